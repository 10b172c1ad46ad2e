"""DirectScheduler (unbatched models): slots, deadlines while waiting, model failures."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from mandant.errors import DeadlineExceeded, ModelFailed, Unavailable
from mandant.scheduling.direct import DirectScheduler
from tests.fakes import (
    POISON,
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
