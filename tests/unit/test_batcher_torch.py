"""A batched torch model whose answer has the wrong rows for one request's data: only
that request fails (UNAVAILABLE, alone); its batch-mates, other tenants', are answered."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from torch import nn

from mandant.backends.torch import BatchOutputMismatch, TorchBackend
from mandant.config import BatchingConfig, ModelSpec
from mandant.errors import Unavailable
from mandant.scheduling.batcher import DynamicBatcher
from mandant.types import InferRequest, ModelKey, Tenant, TensorSpec
from tests.fakes import RecordingObserver, settle

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable:UserWarning")


class _DropNegative(nn.Module):
    """Drops the rows holding a negative value: a data-dependent row count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[(x >= 0).all(dim=1)] * 2


def drop_negative() -> nn.Module:
    return _DropNegative()


def spec(max_batch_size: int = 8) -> ModelSpec:
    return ModelSpec(
        name="m",
        version="1",
        tenant=None,
        backend="torch",
        path=None,
        factory=f"{__name__}:drop_negative",
        factory_args={},
        weights_init=None,
        devices=("cpu",),
        instances=1,
        inputs=(TensorSpec("X", "FP32", (-1, 2)),),
        outputs=(TensorSpec("Y", "FP32", (-1, 2)),),
        batching=BatchingConfig(max_batch_size=max_batch_size),
        triton=None,
    )


def call(tenant: str, x: np.ndarray) -> InferRequest:
    return InferRequest(
        tenant=Tenant(tenant),
        model=ModelKey("m", "1"),
        inputs={"X": x},
        outputs=("Y",),
        request_id=f"{tenant}-{float(x.sum())}",
        deadline=None,
        priority=0,
        rows=int(x.shape[0]),
    )


async def started_batcher(
    backend: TorchBackend, observer: RecordingObserver | None = None
) -> DynamicBatcher:
    """Batches of up to 8 rows, held 50 ms for company: requests sent at once share one."""
    batcher = DynamicBatcher(
        backend,
        BatchingConfig(max_batch_size=8, dispatch="delay", max_queue_delay_ms=50),
        "m",
        observer or RecordingObserver(),
    )
    await batcher.start()
    return batcher


async def test_a_batch_with_the_wrong_rows_is_a_split_not_a_verdict() -> None:
    backend = TorchBackend(spec())
    await backend.start()
    with pytest.raises(BatchOutputMismatch, match="1 rows where 2"):
        await backend.infer_batch(
            [{"X": np.ones((1, 2), np.float32)}, {"X": -np.ones((1, 2), np.float32)}]
        )
    with pytest.raises(Unavailable):  # alone, as before
        await backend.infer({"X": -np.ones((1, 2), np.float32)})
    await backend.aclose()


async def test_only_the_request_whose_data_breaks_the_rows_fails() -> None:
    backend = TorchBackend(spec())
    await backend.start()
    observer = RecordingObserver()
    batcher = await started_batcher(backend, observer)
    good_a = call("a", np.ones((2, 2), np.float32))
    good_a2 = call("a", np.full((1, 2), 5, np.float32))
    bad_b = call("b", np.full((1, 2), -1, np.float32))
    good_c = call("c", np.full((1, 2), 3, np.float32))
    tasks = [asyncio.create_task(batcher.submit(r)) for r in (good_a, good_a2, bad_b, good_c)]
    await settle()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert isinstance(results[2], Unavailable)
    for req, out in zip(
        (good_a, good_a2, good_c), (results[0], results[1], results[3]), strict=True
    ):
        assert isinstance(out, dict)
        np.testing.assert_array_equal(out["Y"], req.inputs["X"] * 2)
    assert observer.failed_batches == [("m", 5)]
    await batcher.aclose()
    await backend.aclose()


class _Widen(nn.Module):
    """Answers 3 columns for each row: a model whose configuration declares 2."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _Widen.calls += 1
        return torch.cat([x, x[:, :1]], dim=1)


def widen() -> nn.Module:
    return _Widen()


async def test_a_misconfigured_model_is_unavailable_to_a_batch_after_few_runs() -> None:
    """Its every answer mismatches the declared outputs: after the batch, its 2 tenants'
    parts and the first and the last request of each of its 2 tenants alone all fail, every
    request is answered UNAVAILABLE (it used to run 2n - 1 times: 15 for 8 requests)."""
    backend = TorchBackend(spec().model_copy(update={"factory": f"{__name__}:widen"}))
    await backend.start()
    batcher = await started_batcher(backend)
    _Widen.calls = 0
    reqs = [call(t, np.full((1, 2), n, np.float32)) for n, t in enumerate("abababab")]
    tasks = [asyncio.create_task(batcher.submit(r)) for r in reqs]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert all(isinstance(r, Unavailable) for r in results), results
    assert _Widen.calls == 3 + 2 * 2
    await batcher.aclose()
    await backend.aclose()


class _DropsAnOutput(nn.Module):
    """Answers Y and Z, but only Y when a row holds a negative value: outputs that
    depend on one request's data."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if bool((x < 0).any()):
            return {"Y": x * 2}
        return {"Y": x * 2, "Z": x}


def drops_an_output() -> nn.Module:
    return _DropsAnOutput()


async def test_only_the_request_whose_data_drops_an_output_fails() -> None:
    """A missing output (or a wrong count of them) in a batch's answer is split on, as
    wrong rows are: it failed every batch-mate UNAVAILABLE."""
    two = (TensorSpec("Y", "FP32", (-1, 2)), TensorSpec("Z", "FP32", (-1, 2)))
    backend = TorchBackend(
        spec().model_copy(update={"factory": f"{__name__}:drops_an_output", "outputs": two})
    )
    await backend.start()
    batcher = await started_batcher(backend)
    good = call("a", np.ones((1, 2), np.float32))
    bad = call("b", -np.ones((1, 2), np.float32))
    try:
        tasks = [asyncio.create_task(batcher.submit(r)) for r in (good, bad)]
        await settle()
        answered, refused = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), 10
        )
    finally:
        await batcher.aclose()
        await backend.aclose()
    assert isinstance(refused, Unavailable)
    assert isinstance(answered, dict)
    np.testing.assert_array_equal(answered["Y"], good.inputs["X"] * 2)
