"""DirectScheduler (unbatched models): slots, deadlines while waiting, model failures."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import numpy as np
import pytest

from mandant.errors import DeadlineExceeded, DeadlinePassedWhileRunning, ModelFailed, Unavailable
from mandant.observability.log_limits import WINDOW_S
from mandant.scheduling.direct import DirectScheduler
from mandant.types import ModelKey, Tenant
from tests.fakes import (
    POISON,
    FakeClock,
    GatedBackend,
    PoisonError,
    RecordingObserver,
    double,
    double_unless_poisoned,
    request,
    settle,
)


async def test_deadline_passing_while_waiting_for_a_slot_never_runs() -> None:
    backend = GatedBackend()
    scheduler = DirectScheduler(backend, "m")
    busy = asyncio.create_task(scheduler.submit(request(value=1)))
    await settle()
    waiting = asyncio.create_task(
        scheduler.submit(request(value=2, deadline=time.monotonic() + 0.02))
    )
    with pytest.raises(DeadlineExceeded):
        await waiting  # the slot stays busy until long after its deadline
    backend.release()
    await busy
    after = asyncio.create_task(scheduler.submit(request(value=3)))  # the slot is free again
    await settle()
    backend.release()
    await after
    assert [float(c.inputs["x"][0, 0]) for c in backend.calls] == [1, 3]


async def test_a_request_the_model_fails_on_is_model_failed_and_counted() -> None:
    observer = RecordingObserver()
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    scheduler = DirectScheduler(backend, "m", observer)
    culprit = request(value=POISON)
    with pytest.raises(ModelFailed) as info:
        await scheduler.submit(culprit)
    assert isinstance(info.value.__cause__, PoisonError)
    assert culprit.request_id in str(info.value) and "out of range" not in str(info.value)
    assert observer.failed_batches == [("m", 1)] and observer.batches == []
    fine = request(value=5)
    out = await scheduler.submit(fine)  # the slot was given back
    np.testing.assert_array_equal(out["OUT0"], double(fine.inputs)["OUT0"])


@pytest.mark.parametrize("ending", ["caller left", "deadline passed while running"])
async def test_a_request_the_backend_ran_is_counted_however_it_ended(ending: str) -> None:
    """Its caller left while the forward pass ran (held until it ended), or the
    backend says the deadline passed while it ran: the call stays charged
    (``service.py``), so its rows and compute are counted too (they were not: the
    quota took rows that /usage and ModelStatistics never showed)."""
    observer = RecordingObserver()
    backend = GatedBackend()
    scheduler = DirectScheduler(backend, "m", observer)
    task = asyncio.create_task(scheduler.submit(request(tenant="t", rows=3)))
    await settle()
    if ending == "caller left":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        backend.release(error=DeadlinePassedWhileRunning("deadline exceeded while running"))
        with pytest.raises(DeadlinePassedWhileRunning):
            await task
    assert [(model, size, shares) for model, size, _, shares in observer.batches] == [
        ("m", 3, {"t": 3})
    ]
    assert [(tenant, model) for tenant, model, *_ in observer.timings] == [("t", "m")]
    assert observer.failed_batches == []


async def test_a_backend_verdict_passes_through_uncounted() -> None:
    observer = RecordingObserver()
    backend = GatedBackend()
    scheduler = DirectScheduler(backend, "m", observer)
    task = asyncio.create_task(scheduler.submit(request()))
    await settle()
    backend.release(error=Unavailable("backend down"))
    with pytest.raises(Unavailable):
        await task
    assert observer.failed_batches == []


async def test_closing_answers_waiting_requests_and_lets_the_running_one_finish() -> None:
    """Unloaded or replaced (once its calls had grace_s): the requests still waiting
    for a slot answer Unavailable at once, the running one answers when it ends, and
    aclose returns only then, so that the backend is never closed under a call (it
    was a no-op: a Triton call whose channel closed under it was never answered, and
    the waiting requests waited on)."""
    backend = GatedBackend()
    scheduler = DirectScheduler(backend, "m")
    running = asyncio.create_task(scheduler.submit(request(value=1)))
    await settle()
    waiting = [asyncio.create_task(scheduler.submit(request(value=v))) for v in (2, 3)]
    await settle()
    closing = asyncio.create_task(scheduler.aclose())
    for task in waiting:
        with pytest.raises(Unavailable, match="model 'm' is shutting down"):
            await asyncio.wait_for(task, 10)
    with pytest.raises(Unavailable, match="not serving"):  # no new request
        await scheduler.submit(request(value=4))
    await settle()
    assert not closing.done()  # the running call has not answered yet
    backend.release()
    await asyncio.wait_for(closing, 10)
    assert float((await running)["OUT0"][0, 0]) == 2
    assert [float(c.inputs["x"][0, 0]) for c in backend.calls] == [1]


async def test_a_request_that_gives_up_waiting_leaves_the_slot_to_the_next() -> None:
    backend = GatedBackend()
    scheduler = DirectScheduler(backend, "m")
    first = asyncio.create_task(scheduler.submit(request(value=1)))
    await settle()
    leaving = asyncio.create_task(scheduler.submit(request(value=2)))
    staying = asyncio.create_task(scheduler.submit(request(value=3)))
    await settle()
    leaving.cancel()  # its caller went away while it waited
    backend.release()
    await first
    await settle()
    backend.release()
    await asyncio.wait_for(staying, 10)
    assert leaving.cancelled()
    assert [float(c.inputs["x"][0, 0]) for c in backend.calls] == [1, 3]
    await asyncio.wait_for(scheduler.aclose(), 10)  # every slot was given back


async def test_waiting_requests_take_turns_by_tenant_and_weight() -> None:
    """A flood of one tenant's calls queued first: the next slots go by weight across
    the tenants waiting (in arrival order, b's call ran after all of a's)."""
    backend = GatedBackend()
    scheduler = DirectScheduler(backend, "m")
    running = asyncio.create_task(scheduler.submit(request("a", value=0)))
    await settle()
    flood = [asyncio.create_task(scheduler.submit(request("a", value=i))) for i in range(1, 7)]
    await settle()
    light = asyncio.create_task(scheduler.submit(request(Tenant("b", weight=2), value=100)))
    heavy = asyncio.create_task(scheduler.submit(request("c", value=200)))
    await settle()
    tasks = [running, *flood, light, heavy]
    while not all(task.done() for task in tasks):
        backend.release()
        await settle()
    order = [float(c.inputs["x"][0, 0]) for c in backend.calls]
    assert order[0] == 0
    # b's weight of 2 and c's 1 against a's 1: b and c run within the next few slots.
    assert order.index(100) <= 3 and order.index(200) <= 4, order
    assert sorted(order) == [0, 1, 2, 3, 4, 5, 6, 100, 200]


async def test_batch_events_name_the_models_owner() -> None:
    """A private model or tuned variant may have a shared model's name: its batches
    (and failed ones) carry its owner, "" for a shared model."""
    observer = RecordingObserver()
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    scheduler = DirectScheduler(backend, "m", observer)
    private = ModelKey("m", "1", owner="acme")
    await scheduler.submit(dataclasses.replace(request("acme"), model=private))
    with pytest.raises(ModelFailed):
        await scheduler.submit(dataclasses.replace(request("acme", value=POISON), model=private))
    await scheduler.submit(request("b"))
    assert observer.batch_owners == ["acme", ""]
    assert observer.failed_batch_owners == ["acme"]


async def test_a_call_sent_without_an_id_is_given_one_only_when_it_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The id is made when a failure quotes it, the same in the log and the answer; a
    call that succeeds never gets one (it cost a ``getrandom`` syscall on every call)."""
    caplog.set_level(logging.ERROR, logger="mandant.scheduling.direct")
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    scheduler = DirectScheduler(backend, "m", RecordingObserver(), FakeClock())
    fine = dataclasses.replace(request(value=5), request_id="")
    await scheduler.submit(fine)
    assert fine.request_id == ""
    culprit = dataclasses.replace(request(value=POISON), request_id="")
    with pytest.raises(ModelFailed) as info:
        await scheduler.submit(culprit)
    made = culprit.request_id
    assert len(made) == 16 and f"(request id {made})" in str(info.value)
    (logged,) = [r for r in caplog.records if r.name == "mandant.scheduling.direct"]
    assert made in logged.getMessage()


async def test_requests_the_model_fails_on_log_one_traceback_and_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each was an ERROR with its traceback and the client's request id (300 bad calls
    of one client: 300 records of ~2.7 KB); every one is still counted as a metric."""
    caplog.set_level(logging.ERROR, logger="mandant.scheduling.direct")
    observer, clock = RecordingObserver(), FakeClock()
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    scheduler = DirectScheduler(backend, "m", observer, clock)
    culprits = [request(value=POISON) for _ in range(20)]
    for culprit in culprits:
        with pytest.raises(ModelFailed):
            await scheduler.submit(culprit)
    assert observer.failed_batches == [("m", 1)] * 20
    (logged,) = [r for r in caplog.records if r.name == "mandant.scheduling.direct"]
    assert culprits[0].request_id in logged.getMessage() and logged.exc_info is not None
    clock.advance(WINDOW_S)
    logged, summary = [r for r in caplog.records if r.name == "mandant.scheduling.direct"]
    assert summary.levelno == logging.ERROR and summary.exc_info is None
    assert "19 more failure(s)" in summary.getMessage()
    assert "mandant_failed_batches_total" in summary.getMessage()
    assert not any(c.request_id in summary.getMessage() for c in culprits)


async def test_one_tenant_s_failures_never_hide_another_s_first_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Failures are counted per model, tenant and exception type: while a's stream of
    bad calls kept the model's window open, b's failure (its answer quoting its request
    id) was counted and logged nowhere (the review)."""
    caplog.set_level(logging.ERROR, logger="mandant.scheduling.direct")
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    scheduler = DirectScheduler(backend, "m", RecordingObserver(), FakeClock())
    for _ in range(5):
        with pytest.raises(ModelFailed):
            await scheduler.submit(request("a", value=POISON))
    victim = request("b", value=POISON)
    with pytest.raises(ModelFailed):
        await scheduler.submit(victim)
    logged = [r.getMessage() for r in caplog.records if r.name == "mandant.scheduling.direct"]
    assert len(logged) == 2 and victim.request_id in logged[1]


async def test_the_slots_follow_the_backend_s_max_concurrency() -> None:
    """A Triton model's ``max_in_flight: auto`` is read from Triton's model config at
    every poll: the scheduler takes it as slots are taken and freed, not once."""
    backend = GatedBackend(max_concurrency=1)
    scheduler = DirectScheduler(backend, "m")
    tasks = [asyncio.create_task(scheduler.submit(request(value=v))) for v in range(6)]
    await settle()
    assert len(backend.running) == 1
    backend.max_concurrency = 3  # Triton's model now runs more at once
    backend.release()
    await settle()
    assert len(backend.running) == 3  # the freed slot and the two new ones
    backend.max_concurrency = 1  # and fewer again: running calls end, none start
    backend.release()
    await settle()
    assert len(backend.running) == 2
    backend.release()
    await settle()
    assert len(backend.running) == 1
    while not all(task.done() for task in tasks):  # one at a time now
        assert len(backend.running) <= 1
        backend.release()
        await settle()
    await asyncio.gather(*tasks)
    assert [float(c.inputs["x"][0, 0]) for c in backend.calls] == [0, 1, 2, 3, 4, 5]
    await scheduler.aclose()  # nothing running: returns at once
