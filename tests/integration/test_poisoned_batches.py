"""One tenant's bad rows fail only that tenant's calls: a real server on port 0, a real
torch embedding that raises on out-of-range ids, real gRPC clients of two tenants in
mixed traffic. Batched and unbatched (DirectScheduler) versions of the same model."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
from mandant.tenancy.keys import hash_key
from mandant_client import AsyncClient, DeadlineExceeded, InvalidInput
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
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0}
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
        # The model has answered: a batch of the bad calls alone is their data's fault
        # (a model that never answered could be failing whatever its inputs).
        await good.infer(model, {"IDS": np.zeros((1, 1), np.int64)})
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


@asynccontextmanager
async def _slow_lookup(tmp_path: Path) -> AsyncIterator[tuple[App, AsyncClient, AsyncClient]]:
    """acme and globex, a quota of 100 rows a day each, and ``slow-lookup``: runs of
    0.5 s, batches of 2 held for their second row far longer than a test; the server
    and a client of each tenant."""
    quota = {"rows_per_day": 100}
    batching = {"max_batch_size": 2, "max_queue_delay_ms": 60_000, "dispatch": "delay"}
    data = {
        "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "grace_s": 0},
        "tenants": [
            {"id": t, "api_keys": [hash_key(DEMO_KEYS[t])], "quota": quota}
            for t in ("acme", "globex")
        ],
        "models": [
            {
                **lookup_model("slow-lookup", batching),
                "factory_args": {"size": SIZE, "width": WIDTH, "seconds": 0.5},
            }
        ],
    }
    async with (
        App(parse_config(data, "test"), tmp_path) as app,
        AsyncClient(f"127.0.0.1:{app.grpc_port}", DEMO_KEYS["acme"]) as acme,
        AsyncClient(f"127.0.0.1:{app.grpc_port}", DEMO_KEYS["globex"]) as globex,
    ):
        yield app, acme, globex


async def _queued_bad_call(app: App, globex: AsyncClient) -> asyncio.Future[Any]:
    """globex's call of an id past the table, once it waits in the queue for a second
    row (the batch leaves with the next call)."""
    bad = asyncio.ensure_future(
        globex.infer("slow-lookup", {"IDS": np.array([[SIZE + 5]], np.int64)})
    )
    deadline = time.monotonic() + 30
    while app.admission.inflight("globex") != 1:
        assert time.monotonic() < deadline and not bad.done(), bad
        await asyncio.sleep(0.01)
    return bad


async def test_an_innocent_call_whose_deadline_passes_while_its_batch_is_split_is_not_charged(
    tmp_path: Path,
) -> None:
    """Acme's call shares a batch with globex's bad ids; the batch fails after 0.5 s and
    is run again call by call, by when acme's 0.3 s have passed: acme's call never ran
    to an answer of its own, and is refunded (d4b9f69 charged it: only a deadline that
    passes while the backend computes the call keeps it charged). Globex's call waits
    for a second row (batches of 2, a delay far longer than the test): the batch
    leaves as acme's call comes, however long that takes."""
    async with _slow_lookup(tmp_path) as (app, acme, globex):
        bad = await _queued_bad_call(app, globex)
        good = acme.infer(
            "slow-lookup", {"IDS": np.array([[1]], np.int64)}, parameters={"timeout": 300_000}
        )
        answers = await asyncio.gather(good, bad, return_exceptions=True)
        assert isinstance(answers[0], DeadlineExceeded), answers
        assert isinstance(answers[1], InvalidInput), answers
        used = await app.admission.quota_used("acme")
    assert used["rows_today"] == 0


async def test_an_innocent_call_cancelled_while_its_part_waits_to_run_again_is_not_charged(
    tmp_path: Path,
) -> None:
    """As above, but acme's caller gives up while its part of the failed batch waits for
    its turn to run again (globex's part runs first): the model never answered it, so
    it is refunded. The failed run had marked it run, and it was charged."""
    async with _slow_lookup(tmp_path) as (app, acme, globex):
        (model,) = app.registry.all()
        queue = model.scheduler._queue  # type: ignore[attr-defined]
        # The model has answered (it works): a failed batch's parts run at their turns.
        # Two calls: a batch of 2 leaves at once.
        await asyncio.gather(
            *(acme.infer("slow-lookup", {"IDS": np.array([[1]], np.int64)}) for _ in range(2))
        )
        bad = await _queued_bad_call(app, globex)
        deadline = time.monotonic() + 30
        good = asyncio.ensure_future(acme.infer("slow-lookup", {"IDS": np.array([[1]], np.int64)}))
        while not any(e.tenant == "acme" and e.split is not None for e in queue):
            assert time.monotonic() < deadline, "acme's part never waited to run again"
            await asyncio.sleep(0)
        if any(e.tenant == "globex" and e.split is not None for e in queue):
            pytest.skip("acme's part runs first here: its caller would be charged rightly")
        good.cancel()
        assert isinstance((await asyncio.gather(bad, return_exceptions=True))[0], InvalidInput)
        while app.admission.inflight("acme"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        used = await app.admission.quota_used("acme")
    assert used["rows_today"] == 2  # the first two calls' rows


async def test_the_id_quoted_for_a_call_sent_without_one_tells_nothing_of_other_calls(
    served: tuple[App, RecordingObserver],
) -> None:
    """A failure's answer quotes the id the server gave a call sent without one. It was
    the pid and a server-wide count: two of globex's failures told it how many calls
    every tenant had made in between (here acme's 5)."""
    app, _ = served
    target = f"127.0.0.1:{app.grpc_port}"
    ids = np.full((1, 1), SIZE, np.int64)  # out of range: the model fails on it
    quoted = []
    async with (
        AsyncClient(target, DEMO_KEYS["acme"]) as acme,
        AsyncClient(target, DEMO_KEYS["globex"]) as globex,
    ):
        for _ in range(2):
            with pytest.raises(InvalidInput) as failed:
                await globex.infer("lookup-direct", {"IDS": ids})
            found = re.search(r"request id ([^)\s]+)", str(failed.value))
            assert found, failed.value
            quoted.append(found.group(1))
            for _ in range(5):
                await acme.infer("lookup-direct", {"IDS": np.zeros((1, 1), np.int64)})
    first, second = quoted
    assert f"{os.getpid():x}" not in first + second
    assert len(first) >= 16 and first != second
    assert int(second, 16) - int(first, 16) not in range(1, 10)
