"""Buckets and quota counts in this process: the embedded default, O(1) per call.

Runs on the event loop without awaiting, so check-then-take is atomic; a call
admitted but then not run is given back what it took (``refund``, with the marks its
``acquire`` returned). State is
kept by (scope, limit name); a limit whose numbers change keeps what it has saved
up or used (clamped to the new burst), so a configuration reload loses no counts.

Quota time never goes back: a wall clock stepped back (NTP) reads as the latest wall
time seen (``quota_wall``), so rows taken then count in the current period, a refund
of them (its permit keeps that time) goes back to it, and a refusal's pushback is at
most one period. The wall's own next midnight does not start a new count early.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from mandant.tenancy.limits import MONOTONIC, Clock, Rate, TokenBucket
from mandant.tenancy.policy import ROWS, Denial, Marks, Plan, Scope, cost
from mandant.tenancy.quota import WALL, QuotaCounter

#: One limit of a plan, resolved to its state: (bucket, per row?, scope).
_Bucket = tuple[TokenBucket, bool, Scope]
_Counter = tuple[QuotaCounter, Scope]


class LocalStore:
    name = "local"

    def __init__(self, clock: Clock = MONOTONIC, wall: Clock = WALL) -> None:
        self._clock = clock
        self._wall = wall
        self._latest_wall = 0.0  # quota time: the latest wall time seen
        self._buckets: dict[tuple[Scope, str], TokenBucket] = {}
        self._counters: dict[tuple[Scope, str], QuotaCounter] = {}
        self._resolved: dict[tuple[str, str], tuple[Plan, list[_Bucket], list[_Counter]]] = {}

    def acquire(self, plan: Plan, rows: int, wall: float) -> Denial | Marks:
        """Take from every bucket and quota of ``plan`` and return the buckets' take
        marks, or take from none and say why: the limit with the longest wait, so
        that the call fits every limit when that wait is over. Quota rows count in
        the UTC day and month of ``quota_wall(wall)``: keep that time and the marks
        for ``refund``."""
        _, buckets, counters = self._state(plan)
        if counters:
            wall = self._seen(wall)
        now = 0.0
        denial: Denial | None = None
        if buckets:
            now = self._clock()
            for bucket, per_row, scope in buckets:
                wait = bucket.wait_s(rows if per_row else 1, now)
                if wait > 0.0 and (denial is None or wait > denial.retry_after_s):
                    denial = Denial(bucket.rate, scope, wait)
        for counter, scope in counters:
            wait = counter.wait_s(rows, wall)
            if wait > 0.0 and (denial is None or wait > denial.retry_after_s):
                denial = Denial(counter.quota, scope, wait)
        if denial is not None:
            return denial
        for counter, _ in counters:
            counter.take(rows, wall)
        return tuple([bucket.take(rows if per_row else 1, now) for bucket, per_row, _ in buckets])

    def request_denial(self, plan: Plan) -> Denial | None:
        """Why any call of ``plan`` would be refused now by a ``requests_per_s`` bucket
        (the longest wait), taking nothing; None if every one has a token."""
        denial: Denial | None = None
        now = self._clock()
        for bucket, per_row, scope in self._state(plan)[1]:
            if not per_row:
                wait = bucket.wait_s(1, now)
                if wait > 0.0 and (denial is None or wait > denial.retry_after_s):
                    denial = Denial(bucket.rate, scope, wait)
        return denial

    def refund(self, plan: Plan, rows: int, wall: float, marks: Marks) -> None:
        """Give back what ``acquire(plan, rows, wall)`` took (it returned ``marks``):
        tokens as far as each bucket would hold them (:mod:`mandant.tenancy.limits`),
        quota rows if their period still lasts. ``wall``: the ``quota_wall`` of the
        acquire. State forgotten since (a removed tenant) stays forgotten."""
        now = self._clock()
        for (scope, rate), mark in zip(plan.buckets, marks, strict=True):
            bucket = self._buckets.get((scope, rate.name))
            if bucket is not None:
                bucket.give(cost(rate, rows), mark, now)
        if plan.quotas:
            wall_now = self._seen(self._wall())
            for scope, quota in plan.quotas:
                counter = self._counters.get((scope, quota.name))
                if counter is not None:
                    counter.give(rows, wall, wall_now)

    def _state(self, plan: Plan) -> tuple[Plan, list[_Bucket], list[_Counter]]:
        resolved = self._resolved.get((plan.tenant, plan.model))
        if resolved is None or resolved[0] is not plan:
            resolved = self._resolve(plan)
        return resolved

    def _resolve(self, plan: Plan) -> tuple[Plan, list[_Bucket], list[_Counter]]:
        """The state behind each limit of a (new) plan; a limit whose numbers changed
        keeps its state, reconfigured."""
        now, wall = self._clock(), self._seen(self._wall())
        buckets: list[_Bucket] = []
        for scope, rate in plan.buckets:
            bucket = self._buckets.get((scope, rate.name))
            if bucket is None:
                bucket = self._buckets[(scope, rate.name)] = TokenBucket(rate, now)
            elif bucket.rate != rate:
                bucket.reconfigure(rate, now)
            buckets.append((bucket, rate.name == ROWS, scope))
        counters: list[_Counter] = []
        for scope, quota in plan.quotas:
            counter = self._counters.get((scope, quota.name))
            if counter is None:
                counter = self._counters[(scope, quota.name)] = QuotaCounter(quota, wall)
            elif counter.quota != quota:
                counter.reconfigure(quota)
            counters.append((counter, scope))
        resolved = self._resolved[(plan.tenant, plan.model)] = (plan, buckets, counters)
        return resolved

    def retain(self, scopes: Collection[Scope], rates: Mapping[tuple[Scope, str], Rate]) -> None:
        """After a reload: forget the state of scopes no longer configured, and switch
        the buckets kept to their new ``rates`` now. Switched at a bucket's next take
        instead, a bucket refilled at its old rate until then: a rate cut from 100/s
        to 0.1/s gave a drained tenant its whole burst back a second later."""
        self._resolved.clear()
        for table in (self._buckets, self._counters):
            for key in [key for key in table if key[0] not in scopes]:
                del table[key]
        now = self._clock()
        for key, bucket in self._buckets.items():
            rate = rates.get(key)
            if rate is not None and bucket.rate != rate:
                bucket.reconfigure(rate, now)

    def used(self, scope: Scope, quota_name: str) -> int:
        """Rows counted against one quota in its current period (0 if none yet)."""
        counter = self._counters.get((scope, quota_name))
        return 0 if counter is None else counter.used(self._seen(self._wall()))

    def quota_wall(self, wall: float) -> float:
        """The wall time quota rows of a call at ``wall`` count at (module doc):
        ``wall``, or the latest wall time this store has seen if that is later."""
        return wall if wall > self._latest_wall else self._latest_wall

    def _seen(self, wall: float) -> float:
        if wall > self._latest_wall:
            self._latest_wall = wall
        return self._latest_wall
