"""The per-tenant queue cap (``max_queue_rows``) when rows arrive while an execution slot
is idle: the rows the idle slots take do not count, but only those that really leave —
after every batch has left, no tenant has more than its cap waiting, whoever arrived in
the same event-loop turn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mandant.config import BatchingConfig
from mandant.errors import QueueFull
from mandant.scheduling.batcher import DynamicBatcher
from mandant.types import InferRequest
from tests.fakes import FakeClock, GatedBackend, RecordingObserver, double, request, settle


async def make(**config: Any) -> tuple[DynamicBatcher, GatedBackend, RecordingObserver]:
    backend, observer = GatedBackend(), RecordingObserver()
    batcher = DynamicBatcher(backend, BatchingConfig(**config), "m", observer, FakeClock())
    await batcher.start()
    return batcher, backend, observer


def answered(req: InferRequest, task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` got ``req``'s own rows (False: it was refused QueueFull)."""
    if isinstance(task.exception(), QueueFull):
        return False
    out = task.result()
    return bool((out["OUT0"] == double(req.inputs)["OUT0"]).all())


@pytest.mark.parametrize("dispatch", ["adaptive", "eager", "delay"])
async def test_tenants_of_one_loop_turn_do_not_share_the_rows_an_idle_slot_takes(
    dispatch: str,
) -> None:
    # One idle slot takes 4 rows. Two tenants each send 8 rows in one event-loop turn:
    # each alone would fit (4 leave, 4 wait), together 12 would wait.
    batcher, backend, observer = await make(max_batch_size=4, max_queue_rows=4, dispatch=dispatch)
    reqs = [request(tenant, rows=4) for tenant in ("a", "b") for _ in range(2)]
    tasks = [asyncio.create_task(batcher.submit(req)) for req in reqs]
    await settle()
    assert len(backend.running) == 1
    assert batcher.queued_rows_of("a") <= 4 and batcher.queued_rows_of("b") <= 4
    assert batcher.queued_rows <= 8
    refused = [task for task in tasks if task.done() and isinstance(task.exception(), QueueFull)]
    assert len(refused) == 1 and observer.rejections == [
        (reqs[tasks.index(refused[0])].tenant.id, "queue_full", "m")
    ]
    for _ in range(3):
        backend.release()
        await settle()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert [answered(req, task) for req, task in zip(reqs, tasks, strict=True)].count(True) == 3
    assert batcher.queued_rows == 0


async def test_a_tenant_keeps_no_allowance_for_rows_another_tenant_sent_out() -> None:
    # Tenant b's 4 rows, queued first in the turn, fill the batch the idle slot takes:
    # tenant a's 4 rows beyond its cap do not leave, so they are refused.
    batcher, backend, _ = await make(
        max_batch_size=4, max_queue_rows=4, dispatch="adaptive", policy="fifo"
    )
    first = asyncio.create_task(batcher.submit(request("b", rows=4)))
    a_reqs = [request("a", rows=4), request("a", rows=4)]
    a_tasks = [asyncio.create_task(batcher.submit(req)) for req in a_reqs]
    await settle()
    assert [c.rows for c in backend.calls] == [4]
    assert batcher.queued_rows_of("a") == 4 and batcher.queued_rows_of("b") == 0
    with pytest.raises(QueueFull):
        await a_tasks[1]
    backend.release(), await settle()
    backend.release()
    await asyncio.gather(first, a_tasks[0])
    assert answered(a_reqs[0], a_tasks[0])
