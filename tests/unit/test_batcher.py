"""The dynamic batcher with a fake clock and a fake backend: no sleeps, no network."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from mandant.config import BatchingConfig
from mandant.context import current_request_id, current_tenant
from mandant.errors import (
    DeadlineExceeded,
    DeadlinePassedWhileRunning,
    InvalidInput,
    ModelFailed,
    QueueFull,
    Unavailable,
)
from mandant.scheduling.batcher import DynamicBatcher, concatenate
from mandant.scheduling.policy import FairQueue
from mandant.types import InferRequest, ModelKey, Tenant
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


async def make(
    backend: GatedBackend | None = None,
    clock: FakeClock | None = None,
    observer: RecordingObserver | None = None,
    **config: Any,
) -> tuple[DynamicBatcher, GatedBackend, FakeClock, RecordingObserver]:
    clock = clock or FakeClock()
    backend = backend or GatedBackend()
    observer = observer or RecordingObserver()
    config.setdefault("dispatch", "eager")  # the adaptive mode has tests of its own below
    batcher = DynamicBatcher(backend, BatchingConfig(**config), "m", observer, clock)
    await batcher.start()
    return batcher, backend, clock, observer


def submit(batcher: DynamicBatcher, req: InferRequest) -> asyncio.Task[dict[str, np.ndarray]]:
    return asyncio.create_task(batcher.submit(req))


def check_own_rows(req: InferRequest, out: dict[str, np.ndarray]) -> None:
    expected = double(req.inputs)
    assert out.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(out[name], expected[name])


@dataclass(eq=False)
class StackingBackend(GatedBackend):
    """A backend that concatenates a batch's requests itself (as the torch backend
    does, into its instance's staging buffers); records the parts it was given."""

    batches: list[list[Mapping[str, np.ndarray]]] = field(default_factory=list)

    async def infer_batch(
        self,
        parts: Sequence[Mapping[str, np.ndarray]],
        *,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        self.batches.append(list(parts))
        return await self.infer(concatenate(parts), outputs=outputs, deadline=deadline)


async def test_a_backend_that_stacks_gets_each_requests_inputs_untouched() -> None:
    batcher, backend, _, _ = await make(StackingBackend(), max_batch_size=8)
    assert isinstance(backend, StackingBackend)
    lone = request(rows=2)
    first = submit(batcher, lone)
    await settle()
    requests = [request(rows=rows) for rows in (1, 3, 2)]
    rest = [submit(batcher, req) for req in requests]
    await settle()
    backend.release(), await settle()
    backend.release()
    outs = await asyncio.gather(first, *rest)
    assert len(backend.batches) == 1  # a lone request goes to infer as it is
    [parts] = backend.batches
    assert all(part["x"] is req.inputs["x"] for part, req in zip(parts, requests, strict=True))
    for req, out in zip([lone, *requests], outs, strict=True):
        check_own_rows(req, out)


# -- batch formation ------------------------------------------------------------------


async def test_eager_runs_a_lone_request_at_once_and_batches_while_busy() -> None:
    batcher, backend, _, _ = await make(max_batch_size=8)
    first = submit(batcher, request())
    await settle()
    assert [c.rows for c in backend.calls] == [1]  # no waiting for company
    rest = [submit(batcher, request()) for _ in range(5)]
    await settle()
    assert len(backend.calls) == 1  # the slot is busy: the next batch forms
    backend.release()
    await settle()
    assert [c.rows for c in backend.calls] == [1, 5]
    backend.release()
    await asyncio.gather(first, *rest)


async def test_a_light_tenant_is_answered_first_out_of_a_shared_batch() -> None:
    """Callers resume in the order they are answered, then each encodes and sends its
    answer: the tenant with the fewest rows in a batch goes first; within a tenant,
    arrival order."""
    batcher, backend, _, _ = await make(max_batch_size=8)
    blocker = submit(batcher, request())
    await settle()
    tenants = ["a", "a", "b", "a", "a", "c", "c"]
    tasks = [submit(batcher, request(tenant=t)) for t in tenants]
    await settle()
    resumed: list[int] = []
    for n, task in enumerate(tasks):
        task.add_done_callback(lambda _, n=n: resumed.append(n))
    backend.release(), await settle()
    assert [c.rows for c in backend.calls] == [1, 7]
    backend.release()
    await asyncio.gather(blocker, *tasks)
    assert resumed == [2, 5, 6, 0, 1, 3, 4]


async def test_max_batch_size_caps_every_batch() -> None:
    batcher, backend, _, _ = await make(max_batch_size=4)
    blocker = submit(batcher, request())
    await settle()
    tasks = [submit(batcher, request()) for _ in range(10)]
    await settle()
    for _ in range(4):
        backend.release()
        await settle()
    assert [c.rows for c in backend.calls] == [1, 4, 4, 2]
    await asyncio.gather(blocker, *tasks)


async def test_preferred_size_is_formed_when_possible() -> None:
    batcher, backend, _, _ = await make(max_batch_size=8, preferred_batch_sizes=(4,))
    blocker = submit(batcher, request())
    await settle()
    tasks = [submit(batcher, request()) for _ in range(6)]
    await settle()
    backend.release(), await settle()
    backend.release(), await settle()
    assert [c.rows for c in backend.calls] == [1, 4, 2]
    backend.release()
    await asyncio.gather(blocker, *tasks)


async def test_delay_waits_for_company_up_to_the_delay() -> None:
    batcher, backend, clock, _ = await make(
        max_batch_size=8, dispatch="delay", max_queue_delay_ms=5
    )
    tasks = [submit(batcher, request()) for _ in range(3)]
    await settle()
    assert backend.calls == []
    clock.advance(0.004)
    await settle()
    assert backend.calls == []
    clock.advance(0.001)
    await settle()
    assert [c.rows for c in backend.calls] == [3]
    backend.release()
    await asyncio.gather(*tasks)


async def test_delay_sends_a_full_or_preferred_batch_at_once() -> None:
    batcher, backend, _, _ = await make(
        max_batch_size=4, dispatch="delay", max_queue_delay_ms=1000, preferred_batch_sizes=(3,)
    )
    tasks = [submit(batcher, request()) for _ in range(2)]
    await settle()
    assert backend.calls == []
    tasks.append(submit(batcher, request()))
    await settle()
    assert [c.rows for c in backend.calls] == [3]
    backend.release()
    await asyncio.gather(*tasks)


async def test_multi_row_requests_get_exactly_their_own_rows() -> None:
    batcher, backend, _, _ = await make(max_batch_size=16)
    blocker = submit(batcher, request())
    await settle()
    reqs = [request("a", 1), request("b", 3), request("a", 2), request("c", 5)]
    tasks = [submit(batcher, r) for r in reqs]
    await settle()
    backend.release()
    await settle()
    assert [c.rows for c in backend.calls] == [1, 11]
    backend.release()
    for req, out in zip(reqs, await asyncio.gather(*tasks), strict=True):
        check_own_rows(req, out)
    await blocker


async def test_requests_of_different_shapes_go_in_different_batches() -> None:
    batcher, backend, _, _ = await make(max_batch_size=16)
    blocker = submit(batcher, request())
    await settle()
    reqs = [request("a", width=4), request("b", width=8), request("a", width=4)]
    tasks = [submit(batcher, r) for r in reqs]
    for _ in range(4):
        await settle()
        backend.release()
    widths = [{c.inputs["x"].shape[1]} for c in backend.calls]
    assert all(len(w) == 1 for w in widths) and len(backend.calls) >= 3
    for req, out in zip(reqs, await asyncio.gather(*tasks), strict=True):
        check_own_rows(req, out)
    await blocker


async def test_too_many_rows_is_invalid_input() -> None:
    batcher, backend, _, _ = await make(max_batch_size=4)
    with pytest.raises(InvalidInput, match="max_batch_size"):
        await batcher.submit(request(rows=5))
    assert backend.calls == []


async def test_inputs_must_share_the_batch_dimension() -> None:
    batcher, _, _, _ = await make()
    req = request(rows=2)
    req.inputs["y"] = np.zeros((3, 1), np.float32)
    with pytest.raises(InvalidInput, match="first dimension"):
        await batcher.submit(req)


async def test_execution_slots_run_batches_concurrently() -> None:
    batcher, backend, _, _ = await make(GatedBackend(max_concurrency=2), max_batch_size=4)
    tasks = [submit(batcher, request()) for _ in range(6)]
    await settle()
    assert [c.rows for c in backend.calls] == [1, 1]  # each went at once to an idle slot
    backend.release()
    await settle()
    assert [c.rows for c in backend.calls] == [1, 1, 4]  # formed while both were busy
    backend.release(2)
    await asyncio.gather(*tasks)


# -- fairness -------------------------------------------------------------------------


async def test_weights_one_and_three_share_rows_one_to_three() -> None:
    backend = GatedBackend(auto=True)
    batcher, _, _, observer = await make(backend, max_batch_size=16)
    light, heavy = Tenant("light", weight=1), Tenant("heavy", weight=3)

    async def closed_loop(tenant: Tenant) -> None:
        while True:
            await batcher.submit(request(tenant))

    clients = [asyncio.create_task(closed_loop(t)) for t in (light, heavy) for _ in range(32)]
    for _ in range(60):
        await settle(3)
    for client in clients:
        client.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    shares: Counter[str] = Counter()
    for _, size, _, by_tenant in observer.batches[5:]:  # steady state
        assert size <= 16
        shares.update(by_tenant)
    assert 3 * 0.95 <= shares["heavy"] / shares["light"] <= 3 * 1.05


async def test_queue_cap_refuses_with_a_retry_hint() -> None:
    batcher, backend, _, observer = await make(max_batch_size=3, max_queue_rows=3)
    running = submit(batcher, request("a"))
    await settle()
    queued = [submit(batcher, request("a", rows=2)), submit(batcher, request("a"))]
    await settle()
    with pytest.raises(QueueFull) as info:
        await batcher.submit(request("a"))
    assert info.value.retry_after_s > 0
    assert observer.rejections == [("a", "queue_full", "m")]  # the model's own cap
    other = submit(batcher, request("b"))  # another tenant's queue is its own
    await settle()
    assert not other.done()
    queued[1].cancel()  # cancelling frees the rows at once
    await settle()
    refill = submit(batcher, request("a"))
    await settle()
    assert not refill.done()
    closing = asyncio.create_task(batcher.aclose())
    await settle()
    for task in (queued[0], other, refill):
        with pytest.raises(Unavailable):
            await task
    backend.release()
    await closing
    await running


@pytest.mark.parametrize("dispatch", ["adaptive", "eager", "delay"])
async def test_the_queue_cap_counts_rows_that_wait_not_those_an_idle_slot_takes(
    dispatch: str,
) -> None:
    batcher, backend, _, observer = await make(
        max_batch_size=4, max_queue_rows=4, dispatch=dispatch
    )
    # Two full batches in one event-loop turn, the model idle: one runs, one waits.
    reqs = [request("a", rows=4), request("a", rows=4)]
    first, second = (submit(batcher, req) for req in reqs)
    await settle()
    assert len(backend.running) == 1 and not second.done()
    with pytest.raises(QueueFull):  # now 4 rows wait behind the running batch: full
        await batcher.submit(request("a"))
    assert observer.rejections == [("a", "queue_full", "m")]
    for req, task in zip(reqs, (first, second), strict=True):
        backend.release()
        check_own_rows(req, await task)
        await settle()


async def test_a_request_larger_than_the_queue_cap_is_invalid_input() -> None:
    # Configuration refuses max_queue_rows < max_batch_size; the batcher does not
    # count on it: a request that can never be queued is no reason to retry.
    config = BatchingConfig.model_construct(
        **{**BatchingConfig().model_dump(), "max_batch_size": 8, "max_queue_rows": 3}
    )
    backend, observer = GatedBackend(), RecordingObserver()
    batcher = DynamicBatcher(backend, config, "m", observer, FakeClock())
    await batcher.start()
    with pytest.raises(InvalidInput, match="3 rows per tenant"):
        await batcher.submit(request("a", rows=4))
    assert backend.calls == [] and observer.rejections == []
    assert batcher.queued_rows == 0


# -- deadlines, cancellation, priority -----------------------------------------------------


async def test_deadline_passing_in_queue_answers_deadline_exceeded_and_never_runs() -> None:
    clock = FakeClock()
    batcher, backend, _, _ = await make(clock=clock)
    blocker = submit(batcher, request(value=100))
    await settle()
    late = submit(batcher, request(value=7, deadline=clock.now + 0.010))
    on_time = submit(batcher, request(value=8, deadline=clock.now + 10))
    await settle()
    clock.advance(0.011)
    await settle()
    assert late.done()
    with pytest.raises(DeadlineExceeded):
        await late
    backend.release()
    await settle()
    backend.release()
    await asyncio.gather(blocker, on_time)
    executed = np.concatenate([c.inputs["x"][:, 0] for c in backend.calls])
    assert 7 not in executed and 8 in executed


async def test_one_timer_watches_the_deadlines_of_every_queued_request() -> None:
    clock = FakeClock()
    batcher, backend, _, _ = await make(clock=clock, max_batch_size=1)
    blocker = submit(batcher, request())
    await settle()
    queued = [submit(batcher, request(deadline=clock.now + 1 + n)) for n in range(10)]
    await settle()
    assert clock.armed == 1  # at the earliest deadline, not one per request
    late = submit(batcher, request(value=-7, deadline=clock.now + 0.010))  # earlier still
    await settle()
    assert clock.armed == 1
    clock.advance(0.011)
    await settle()
    with pytest.raises(DeadlineExceeded):
        await late
    assert clock.armed == 1  # the next earliest
    for _ in range(11):
        backend.release()
        await settle()
    await asyncio.gather(blocker, *queued)
    assert clock.armed == 0  # nothing queued: nothing to watch
    # (-7: the other requests' values count up from how many the process made)
    assert -7 not in np.concatenate([c.inputs["x"][:, 0] for c in backend.calls])


async def test_a_deadline_is_kept_when_the_earliest_one_has_left_the_queue() -> None:
    """The timer's request leaves in a batch before its deadline; the one behind it
    in the queue, due later, is still answered DeadlineExceeded on time."""
    clock = FakeClock()
    batcher, backend, _, _ = await make(clock=clock, max_batch_size=1)
    blocker = submit(batcher, request())
    await settle()
    early = submit(batcher, request(value=-1, deadline=clock.now + 0.010))
    later = submit(batcher, request(value=-2, deadline=clock.now + 0.030))
    await settle()
    backend.release()  # the blocker ends; ``early`` runs, ``later`` waits
    await settle()
    clock.advance(0.011)  # the timer fires for ``early``, which left: nothing expires
    await settle()
    assert not later.done()
    clock.advance(0.020)
    await settle()
    with pytest.raises(DeadlineExceeded):
        await later
    backend.release()
    await asyncio.gather(blocker, early)
    assert -2 not in np.concatenate([c.inputs["x"][:, 0] for c in backend.calls])


async def test_expiry_takes_what_passed_from_a_heap_not_a_walk_of_the_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each expiry walked the whole queue: 20,000 queued calls whose deadlines passed
    one by one took 8 s of the event loop. Deadlines in every order (rising, falling,
    mixed), some requests leaving early: each is answered at its deadline, none walks
    the queue, and the heap holds no more than the queue (plus a slack) however many
    requests came and went."""
    walks = 0
    real_iter = FairQueue.__iter__

    def counted_iter(self: FairQueue[Any]) -> Any:
        nonlocal walks
        walks += 1
        return real_iter(self)

    monkeypatch.setattr(FairQueue, "__iter__", counted_iter)
    clock = FakeClock()
    batcher, backend, _, _ = await make(clock=clock, max_batch_size=1)
    blocker = submit(batcher, request())
    await settle()
    start = clock.now
    offsets = [((n * 37) % 300) / 1000 + 0.001 for n in range(300)]  # 1..300 ms, mixed
    queued = [submit(batcher, request(deadline=start + offset)) for offset in offsets]
    gone = queued[::7]  # their callers give up first
    for task in gone:
        task.cancel()
    await settle()
    for step in range(302):
        clock.advance(0.001)
        await settle()
        for task, offset in zip(queued, offsets, strict=True):
            if task in gone:
                continue
            assert task.done() == (start + offset <= clock.now), (step, offset)
    for task in queued:
        if task not in gone:
            with pytest.raises(DeadlineExceeded):
                await task
    assert walks == 0
    assert clock.armed == 0 and not batcher._deadlines
    # Requests that leave in batches leave their items behind, bounded by the queue.
    backend.release()
    await blocker
    backend.auto = True
    for _ in range(1000):
        await batcher.submit(request(deadline=clock.now + 60))
        assert len(batcher._deadlines) <= 2 * len(batcher._queue) + 65


async def test_expired_deadline_is_refused_before_queueing() -> None:
    clock = FakeClock()
    batcher, backend, _, _ = await make(clock=clock)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(request(deadline=clock.now))
    assert backend.calls == []


async def test_cancelled_caller_leaves_the_queue_at_once() -> None:
    batcher, backend, _, _ = await make(max_batch_size=8)
    blocker = submit(batcher, request(value=100))
    await settle()
    gone = submit(batcher, request(value=5))
    stays = submit(batcher, request(value=6))
    await settle()
    gone.cancel()
    await settle()
    backend.release(2)
    await settle()
    backend.release()
    await asyncio.gather(blocker, stays)
    assert gone.cancelled()
    executed = np.concatenate([c.inputs["x"][:, 0] for c in backend.calls])
    assert 5 not in executed and 6 in executed


async def test_cancelled_while_running_does_not_disturb_the_batch() -> None:
    batcher, backend, _, _ = await make(max_batch_size=8)
    tasks = [submit(batcher, request()) for _ in range(3)]
    await settle()
    backend.release()
    await settle()
    tasks[1].cancel()
    backend.release()
    await settle()
    assert tasks[1].cancelled()
    await tasks[0], await tasks[2]


async def test_priority_is_strict_within_a_tenant_only() -> None:
    batcher, backend, _, _ = await make(max_batch_size=1)
    blocker = submit(batcher, request("a", value=100))
    await settle()
    tasks = [
        submit(batcher, request("a", value=1, priority=0)),
        submit(batcher, request("a", value=2, priority=2)),
        submit(batcher, request("a", value=3, priority=1)),
        submit(batcher, request("b", value=4, priority=0)),
    ]
    await settle()
    for _ in range(5):
        backend.release()
        await settle()
    order = [float(c.inputs["x"][0, 0]) for c in backend.calls]
    assert order[0] == 100
    a_order = [v for v in order if v in (1, 2, 3)]
    assert a_order == [3, 2, 1]
    assert order.index(4) <= 2  # b's unprioritised request is not behind a's levels
    await asyncio.gather(blocker, *tasks)


# -- failures, metrics, lifecycle ----------------------------------------------------------


async def test_failed_batch_answers_only_the_request_it_fails_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    batcher, _, _, observer = await make(backend, max_batch_size=16)
    backend.auto = False
    blocker = submit(batcher, request("good"))
    await settle()
    reqs = [request("good", rows=1 + n % 2) for n in range(7)]
    culprit = request("bad", value=POISON)
    reqs.insert(5, culprit)
    tasks = [submit(batcher, r) for r in reqs]
    await settle()
    backend.auto = True
    caplog.set_level(logging.ERROR, logger="mandant.scheduling.batcher")
    backend.release(len(backend.running))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await blocker
    for req, result in zip(reqs, results, strict=True):
        if req is culprit:
            assert isinstance(result, ModelFailed), result
            assert isinstance(result.__cause__, PoisonError)
            assert "index out of range" not in str(result)  # never sent to the client
            assert culprit.request_id in str(result)
        else:
            assert not isinstance(result, BaseException), result
            check_own_rows(req, result)
    assert observer.failed_batches == [("m", sum(r.rows for r in reqs))]
    # Bisecting 8 requests with one culprit: the batch, then 2 runs per level.
    assert len(backend.calls) - 1 <= 1 + 2 * 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and culprit.request_id in errors[0].getMessage()


@pytest.mark.parametrize("size", [2, 3, 9, 16])
async def test_a_model_failing_on_everything_stops_splitting_after_both_halves_and_probes(
    size: int,
) -> None:
    """Both halves failing alike, and then the tenant's first and last request alone,
    is the model's failure, not one request's: the rest are answered Unavailable at
    once (it used to run 2n - 1 times, each caller answered ModelFailed as if its own
    data were at fault)."""

    def broken(inputs: Any) -> dict[str, np.ndarray]:
        raise RuntimeError("broken model")

    batcher, backend, _, observer = await make(max_batch_size=16)
    blocker = submit(batcher, request())
    await settle()
    reqs = [request() for _ in range(size)]
    tasks = [submit(batcher, r) for r in reqs]
    await settle()
    backend.compute, backend.auto = broken, True
    backend.release(len(backend.running))
    results = await asyncio.gather(blocker, *tasks, return_exceptions=True)
    assert isinstance(results[0], ModelFailed)  # alone from the start: its own verdict
    alone = {int(c.inputs["x"][0, 0]) for c in backend.calls[1:] if c.rows == 1}
    for req, result in zip(reqs, results[1:], strict=True):
        ran_alone = int(req.inputs["x"][0, 0]) in alone
        assert isinstance(result, ModelFailed if ran_alone else Unavailable), result
    # The batch, its two halves, then the first and the last request alone (a lone
    # half is one of them).
    assert len(backend.calls) == 1 + {2: 3, 3: 4}.get(size, 5)
    assert observer.failed_batches == [("m", 1), ("m", size)]


async def test_a_broken_model_runs_twice_alone_per_tenant_of_the_batch() -> None:
    def broken(inputs: Any) -> dict[str, np.ndarray]:
        raise RuntimeError("broken model")

    batcher, backend, _, _ = await make(max_batch_size=16)
    blocker = submit(batcher, request())
    await settle()
    tasks = [submit(batcher, request(t)) for t in "abababab"]
    await settle()
    backend.compute, backend.auto = broken, True
    backend.release(len(backend.running))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["ModelFailed"] * 4 + ["Unavailable"] * 4
    assert len(backend.calls) == 1 + 3 + 4  # the blocker, the batch, a's and b's parts, ends
    await asyncio.gather(blocker, return_exceptions=True)


async def in_one_batch(
    compute: Any, reqs: list[InferRequest], *, worked: bool = False
) -> list[Any]:
    """``reqs`` queued behind a running call, so that they go to ``compute`` as one
    batch (FIFO, batches of 16); each one's result or exception. The call ahead is
    answered (``worked``: the model works) or fails (it has never answered: the
    probes alone tell the model's failure from the data's)."""
    backend = GatedBackend(auto=True, compute=compute)
    batcher, _, _, _ = await make(backend, max_batch_size=16, policy="fifo")
    backend.auto = False
    blocker = submit(batcher, request("a", value=None if worked else POISON))
    await settle()
    tasks = [submit(batcher, r) for r in reqs]
    await settle()
    backend.auto = True
    backend.release(len(backend.running))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    (ahead,) = await asyncio.gather(blocker, return_exceptions=True)
    assert isinstance(ahead, BaseException) is not worked, ahead
    return results


async def test_one_tenants_poisoned_requests_never_fail_another_tenants() -> None:
    """Both tenants' parts fail alike and a poisoned request fails alone: the model could
    be at fault, but tenant b's request succeeds alone, so the split goes on."""
    reqs = [request("a", value=POISON), request("b"), request("a", value=POISON), request("b")]
    results = await in_one_batch(double_unless_poisoned, reqs)
    assert isinstance(results[0], ModelFailed) and isinstance(results[2], ModelFailed)
    check_own_rows(reqs[1], results[1])
    check_own_rows(reqs[3], results[3])


async def test_a_light_tenant_s_call_in_a_suspect_batch_runs_alone_next() -> None:
    """The model has not answered lately (one tenant's poisoned batches): a batch of
    a's seven poisoned calls and b's one fails, and is split in the slot by tenant, b's
    part first: b's call is answered by the batch's second run (split in halves, it
    waited for four, about six beside a flood of them)."""
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    batcher, _, _, _ = await make(backend, max_batch_size=16, policy="fifo")
    backend.auto = False
    blocker = submit(batcher, request("a", value=POISON))
    await settle()
    reqs = [request("a", value=POISON) for _ in range(4)] + [request("b", value=5.0)]
    reqs += [request("a", value=POISON) for _ in range(3)]
    tasks = [submit(batcher, r) for r in reqs]
    await settle()
    backend.auto = True
    backend.release(len(backend.running))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(blocker, return_exceptions=True)
    check_own_rows(reqs[4], results[4])
    assert all(isinstance(r, ModelFailed) for r in results[:4] + results[5:]), results
    batch, light = backend.calls[1:3]  # after the blocker
    assert batch.rows == 8
    np.testing.assert_array_equal(light.inputs["x"], reqs[4].inputs["x"])
    await batcher.aclose()


async def test_no_answer_carries_another_request_s_verdict() -> None:
    """A backend's verdict on one request alone (Triton's INVALID_ARGUMENT quotes the
    request's values) is that request's: when every part failed alike and the
    probes failed with verdicts of their own, tenant b was answered with tenant a's
    message, its value in it."""

    def picky(inputs: Any) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if (x < 0).any():
            if x.shape[0] > 1:
                raise RuntimeError("the backend refused a batch")
            raise InvalidInput(f"value {float(x[0, 0])} refused")  # alone: its own
        return double(inputs)

    values = [("a", -7.0), ("b", -9.0), ("a", -7.5), ("b", -9.5), ("b", -9.75)]
    results = await in_one_batch(picky, [request(t, value=v) for t, v in values])
    for (_, value), result in zip(values, results, strict=True):
        assert isinstance(result, InvalidInput) and str(result) == f"value {value} refused"


async def test_a_tenant_s_good_calls_are_not_failed_by_its_own_poisoned_ones() -> None:
    """One tenant, poisoned and good requests alternating: both halves fail alike and
    its first request fails alone, but its last succeeds alone, so the split goes on
    (with one probe, the good ones were answered Unavailable unrun, and the second
    poisoned one Unavailable too: a retry loop)."""
    reqs = [request("a", value=POISON if n % 2 == 0 else n) for n in range(4)]
    results = await in_one_batch(double_unless_poisoned, reqs)
    assert isinstance(results[0], ModelFailed) and isinstance(results[2], ModelFailed)
    check_own_rows(reqs[1], results[1])
    check_own_rows(reqs[3], results[3])


async def test_a_part_of_one_tenant_s_poisoned_requests_is_their_data_once_others_succeeded() -> (
    None
):
    """The CI failure of test_poisoned_batches: b's good requests and a's poisoned ones
    in one batch; b's part succeeds, a's four fail as two halves and as first and
    last alone, which looked like a model failing whatever its inputs (a's middle two
    were answered Unavailable). A model seen answering in the same batch works: each
    of a's requests is its own ModelFailed."""
    reqs = [request("b", value=n) for n in range(4)] + [
        request("a", value=POISON) for _ in range(4)
    ]
    results = await in_one_batch(double_unless_poisoned, reqs)
    for req, result in zip(reqs[:4], results[:4], strict=True):
        check_own_rows(req, result)
    assert all(isinstance(r, ModelFailed) for r in results[4:]), results


@pytest.mark.parametrize("worked", [True, False])
async def test_a_batch_of_poisoned_requests_alone_is_their_data_if_the_model_worked(
    worked: bool,
) -> None:
    """A batch holding only a's poisoned requests: when the model answered since its
    last failed batch, each is its own ModelFailed; a model that never answered cannot
    be told from its data, and the probes judge it at fault."""
    reqs = [request("a", value=POISON) for _ in range(4)]
    results = await in_one_batch(double_unless_poisoned, reqs, worked=worked)
    failed = Counter(type(r).__name__ for r in results)
    assert failed == ({"ModelFailed": 4} if worked else {"ModelFailed": 2, "Unavailable": 2})


async def test_a_model_that_breaks_after_working_is_split_once_then_judged_at_fault() -> None:
    """The model answers only 7s (it broke for everything else): a batch of two
    tenants behind an answered 7 is split to the end, each request its own ModelFailed
    (the model was seen working); nothing answered while it was split, so the next
    batch, with no answer since, is judged the model's fault."""

    def only_sevens(inputs: Any) -> dict[str, np.ndarray]:
        if not (inputs["x"] == 7).all():
            raise RuntimeError("broken model")
        return double(inputs)

    backend = GatedBackend(compute=only_sevens)
    batcher, _, _, _ = await make(backend, max_batch_size=8, policy="fifo")
    rounds = [(7, {"ModelFailed": 8}, 2 * 8 - 1), (0, {"ModelFailed": 4, "Unavailable": 4}, 7)]
    for ahead, expected, runs in rounds:
        backend.auto = False
        blocker = submit(batcher, request(value=ahead))
        await settle()
        # values of their own, never 7 (a request's default value is its number in
        # the process: run alone, the seventh was a 7, and answered)
        tasks = [submit(batcher, request(t, value=100 + n)) for n, t in enumerate("abababab")]
        await settle()
        backend.auto = True
        before = len(backend.calls)
        backend.release(len(backend.running))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(blocker, return_exceptions=True)
        assert Counter(type(r).__name__ for r in results) == expected
        # the batch, a's and b's parts, then a's and b's first and last alone
        assert len(backend.calls) - before == runs


async def test_a_tenant_s_failures_make_the_model_suspect_only_three_batches_in_a_row() -> None:
    """The model answered; then only b's poisoned calls come, in batches of their own
    (nothing of them answers). A lone one failing, then a batch of three: still their
    data's fault, each its own ModelFailed (every failed batch made the model suspect:
    the middle call was answered Unavailable, the flake hunt's repro of the CI failure
    of test_poisoned_batches). After the third failed batch in a row with nothing
    answered (each counted once its split is over), the next is judged the model's
    fault (a model that broke while one tenant calls it: before,
    it was split in full for ever, each caller INVALID_ARGUMENT, as the review found)."""
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    batcher, _, clock, _ = await make(
        backend, max_batch_size=16, dispatch="delay", max_queue_delay_ms=5
    )

    async def batch_of(count: int) -> Counter[str]:
        tasks = [submit(batcher, request("b", value=POISON)) for _ in range(count)]
        await settle()
        clock.advance(0.005)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return Counter(type(r).__name__ for r in results)

    ok = submit(batcher, request("a"))  # the model answers: it works
    await settle()
    clock.advance(0.005)
    await ok
    assert await batch_of(1) == {"ModelFailed": 1}
    assert await batch_of(3) == {"ModelFailed": 3}
    assert await batch_of(3) == {"ModelFailed": 3}  # (counted once its split is over)
    assert await batch_of(3) == {"ModelFailed": 2, "Unavailable": 1}


async def working_and_held(
    max_batch_size: int, first: str, held: str
) -> tuple[GatedBackend, DynamicBatcher, RecordingObserver, asyncio.Task[dict[str, np.ndarray]]]:
    """A batcher whose model (failing on POISON) has answered a call of tenant
    ``first`` (so it works), and whose slot is then held by a call of ``held``, the
    blocker, answered at the backend's next release (its ``auto`` off)."""
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    batcher, _, _, observer = await make(backend, max_batch_size=max_batch_size)
    check_own_rows(warm := request(first), await submit(batcher, warm))
    backend.auto = False
    blocker = submit(batcher, request(held))
    await settle()
    return backend, batcher, observer, blocker


async def test_a_tenant_s_poisoned_batch_is_split_at_its_turns_not_ahead_of_others() -> None:
    """a's batch of 8 poisoned calls fails while b's call waits. Split in the slot,
    a's 15 runs (2n - 1) all went before b's call, and with a's calls coming on, b
    waited for every one of a's splits (a reviewer's light tenant: 12 ms p50 alone,
    1.3 s beside 64 poisoned callers). Now a's halves queue again at a's turns, so
    b's call runs right after a's failed batch (or one half of it)."""
    backend, batcher, observer, blocker = await working_and_held(16, first="b", held="a")
    poisoned = [submit(batcher, request("a", value=POISON)) for _ in range(8)]
    await settle()
    backend.release()  # the blocker; a's poisoned batch starts
    await settle()
    light = request("b", value=5)
    waiting = submit(batcher, light)
    await settle()
    backend.auto = True
    backend.release(len(backend.running))
    check_own_rows(light, await waiting)
    results = await asyncio.gather(blocker, *poisoned, return_exceptions=True)
    assert all(isinstance(r, ModelFailed) for r in results[1:]), results
    runs = [float(call.inputs["x"][0, 0]) for call in backend.calls]
    assert runs.index(5.0) <= 4  # after the first call, the blocker, a's batch (a half)
    assert len(runs) == 1 + 1 + (2 * 8 - 1) + 1  # a's split: as many runs as in the slot
    assert observer.failed_batches == [("m", 8)]  # its parts' runs are not batches


async def test_a_batch_failing_while_the_batcher_closes_is_split_in_its_slot() -> None:
    """``aclose`` lets running batches end: a batch that fails while it waits had its
    parts queued again, in a queue nobody takes from any more, and their callers
    waited for ever. It is split in its slot then, every request answered."""
    backend, batcher, _, blocker = await working_and_held(8, first="a", held="a")
    good = request("b", value=3)
    tasks = [submit(batcher, request("a", value=POISON)), submit(batcher, good)]
    await settle()
    backend.release()  # the blocker; the failing batch starts
    await settle()
    closing = asyncio.create_task(batcher.aclose())
    await settle()
    backend.auto = True
    backend.release()  # it fails while the batcher closes
    await asyncio.wait_for(closing, 5)
    await blocker
    bad, fine = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert isinstance(bad, ModelFailed)
    check_own_rows(good, fine)


async def test_a_working_model_is_not_judged_at_fault_while_a_failed_batch_s_parts_wait() -> None:
    """Three tenants' batches (three shapes) of [poisoned, good, good, poisoned] fail
    in turn while the model works. Counted as they failed, the third was judged the
    model's fault before any part had run, and its good calls answered Unavailable:
    a failure counts once its parts have run, with nothing answered since."""
    backend, batcher, _, blocker = await working_and_held(8, first="z", held="z")
    reqs = {
        tenant: [request(tenant, value=v, width=width) for v in (POISON, 5, 6, POISON)]
        for tenant, width in (("a", 5), ("d", 6), ("e", 7))
    }
    tasks = {tenant: [submit(batcher, r) for r in rs] for tenant, rs in reqs.items()}
    await settle()
    backend.auto = True
    backend.release()
    await blocker
    for tenant, ts in tasks.items():
        results = await asyncio.gather(*ts, return_exceptions=True)
        assert isinstance(results[0], ModelFailed) and isinstance(results[3], ModelFailed)
        check_own_rows(reqs[tenant][1], results[1])
        check_own_rows(reqs[tenant][2], results[2])


@pytest.mark.parametrize("dispatch", ["delay", "adaptive"])
async def test_a_failed_batch_s_part_waits_for_no_company(dispatch: str) -> None:
    """A part of a failed batch is batched with nothing else, so it is due at once:
    the delay mode held it its whole ``max_queue_delay_ms`` with the slot idle, and
    the adaptive one counted its runs as company found, widening its window."""
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    batcher, _, clock, _ = await make(
        backend, max_batch_size=4, dispatch=dispatch, max_queue_delay_ms=50
    )
    warm = submit(batcher, request("z"))
    await settle()
    clock.advance(0.05)
    await warm  # it works
    backend.auto = False
    reqs = [request("a"), request("a"), request("a", value=POISON), request("a")]
    tasks = [submit(batcher, r) for r in reqs]  # a full batch: it leaves at once
    await settle()
    idle_with_parts = 0
    while not all(task.done() for task in tasks):
        backend.release(len(backend.running))
        await settle()
        if not backend.running and batcher.queued_rows:
            idle_with_parts += 1  # the slot idle, a part waiting
            clock.advance(0.001)
    assert idle_with_parts == 0
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], ModelFailed)
    for req, result in zip(reqs, results, strict=True):
        if req is not reqs[2]:
            check_own_rows(req, result)


async def test_a_lone_request_the_model_fails_on_is_model_failed() -> None:
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    batcher, _, _, observer = await make(backend)
    with pytest.raises(ModelFailed):
        await batcher.submit(request(value=POISON))
    assert len(backend.calls) == 1 and observer.failed_batches == [("m", 1)]
    assert observer.batches == []


async def test_a_backend_verdict_goes_to_every_request_of_the_batch_without_reruns() -> None:
    batcher, backend, _, observer = await make(max_batch_size=8)
    blocker = submit(batcher, request())
    await settle()
    tasks = [submit(batcher, request()) for _ in range(4)]
    await settle()
    backend.release()
    await settle()
    backend.release(error=Unavailable("backend down"))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    assert len(backend.calls) == 2 and observer.failed_batches == []
    await blocker


async def test_a_batch_whose_deadline_passed_while_it_ran_is_counted() -> None:
    """The backend ran the batch (Triton computes it whatever the deadline): its
    callers stay charged (``service.py``), so its rows and compute are counted, as a
    batch whose caller left is; before, the quota took rows that /usage never showed."""
    clock = FakeClock()
    backend = GatedBackend(clock=clock, compute_s=0.004)
    batcher, _, _, observer = await make(backend, clock, max_batch_size=8)
    blocker = submit(batcher, request("a"))
    await settle()
    tasks = [submit(batcher, request("a", rows=2)), submit(batcher, request("b"))]
    await settle()
    backend.release()
    await settle()
    backend.release(error=DeadlinePassedWhileRunning("deadline exceeded while running"))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, DeadlinePassedWhileRunning) for r in results)
    await blocker
    assert [(size, shares) for _, size, _, shares in observer.batches] == [
        (1, {"a": 1}),
        (3, {"a": 2, "b": 1}),
    ]
    assert observer.batches[1][2] == pytest.approx(0.004)
    assert sorted(t for t, *_ in observer.timings[1:]) == ["a", "b"]
    assert observer.failed_batches == []


async def test_requests_past_their_deadline_are_not_rerun() -> None:
    clock = FakeClock()
    backend = GatedBackend(compute=double_unless_poisoned)
    batcher, _, _, _ = await make(backend, clock, max_batch_size=8)
    blocker = submit(batcher, request(value=100))
    await settle()
    late = request(value=7, deadline=clock.now + 0.010)
    culprit = request(value=POISON)
    fine = request(value=9)
    tasks = [submit(batcher, r) for r in (late, culprit, fine)]
    await settle()
    backend.release()
    await settle()
    assert backend.calls[-1].rows == 3
    clock.advance(0.020)  # the batch ran past the late request's deadline, then failed
    for _ in range(4):
        backend.release()
        await settle()
    with pytest.raises(DeadlineExceeded):
        await tasks[0]
    with pytest.raises(ModelFailed):
        await tasks[1]
    check_own_rows(fine, await tasks[2])
    reruns = np.concatenate([c.inputs["x"][:, 0] for c in backend.calls[2:]])
    assert 7 not in reruns and 9 in reruns
    await blocker


@pytest.mark.parametrize("dispatch", ["adaptive", "eager", "delay"])
async def test_batches_run_in_a_context_of_no_request(dispatch: str) -> None:
    seen: list[tuple[object, str]] = []

    def recording(inputs: Any) -> dict[str, np.ndarray]:
        seen.append((current_tenant.get(None), current_request_id.get()))
        return double(inputs)

    backend = GatedBackend(auto=True, compute=recording)
    batcher, _, clock, _ = await make(backend, dispatch=dispatch, max_queue_delay_ms=1)

    async def call(tenant: str) -> dict[str, np.ndarray]:
        current_tenant.set(Tenant(tenant))
        current_request_id.set(f"{tenant}-request")
        return await batcher.submit(request(tenant))

    tasks = [asyncio.create_task(call(t)) for t in ("acme", "globex")]
    await settle()
    clock.advance(0.001)
    await asyncio.gather(*tasks)
    assert seen and all(entry == (None, "") for entry in seen)


async def test_observer_gets_queue_and_compute_time_and_batch_shares() -> None:
    clock = FakeClock()
    backend = GatedBackend(clock=clock, compute_s=0.003)
    batcher, _, _, observer = await make(backend, clock)
    blocker = submit(batcher, request("a"))
    await settle()
    tasks = [submit(batcher, request("a", rows=2)), submit(batcher, request("b"))]
    await settle()
    clock.advance(0.002)
    backend.release()
    await settle()
    backend.release()
    await asyncio.gather(blocker, *tasks)
    assert [(size, shares) for _, size, _, shares in observer.batches] == [
        (1, {"a": 1}),
        (3, {"a": 2, "b": 1}),
    ]
    assert observer.batches[1][2] == pytest.approx(0.003)
    second = observer.timings[1:]
    assert {t for t, *_ in second} == {"a", "b"}
    for _, model, queue_s, compute_s in second:
        assert model == "m"
        assert queue_s == pytest.approx(0.005)  # 2 ms waiting + 3 ms of the first batch
        assert compute_s == pytest.approx(0.003)


async def test_aclose_answers_queued_requests_and_refuses_new_ones() -> None:
    batcher, backend, _, _ = await make()
    running = submit(batcher, request())
    await settle()
    queued = submit(batcher, request())
    await settle()
    closing = asyncio.create_task(batcher.aclose())
    await settle()
    with pytest.raises(Unavailable):
        await queued
    backend.release()
    await closing
    assert (await running)["OUT0"].shape == (1, 4)
    with pytest.raises(Unavailable):
        await batcher.submit(request())


async def test_model_that_drops_the_batch_dimension_serves_each_request_alone() -> None:
    backend = GatedBackend(auto=True, compute=lambda inputs: {"OUT0": np.zeros(1, np.float32)})
    batcher, _, _, observer = await make(backend, max_batch_size=8)
    assert (await batcher.submit(request()))["OUT0"].shape == (1,)
    backend.auto = False
    tasks = [submit(batcher, request()) for _ in range(3)]
    await settle()
    backend.release(), await settle()
    backend.auto = True
    backend.release()
    results = await asyncio.gather(*tasks)
    assert all(r["OUT0"].shape == (1,) for r in results)  # the batch of 2 split in two
    assert observer.failed_batches == [("m", 2)]


async def test_backend_gets_the_batchs_wanted_outputs_and_latest_deadline() -> None:
    batcher, backend, clock, _ = await make(max_batch_size=8)
    busy = submit(batcher, request())
    await settle()
    one = request(deadline=clock.now + 5)
    one.outputs = ("OUT1",)
    two = request(deadline=clock.now + 7)
    two.outputs = ("OUT0",)
    pending = [submit(batcher, one), submit(batcher, two)]
    await settle()
    backend.release()
    await settle()
    assert backend.calls[1].outputs == ("OUT1", "OUT0")
    assert backend.calls[1].deadline == clock.now + 7  # the batch serves its latest waiter
    backend.release()
    await asyncio.gather(busy, *pending)
    busy = submit(batcher, request())
    await settle()
    three = submit(batcher, request(deadline=clock.now + 5))
    four = submit(batcher, request())  # no deadline: the batch's call has none either
    await settle()
    backend.release()
    await settle()
    assert backend.calls[-1].rows == 2 and backend.calls[-1].deadline is None
    backend.release()
    await asyncio.gather(busy, three, four)


# -- adaptive dispatch ---------------------------------------------------------------------


async def test_adaptive_never_holds_a_lone_caller() -> None:
    batcher, backend, _, _ = await make(dispatch="adaptive", max_queue_delay_ms=50)
    for _ in range(20):  # closed loop, concurrency 1: the clock never moves
        task = submit(batcher, request())
        await settle()
        assert backend.running, "a lone request waited for company"
        backend.release()
        await task
    assert [c.rows for c in backend.calls] == [1] * 20


async def test_adaptive_sends_requests_of_one_loop_turn_together() -> None:
    batcher, backend, _, _ = await make(dispatch="adaptive", max_batch_size=8)
    tasks = [submit(batcher, request()) for _ in range(5)]  # all woken in one turn
    await settle()
    assert [c.rows for c in backend.calls] == [5]
    backend.release()
    await asyncio.gather(*tasks)


async def test_adaptive_holds_under_load_but_never_past_the_delay() -> None:
    clock = FakeClock()
    batcher, backend, _, _ = await make(
        clock=clock, dispatch="adaptive", max_batch_size=16, max_queue_delay_ms=2
    )
    tasks = [submit(batcher, request()) for _ in range(4)]
    await settle()
    backend.release()  # a batch of 4: company was found, so the next batch may wait
    await asyncio.gather(*tasks)
    first = submit(batcher, request())
    await settle()
    assert len(backend.calls) == 1  # held: more are expected
    clock.advance(0.0001)
    second = submit(batcher, request())
    await settle()
    assert len(backend.calls) == 1
    clock.advance(0.002)  # past the longest hold (max_queue_delay_ms)
    await settle()
    assert [c.rows for c in backend.calls] == [4, 2]
    backend.release()
    await asyncio.gather(first, second)


async def test_adaptive_hold_ends_before_a_deadline() -> None:
    clock = FakeClock()
    batcher, backend, _, _ = await make(
        clock=clock, dispatch="adaptive", max_batch_size=16, max_queue_delay_ms=100
    )
    tasks = [submit(batcher, request()) for _ in range(3)]  # company: the window grows
    await settle()
    backend.release()
    await asyncio.gather(*tasks)
    held = submit(batcher, request(deadline=clock.now + 0.005))
    await settle()
    assert len(backend.calls) == 1  # held
    clock.advance(0.005 - 1e-6)  # just before the deadline: it must have left
    await settle()
    assert len(backend.calls) == 2
    backend.release()
    await held


async def test_batch_events_name_the_models_owner() -> None:
    """A private model or tuned variant may have a shared model's name: the batcher of
    one says whose it is in every batch event (and failed batch), so that its figures
    are not counted as the shared model's."""
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    batcher, _, _, observer = await make(backend, max_batch_size=4)
    tuned = ModelKey("m", "1", owner="acme")
    fine = dataclasses.replace(request("acme", rows=2), model=tuned)
    check_own_rows(fine, await submit(batcher, fine))
    with pytest.raises(ModelFailed):
        await submit(batcher, dataclasses.replace(request("acme", value=POISON), model=tuned))
    assert observer.batch_owners == ["acme"]
    assert observer.failed_batch_owners == ["acme"]


async def test_batches_the_model_fails_on_log_one_traceback_per_kind_and_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each failed batch was a WARNING and each request it failed on alone an ERROR with
    its traceback: one client's bad calls flooded the log. Now the first of each is
    logged, the rest counted in one line per minute (and in the metrics, as before)."""
    caplog.set_level(logging.WARNING, logger="mandant.scheduling.isolation")
    backend = GatedBackend(auto=True, compute=double_unless_poisoned)
    # FIFO: each pair is a batch (the fair queue may batch the bad calls together).
    batcher, _, clock, observer = await make(backend, max_batch_size=2, policy="fifo")
    backend.auto = False
    blocker = submit(batcher, request("good"))
    await settle()
    pairs = [(request("good"), request("bad", value=POISON)) for _ in range(3)]
    tasks = [submit(batcher, r) for pair in pairs for r in pair]
    await settle()
    backend.auto = True
    backend.release(len(backend.running))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await blocker
    assert [isinstance(r, ModelFailed) for r in results] == [False, True] * 3
    assert len(observer.failed_batches) == 3
    logged = [r for r in caplog.records if r.name == "mandant.scheduling.isolation"]
    assert [r.levelno for r in logged] == [logging.WARNING, logging.ERROR]
    assert pairs[0][1].request_id in logged[1].getMessage() and logged[1].exc_info
    clock.advance(60)
    summaries = [r for r in caplog.records if r.name == "mandant.scheduling.isolation"][2:]
    assert sorted(r.levelno for r in summaries) == [logging.WARNING, logging.ERROR]
    assert all("2 more failure(s)" in r.getMessage() for r in summaries)
    assert all("mandant_failed_batches_total" in r.getMessage() for r in summaries)
    assert not any(r.exc_info for r in summaries)
