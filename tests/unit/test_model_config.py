"""A model's spec as Triton's ModelConfig: Triton's batch-dimension convention, data
types, the batching section, instance groups and version policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mandant.config import ModelSpec, parse_config
from mandant.config.models import (
    MAX_BATCH_SIZE,
    MAX_DIMENSION,
    MAX_INSTANCES,
    MAX_LATEST_VERSIONS,
    MAX_QUEUE_DELAY_MS,
)
from mandant.errors import ConfigError
from mandant.registry import Model, ModelRegistry
from mandant.scheduling.direct import DirectScheduler
from mandant.transport.grpc.model_config import TRITON_DATATYPES, model_config
from mandant.types import DATATYPES, Tenant
from mandant_client._proto import model_config_pb2 as mc
from tests.fakes import FakeBackend

ACME = Tenant("acme")


class DeviceBackend(FakeBackend):
    """A backend that says where it runs (as the torch backend does)."""

    devices = ("cuda:1",)


def _models(*models: dict[str, Any], backend: type[FakeBackend] = FakeBackend) -> ModelRegistry:
    config = parse_config({"tenants": [{"id": "acme"}], "models": list(models)})

    def make(spec: ModelSpec) -> FakeBackend:
        return backend(spec)

    return ModelRegistry(config.model_specs(Path("/m")), make, lambda s, b: DirectScheduler(b))


def _config(registry: ModelRegistry, name: str) -> mc.ModelConfig:
    model: Model = registry.resolve(ACME, name)
    return model_config(model)


def _entry(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "factory": "m:f",
        "inputs": [{"name": "IN", "datatype": "BYTES", "shape": [-1, 3, -1]}],
        "outputs": [{"name": "OUT", "datatype": "INT64", "shape": [-1, 2]}],
        **extra,
    }


def test_every_v2_datatype_has_a_triton_type() -> None:
    assert set(TRITON_DATATYPES) == set(DATATYPES)
    assert set(TRITON_DATATYPES.values()) <= set(mc.DataType.keys())
    assert TRITON_DATATYPES["BYTES"] == "TYPE_STRING"
    assert TRITON_DATATYPES["FP32"] == "TYPE_FP32"


def test_without_batching_dims_keep_the_batch_dimension_and_max_batch_size_is_0() -> None:
    config = _config(_models(_entry("plain", device="cpu", instances=3)), "plain")
    assert config.name == "plain" and config.backend == "torch"
    assert config.platform == "fake"
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("IN", mc.TYPE_STRING, [-1, 3, -1])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("OUT", mc.TYPE_INT64, [-1, 2])
    ]
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_CPU, 3, [])


def test_with_batching_dims_drop_the_batch_dimension() -> None:
    batching = {"max_batch_size": 16, "max_queue_delay_ms": 2.5, "preferred_batch_sizes": [4, 8]}
    config = _config(_models(_entry("batched", batching=batching)), "batched")
    assert config.max_batch_size == 16
    assert [list(t.dims) for t in config.input] == [[3, -1]]
    assert [list(t.dims) for t in config.output] == [[2]]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500


def test_instance_group_is_on_the_device_the_backend_runs_on() -> None:
    config = _config(_models(_entry("gpu", instances=2), backend=DeviceBackend), "gpu")
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_GPU, 2, [1])
    auto = _config(_models(_entry("auto")), "auto").instance_group[0]
    assert auto.kind == mc.ModelInstanceGroup.KIND_AUTO


class TwoGpuBackend(FakeBackend):
    devices = ("cuda:0", "cuda:2")


def test_instance_group_lists_every_gpu_the_instances_are_on() -> None:
    config = _config(_models(_entry("gpus", instances=3), backend=TwoGpuBackend), "gpus")
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (
        mc.ModelInstanceGroup.KIND_GPU,
        3,
        [0, 2],
    )
    # A backend that does not say: the configured placement ("cuda" is every GPU).
    listed = _config(_models(_entry("listed", devices=["cuda:1", "cuda:3"])), "listed")
    assert list(listed.instance_group[0].gpus) == [1, 3]
    every = _config(_models(_entry("every", device="cuda")), "every").instance_group[0]
    assert (every.kind, list(every.gpus)) == (mc.ModelInstanceGroup.KIND_GPU, [])


def test_version_policy_is_the_configured_one() -> None:
    """The default (no ``version_policy``) serves every configured version: ``all``."""
    config = _config(_models(_entry("m", version=1), _entry("m", version=3)), "m")
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    latest = {"latest": 2}
    registry = _models(*(_entry("m", version=v, version_policy=latest) for v in (1, 2, 3)))
    policy = _config(registry, "m").version_policy
    assert policy.WhichOneof("policy_choice") == "latest"
    assert policy.latest.num_versions == 2
    specific = {"specific": [3, 1]}
    registry = _models(*(_entry("m", version=v, version_policy=specific) for v in (1, 2, 3)))
    policy = _config(registry, "m").version_policy
    assert list(policy.specific.versions) == [1, 3]


def test_a_configuration_at_every_bound_still_has_a_model_config() -> None:
    """The largest values a configuration may hold fit Triton's ModelConfig message;
    beyond them (``max_batch_size: 2**40``, ``max_queue_delay_ms: 1e300``, a dimension
    of 2**63) a load succeeded and every tenant's ModelConfig of the model failed
    INTERNAL (ValueError: Value out of range)."""
    batching = {
        "max_batch_size": MAX_BATCH_SIZE,
        "max_queue_delay_ms": MAX_QUEUE_DELAY_MS,
        "preferred_batch_sizes": [MAX_BATCH_SIZE],
    }
    entry = _entry(
        "edge",
        batching=batching,
        instances=MAX_INSTANCES,
        version_policy={"latest": MAX_LATEST_VERSIONS},
    )
    entry["inputs"] = [{"name": "IN", "datatype": "FP32", "shape": [-1, MAX_DIMENSION]}]
    config = _config(_models(entry), "edge")
    assert config.max_batch_size == MAX_BATCH_SIZE
    assert list(config.input[0].dims) == [MAX_DIMENSION]
    assert config.dynamic_batching.max_queue_delay_microseconds == MAX_QUEUE_DELAY_MS * 1000
    assert config.version_policy.latest.num_versions == MAX_LATEST_VERSIONS


@pytest.mark.parametrize(
    ("triton", "where"),
    [
        ({"timeout_s": 1e10}, "timeout_s"),  # its deadline overflowed: every call failed
        ({"timeout_s": float("inf")}, "timeout_s"),
        ({"health_interval_s": 1e-300}, "health_interval_s"),  # a poll in a busy loop
    ],
)
def test_triton_settings_a_backend_cannot_run_with_are_refused(
    triton: dict[str, Any], where: str
) -> None:
    entry = {
        "name": "t",
        "backend": "triton",
        "triton": {"url": "127.0.0.1:1", "model": "m", **triton},
    }
    with pytest.raises(ConfigError) as info:
        parse_config({"tenants": [{"id": "acme"}], "models": [entry]})
    [(path, _)] = info.value.errors
    assert path == f"models.0.triton.{where}"


@pytest.mark.parametrize(
    ("change", "where", "reason"),
    [
        ({"batching": {"max_batch_size": MAX_BATCH_SIZE + 1}}, "batching.max_batch_size", "less"),
        ({"batching": {"max_queue_delay_ms": 1e300}}, "batching.max_queue_delay_ms", "less"),
        ({"batching": {"preferred_batch_sizes": [0]}}, "batching.preferred_batch_sizes.0",
         "greater than 0"),
        ({"instances": 10**9}, "instances", "less than or equal to 256"),
        ({"inputs": [{"name": "IN", "datatype": "FP32", "shape": [1 << 63]}]},
         "inputs.0.shape", "at most"),
        ({"inputs": [{"name": "\ud800", "datatype": "FP32", "shape": [1]}]},
         "inputs.0.name", "valid Unicode"),
        ({"outputs": [{"name": "", "datatype": "FP32", "shape": [1]}]},
         "outputs.0.name", "a tensor has a name"),
        ({"version_policy": {"latest": MAX_LATEST_VERSIONS + 1}}, "version_policy.latest",
         "less"),
        ({"version_policy": {"specific": [1 << 63]}}, "version_policy.specific.0", "less"),
        # every call failed, charged to its caller (inputs) or UNAVAILABLE (outputs)
        ({"inputs": [{"name": "IN", "datatype": "FP32", "shape": [1]}] * 2}, "inputs",
         "given twice: IN"),
        ({"outputs": [{"name": "OUT", "datatype": "FP32", "shape": [1]}] * 2}, "outputs",
         "given twice: OUT"),
    ],
)  # fmt: skip
def test_values_beyond_what_a_model_config_holds_are_refused(
    change: dict[str, Any], where: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"tenants": [{"id": "acme"}], "models": [_entry("m", **change)]})
    [(path, message)] = info.value.errors
    assert path == f"models.0.{where}" and reason in message
