"""One tenant's bad rows fail only that tenant's calls: a real server on port 0, a real
torch embedding that raises on out-of-range ids, real gRPC clients of two tenants in
mixed traffic. Batched and unbatched (DirectScheduler) versions of the same model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mandant import app as app_module
from mandant.app import App
from mandant.backends.base import Backend
from mandant.config import ModelSpec, parse_config
from mandant.events import Observer
from mandant.scheduling.base import Scheduler
from mandant_client import AsyncClient, InvalidInput
from tests.fakes import RecordingObserver
from tests.servers import DEMO_CONFIG, DEMO_KEYS

SIZE, WIDTH = 100, 4


def lookup_model(name: str, batching: dict[str, Any] | None) -> dict[str, Any]:
    model: dict[str, Any] = {
        "name": name,
        "backend": "torch",
        "factory": "tests.integration.slow_models:lookup",
        "factory_args": {"size": SIZE, "width": WIDTH},
        "inputs": [{"name": "IDS", "datatype": "INT64", "shape": [-1, 1]}],
        "outputs": [{"name": "VECTORS", "datatype": "FP32", "shape": [-1, WIDTH]}],
    }
    if batching is not None:
        model["batching"] = batching
    return model


@pytest.fixture
async def served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[App, RecordingObserver]]:
    recorder = RecordingObserver()
    make_scheduler = app_module.make_scheduler

    def recording(spec: ModelSpec, backend: Backend, observer: Observer | None = None) -> Scheduler:
        return make_scheduler(spec, backend, recorder)

    monkeypatch.setattr(app_module, "make_scheduler", recording)
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0}
    # Hold batches long enough that both tenants' concurrent calls meet in one.
    batching = {"max_batch_size": 64, "max_queue_delay_ms": 50, "dispatch": "delay"}
    data["models"] = [lookup_model("lookup", batching), lookup_model("lookup-direct", None)]
    async with App(parse_config(data, "test"), tmp_path) as app:
        yield app, recorder


@pytest.mark.parametrize("model", ["lookup", "lookup-direct"])
async def test_the_innocent_tenant_gets_only_successes(
    served: tuple[App, RecordingObserver], model: str
) -> None:
    app, recorder = served
    target = f"127.0.0.1:{app.grpc_port}"
    good = AsyncClient(target, api_key=DEMO_KEYS["acme"])
    bad = AsyncClient(target, api_key=DEMO_KEYS["globex"])
    rng = np.random.default_rng(1)
    try:
        for _ in range(3):  # rounds of mixed traffic
            good_ids = [rng.integers(0, SIZE, (1 + n % 3, 1)) for n in range(12)]
            bad_ids = [np.full((1, 1), SIZE + n, np.int64) for n in range(4)]
            good_calls = [good.infer(model, {"IDS": ids}) for ids in good_ids]
            bad_calls = [bad.infer(model, {"IDS": ids}) for ids in bad_ids]
            results = await asyncio.gather(*good_calls, *bad_calls, return_exceptions=True)
            for ids, out in zip(good_ids, results[: len(good_ids)], strict=True):
                assert not isinstance(out, BaseException), out
                np.testing.assert_array_equal(
                    out["VECTORS"], np.repeat(ids.astype(np.float32), WIDTH, axis=1)
                )
            for error in results[len(good_ids) :]:
                assert isinstance(error, InvalidInput), error
                assert "out of range" not in str(error)  # the model's text stays inside
    finally:
        await good.close()
        await bad.close()
    failed = [size for name, size in recorder.failed_batches if name == model]
    if model == "lookup":  # the batcher mixed tenants and still isolated the culprits
        assert failed and any(size > 1 for size in failed)
    else:  # unbatched: each bad call is a failed batch of its own
        assert failed == [1] * 12
