"""Token-bucket math: pure, O(1), on an injected monotonic clock.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second. A
request costing ``n`` tokens is admitted when ``n`` tokens are there; otherwise it is
refused, takes nothing, and learns exactly how long until ``n`` tokens will be there.
Checking and taking are separate steps so that a request meeting several buckets
(requests, rows) takes from all of them or from none.

Tokens taken for a call that then did not run are given back, exactly as far as the
bucket would hold them had they never been taken: a bucket that would have filled to
its burst meanwhile has lost that refill, and a bucket that has reached its burst since
gives back nothing. That is ``min(cost, burst - highest level since the take)``
(:func:`refund_s`), so each bucket keeps the levels its recent takes found
(:class:`Peaks`); a refund never lets a tenant past its rate.
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_right
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds from an arbitrary origin, never going backwards."""
        ...


MONOTONIC: Clock = time.monotonic

#: Take marks, one count for every bucket of the process: a bucket made again (a
#: tenant removed and added back) never reads a mark of the one before as its own.
_MARKS = itertools.count(1)
#: Levels a bucket keeps, at most; past that the older half goes at once (so that the
#: Redis scripts, which keep them in one string, cut it once in 16 takes). A take older
#: than the oldest kept gets nothing back (it stays charged: a refund never gives back
#: more than it should).
MAX_PEAKS = 32


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


def refund_s(cost: float, burst: float, highest: float) -> float:
    """What giving back ``cost`` adds to a bucket whose level has been at most
    ``highest`` since the take: the part of ``cost`` the bucket would still hold had it
    never been taken (the rest would have been refill lost at the burst)."""
    return max(0.0, min(cost, burst - highest))


class Peaks:
    """The highest level of one bucket since any of its takes. Levels only rise
    between takes, so it is the highest level a later take found (or the level now):
    kept as a falling staircase of (take mark, level found), the highest since a take
    is the first step after it."""

    __slots__ = ("_floor", "_levels", "_marks")

    def __init__(self) -> None:
        self._marks: list[int] = []
        self._levels: list[float] = []
        self._floor = 0  # takes before this mark get nothing back (their step is gone)

    def add(self, mark: int, level: float) -> None:
        """Take ``mark`` (larger than every mark before) found the bucket at ``level``."""
        marks, levels = self._marks, self._levels
        while levels and levels[-1] <= level:
            marks.pop()
            levels.pop()
        marks.append(mark)
        levels.append(level)
        if len(marks) > MAX_PEAKS:
            cut = len(marks) - MAX_PEAKS // 2
            self._floor = marks[cut - 1]
            del marks[:cut], levels[:cut]

    def refund(self, mark: int, cost: float, burst: float, level: float) -> float:
        """What giving back take ``mark``'s ``cost`` adds to the bucket, at ``level``
        now. The levels later takes found are raised to what they would have been
        without that take (by what it would have kept of its cost up to each: the
        same for all, since the first step after it is the highest), so that the
        next refund is exact too."""
        if mark < self._floor:
            return 0.0
        marks, levels = self._marks, self._levels
        step = bisect_right(marks, mark)
        if step == len(levels):
            return refund_s(cost, burst, level)
        first = levels[step]
        lift = refund_s(cost, burst, first)
        if lift > 0.0:
            for i in range(step, len(levels)):
                levels[i] += lift
            while step and levels[step - 1] <= levels[step]:
                step -= 1
                del marks[step], levels[step]
        return refund_s(cost, burst, max(first, level))


class TokenBucket:
    """One bucket; starts full. Every method takes ``now`` (monotonic seconds)."""

    __slots__ = ("_peaks", "_tokens", "_updated", "rate")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self._tokens = rate.burst
        self._updated = now
        self._peaks = Peaks()

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

    def take(self, cost: float, now: float) -> int:
        """Take ``cost`` tokens; call only after ``wait_s(cost, now) == 0``. Returns
        the take's mark, for :meth:`give`."""
        level = self.tokens(now)
        mark = next(_MARKS)
        self._peaks.add(mark, level)
        self._tokens = level - cost
        return mark

    def try_take(self, cost: float, now: float) -> float:
        """Take ``cost`` tokens and return 0.0, or take nothing and return the wait."""
        wait = self.wait_s(cost, now)
        if wait == 0.0:
            self.take(cost, now)
        return wait

    def give(self, cost: float, mark: int, now: float) -> None:
        """Give back the ``cost`` tokens take ``mark`` took for a call that did not run,
        as far as the bucket would hold them (module doc)."""
        level = self.tokens(now)
        self._tokens = level + self._peaks.refund(mark, cost, self.rate.burst, level)

    def reconfigure(self, rate: Rate, now: float) -> None:
        """Switch to a new rate keeping what is saved up (clamped to the new burst),
        so that a configuration change neither refills nor empties the bucket. Takes
        before it are given back nothing (their levels were of the old burst)."""
        tokens = self.tokens(now)
        self.rate = rate
        self._tokens = min(tokens, rate.burst)
        self._peaks.add(next(_MARKS), rate.burst)
