"""Runs each request alone, as soon as one of the backend's execution slots is free."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from mandant.backends.base import Backend
from mandant.errors import DeadlineExceeded, MandantError, ModelFailed
from mandant.events import NullObserver, Observer
from mandant.types import InferRequest

logger = logging.getLogger(__name__)


class DirectScheduler:
    """No batching: one request, one backend call; at most ``max_concurrency`` at
    once, the rest wait their turn in arrival order. A request whose deadline passes
    while it waits is answered DeadlineExceeded and never runs. A model that raises
    (anything but a MandantError) on a request ran alone on that request's data: it
    is answered ModelFailed and counted as a failed batch of one."""

    def __init__(self, backend: Backend, model: str = "", observer: Observer | None = None) -> None:
        self._backend = backend
        self._model = model
        self._observer: Observer = observer or NullObserver()
        self._slots = asyncio.Semaphore(backend.max_concurrency)

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def submit(self, request: InferRequest) -> dict[str, np.ndarray]:
        arrival = time.monotonic()
        if self._slots.locked():  # wait for a slot, no longer than the deadline
            timeout = None if request.deadline is None else request.deadline - arrival
            try:
                async with asyncio.timeout(timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise DeadlineExceeded("deadline exceeded while queued") from None
        else:
            await self._slots.acquire()  # free: no timer to arm and cancel
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
                self._observer.batch_failed(self._model, request.rows)
                logger.error(
                    "model %s failed on request %s of tenant %s",
                    self._model,
                    request.request_id,
                    request.tenant.id,
                    exc_info=exc,
                )
                raise ModelFailed(self._model, request.request_id) from exc
            compute_s = time.monotonic() - start
        finally:
            self._slots.release()
        tenant = request.tenant.id
        self._observer.request_timing(tenant, self._model, start - arrival, compute_s)
        self._observer.batch_executed(self._model, request.rows, compute_s, {tenant: request.rows})
        return outputs
