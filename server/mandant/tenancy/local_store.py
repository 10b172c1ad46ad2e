"""Buckets and quota counts in this process: the embedded default, O(1) per call.

Runs on the event loop without awaiting, so check-then-take is atomic. State is
kept by (scope, limit name); a limit whose numbers change keeps what it has saved
up or used (clamped to the new burst), so a configuration reload loses no counts.
"""

from __future__ import annotations

from collections.abc import Collection

from mandant.tenancy.limits import MONOTONIC, Clock, TokenBucket
from mandant.tenancy.policy import Denial, Plan, Scope, cost
from mandant.tenancy.quota import WALL, QuotaCounter


class LocalStore:
    name = "local"

    def __init__(self, clock: Clock = MONOTONIC, wall: Clock = WALL) -> None:
        self._clock = clock
        self._wall = wall
        self._buckets: dict[tuple[Scope, str], TokenBucket] = {}
        self._counters: dict[tuple[Scope, str], QuotaCounter] = {}

    def acquire(self, plan: Plan, rows: int) -> Denial | None:
        """Take from every bucket and quota of ``plan``, or from none and say why."""
        buckets: list[TokenBucket] = []
        if plan.buckets:
            now = self._clock()
            for scope, rate in plan.buckets:
                bucket = self._buckets.get((scope, rate.name))
                if bucket is None:
                    bucket = self._buckets[(scope, rate.name)] = TokenBucket(rate, now)
                elif bucket.rate is not rate and bucket.rate != rate:
                    bucket.reconfigure(rate, now)
                wait = bucket.wait_s(cost(rate, rows), now)
                if wait > 0.0:
                    return Denial(rate, scope, wait)
                buckets.append(bucket)
        counters: list[QuotaCounter] = []
        if plan.quotas:
            wall = self._wall()
            for scope, quota in plan.quotas:
                counter = self._counters.get((scope, quota.name))
                if counter is None:
                    counter = self._counters[(scope, quota.name)] = QuotaCounter(quota, wall)
                elif counter.quota != quota:
                    counter.reconfigure(quota)
                wait = counter.wait_s(rows, wall)
                if wait > 0.0:
                    return Denial(quota, scope, wait)
                counters.append(counter)
            for counter in counters:
                counter.take(rows, wall)
        for bucket in buckets:
            bucket.take(cost(bucket.rate, rows), now)
        return None

    def retain(self, scopes: Collection[Scope]) -> None:
        """Forget the state of scopes no longer configured (after a reload)."""
        for table in (self._buckets, self._counters):
            for key in [key for key in table if key[0] not in scopes]:
                del table[key]

    def used(self, scope: Scope, quota_name: str) -> int:
        """Rows counted against one quota in its current period (0 if none yet)."""
        counter = self._counters.get((scope, quota_name))
        return 0 if counter is None else counter.used(self._wall())
