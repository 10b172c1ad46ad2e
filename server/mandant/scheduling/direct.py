"""Runs each request alone, as soon as one of the backend's execution slots is free."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from mandant.backends.base import Backend
from mandant.errors import DeadlineExceeded
from mandant.events import NullObserver, Observer
from mandant.types import InferRequest


class DirectScheduler:
    """No batching: one request, one backend call; at most ``max_concurrency`` at
    once, the rest wait their turn in arrival order. A request whose deadline passes
    while it waits is answered DeadlineExceeded and never runs."""

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
            outputs = await self._backend.infer(
                request.inputs, outputs=request.outputs, deadline=request.deadline
            )
            compute_s = time.monotonic() - start
        finally:
            self._slots.release()
        tenant = request.tenant.id
        self._observer.request_timing(tenant, self._model, start - arrival, compute_s)
        self._observer.batch_executed(self._model, request.rows, compute_s, {tenant: request.rows})
        return outputs
