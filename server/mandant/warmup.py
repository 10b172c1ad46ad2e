"""Warm-up: the requests a model version's ``warmup`` entries describe, run on its
backend after it loaded and before it is ready (Triton's ``model_warmup``). They go to
the backend directly, not through the scheduler: they are no tenant's calls, so no
statistics, metrics or quotas see them. One that raises fails the load."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from mandant.backends.base import Backend
from mandant.config import WarmupConfig, WarmupTensorConfig
from mandant.types import DATATYPES


class WarmupFailed(RuntimeError):
    """A warm-up request raised: the model version does not become ready (the load
    fails with this as its reason; never sent to a caller as a status)."""


def warmup_tensor(tensor: WarmupTensorConfig, rng: np.random.Generator) -> np.ndarray:
    """The array ``tensor`` describes: its ``value`` (zeros by default) over its shape,
    or random numbers (floats in [0, 1), integers 0 or 1, booleans)."""
    dtype = DATATYPES[tensor.datatype]
    if tensor.datatype == "BYTES":
        value = tensor.value if tensor.value is not None else b""
        data = value.encode() if isinstance(value, str) else str(value).encode()
        array = np.empty(tensor.shape, dtype=np.object_)
        array.fill(data)
        return array
    if tensor.random:
        if dtype.kind == "f":
            return rng.random(tensor.shape).astype(dtype)
        return rng.integers(0, 2, tensor.shape).astype(dtype)
    return np.full(tensor.shape, tensor.value or 0, dtype=dtype)


def warmup_inputs(request: WarmupConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The inputs of one warm-up request, by name (sent ``count`` times)."""
    return {name: warmup_tensor(tensor, rng) for name, tensor in request.inputs.items()}


async def warm_up(backend: Backend, requests: Sequence[WarmupConfig], seed: int = 0) -> None:
    """Run every warm-up request ``count`` times; WarmupFailed says which one raised.
    Its tensors are made once, in a thread: made on the event loop (2²⁴ random values,
    each of ``count`` times), a model's load held every tenant's calls for seconds."""
    rng = np.random.default_rng(seed)
    for index, request in enumerate(requests):
        inputs = await asyncio.to_thread(warmup_inputs, request, rng)
        for _ in range(request.count):
            try:
                await backend.infer(inputs)
            except Exception as exc:
                raise WarmupFailed(
                    f"warm-up request {index} failed: {type(exc).__name__}: {exc}"
                ) from exc
