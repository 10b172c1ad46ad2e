"""Per-tenant latency SLO attainment over rolling windows, in process.

A request counts toward a tenant's SLO when the server answered it on its own
account: ``OK`` or a server-side failure (:data:`SLO_CODES`). It is *good* when it
is ``OK`` and no slower than the tenant's ``slo.latency_ms``. Client mistakes (bad
key, unknown model, bad input) and the tenant's own limits (``RESOURCE_EXHAUSTED``)
spend no error budget; a refusal for the server-wide cap on calls (or a place at the
door another tenant's call took) is on the server's account and is bad
(``Observer.request_finished``'s ``busy``). The same rule feeds the Prometheus
good/total counters, so the dashboard and PromQL agree.

Counts live in a ring of fixed time slots (``resolution_s`` wide) covering the
longest window; a window's sum is exact to within one slot. Time comes from an
injected clock (``time.monotonic`` by default), never the wall clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass

from mandant.config import SloConfig, TenantConfig
from mandant.tenancy.directory import TenantDirectory

Clock = Callable[[], float]

#: Status names that count toward a latency SLO (OK is good when fast enough).
SLO_CODES = frozenset({"OK", "DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL", "UNKNOWN"})

#: The rolling windows computed in process, by display name.
WINDOWS_S: Mapping[str, float] = {"5m": 300.0, "1h": 3600.0}


def is_good(code: str, duration_s: float, threshold_s: float) -> bool:
    return code == "OK" and duration_s <= threshold_s


@dataclass(frozen=True, slots=True)
class Attainment:
    """Good and eligible requests of one tenant in one window."""

    window_s: float
    good: int
    total: int
    objective: float

    @property
    def ratio(self) -> float | None:
        """Fraction of good requests; None when there were none to judge."""
        return self.good / self.total if self.total else None

    @property
    def burn_rate(self) -> float | None:
        """How fast the error budget burns: 1.0 spends exactly the budget; None when
        there were no requests to judge (no traffic burns nothing, but says nothing)."""
        if not self.total:
            return None
        return ((self.total - self.good) / self.total) / (1.0 - self.objective)

    @property
    def budget_left(self) -> float | None:
        """Fraction of this window's error budget not yet spent (negative: overspent,
        by that fraction); None when there were no requests to judge."""
        burn = self.burn_rate
        return None if burn is None else 1.0 - burn

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-ready; fractions to 6 decimals (objectives go to 99.99 %)."""
        return {
            "good": self.good,
            "total": self.total,
            "attainment": _round(self.ratio),
            "burn_rate": _round(self.burn_rate),
            "budget_left": _round(self.budget_left),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class _Fold:
    """Good/total of one window's closed slots, ``(end - length, end]``, kept up to
    date slot by slot (see :meth:`_Ring.window`)."""

    __slots__ = ("end", "good", "length", "total")

    def __init__(self, length: int) -> None:
        self.length = length
        self.end = -(2**62)
        self.good = 0
        self.total = 0

    def holds(self, slot: int) -> bool:
        return self.end - self.length < slot <= self.end


class _Ring:
    """Good/total counts in ``size`` slots; a slot is reused once its time is past.
    A window's sum is its closed slots' (folded in once each, taken out once each as
    they leave it) plus the current slot's: a query costs the slots that moved since
    the last one, not the window's length."""

    __slots__ = ("folds", "good", "slot_ids", "total")

    def __init__(self, size: int) -> None:
        self.slot_ids = [-1] * size
        self.good = [0] * size
        self.total = [0] * size
        self.folds: dict[int, _Fold] = {}

    def add(self, slot: int, good: bool) -> None:
        index = slot % len(self.slot_ids)
        if self.slot_ids[index] != slot:
            old = self.slot_ids[index]
            for fold in self.folds.values():  # a folded slot's counts leave with it
                if fold.holds(old):
                    fold.good -= self.good[index]
                    fold.total -= self.total[index]
            self.slot_ids[index] = slot
            self.good[index] = 0
            self.total[index] = 0
        self.total[index] += 1
        if good:
            self.good[index] += 1

    def _take(self, fold: _Fold, slot: int, sign: int) -> None:
        index = slot % len(self.slot_ids)
        if self.slot_ids[index] == slot:
            fold.good += sign * self.good[index]
            fold.total += sign * self.total[index]

    def window(self, now_slot: int, slots: int) -> tuple[int, int]:
        """Good and total in the ``slots`` slots ending with ``now_slot`` (at most
        ``size - 1``)."""
        length = min(slots, len(self.slot_ids) - 1) - 1  # the closed slots
        fold = self.folds.get(length)
        if fold is None:
            fold = self.folds[length] = _Fold(length)
        target = now_slot - 1
        if target > fold.end:
            for slot in range(max(fold.end - length + 1, target - 2 * length),
                              min(fold.end, target - length) + 1):  # fmt: skip
                self._take(fold, slot, -1)  # left the window
            if target - fold.end > length:
                fold.good = fold.total = 0
            for slot in range(max(fold.end + 1, target - length + 1), target + 1):
                self._take(fold, slot, 1)  # closed within the window
            fold.end = target
        index = now_slot % len(self.slot_ids)
        if self.slot_ids[index] == now_slot:
            return fold.good + self.good[index], fold.total + self.total[index]
        return fold.good, fold.total


class SloTracker:
    """Rolling attainment for every tenant with an SLO in the configuration.
    ``objectives``: the tenant directory (its current snapshot's SLOs, so a reload
    applies at once), or a fixed mapping."""

    def __init__(
        self,
        objectives: Mapping[str, SloConfig] | TenantDirectory,
        clock: Clock = time.monotonic,
        resolution_s: float = 5.0,
        horizon_s: float = max(WINDOWS_S.values()),
    ) -> None:
        self._directory = (
            objectives
            if isinstance(objectives, TenantDirectory)
            else TenantDirectory(TenantConfig(id=t, slo=slo) for t, slo in objectives.items())
        )
        self._clock = clock
        self._resolution_s = resolution_s
        self._size = int(horizon_s // resolution_s) + 2
        self._rings: dict[str, _Ring] = {}

    @property
    def tenants(self) -> list[str]:
        return list(self._directory.current.slos)

    def objective(self, tenant: str) -> SloConfig | None:
        return self._directory.current.slos.get(tenant)

    def threshold_s(self, tenant: str) -> float | None:
        return self._directory.current.slo_thresholds_s.get(tenant)

    def forget_tenants(self, tenants: Container[str]) -> None:
        """Drop the windows of the tenants not in ``tenants`` (removed by a reload): a
        tenant added later under the same id must not read them as its own."""
        for tenant in [tenant for tenant in self._rings if tenant not in tenants]:
            del self._rings[tenant]

    def record(self, tenant: str, good: bool) -> None:
        """Count one eligible request (see the module docstring for which are)."""
        ring = self._rings.get(tenant)
        if ring is None:
            if tenant not in self._directory.current.slos:
                return
            ring = self._rings[tenant] = _Ring(self._size)
        ring.add(int(self._clock() // self._resolution_s), good)

    def attainment(self, tenant: str, window_s: float) -> Attainment:
        slo = self._directory.current.slos[tenant]
        now_slot = int(self._clock() // self._resolution_s)
        slots = max(1, round(window_s / self._resolution_s))
        ring = self._rings.get(tenant)
        good, total = ring.window(now_slot, slots) if ring is not None else (0, 0)
        return Attainment(window_s, good, total, slo.objective)

    def report(self, tenant: str) -> dict[str, dict[str, float | int | None]]:
        """Every window of :data:`WINDOWS_S` for one tenant, JSON-ready."""
        return {name: self.attainment(tenant, span).as_dict() for name, span in WINDOWS_S.items()}
