"""What the built-in dashboard shows, kept in process: per tenant, the last few
minutes in ``step_s`` slots (throughput, errors, rejections by reason, a latency
histogram to read p50/p99 from), the requests in flight; per model, the batch
sizes seen. Bounded by the configuration: only configured tenant ids and model
names are ever keys.

Latency quantiles come from log-spaced buckets (:data:`LATENCY_BOUNDS_S`, 15 % apart),
interpolated within a bucket, so they are within a few percent of the true value.
Call it from the event loop thread, like the rest of the data plane.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable
from typing import Any

from mandant.config import TenantConfig
from mandant.observability.slo import Clock, SloTracker
from mandant.tenancy.directory import TenantDirectory


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
        self.rejections: dict[str, int] = {}

    def reset(self, slot_id: int) -> None:
        self.slot_id = slot_id
        self.ok = 0
        self.errors = 0
        self.latency = [0] * (len(LATENCY_BOUNDS_S) + 1)
        self.rejections = {}


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
    history; the snapshot lists the current ones), or fixed tenant ids."""

    def __init__(
        self,
        tenants: Iterable[str] | TenantDirectory,
        models: Iterable[str],
        clock: Clock = time.monotonic,
        step_s: float = 5.0,
        span_s: float = 300.0,
        wall: Clock = time.time,
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
        self._tenants: dict[str, list[_Slot]] = {}
        self._inflight: dict[str, int] = {}
        for tenant in self._directory.current.ids:
            self._ring(tenant)
        self._batches: dict[str, dict[int, int]] = {model: {} for model in models}
        self._started = clock()

    def _ring(self, tenant: str) -> list[_Slot] | None:
        """The tenant's history, made on first use; None for tenants not configured."""
        if tenant not in self._directory.current.ids:
            return None
        self._inflight.setdefault(tenant, 0)
        return self._tenants.setdefault(tenant, [_Slot() for _ in range(self._slots_kept + 1)])

    def _slot(self, tenant: str) -> _Slot | None:
        ring = self._tenants.get(tenant) or self._ring(tenant)
        if ring is None:
            return None
        slot_id = int(self._clock() // self._step_s)
        slot = ring[slot_id % len(ring)]
        if slot.slot_id != slot_id:
            slot.reset(slot_id)
        return slot

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

    def record_rejection(self, tenant: str, reason: str) -> None:
        slot = self._slot(tenant)
        if slot is not None:
            slot.rejections[reason] = slot.rejections.get(reason, 0) + 1

    def record_batch(self, model: str, size: int) -> None:
        """``model``: a configured name (a model loaded after start too), or "" (skipped)."""
        if model:
            sizes = self._batches.setdefault(model, {})
            sizes[size] = sizes.get(size, 0) + 1

    def record_admitted(self, tenant: str, rows: int) -> None:
        """Rows admitted, counted per UTC day and month (wall clock, like quotas)."""
        if tenant not in self._inflight and self._ring(tenant) is None:
            return
        day, month = self._periods()
        counts = self._admitted.setdefault(tenant, [day, 0, month, 0])
        if counts[0] != day:
            counts[0], counts[1] = day, 0
        if counts[2] != month:
            counts[2], counts[3] = month, 0
        counts[1] += rows
        counts[3] += rows

    def quota_used(self, tenant: str) -> dict[str, int]:
        """Rows admitted by this process today and this month (UTC)."""
        day, month = self._periods()
        counts = self._admitted.get(tenant, [day, 0, month, 0])
        return {
            "rows_today": counts[1] if counts[0] == day else 0,
            "rows_this_month": counts[3] if counts[2] == month else 0,
        }

    def _periods(self) -> tuple[int, int]:
        """UTC day number and year*12+month, the month worked out once per day."""
        day = int(self._wall() // 86400)
        if day != self._day_cache[0]:
            now = time.gmtime(day * 86400)
            self._day_cache = (day, now.tm_year * 12 + now.tm_mon)
        return self._day_cache

    def inflight_changed(self, tenant: str, delta: int) -> None:
        if tenant in self._inflight or self._ring(tenant) is not None:
            self._inflight[tenant] += delta

    def snapshot(self, slo: SloTracker, only: str | None = None) -> dict[str, Any]:
        """Everything the dashboard draws, JSON-ready. Times in ms, rates per second;
        ``history`` is oldest first, one point per ``step_s`` slot, the current
        (partial) slot last; the high percentile is the tenant's SLO percentile (99
        without one). ``only``: that tenant's figures alone, and no model's (batches
        mix tenants)."""
        now = self._clock()
        now_slot = int(now // self._step_s)
        first = now_slot - self._slots_kept + 1
        tenants = []
        for tenant in (t.id for t in self._directory.current.configs):
            if only is not None and tenant != only:
                continue
            ring = self._ring(tenant)
            assert ring is not None
            by_id = {s.slot_id: s for s in ring if first <= s.slot_id <= now_slot}
            objective = slo.objective(tenant)
            high_q = (objective.percentile if objective is not None else 99.0) / 100.0
            history = []
            merged = [0] * (len(LATENCY_BOUNDS_S) + 1)
            ok = errors = 0
            rejections: dict[str, int] = {}
            for slot_id in range(first, now_slot + 1):
                slot = by_id.get(slot_id)
                width = (now - slot_id * self._step_s) if slot_id == now_slot else self._step_s
                width = max(width, 1e-3)
                if slot is None:
                    history.append(
                        {
                            "t": (slot_id - now_slot) * self._step_s,
                            "rps": 0.0,
                            "errors_per_s": 0.0,
                            "p50_ms": None,
                            "p99_ms": None,
                        }
                    )
                    continue
                ok += slot.ok
                errors += slot.errors
                for reason, count in slot.rejections.items():
                    rejections[reason] = rejections.get(reason, 0) + count
                merged = [a + b for a, b in zip(merged, slot.latency, strict=True)]
                history.append(
                    {
                        "t": (slot_id - now_slot) * self._step_s,
                        "rps": slot.ok / width,
                        "errors_per_s": slot.errors / width,
                        "p50_ms": _ms(quantile(slot.latency, 0.5)),
                        "p99_ms": _ms(quantile(slot.latency, high_q)),
                    }
                )
            span = max(min(now - self._started, self._slots_kept * self._step_s), 1e-3)
            tenants.append(
                {
                    "id": tenant,
                    "slo": None
                    if objective is None
                    else {
                        "latency_ms": objective.latency_ms,
                        "percentile": objective.percentile,
                        "objective": objective.objective,
                    },
                    "windows": slo.report(tenant) if objective is not None else None,
                    "inflight": self._inflight[tenant],
                    "span_s": span,
                    "requests": ok,
                    "errors": errors,
                    "rps": ok / span,
                    "p50_ms": _ms(quantile(merged, 0.5)),
                    "p99_ms": _ms(quantile(merged, high_q)),
                    "rejections": rejections,
                    "history": history,
                }
            )
        models = [
            {"name": name, "batch_sizes": {str(k): v for k, v in sorted(sizes.items())}}
            for name, sizes in self._batches.items()
            if only is None
        ]
        return {"step_s": self._step_s, "tenants": tenants, "models": models}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)
