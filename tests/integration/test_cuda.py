"""The torch backend on CUDA devices (skipped without one): results equal the CPU's,
each instance runs on its own stream, batches running at once on several instances
get their own rows, staging buffers are pinned and reused, a failing batch leaves
its instance usable, instances spread over several GPUs where there are, and their
threads keep the event loop's priority whatever ``compute_nice`` says."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mandant.backends.staging import StagingBuffers
from mandant.backends.torch import ModelLoadError, TorchBackend, pinned_array
from mandant.config import BatchingConfig, ModelSpec
from mandant.scheduling.batcher import DynamicBatcher
from mandant.types import InferRequest, ModelKey, Tenant, TensorSpec
from tests.unit.torch_models import kept_after_the_next_call

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HELPERS = "tests.unit.torch_models"
VECTOR_IN = (TensorSpec("X", "FP32", (-1,)),)
VECTOR_OUT = (TensorSpec("Y", "FP32", (-1,)),)


def spec(devices: tuple[str, ...], instances: int = 1, **fields: Any) -> ModelSpec:
    base: dict[str, Any] = {
        "name": "m",
        "version": "1",
        "tenant": None,
        "backend": "torch",
        "path": None,
        "factory": None,
        "factory_args": {},
        "weights_init": None,
        "devices": devices,
        "instances": instances,
        "inputs": VECTOR_IN,
        "outputs": VECTOR_OUT,
        "batching": None,
        "triton": None,
    }
    return ModelSpec(**{**base, **fields})


def classifier_spec(path: Path, devices: tuple[str, ...], instances: int = 1) -> ModelSpec:
    return spec(
        devices,
        instances,
        name="classifier",
        path=path,
        factory="mandant.demo.models:classifier",
        factory_args={"seed": 0},
        weights_init="mandant.demo.models:build_classifier_weights",
        inputs=(TensorSpec("INPUT0", "FP32", (-1, 256)),),
        outputs=(TensorSpec("OUTPUT0", "FP32", (-1, 16)),),
    )


async def infer(model: ModelSpec, x: np.ndarray) -> np.ndarray:
    backend = TorchBackend(model)
    await backend.start()
    try:
        return (await backend.infer({"INPUT0": x}))["OUTPUT0"]
    finally:
        await backend.aclose()


def every_gpu() -> tuple[str, ...]:
    return tuple(f"cuda:{n}" for n in range(torch.cuda.device_count()))


@pytest.mark.parametrize("device", ["cuda", "auto"])
async def test_classifier_on_cuda_matches_cpu(tmp_path: Path, device: str) -> None:
    path = tmp_path / "classifier.safetensors"
    x = np.random.default_rng(0).standard_normal((64, 256), dtype=np.float32)
    x.setflags(write=False)  # as the codec hands inputs over
    on_cpu = await infer(classifier_spec(path, ("cpu",)), x)
    backend = TorchBackend(classifier_spec(path, (device,), instances=2))
    assert backend.devices == every_gpu()  # cuda and auto: every visible GPU
    assert backend.max_concurrency == 2 * len(every_gpu())
    on_cuda = await infer(classifier_spec(path, (device,), instances=2), x)
    assert on_cuda.dtype == np.float32
    assert on_cuda.shape == (64, 16)
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)


async def run_together(backend: TorchBackend, calls: int) -> list[dict[str, np.ndarray]]:
    await backend.start()
    try:
        return await asyncio.gather(
            *(backend.infer({"X": np.full(3, n, np.float32)}) for n in range(calls))
        )
    finally:
        await backend.aclose()


async def test_a_host_buffer_a_gpu_model_keeps_is_answered_as_a_copy() -> None:
    """Its output is a CPU tensor already, which the copy to the host leaves as it is:
    it passed for a fresh copy, and the next call wrote into the answer."""
    backend = TorchBackend(spec(("cuda:0",), factory=f"{HELPERS}:keeps_on_host"))
    first = await kept_after_the_next_call(backend, "Y")
    np.testing.assert_array_equal(first, np.full(4, 2, np.float32))


async def test_two_instances_on_one_device_run_at_once_on_their_own_streams() -> None:
    seen: list[tuple[int, str]] = []
    barrier = threading.Barrier(2, timeout=30)  # both calls inside forward at once
    factory_args = {"barrier": barrier, "seen": seen}
    backend = TorchBackend(
        spec(("cuda:0",), 2, factory=f"{HELPERS}:stream_rendezvous", factory_args=factory_args)
    )
    outs = await run_together(backend, 2)
    assert [out["Y"].tolist() for out in outs] == [[0.0] * 3, [2.0] * 3]
    streams = {stream for stream, _ in seen}
    assert len(streams) == 2
    assert torch.cuda.default_stream(0).cuda_stream not in streams
    assert {device for _, device in seen} == {"cuda:0"}


async def test_instances_spread_over_the_listed_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    seen: list[tuple[int, str]] = []
    barrier = threading.Barrier(2, timeout=30)
    factory_args = {"barrier": barrier, "seen": seen}
    backend = TorchBackend(
        spec(
            ("cuda:0", "cuda:1"),
            1,
            factory=f"{HELPERS}:stream_rendezvous",
            factory_args=factory_args,
        )
    )
    assert backend.max_concurrency == 2
    await run_together(backend, 2)
    assert {device for _, device in seen} == {"cuda:0", "cuda:1"}


async def test_a_gpu_that_is_not_there_is_refused_at_start() -> None:
    missing = f"cuda:{torch.cuda.device_count()}"
    backend = TorchBackend(spec((missing,), factory="mandant.demo.models:echo"))
    with pytest.raises(ModelLoadError, match=f"{missing} requested but"):
        await backend.start()


async def test_concurrent_batches_on_several_instances_get_their_own_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "classifier.safetensors"
    model = classifier_spec(path, ("cuda",), instances=3)
    reference = TorchBackend(classifier_spec(path, ("cpu",)))
    backend = TorchBackend(model)
    config = BatchingConfig(max_batch_size=32, max_queue_delay_ms=1, dispatch="eager")
    batcher = DynamicBatcher(backend, config, "classifier")
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((int(rng.integers(1, 9)), 256), np.float32) for _ in range(400)]
    await reference.start()
    await backend.start()
    await batcher.start()
    try:
        outs = await asyncio.gather(*(batcher.submit(request(x, n)) for n, x in enumerate(inputs)))
        expected = [(await reference.infer({"INPUT0": x}))["OUTPUT0"] for x in inputs]
    finally:
        await batcher.aclose()
        await backend.aclose()
        await reference.aclose()
    for got, want in zip(outs, expected, strict=True):
        np.testing.assert_allclose(got["OUTPUT0"], want, rtol=1e-4, atol=1e-4)


def request(x: np.ndarray, number: int) -> InferRequest:
    return InferRequest(
        tenant=Tenant(f"t{number % 3}"),
        model=ModelKey("classifier", "1"),
        inputs={"INPUT0": x},
        outputs=("OUTPUT0",),
        request_id=str(number),
        rows=x.shape[0],
    )


async def test_staging_buffers_are_pinned_and_reused_across_batches(tmp_path: Path) -> None:
    view = StagingBuffers(pinned_array).take(np.dtype(np.float32), (8, 256))
    assert torch.from_numpy(view).is_pinned()
    backend = TorchBackend(classifier_spec(tmp_path / "c.safetensors", ("cuda:0",)))
    rng = np.random.default_rng(2)
    await backend.start()
    try:
        assert backend.staging_bytes == 0
        await backend.infer_batch([{"INPUT0": rng.standard_normal((32, 256), np.float32)}] * 2)
        held = backend.staging_bytes
        assert held >= 64 * 256 * 4
        for rows in (64, 1, 17, 64, 3):
            parts = [{"INPUT0": rng.standard_normal((rows, 256), np.float32)}]
            await backend.infer_batch(parts)
            await backend.infer(parts[0])
        assert backend.staging_bytes == held  # the same buffer every time
    finally:
        await backend.aclose()


async def test_a_batch_the_model_fails_on_leaves_its_instance_and_buffers_usable() -> None:
    backend = TorchBackend(spec(("cuda:0",), factory=f"{HELPERS}:no_negatives"))
    await backend.start()
    try:
        good = {"X": np.arange(4, dtype=np.float32)}
        assert (await backend.infer(good))["Y"].tolist() == [1.0, 2.0, 3.0, 4.0]
        held = backend.staging_bytes
        with pytest.raises(ValueError, match="negative"):
            await backend.infer_batch([good, {"X": -np.ones(2, np.float32)}])
        assert (await backend.infer(good))["Y"].tolist() == [1.0, 2.0, 3.0, 4.0]
        assert backend.staging_bytes == held
    finally:
        await backend.aclose()


async def test_instances_on_cuda_keep_the_event_loops_priority(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    backend = TorchBackend(classifier_spec(path, ("cuda:0",)), compute_nice=5)
    await backend.start()
    try:
        await backend.infer({"INPUT0": np.ones((2, 256), np.float32)})  # runs in the pool
        [worker] = [t for t in threading.enumerate() if t.name.startswith("torch-")]
        assert worker.native_id is not None
        loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert os.getpriority(os.PRIO_PROCESS, worker.native_id) == loop_nice
    finally:
        await backend.aclose()
