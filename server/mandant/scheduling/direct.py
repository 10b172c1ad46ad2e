"""Runs each request alone, as soon as one of the backend's execution slots is free."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import numpy as np

from mandant.backends.base import Backend
from mandant.errors import DeadlineExceeded, MandantError, ModelFailed, Unavailable
from mandant.events import NullObserver, Observer
from mandant.observability.log_limits import FailureLog
from mandant.scheduling.clock import Clock
from mandant.types import InferRequest

logger = logging.getLogger(__name__)


class DirectScheduler:
    """No batching: one request, one backend call; at most ``max_concurrency`` at
    once, the rest wait their turn in arrival order. A request whose deadline passes
    while it waits is answered DeadlineExceeded and never runs. A model that raises
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
        self._slots = max(1, backend.max_concurrency)
        self._free = self._slots
        #: Requests waiting for a slot, in arrival order; a slot is handed over to the
        #: first by setting its future's result.
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._all_free: asyncio.Event | None = None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        """Refuse new requests, answer waiting ones Unavailable, let running ones end."""
        self._closed = True
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(Unavailable(f"model '{self._model}' is shutting down"))
        if self._free < self._slots:
            self._all_free = asyncio.Event()
            await self._all_free.wait()
        self._failures.flush()  # the counts of its last minute, before the loop ends

    async def submit(self, request: InferRequest) -> dict[str, np.ndarray]:
        if self._closed:
            raise Unavailable(f"model '{self._model}' is not serving")
        arrival = time.monotonic()
        if self._free and not self._waiting:
            self._free -= 1  # free: no future to make, no timer to arm and cancel
        else:
            await self._wait_for_slot(request.deadline, arrival)
        try:
            start = time.monotonic()
            if request.deadline is not None and request.deadline <= start:
                raise DeadlineExceeded("deadline exceeded while queued")
            request.ran = True
            try:
                outputs = await self._backend.infer(
                    request.inputs, outputs=request.outputs, deadline=request.deadline
                )
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
        tenant = request.tenant.id
        self._observer.request_timing(tenant, self._model, start - arrival, compute_s)
        self._observer.batch_executed(
            self._model, request.rows, compute_s, {tenant: request.rows}, request.model.owner or ""
        )
        return outputs

    async def _wait_for_slot(self, deadline: float | None, arrival: float) -> None:
        """Wait for a slot handed over by :meth:`_release`, no longer than ``deadline``."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            async with asyncio.timeout(None if deadline is None else deadline - arrival):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release()  # handed a slot just as it gave up: pass it on
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded("deadline exceeded while queued") from None
            raise

    def _release(self) -> None:
        """Hand the slot to the first request waiting, else free it."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1
        if self._free == self._slots and self._all_free is not None:
            self._all_free.set()
