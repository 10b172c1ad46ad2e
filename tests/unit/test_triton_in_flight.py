"""``triton.max_in_flight: auto``: what Triton's model config says it runs at once
(``backends/triton.py``, :func:`runs_at_once`), read from real ModelConfig messages."""

from __future__ import annotations

from typing import Any

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from mandant.backends.triton import runs_at_once


def config(**fields: Any) -> mc.ModelConfig:
    return mc.ModelConfig(name="m", **fields)


def groups(*counts_and_gpus: tuple[int, list[int]]) -> list[mc.ModelInstanceGroup]:
    return [mc.ModelInstanceGroup(count=count, gpus=gpus) for count, gpus in counts_and_gpus]


@pytest.mark.parametrize(
    ("fields", "rows_per_call", "expected"),
    [
        # one instance, no batcher: one call at a time, whatever its max_batch_size
        ({"instance_group": groups((1, [])), "max_batch_size": 64}, 1, 1),
        # two groups of instances, the GPU one on each of its two GPUs: 1 + 2 x 2
        ({"instance_group": groups((1, []), (2, [0, 1]))}, 1, 5),
        # a count of 0 is Triton's default, one
        ({"instance_group": groups((0, []))}, 1, 1),
        # a dynamic batcher joins calls of one row up to its max_batch_size
        (
            {
                "instance_group": groups((2, [])),
                "max_batch_size": 64,
                "dynamic_batching": mc.ModelDynamicBatching(),
            },
            1,
            128,
        ),
        # ... and Mandant's batches of 16 rows four at a time
        (
            {
                "instance_group": groups((1, [])),
                "max_batch_size": 64,
                "dynamic_batching": mc.ModelDynamicBatching(),
            },
            16,
            4,
        ),
        # ... and batches larger than it one at a time (sent in calls of at most 64)
        (
            {
                "instance_group": groups((1, [])),
                "max_batch_size": 64,
                "sequence_batching": mc.ModelSequenceBatching(),
            },
            128,
            1,
        ),
        # an ensemble: its steps' models run it, the config does not say
        ({"platform": "ensemble", "max_batch_size": 8}, 1, None),
        # no instance groups (a server that leaves them out)
        ({"max_batch_size": 8}, 1, None),
    ],
)
def test_what_triton_runs_at_once(
    fields: dict[str, Any], rows_per_call: int, expected: int | None
) -> None:
    assert runs_at_once(config(**fields), rows_per_call) == expected
