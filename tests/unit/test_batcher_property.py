"""Property: for any interleaving of arrivals (random rows, tenants, shapes, deadlines,
priorities, poisoned values), cancellations, clock steps, batch completions and backend
failures, in every dispatch mode:

* every request is answered exactly once, with exactly its own rows;
* the batcher's queued-row counts are at least the rows of the requests that never
  ran and still wait, and at most those of every request waiting and not running
  (the parts of a failed batch wait again), after every step (nothing leaks on
  cancellation, expiry or failure), and 0 at the end;
* QueueFull only when the tenant's queued rows plus the request's exceed the cap, and
  no tenant has more rows than the cap waiting that never ran, after any step;
* while an execution slot is idle, no queued request has waited longer than
  ``max_queue_delay_ms`` (0 in eager mode) or is past its deadline;
* no batch exceeds ``max_batch_size`` or mixes shapes; no request that expired runs;
* a failed batch is rerun in parts: a request is answered ModelFailed only when it failed
  alone, Unavailable (the model judged at fault) only when a batch it ran in held two
  poisoned requests or more, one of its own tenant's — one poisoned request fails no
  other, one tenant's poisoned requests no other tenant's — and succeeds
  otherwise (unless its deadline passed first)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mandant.config import BatchingConfig
from mandant.errors import DeadlineExceeded, ModelFailed, QueueFull, Unavailable
from mandant.scheduling.batcher import DynamicBatcher
from mandant.types import InferRequest, Tenant
from tests.fakes import (
    POISON,
    Call,
    FakeClock,
    GatedBackend,
    double,
    double_unless_poisoned,
    request,
)

TENANTS = [Tenant("a", weight=1), Tenant("b", weight=3), Tenant("c", weight=0.5)]

configs = st.builds(
    BatchingConfig,
    max_batch_size=st.integers(1, 8),
    max_queue_delay_ms=st.sampled_from([0.0, 1.0, 5.0]),
    preferred_batch_sizes=st.lists(st.integers(1, 8), max_size=2).map(tuple),
    policy=st.sampled_from(["fair", "fifo"]),
    dispatch=st.sampled_from(["adaptive", "eager", "delay"]),
    max_queue_rows=st.none() | st.integers(8, 16),  # at least max_batch_size
)

submits = st.tuples(
    st.just("submit"),
    st.integers(0, len(TENANTS) - 1),
    st.integers(1, 8),  # rows (clipped to max_batch_size)
    st.sampled_from([2, 3, 4]),  # width: three shape groups
    st.none() | st.floats(0.0, 0.02),  # deadline, seconds from now
    st.integers(0, 3),  # priority
    st.integers(0, 9).map(lambda n: n == 0),  # poisoned: the model raises on it
)
operations = st.lists(
    st.one_of(
        submits,
        submits,
        submits,
        st.tuples(st.just("advance"), st.floats(0.0, 0.01)),
        st.tuples(st.just("cancel"), st.integers(0, 1000)),
        st.tuples(st.just("finish"), st.integers(1, 3)),
        st.tuples(st.just("fail")),
    ),
    min_size=10,
    max_size=60,
)


async def settle() -> None:
    for _ in range(12):
        await asyncio.sleep(0)


def numbers_in(call: Call) -> set[int]:
    return set((call.inputs["x"][:, 0] // 100).astype(int).tolist())


async def scenario(config: BatchingConfig, slots: int, ops: list[tuple[Any, ...]]) -> None:
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
    clock = FakeClock()
    backend = GatedBackend(max_concurrency=slots, compute=double_unless_poisoned)
    batcher = DynamicBatcher(backend, config, "m", clock=clock)
    await batcher.start()
    bound_s = 0.0 if config.dispatch == "eager" else config.max_queue_delay_ms / 1000
    cap = config.max_queue_rows
    submitted: list[tuple[asyncio.Task[dict[str, np.ndarray]], InferRequest, float, int]] = []

    def check_queue() -> None:
        """The batcher's queued rows are at least those of the requests that never ran
        and still wait, and at most those of every request still waiting and not
        running now (a part of a failed batch waits again in its tenant's queue, or
        in its slot while the model may be at fault)."""
        in_calls = set().union(*(numbers_in(c) for c in backend.calls))
        running = set().union(*(numbers_in(c) for c in backend.running))
        waiting = [
            (number, req, arrival)
            for number, (task, req, arrival, _) in enumerate(submitted)
            if not task.done() and number not in running
        ]
        fresh = [(req, arrival) for number, req, arrival in waiting if number not in in_calls]
        for tenant in [None, *TENANTS]:
            least = sum(req.rows for req, _ in fresh if tenant in (None, req.tenant))
            most = sum(req.rows for _, req, _ in waiting if tenant in (None, req.tenant))
            rows = batcher.queued_rows if tenant is None else batcher.queued_rows_of(tenant.id)
            assert least <= rows <= most
            if tenant is not None:
                assert cap is None or least <= cap, "more rows waiting than the tenant's cap"
        if len(backend.running) < slots:  # a slot is idle: nobody waits past a bound
            for req, arrival in fresh:
                assert clock.now - arrival <= bound_s + 1e-9, "waited past its bound"
                assert req.deadline is None or req.deadline > clock.now

    for op in ops:
        if op[0] == "submit":
            _, tenant, rows, width, deadline, priority, poisoned = op
            number = len(submitted)
            # Row r of request n holds n*100 + r: recognisable wherever it goes.
            x = (number * 100 + np.arange(min(rows, config.max_batch_size), dtype=np.float32))[
                :, None
            ] * np.ones(width, np.float32)
            if poisoned:
                x[:, 1] = POISON
            req = request(
                TENANTS[tenant],
                x=x,
                deadline=None if deadline is None else clock.now + deadline,
                priority=priority,
            )
            before = batcher.queued_rows_of(TENANTS[tenant].id)
            submitted.append((asyncio.create_task(batcher.submit(req)), req, clock.now, before))
        elif op[0] == "advance":
            clock.advance(op[1])
        elif op[0] == "cancel":
            waiting = [task for task, *_ in submitted if not task.done()]
            if waiting:
                waiting[op[1] % len(waiting)].cancel()
        elif op[0] == "finish":
            backend.release(op[1])
        elif op[0] == "fail" and backend.running:
            backend.release(1, error=RuntimeError("boom"))
        await settle()
        check_queue()
    # Drain: let time pass and every batch finish until everybody has an answer.
    for _ in range(300):
        if all(task.done() for task, *_ in submitted):
            break
        backend.release(len(backend.running))
        clock.advance(1.0)
        await settle()
    closing = asyncio.create_task(batcher.aclose())
    while not closing.done():  # batches whose callers all left still run to the end
        backend.release(len(backend.running))
        await settle()
    assert all(task.done() for task, *_ in submitted)
    assert not loop_errors, loop_errors
    assert batcher.queued_rows == 0
    assert all(batcher.queued_rows_of(t.id) == 0 for t in TENANTS)

    runs: dict[int, list[Call]] = {}  # request number → the calls that ran it, in order
    for call in backend.calls:
        x = call.inputs["x"]
        assert x.shape[0] <= config.max_batch_size
        for number in numbers_in(call):
            runs.setdefault(number, []).append(call)

    def failed(call: Call) -> bool:
        return call.error is not None or bool((call.inputs["x"] == POISON).any())

    poisoned_numbers = {
        number
        for number, (_, req, _, _) in enumerate(submitted)
        if (req.inputs["x"] == POISON).any()
    }
    for number, (task, req, _, before) in enumerate(submitted):
        calls = runs.get(number, [])
        assert all(failed(c) for c in calls[:-1]), "rerun after a success"
        if task.cancelled():
            continue
        exc = task.exception()
        poisoned = bool((req.inputs["x"] == POISON).any())
        if exc is None:
            out = task.result()
            for name, want in double(req.inputs).items():
                np.testing.assert_array_equal(out[name], want)
            assert calls and not failed(calls[-1]) and not poisoned
        elif isinstance(exc, ModelFailed):
            assert calls and failed(calls[-1]) and numbers_in(calls[-1]) == {number}
        elif isinstance(exc, Unavailable):  # judged the model's failure, not its own
            assert calls and all(failed(c) for c in calls)
            assert any(len(numbers_in(c) & poisoned_numbers) >= 2 for c in calls)
            assert any(  # its own tenant's poisoned request among them
                submitted[n][1].tenant == req.tenant
                for c in calls
                for n in numbers_in(c) & poisoned_numbers
            )
        elif isinstance(exc, DeadlineExceeded):
            assert all(failed(c) for c in calls), "an expired request ran"
        else:
            assert isinstance(exc, QueueFull), exc
            assert cap is not None and before + req.rows > cap and not calls


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(config=configs, slots=st.integers(1, 3), ops=operations)
def test_every_request_is_answered_once_with_its_own_rows(
    config: BatchingConfig, slots: int, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(scenario(config, slots, ops))
