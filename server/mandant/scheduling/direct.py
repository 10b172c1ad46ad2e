"""Runs each request alone, as soon as one of the backend's execution slots is free;
requests waiting for a slot take turns by tenant, as the batcher's do."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from mandant.backends.base import Backend
from mandant.errors import (
    DeadlineExceeded,
    DeadlinePassedWhileRunning,
    MandantError,
    ModelFailed,
    Unavailable,
)
from mandant.events import NullObserver, Observer
from mandant.observability.log_limits import FailureLog
from mandant.scheduling.clock import Clock
from mandant.scheduling.policy import FairQueue, priority_level
from mandant.types import InferRequest

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Waiter:
    """A request waiting for a slot, as the fair queue sees it; a slot is handed over
    by setting ``future``'s result."""

    future: asyncio.Future[None]
    tenant: str
    weight: float
    rows: int
    level: int
    arrival: float
    group: None = None  # every request runs alone: one group


class DirectScheduler:
    """No batching: one request, one backend call; at most the backend's
    ``max_concurrency`` at once (read as slots are taken: a Triton model's follows
    Triton's model config). The rest wait for a slot in their tenant's queue, and each
    slot that frees goes to the next tenant by weighted deficit round robin over rows
    (``policy.py``'s :class:`FairQueue`: a tenant's priority levels are strict within
    its share), so a flood of one tenant's calls does not hold another's behind it (in
    arrival order, a light tenant's call waited 2.9 s behind 60 of another's 50 ms
    calls, against 0.11 s with the batcher's fair queue). A request whose deadline
    passes while it waits is answered DeadlineExceeded and never runs. A model that raises
    (anything but a MandantError) on a request ran alone on that request's data: it
    is answered ModelFailed and counted as a failed batch of one; the first failure of
    each exception type is logged with its traceback, the next ones counted in one line
    a minute (``observability/log_limits.py``): a client's bad calls cannot flood the log.

    :meth:`aclose` (the model unloaded or replaced, once its calls had ``grace_s``)
    refuses new requests, answers the ones still waiting for a slot Unavailable, and
    returns once the running ones answered, so that the backend is never closed under
    a call (a Triton call whose channel closed was never answered)."""

    def __init__(
        self,
        backend: Backend,
        model: str = "",
        observer: Observer | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``clock``: the failure log's windows' (``time.monotonic`` on the loop)."""
        self._backend = backend
        self._model = model
        self._observer: Observer = observer or NullObserver()
        self._failures = FailureLog(logger, "mandant_failed_batches_total", clock=clock)
        self._busy = 0  # slots taken (by running requests, or handed to a waiting one)
        #: Requests waiting for a slot, by tenant (class doc).
        self._waiting: FairQueue[_Waiter] = FairQueue()
        self._closed = False
        self._all_free: asyncio.Event | None = None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        """Refuse new requests, answer waiting ones Unavailable, let running ones end."""
        self._closed = True
        waiting, self._waiting = self._waiting, FairQueue()
        for waiter in waiting:
            if not waiter.future.done():
                waiter.future.set_exception(Unavailable(f"model '{self._model}' is shutting down"))
        if self._busy:
            self._all_free = asyncio.Event()
            await self._all_free.wait()
        self._failures.flush()  # the counts of its last minute, before the loop ends

    async def submit(self, request: InferRequest) -> dict[str, np.ndarray]:
        if self._closed:
            raise Unavailable(f"model '{self._model}' is not serving")
        arrival = time.monotonic()
        if self._busy < max(1, self._backend.max_concurrency) and not self._waiting:
            self._busy += 1  # free: no future to make, no timer to arm and cancel
        else:
            await self._wait_for_slot(request, arrival)
        try:
            start = time.monotonic()
            if request.deadline is not None and request.deadline <= start:
                raise DeadlineExceeded("deadline exceeded while queued")
            request.ran = True
            try:
                outputs = await self._backend.infer(
                    request.inputs,
                    outputs=request.outputs,
                    deadline=request.deadline,
                    hold_on_cancel=True,  # the slot is free once the backend is (base.py)
                )
            except (asyncio.CancelledError, DeadlinePassedWhileRunning):
                # The caller left (held until the forward pass ended), or its deadline
                # passed while the backend ran it: charged, as it ran (service.py), so
                # counted too, as a batch whose caller left is.
                self._ran(request, arrival, start, time.monotonic() - start)
                raise
            except MandantError:
                raise
            except Exception as exc:
                self._observer.batch_failed(self._model, request.rows, request.model.owner or "")
                self._failures.failed(
                    f"model {self._model} failed on a request of tenant "
                    f"{request.tenant.id} ({type(exc).__name__})",
                    "model %s failed on request %s of tenant %s",
                    self._model,
                    request.logged_id(),
                    request.tenant.id,
                    exc=exc,
                )
                raise ModelFailed(self._model, request.logged_id()) from exc
            compute_s = time.monotonic() - start
        finally:
            self._release()
        self._ran(request, arrival, start, compute_s)
        return outputs

    def _ran(self, request: InferRequest, arrival: float, start: float, compute_s: float) -> None:
        """The backend ran ``request`` (a batch of one) from ``start``."""
        tenant = request.tenant.id
        self._observer.request_timing(tenant, self._model, start - arrival, compute_s)
        self._observer.batch_executed(
            self._model, request.rows, compute_s, {tenant: request.rows}, request.model.owner or ""
        )

    async def _wait_for_slot(self, request: InferRequest, arrival: float) -> None:
        """Wait for a slot handed over by :meth:`_release`, no longer than the
        request's deadline."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(
            future,
            request.tenant.id,
            request.tenant.weight,
            max(1, request.rows),  # a turn is one request: take(1) hands over one
            priority_level(request.priority),
            arrival,
        )
        self._waiting.push(waiter)
        deadline = request.deadline
        try:
            async with asyncio.timeout(None if deadline is None else deadline - arrival):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release()  # handed a slot just as it gave up: pass it on
            else:
                self._waiting.remove(waiter)  # (False if the queue was closed)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded("deadline exceeded while queued") from None
            raise

    def _release(self) -> None:
        """Free a slot; hand the free slots to the next requests waiting (class doc)."""
        self._busy -= 1
        slots = max(1, self._backend.max_concurrency)
        while self._waiting and self._busy < slots:
            (waiter,) = self._waiting.take(1)
            if not waiter.future.done():
                self._busy += 1
                waiter.future.set_result(None)
        if not self._busy and self._all_free is not None:
            self._all_free.set()
