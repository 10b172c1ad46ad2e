"""What the built-in dashboard shows, kept in process: per tenant, the last few
minutes in ``step_s`` slots (throughput, errors, rejections by reason, a latency
histogram to read p50/p99 from), the requests in flight; per model (name and owner:
a tenant's private model or tuned variant apart from the shared one), the batch sizes
seen. Bounded by the configuration: only configured tenant ids and model names are
ever keys, and a model no longer served is dropped (:meth:`LiveStats.forget`).

Latency quantiles come from log-spaced buckets (:data:`LATENCY_BOUNDS_S`, 15 % apart),
interpolated within a bucket, so they are within a few percent of the true value.
Call it from the event loop thread, like the rest of the data plane.
"""

from __future__ import annotations

import bisect
import math
import operator
import time
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any

from mandant.config import TenantConfig
from mandant.observability.slo import Clock, SloTracker
from mandant.observability.stats import size_key
from mandant.tenancy.directory import TenantDirectory
from mandant.types import ServedModels


def _log_bounds(low_s: float, high_s: float, ratio: float) -> tuple[float, ...]:
    count = math.ceil(math.log(high_s / low_s) / math.log(ratio)) + 1
    return tuple(low_s * ratio**i for i in range(count))


#: Upper bounds of the in-process latency buckets: 50 µs … ~60 s, 15 % apart.
LATENCY_BOUNDS_S = _log_bounds(50e-6, 60.0, 1.15)


class _Slot:
    __slots__ = ("errors", "latency", "ok", "rejections", "slot_id")

    def __init__(self) -> None:
        self.slot_id = -1
        self.ok = 0
        self.errors = 0
        self.latency = [0] * (len(LATENCY_BOUNDS_S) + 1)
        self.rejections: dict[tuple[str, str], int] = {}  # (reason, model): calls

    def reset(self, slot_id: int) -> None:
        self.slot_id = slot_id
        self.ok = 0
        self.errors = 0
        self.latency = [0] * (len(LATENCY_BOUNDS_S) + 1)
        self.rejections = {}


class _History:
    """One tenant's slots (a ring: ``kept`` of them plus one being reused) and the
    sums of its closed slots in the span kept, ``(end - length, end]``, moved slot by
    slot: a closed slot is folded in once and taken out once (when it leaves the span,
    or when its place is reused), so the overview's cost is the slots that moved since
    the last one, not every slot of every tenant."""

    __slots__ = ("end", "errors", "latency", "length", "ok", "slots")

    def __init__(self, kept: int) -> None:
        self.slots = [_Slot() for _ in range(kept + 1)]
        self.length = kept - 1  # the closed slots of the span: all but the current
        self.end = -(2**62)
        self.ok = 0
        self.errors = 0
        self.latency = [0] * (len(LATENCY_BOUNDS_S) + 1)

    def slot(self, slot_id: int) -> _Slot:
        """The slot to record into (the current one), reset when its place is reused."""
        slot = self.slots[slot_id % len(self.slots)]
        if slot.slot_id != slot_id:
            if self.end - self.length < slot.slot_id <= self.end:
                self._take(slot, -1)
            slot.reset(slot_id)
        return slot

    def at(self, slot_id: int) -> _Slot | None:
        slot = self.slots[slot_id % len(self.slots)]
        return slot if slot.slot_id == slot_id else None

    def _take(self, slot: _Slot, sign: int) -> None:
        self.ok += sign * slot.ok
        self.errors += sign * slot.errors
        if slot.ok:
            combine = operator.add if sign > 0 else operator.sub
            self.latency = list(map(combine, self.latency, slot.latency))

    def totals(self, now_slot: int) -> tuple[int, int, list[int]]:
        """Successes, errors and the latency histogram of the span ending with
        ``now_slot`` (the current slot included)."""
        target, length = now_slot - 1, self.length
        if target > self.end:
            for slot_id in range(max(self.end - length + 1, target - 2 * length),
                                 min(self.end, target - length) + 1):  # fmt: skip
                slot = self.at(slot_id)  # left the span
                if slot is not None:
                    self._take(slot, -1)
            if target - self.end > length:
                self.ok = self.errors = 0
                self.latency = [0] * len(self.latency)
            for slot_id in range(max(self.end + 1, target - length + 1), target + 1):
                slot = self.at(slot_id)  # closed within the span
                if slot is not None:
                    self._take(slot, 1)
            self.end = target
        current = self.at(now_slot)
        if current is None:
            return self.ok, self.errors, self.latency
        latency = (
            list(map(operator.add, self.latency, current.latency)) if current.ok else self.latency
        )
        return self.ok + current.ok, self.errors + current.errors, latency


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram over :data:`LATENCY_BOUNDS_S`, seconds."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            lower = LATENCY_BOUNDS_S[index - 1] if index > 0 else 0.0
            upper = LATENCY_BOUNDS_S[index] if index < len(LATENCY_BOUNDS_S) else lower
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    return LATENCY_BOUNDS_S[-1]


class LiveStats:
    """Rolling per-tenant traffic for the dashboard (``span_s`` of history).
    ``tenants``: the tenant directory (tenants added by a reload get their own
    history; the snapshot lists the current ones), or fixed tenant ids. ``models``:
    the (name, owner) pairs of the models served now, listed before their first batch
    (read when a snapshot is drawn: a model a reload or a load brought had no card
    until its first batch, where one configured at start had).
    ``inflight``: a tenant's calls in flight, read when a snapshot is drawn (the
    admission's count, which caps them: the one count there is)."""

    def __init__(
        self,
        tenants: Iterable[str] | TenantDirectory,
        models: Callable[[], Iterable[tuple[str, str]]],
        clock: Clock = time.monotonic,
        step_s: float = 5.0,
        span_s: float = 300.0,
        wall: Clock = time.time,
        inflight: Callable[[str], int] = lambda tenant: 0,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._admitted: dict[str, list[int]] = {}  # [day, rows, month, rows]
        self._day_cache = (-1, -1)
        self._step_s = step_s
        self._slots_kept = max(1, round(span_s / step_s))
        self._directory = (
            tenants
            if isinstance(tenants, TenantDirectory)
            else TenantDirectory(TenantConfig(id=t) for t in tenants)
        )
        self._tenants: dict[str, _History] = {}
        self._inflight = inflight
        for tenant in self._directory.current.ids:
            self._ring(tenant)
        #: (model name, owner: a tenant id, "" shared) -> batch size -> batches.
        self._batches: dict[tuple[str, str], dict[int, int]] = {}
        self._models = models
        self._started = clock()

    def _ring(self, tenant: str) -> _History | None:
        """The tenant's history, made on first use; None for tenants not configured."""
        if tenant not in self._directory.current.ids:
            return None
        history = self._tenants.get(tenant)
        if history is None:
            history = self._tenants[tenant] = _History(self._slots_kept)
        return history

    def _slot(self, tenant: str) -> _Slot | None:
        ring = self._tenants.get(tenant) or self._ring(tenant)
        if ring is None:
            return None
        return ring.slot(int(self._clock() // self._step_s))

    def record_request(self, tenant: str, code: str, duration_s: float) -> None:
        """One answered inference call; latency is kept for successful ones."""
        slot = self._slot(tenant)
        if slot is None:
            return
        if code == "OK":
            slot.ok += 1
            slot.latency[bisect.bisect_left(LATENCY_BOUNDS_S, duration_s)] += 1
        else:
            slot.errors += 1

    def record_rejection(self, tenant: str, reason: str, model: str = "") -> None:
        """One refused call; ``model``: the configured model whose own limit fired."""
        slot = self._slot(tenant)
        if slot is not None:
            key = (reason, model)
            slot.rejections[key] = slot.rejections.get(key, 0) + 1

    def record_batch(self, model: str, size: int, owner: str = "") -> None:
        """``model``: a configured name (a model loaded after start too), or "" (skipped);
        ``owner``: the tenant owning it (a private model or a tuned variant), "" if
        shared: models of one name are kept apart."""
        if model:
            sizes = self._batches.get((model, owner))
            if sizes is None:  # not setdefault: a dict made on every batch
                sizes = self._batches[model, owner] = {}
            size = size_key(size)
            sizes[size] = sizes.get(size, 0) + 1

    def forget(self, served: ServedModels) -> None:
        """Drop the batch sizes of the models ``served`` does not list (an owner's
        variant apart from the shared model of its name), and the rejections their
        own limits made (a tenant's rejections by its own limits stay)."""
        for gone in [model for model in self._batches if not served.serves(*model)]:
            del self._batches[gone]
        for history in self._tenants.values():
            for slot in history.slots:
                if any(model and not served.serves(model) for _, model in slot.rejections):
                    slot.rejections = {
                        (reason, model): count
                        for (reason, model), count in slot.rejections.items()
                        if not model or served.serves(model)
                    }

    def forget_tenants(self, tenants: Container[str]) -> None:
        """Drop the history and admitted rows of the tenants not in ``tenants``
        (removed by a reload): a tenant added later under the same id must not read
        them as its own."""
        for table in (self._tenants, self._admitted):
            for tenant in [tenant for tenant in table if tenant not in tenants]:
                del table[tenant]

    def record_admitted(self, tenant: str, rows: int) -> None:
        """Rows admitted, counted per UTC day and month (wall clock, like quotas)."""
        if tenant not in self._tenants and self._ring(tenant) is None:
            return
        day, month = self._periods()
        counts = self._admitted.get(tenant)
        if counts is None:  # not setdefault: a list made on every call
            counts = self._admitted[tenant] = [day, 0, month, 0]
        # A new day (month) starts the count again; a wall clock stepped back (NTP)
        # across midnight goes on counting in the later one (it emptied it).
        if day > counts[0]:
            counts[0], counts[1] = day, 0
        if month > counts[2]:
            counts[2], counts[3] = month, 0
        counts[1] += rows
        counts[3] += rows

    def record_refunded(self, tenant: str, rows: int, admitted_at: float = 0.0) -> None:
        """Admitted rows given back (the model did not run them): taken off the counts
        of the day and month they were admitted in (``admitted_at``, wall clock; 0:
        now), as quotas give them back: a call admitted before midnight and refunded
        after it took them off the new day's."""
        counts = self._admitted.get(tenant)
        if counts is None:
            return
        day, month = self._periods(admitted_at) if admitted_at else self._periods()
        if counts[0] == day:
            counts[1] = max(0, counts[1] - rows)
        if counts[2] == month:
            counts[3] = max(0, counts[3] - rows)

    def quota_used(self, tenant: str) -> dict[str, int]:
        """Rows admitted by this process today and this month (UTC), net of refunds."""
        day, month = self._periods()
        counts = self._admitted.get(tenant, [day, 0, month, 0])
        return {  # a count ahead of the wall clock (stepped back) is still the latest
            "rows_today": counts[1] if counts[0] >= day else 0,
            "rows_this_month": counts[3] if counts[2] >= month else 0,
        }

    def _periods(self, wall: float | None = None) -> tuple[int, int]:
        """UTC day number and year*12+month of ``wall`` (default: now), the month
        worked out once per day."""
        day = int((self._wall() if wall is None else wall) // 86400)
        if day != self._day_cache[0]:
            when = time.gmtime(day * 86400)
            if wall is not None:  # another day than now's: not cached
                return day, when.tm_year * 12 + when.tm_mon
            self._day_cache = (day, when.tm_year * 12 + when.tm_mon)
        return self._day_cache

    def snapshot(self, slo: SloTracker, only: str | None = None) -> dict[str, Any]:
        """The overview the dashboard's table draws, JSON-ready: one row per tenant
        (:meth:`_summary`, no history), worst burn rate first (:func:`burn_order`),
        and per model the batch sizes seen. ``only``: that tenant's row alone, and no
        model's (batches mix tenants)."""
        now = self._clock()
        rows = [
            self._summary(slo, tenant, now)[0]
            for tenant in self._directory.current.ids
            if only is None or tenant == only
        ]
        rows.sort(key=burn_order)
        models = []
        if only is None:
            batches = self._batches
            for name, owner in sorted({*self._models(), *batches}):
                sizes = batches.get((name, owner), {})
                models.append(
                    {
                        "name": name,
                        "owner": owner,
                        "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
                    }
                )
        return {"step_s": self._step_s, "span_s": self._span_s(now), "tenants": rows,
                "models": models}  # fmt: skip

    def detail(self, slo: SloTracker, tenant: str) -> dict[str, Any] | None:
        """One tenant's row with its ``history``: oldest first, one point per
        ``step_s`` slot, the current (partial) slot last; None for a tenant not
        configured."""
        if tenant not in self._directory.current.ids:
            return None
        now = self._clock()
        row, slots = self._summary(slo, tenant, now)
        objective = slo.objective(tenant)
        high_q = (objective.percentile if objective is not None else 99.0) / 100.0
        now_slot = int(now // self._step_s)
        history = []
        for slot_id in range(now_slot - self._slots_kept + 1, now_slot + 1):
            slot = slots.get(slot_id)
            width = (now - slot_id * self._step_s) if slot_id == now_slot else self._step_s
            width = max(width, 1e-3)
            history.append(
                {
                    "t": (slot_id - now_slot) * self._step_s,
                    "rps": _rate(slot.ok / width) if slot else 0.0,
                    "errors_per_s": _rate(slot.errors / width) if slot else 0.0,
                    "p50_ms": _ms(quantile(slot.latency, 0.5)) if slot else None,
                    "p99_ms": _ms(quantile(slot.latency, high_q)) if slot else None,
                }
            )
        row["history"] = history
        return {"step_s": self._step_s, "span_s": self._span_s(now), "tenant": row}

    def _span_s(self, now: float) -> float:
        """The time the rates are over: the history kept, or less since the start."""
        return max(min(now - self._started, self._slots_kept * self._step_s), 1e-3)

    def _summary(
        self, slo: SloTracker, tenant: str, now: float
    ) -> tuple[dict[str, Any], dict[int, _Slot]]:
        """The tenant's figures over the history kept (times in ms, rates per second;
        the high percentile is its SLO percentile, 99 without one; ``windows``: SLO
        attainment, burn rate and error budget, None without an SLO), and its slots
        in that span by slot id."""
        history = self._ring(tenant)
        assert history is not None
        now_slot = int(now // self._step_s)
        first = now_slot - self._slots_kept + 1
        slots = {s.slot_id: s for s in history.slots if first <= s.slot_id <= now_slot}
        objective = slo.objective(tenant)
        high_q = (objective.percentile if objective is not None else 99.0) / 100.0
        ok, errors, latency = history.totals(now_slot)
        rejections: dict[tuple[str, str], int] = {}
        for slot in slots.values():
            for key, count in slot.rejections.items():
                rejections[key] = rejections.get(key, 0) + count
        row = {
            "id": tenant,
            "slo": None
            if objective is None
            else {
                "latency_ms": objective.latency_ms,
                "percentile": objective.percentile,
                "objective": objective.objective,
            },
            "windows": slo.report(tenant) if objective is not None else None,
            "inflight": self._inflight(tenant),
            "requests": ok,
            "errors": errors,
            "rps": _rate(ok / self._span_s(now)),
            "p50_ms": _ms(quantile(latency, 0.5)),
            "p99_ms": _ms(quantile(latency, high_q)),
            "rejections": [
                {"reason": reason, "model": model, "count": count}
                for (reason, model), count in sorted(
                    rejections.items(), key=lambda item: (-item[1], item[0])
                )
            ],
        }
        return row, slots


def burn_order(row: Mapping[str, Any]) -> tuple[bool, float, bool, float, str]:
    """Sort key of overview rows, worst first: the 5-minute burn rate, then the
    1-hour one, highest first; tenants with nothing to judge (no SLO, no calls)
    last; then by id."""
    windows = row["windows"] or {}
    fast = (windows.get("5m") or {}).get("burn_rate")
    slow = (windows.get("1h") or {}).get("burn_rate")
    return (fast is None, -(fast or 0.0), slow is None, -(slow or 0.0), row["id"])


def _rate(per_s: float) -> float:
    return round(per_s, 3)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)
