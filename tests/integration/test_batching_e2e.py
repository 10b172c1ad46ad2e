"""Dynamic batching end to end: the demo server on port 0, called over real gRPC by
``mandant_client.AsyncClient`` from several tenants at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mandant import app as app_module
from mandant.app import App
from mandant.backends.base import Backend
from mandant.config import ModelSpec
from mandant.demo.models import classifier
from mandant.events import Observer
from mandant.scheduling.base import Scheduler
from mandant_client import AsyncClient, InvalidInput
from tests.fakes import RecordingObserver
from tests.servers import DEMO_KEYS, demo_config


@pytest.fixture
async def served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[App, RecordingObserver]]:
    recorder = RecordingObserver()
    make_scheduler = app_module.make_scheduler

    def recording(spec: ModelSpec, backend: Backend, observer: Observer | None = None) -> Scheduler:
        return make_scheduler(spec, backend, recorder)

    monkeypatch.setattr(app_module, "make_scheduler", recording)
    # Hold batches open long enough that all of this test's concurrent calls meet in
    # the queue, whatever the machine's speed (the default, adaptive, holds a batch only
    # while more requests are expected, and never longer than max_queue_delay_ms).
    batching = {"max_batch_size": 64, "max_queue_delay_ms": 250, "dispatch": "delay"}
    async with App(demo_config(batching=batching), tmp_path) as app:
        yield app, recorder


def expected(seed: int, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return classifier(seed)(torch.from_numpy(x)).numpy()


async def test_concurrent_tenants_are_batched_and_get_their_own_outputs(
    served: tuple[App, RecordingObserver],
) -> None:
    app, recorder = served
    target = f"127.0.0.1:{app.grpc_port}"
    rng = np.random.default_rng(0)
    clients = {t: AsyncClient(target, api_key=key) for t, key in DEMO_KEYS.items()}
    # Each client's connection up first: in a CI run every tenant's calls left in a
    # batch of their own, its connection set up under load after the others' calls
    # had waited out the queue delay (100 ms then).
    await asyncio.gather(*(client.server_live() for client in clients.values()))
    calls: list[tuple[str, np.ndarray, Any]] = []
    # 20 calls of 1 or 2 rows per tenant: fewer rows than max_batch_size per model, so
    # the calls that meet in the queue (250 ms) leave in one batch per model.
    for n in range(60):
        tenant = ("acme", "initech", "globex")[n % 3]
        x = rng.standard_normal((1 + n % 2, 256), dtype=np.float32)
        calls.append((tenant, x, clients[tenant].infer("classifier", {"INPUT0": x})))
    try:
        results = await asyncio.gather(*(call for _, _, call in calls))
    finally:
        for client in clients.values():
            await client.close()

    for (tenant, x, _), out in zip(calls, results, strict=True):
        seed = 1 if tenant == "globex" else 0  # globex has its tuned variant
        np.testing.assert_allclose(out["OUTPUT0"], expected(seed, x), rtol=1e-4, atol=1e-5)

    sizes = [size for _, size, _, _ in recorder.batches]
    assert max(sizes) > 3 and max(sizes) <= 64  # several requests per batch
    mixed = [shares for _, _, _, shares in recorder.batches if {"acme", "initech"} <= shares.keys()]
    assert mixed, f"the shared model mixes tenants in one batch: {recorder.batches}"
    for _, _, _, shares in recorder.batches:
        assert "globex" not in shares or set(shares) == {"globex"}  # never with its base
    timings = [t for t in recorder.timings if t[1] == "classifier"]
    assert len(timings) == len(calls)
    assert all(queue_s >= 0 and compute_s > 0 for _, _, queue_s, compute_s in timings)


async def test_a_request_over_max_batch_size_is_invalid_argument(
    served: tuple[App, RecordingObserver],
) -> None:
    app, _ = served
    async with AsyncClient(f"127.0.0.1:{app.grpc_port}", api_key="acme-demo-key") as client:
        with pytest.raises(InvalidInput, match="max_batch_size"):
            await client.infer("classifier", {"INPUT0": np.zeros((65, 256), np.float32)})
