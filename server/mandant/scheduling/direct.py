"""Runs each request alone, as soon as one of the backend's execution slots is free."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from mandant.backends.base import Backend
from mandant.errors import DeadlineExceeded
from mandant.types import InferRequest


class DirectScheduler:
    """No batching: one request, one backend call; at most ``max_concurrency`` at
    once, the rest wait their turn in arrival order. A request whose deadline passes
    while it waits is answered DeadlineExceeded and never runs."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._slots = asyncio.Semaphore(backend.max_concurrency)

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def submit(self, request: InferRequest) -> dict[str, np.ndarray]:
        timeout = None if request.deadline is None else request.deadline - time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded while queued") from None
        try:
            return await self._backend.infer(request.inputs)
        finally:
            self._slots.release()
