"""Token-bucket math: pure, O(1), on an injected monotonic clock.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second. A
request costing ``n`` tokens is admitted when ``n`` tokens are there; otherwise it is
refused, takes nothing, and learns exactly how long until ``n`` tokens will be there.
Tokens taken for a call that then did not run are given back (up to the burst).
Checking and taking are separate steps so that a request meeting several buckets
(requests, rows) takes from all of them or from none.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds from an arbitrary origin, never going backwards."""
        ...


MONOTONIC: Clock = time.monotonic


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_s`` tokens per second, at most ``burst`` saved up. ``name`` is the
    configuration field it came from (``requests_per_s``, ``rows_per_s``)."""

    name: str
    per_s: float
    burst: float

    def __post_init__(self) -> None:
        if self.per_s <= 0 or self.burst <= 0:
            raise ValueError("a rate and its burst are positive")


class TokenBucket:
    """One bucket; starts full. Every method takes ``now`` (monotonic seconds)."""

    __slots__ = ("_tokens", "_updated", "rate")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self._tokens = rate.burst
        self._updated = now

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (refills, never above the burst)."""
        if now > self._updated:
            self._tokens = min(
                self.rate.burst, self._tokens + (now - self._updated) * self.rate.per_s
            )
            self._updated = now
        return self._tokens

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` tokens are there: 0.0 if they are there now.
        A cost above the burst never fits; callers refuse it up front."""
        missing = cost - self.tokens(now)
        return 0.0 if missing <= 0 else missing / self.rate.per_s

    def take(self, cost: float, now: float) -> None:
        """Take ``cost`` tokens; call only after ``wait_s(cost, now) == 0``."""
        self._tokens = self.tokens(now) - cost

    def try_take(self, cost: float, now: float) -> float:
        """Take ``cost`` tokens and return 0.0, or take nothing and return the wait."""
        wait = self.wait_s(cost, now)
        if wait == 0.0:
            self._tokens -= cost
        return wait

    def give(self, cost: float, now: float) -> None:
        """Give back ``cost`` tokens taken for a call that did not run (never above
        the burst: what refilled meanwhile is not counted twice)."""
        self._tokens = min(self.rate.burst, self.tokens(now) + cost)

    def reconfigure(self, rate: Rate, now: float) -> None:
        """Switch to a new rate keeping what is saved up (clamped to the new burst),
        so that a configuration change neither refills nor empties the bucket."""
        tokens = self.tokens(now)
        self.rate = rate
        self._tokens = min(tokens, rate.burst)
