"""The demo classifier on a CUDA device gives what it gives on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mandant.backends.torch import TorchBackend
from mandant.config import ModelSpec
from mandant.types import TensorSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def classifier_spec(path: Path, device: str, instances: int = 1) -> ModelSpec:
    return ModelSpec(
        name="classifier",
        version="1",
        tenant=None,
        backend="torch",
        path=path,
        factory="mandant.demo.models:classifier",
        factory_args={"seed": 0},
        weights_init="mandant.demo.models:build_classifier_weights",
        device=device,
        instances=instances,
        inputs=(TensorSpec("INPUT0", "FP32", (-1, 256)),),
        outputs=(TensorSpec("OUTPUT0", "FP32", (-1, 16)),),
        batching=None,
        triton=None,
    )


async def infer(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    backend = TorchBackend(spec)
    await backend.start()
    try:
        return (await backend.infer({"INPUT0": x}))["OUTPUT0"]
    finally:
        await backend.aclose()


@pytest.mark.parametrize("device", ["cuda", "auto"])
async def test_classifier_on_cuda_matches_cpu(tmp_path: Path, device: str) -> None:
    path = tmp_path / "classifier.safetensors"
    x = np.random.default_rng(0).standard_normal((64, 256), dtype=np.float32)
    x.setflags(write=False)  # as the codec hands inputs over
    on_cpu = await infer(classifier_spec(path, "cpu"), x)
    backend = TorchBackend(classifier_spec(path, device, instances=2))
    assert backend.device == "cuda"
    on_cuda = await infer(classifier_spec(path, device, instances=2), x)
    assert on_cuda.dtype == np.float32
    assert on_cuda.shape == (64, 16)
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-4, atol=1e-4)
