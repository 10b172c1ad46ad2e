"""The batcher's edge cases: empty requests under FIFO, and a batch that breaks off
while taken — every request is answered, never left waiting."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from mandant.config import BatchingConfig
from mandant.errors import Unavailable
from mandant.scheduling.batcher import DynamicBatcher
from mandant.scheduling.policy import FifoQueue, TakeFailed
from tests.fakes import FakeClock, GatedBackend, RecordingObserver, request, settle


async def make(backend: GatedBackend, **config: Any) -> DynamicBatcher:
    batcher = DynamicBatcher(
        backend, BatchingConfig(**config), "m", RecordingObserver(), FakeClock()
    )
    await batcher.start()
    return batcher


def empty(tenant: str) -> Any:
    return request(tenant=tenant, x=np.zeros((0, 4), np.float32))


@pytest.mark.parametrize("dispatch", ["eager", "adaptive"])
async def test_fifo_answers_a_batch_holding_a_tenant_s_empty_requests(dispatch: str) -> None:
    """Tenant a's 2 rows, then its 0-row request, then b's row, queued behind a busy
    slot: the batch of all three is answered (the FIFO queue's count of a raised
    KeyError when taking them, and the whole batch — b's request too — was lost)."""
    backend = GatedBackend()
    batcher = await make(backend, max_batch_size=8, policy="fifo", dispatch=dispatch)
    blocker = asyncio.create_task(batcher.submit(request(tenant="a")))
    await settle()
    reqs = [request(tenant="a", rows=2), empty("a"), empty("a"), request(tenant="b")]
    tasks = [asyncio.create_task(batcher.submit(r)) for r in reqs]
    await settle()
    backend.release()
    await settle()
    backend.release()
    outs = await asyncio.wait_for(asyncio.gather(blocker, *tasks), 1.0)
    assert [out["OUT0"].shape[0] for out in outs[1:]] == [2, 0, 0, 1]
    assert batcher.queued_rows_of("a") == batcher.queued_rows_of("b") == 0
    await batcher.aclose()


async def test_fifo_withdraws_a_tenant_s_empty_requests() -> None:
    """Cancelled callers leave the FIFO queue whatever their rows (removing a tenant's
    second empty request raised KeyError)."""
    backend = GatedBackend()
    batcher = await make(backend, max_batch_size=8, policy="fifo", dispatch="eager")
    blocker = asyncio.create_task(batcher.submit(request(tenant="a")))
    await settle()
    tasks = [asyncio.create_task(batcher.submit(r)) for r in (request(tenant="a"), empty("a"))]
    tasks.append(asyncio.create_task(batcher.submit(empty("a"))))
    await settle()
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert batcher.queued_rows == batcher.queued_rows_of("a") == 0
    backend.release()
    await blocker
    await batcher.aclose()


async def test_a_batch_that_breaks_off_while_taken_is_answered_with_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong in taking a batch, the requests already taken are answered
    (an internal error, logged once) and later ones still run."""
    backend = GatedBackend()
    batcher = await make(backend, max_batch_size=8, policy="fifo", dispatch="eager")
    blocker = asyncio.create_task(batcher.submit(request(tenant="a")))
    await settle()
    tasks = [asyncio.create_task(batcher.submit(request(tenant=t))) for t in "ab"]
    await settle()
    _break_fifo_take(monkeypatch)
    backend.release()
    await settle()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.0)
    assert all(type(r) is RuntimeError for r in results)  # INTERNAL, no detail sent
    assert sum("answering them with an internal error" in r.message for r in caplog.records) == 1
    monkeypatch.undo()
    later = asyncio.create_task(batcher.submit(request(tenant="b")))
    await settle()
    backend.release()
    await asyncio.wait_for(asyncio.gather(blocker, later), 1.0)
    await batcher.aclose()


async def test_a_close_whose_take_breaks_off_answers_every_queued_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Closing (an unload) with a take that breaks off: the requests it took get an
    internal error, every other queued one is answered Unavailable (they were left
    to their deadlines: the expiry timer is disarmed on close)."""
    backend = GatedBackend()
    batcher = await make(backend, max_batch_size=1, policy="fifo", dispatch="eager")
    blocker = asyncio.create_task(batcher.submit(request(tenant="a")))
    await settle()
    queued = [asyncio.create_task(batcher.submit(request(tenant=t))) for t in "abab"]
    await settle()
    _break_fifo_take(monkeypatch)
    closing = asyncio.create_task(batcher.aclose())
    results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 1.0)
    assert type(results[0]) is RuntimeError  # the one taken
    assert all(isinstance(r, Unavailable) for r in results[1:])
    backend.release()
    await asyncio.wait_for(asyncio.gather(blocker, closing), 1.0)


def _break_fifo_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every FIFO take break off after taking its batch (as a bug would)."""
    take = FifoQueue.take

    def broken(self: FifoQueue[Any], room: int) -> list[Any]:
        try:
            raise RuntimeError("a bug")
        except RuntimeError as exc:
            raise TakeFailed(take(self, room)) from exc

    monkeypatch.setattr(FifoQueue, "take", broken)
