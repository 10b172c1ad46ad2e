"""Property: for any interleaving of arrivals (random rows, tenants, shapes, deadlines,
priorities), cancellations, clock steps, batch completions and backend failures,
every request is answered exactly once, with exactly its own rows, no batch exceeds
``max_batch_size`` or mixes shapes, and no request that expired in the queue runs."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mandant.config import BatchingConfig
from mandant.errors import DeadlineExceeded, QueueFull
from mandant.scheduling.batcher import BatchFailed, DynamicBatcher
from mandant.types import Tenant
from tests.fakes import FakeClock, GatedBackend, double, request, settle

TENANTS = [Tenant("a", weight=1), Tenant("b", weight=3), Tenant("c", weight=0.5)]

configs = st.builds(
    BatchingConfig,
    max_batch_size=st.integers(1, 8),
    max_queue_delay_ms=st.sampled_from([0.0, 1.0, 5.0]),
    preferred_batch_sizes=st.lists(st.integers(1, 8), max_size=2).map(tuple),
    policy=st.sampled_from(["fair", "fifo"]),
    dispatch=st.sampled_from(["eager", "delay"]),
    max_queue_rows=st.none() | st.integers(8, 16),  # at least max_batch_size
)

submits = st.tuples(
    st.just("submit"),
    st.integers(0, len(TENANTS) - 1),
    st.integers(1, 8),  # rows (clipped to max_batch_size)
    st.sampled_from([2, 3]),  # width: two shape groups
    st.none() | st.floats(0.0, 0.02),  # deadline, seconds from now
    st.integers(0, 3),  # priority
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


async def scenario(config: BatchingConfig, slots: int, ops: list[tuple[Any, ...]]) -> None:
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
    clock = FakeClock()
    backend = GatedBackend(max_concurrency=slots)
    failed_calls: set[int] = set()
    batcher = DynamicBatcher(backend, config, "m", clock=clock)
    await batcher.start()
    submitted: list[tuple[int, asyncio.Task[dict[str, np.ndarray]], Any]] = []
    for op in ops:
        if op[0] == "submit":
            _, tenant, rows, width, deadline, priority = op
            number = len(submitted)
            # Row r of request n holds n*100 + r: recognisable wherever it goes.
            x = (number * 100 + np.arange(min(rows, config.max_batch_size), dtype=np.float32))[
                :, None
            ] * np.ones(width, np.float32)
            req = request(
                TENANTS[tenant],
                x=x,
                deadline=None if deadline is None else clock.now + deadline,
                priority=priority,
            )
            submitted.append((number, asyncio.create_task(batcher.submit(req)), req))
        elif op[0] == "advance":
            clock.advance(op[1])
        elif op[0] == "cancel" and submitted:
            submitted[op[1] % len(submitted)][1].cancel()
        elif op[0] == "finish":
            backend.release(op[1])
        elif op[0] == "fail" and backend.running:
            failed_calls.add(id(backend.running[0]))
            backend.release(1, error=RuntimeError("boom"))
        await settle(3)
    # Drain: let time pass and every batch finish until everybody has an answer.
    for _ in range(200):
        if all(task.done() for _, task, _ in submitted):
            break
        backend.release(len(backend.running))
        clock.advance(1.0)
        await settle(3)
    closing = asyncio.create_task(batcher.aclose())
    while not closing.done():  # batches whose callers all left still run to the end
        backend.release(len(backend.running))
        await settle(3)
    assert all(task.done() for _, task, _ in submitted)
    assert not loop_errors, loop_errors

    seen: dict[int, int] = {}  # request number → the call that ran it
    for index, call in enumerate(backend.calls):
        x = call.inputs["x"]
        assert x.shape[0] <= config.max_batch_size
        numbers = (x[:, 0] // 100).astype(int)
        for number in set(numbers.tolist()):
            assert number not in seen, "a request ran twice"
            seen[number] = index

    for number, task, req in submitted:
        if task.cancelled():
            continue
        exc = task.exception()
        if exc is None:
            out = task.result()
            for name, want in double(req.inputs).items():
                np.testing.assert_array_equal(out[name], want)
            assert id(backend.calls[seen[number]]) not in failed_calls
        elif isinstance(exc, DeadlineExceeded):
            assert number not in seen, "an expired request ran"
        elif isinstance(exc, BatchFailed):
            assert id(backend.calls[seen[number]]) in failed_calls
        else:
            assert isinstance(exc, QueueFull), exc
            assert number not in seen


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
