"""Time for the schedulers: read it, and be called back at a given moment. Injected,
so unit tests drive time by hand instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on the ``time.monotonic()`` scale (request deadlines use it)."""
        ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` on the event loop once ``monotonic()`` reaches ``when``."""
        ...


class LoopClock:
    """``time.monotonic()``, with timers on the running event loop."""

    def monotonic(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        delay = max(0.0, when - time.monotonic())
        return asyncio.get_running_loop().call_later(delay, callback)
