"""Calendar quotas: rows per UTC day or UTC month, on the wall clock.

Quotas are budgets that operators sell by the day or the month, so they follow the
calendar (UTC), not a sliding window: the count starts again at 00:00 UTC, or on the
first of the month. ``wall`` is POSIX seconds (``time.time()``), injectable in tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from mandant.tenancy.limits import Clock

WALL: Clock = time.time  # wall clock: quotas only; every rate uses MONOTONIC

PeriodKind = Literal["day", "month"]


@dataclass(frozen=True, slots=True)
class Quota:
    """At most ``limit`` rows per ``period``; ``name`` is the configuration field."""

    name: str
    limit: int
    period: PeriodKind


@dataclass(frozen=True, slots=True)
class Period:
    """One calendar period: ``key`` names it (``2024-05-17``, ``2024-05``),
    ``reset_at`` is the wall time it ends and ``start`` the wall time it began."""

    key: str
    reset_at: float
    start: float


def period_at(kind: PeriodKind, wall: float) -> Period:
    moment = datetime.fromtimestamp(wall, UTC)
    if kind == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        begin = start.timestamp()
        return Period(start.strftime("%Y-%m-%d"), begin + 86400.0, begin)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return Period(
        moment.strftime("%Y-%m"),
        datetime(year, month, 1, tzinfo=UTC).timestamp(),
        datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp(),
    )


class PeriodTracker:
    """The current period of one kind, recomputed only when it ends (O(1) per call).
    ``at`` gives the period of any moment: one before the current period (a call
    charged before midnight and refunded after it) is computed, and the tracker
    stays where it is."""

    __slots__ = ("_current", "kind")

    def __init__(self, kind: PeriodKind, wall: float) -> None:
        self.kind = kind
        self._current = period_at(kind, wall)

    def at(self, wall: float) -> Period:
        current = self._current
        if wall >= current.reset_at:
            current = self._current = period_at(self.kind, wall)
        elif wall < current.start:
            return period_at(self.kind, wall)
        return current


class QuotaCounter:
    """Rows used in the current period of one quota, in process memory. The period
    only moves forward: rows taken at a wall time before it (the clock stepped back)
    count in it, so a refund must name a time within it (``LocalStore`` gives its
    counters no wall time older than the latest it has seen, and its permits keep
    that time)."""

    __slots__ = ("_reset_at", "_start", "_used", "quota")

    def __init__(self, quota: Quota, wall: float) -> None:
        self.quota = quota
        period = period_at(quota.period, wall)
        self._start, self._reset_at = period.start, period.reset_at
        self._used = 0

    def used(self, wall: float) -> int:
        if wall >= self._reset_at:
            period = period_at(self.quota.period, wall)
            self._start, self._reset_at = period.start, period.reset_at
            self._used = 0
        return self._used

    def wait_s(self, rows: int, wall: float) -> float:
        """0.0 if ``rows`` more fit in this period, else the seconds until it resets,
        counted from ``wall`` or from the period's start if the wall is behind it
        (stepped back): never more than one period's length."""
        if self.used(wall) + rows <= self.quota.limit:
            return 0.0
        return self._reset_at - max(wall, self._start)

    def take(self, rows: int, wall: float) -> None:
        self._used = self.used(wall) + rows

    def give(self, rows: int, charged_at: float, wall: float) -> None:
        """Give back ``rows`` taken at wall time ``charged_at`` (a call that did not
        run): only while that period lasts; a new period starts at zero anyway. O(1):
        ``charged_at`` against the current period's bounds."""
        used = self.used(wall)
        if self._start <= charged_at < self._reset_at:
            self._used = max(0, used - rows)

    def reconfigure(self, quota: Quota) -> None:
        """A new limit for the same period: rows already used this period stay used."""
        self.quota = quota
