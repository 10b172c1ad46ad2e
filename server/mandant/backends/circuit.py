"""A circuit breaker for calls to a remote backend.

    CLOSED ──(failure_threshold failures in a row)──▶ OPEN
    OPEN ──(reset_timeout_s passed)──▶ HALF_OPEN: up to ``half_open_probes`` calls go through
    HALF_OPEN ──(a probe succeeds)──▶ CLOSED;  ──(a probe fails)──▶ OPEN again

While OPEN every call is refused at once, so a dead server costs callers nothing and
is not hammered; the half-open probes find out when it is back. Callers report each
call's :class:`CallOutcome`: only FAILED (unreachable, timed out) counts towards
opening; an error the server answered shows it works, since the breaker is shared by
every tenant and one tenant's bad inputs must not shut a model for all.

Each opening starts a new :attr:`CircuitBreaker.generation`; a caller passes the
generation it was let through in back with the outcome. Outcomes of calls let through
before the last opening count for nothing: a call sent before the circuit opened that
succeeds late says nothing about the server now, and closing on it would let every
caller through again at once (the circuit flapped open/closed with each late answer).
Only the calls let through since (a half-open probe) close it. Pure logic on an
injected clock (``time.monotonic`` by default): no I/O, no sleeping, no asyncio.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class CallOutcome(enum.Enum):
    """What one call let through says about the server behind the circuit."""

    ANSWERED = "answered"  # the server ran it and answered (an error answer too): it works
    FAILED = "failed"  # unreachable, or no answer in time: counts towards opening
    ABANDONED = "abandoned"  # the caller gave up first: says nothing


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 2.0,
        half_open_probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or half_open_probes < 1 or reset_timeout_s < 0:
            raise ValueError("failure_threshold and half_open_probes ≥ 1, reset_timeout_s ≥ 0")
        self._threshold = failure_threshold
        self._reset_timeout_s = reset_timeout_s
        self._max_probes = half_open_probes
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self._generation = 0

    @property
    def generation(self) -> int:
        """Which opening the circuit is in (0 until it first opens): read it when
        :meth:`allow` lets a call through, and pass it back with the call's outcome."""
        return self._generation

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self.retry_after_s == 0:
            return CircuitState.HALF_OPEN
        return self._state

    @property
    def reset_timeout_s(self) -> float:
        """Seconds an open circuit refuses every call before it lets a probe through."""
        return self._reset_timeout_s

    @property
    def retry_after_s(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        if self._state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._reset_timeout_s - self._clock())

    def allow(self) -> bool:
        """May a call go out now? A True in HALF_OPEN takes a probe slot: the caller
        must report the call's outcome with :meth:`record_success` or
        :meth:`record_failure` (or :meth:`record_abandoned` if it never finished)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        if self._state is CircuitState.OPEN:  # its reset timeout has just passed
            self._state = CircuitState.HALF_OPEN
            self._probes = 0
        if self._probes < self._max_probes:
            self._probes += 1
            return True
        return False

    def record(self, outcome: CallOutcome, generation: int | None = None) -> None:
        """Report the outcome of a call that :meth:`allow` let through in
        ``generation`` (None: the current one)."""
        if outcome is CallOutcome.ANSWERED:
            self.record_success(generation)
        elif outcome is CallOutcome.FAILED:
            self.record_failure(generation)
        else:
            self.record_abandoned(generation)

    def _stale(self, generation: int | None) -> bool:
        """A call let through before the circuit last opened: its outcome is old news."""
        return generation is not None and generation != self._generation

    def record_success(self, generation: int | None = None) -> None:
        if self._stale(generation):
            return
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._probes = 0

    def record_failure(self, generation: int | None = None) -> None:
        if self._stale(generation):
            return
        if self._state is CircuitState.HALF_OPEN:
            self._open()
            return
        self._failures += 1
        if self._state is CircuitState.CLOSED and self._failures >= self._threshold:
            self._open()

    def record_abandoned(self, generation: int | None = None) -> None:
        """A call that was let through ended without telling anything about the
        server (cancelled by its caller): give its probe slot back."""
        if self._stale(generation):
            return
        if self._state is CircuitState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def _open(self) -> None:
        self._state = CircuitState.OPEN
        self._generation += 1
        self._opened_at = self._clock()
        self._failures = 0
        self._probes = 0
