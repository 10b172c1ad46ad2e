"""Usage per tenant for cost allocation and support: what ``/usage`` on the HTTP port
and ``AdminService.GetUsage`` over gRPC both report, saying the scope of each figure:

- ``requests``, ``rows``, ``compute_seconds``, ``rejections``, ``admitted_rows``: this
  replica's, since this process started (its Prometheus registry's series; a fleet
  total is the sum over replicas, as Prometheus sums them);
- ``quota.used``: every replica's where the limits store is Redis (``quota.scope``
  says which it is: this process's own counts while Redis is down);
- ``fleet`` (with the Redis store only): every replica's requests, rows, compute
  seconds and rejections today and this month (UTC), kept in Redis beside the limits
  (``tenancy/redis_usage.py``, fed by :class:`FleetCounting`): what billing reads.

Admins' reports also list the tenants a reload removed (``removed: true``, no quota):
what they were billed, until their id is configured again (when the counts go)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from mandant.config import TenantConfig
from mandant.events import Observer, Settle, recorded
from mandant.observability.live import LiveStats
from mandant.tenancy.directory import TenantDirectory
from mandant.tenancy.redis_usage import RedisUsage

#: Who answers a report: the figures marked ``replica`` are this process's.
REPLICA = f"{socket.gethostname()}:{os.getpid()}"
#: The scope of each per-tenant figure of a report (``quota`` and ``fleet``: see
#: ``quota.scope`` and whether ``fleet`` is there).
SCOPES = {
    "requests": "replica",
    "rows": "replica",
    "compute_seconds": "replica",
    "rejections": "replica",
    "admitted_rows": "replica",
    "quota": "fleet with limits.store redis (quota.scope), else replica",
    "fleet": "fleet: every replica's, today and this month (UTC), from Redis",
}


class UsageCounts(Protocol):
    """Where a report reads this process's counts (:class:`PrometheusObserver`)."""

    def usage_counts(
        self, tenant: str | None = None
    ) -> Iterable[tuple[str, dict[str, str], float]]:
        """(sample name, labels, value) of the requests, rows, compute seconds,
        rejections and admitted rows counters: ``tenant``'s (None: every tenant's)."""
        ...


@runtime_checkable
class QuotaUsage(Protocol):
    """Rows counted against a tenant's quotas (``rows_today``, ``rows_this_month``),
    as the limits store counts them (every replica's, with Redis)."""

    async def quotas_used(self, tenants: Sequence[str]) -> Mapping[str, Mapping[str, int]]:
        """Per tenant, in one read for all of them (one timeout at most)."""
        ...

    @property
    def quota_scope(self) -> str:
        """``fleet`` where ``quota_used`` reads every replica's counts, else ``replica``."""
        ...


class FleetCounting:
    """An observer that passes every event on to ``inner`` and counts, for ``usage``
    (Redis, fleet-wide), each tenant's answered calls by code, rows and compute
    seconds by model, and rejections by reason (in process: ``RedisUsage.add``)."""

    __slots__ = ("_add", "_inner")

    def __init__(self, inner: Observer, usage: RedisUsage) -> None:
        self._inner = inner
        self._add = usage.add

    def request_finished(
        self,
        tenant: str,
        model: str,
        code: str,
        duration_s: float,
        version: str = "",
        inference: bool = False,
        owner: str = "",
        busy: bool = False,
    ) -> None:
        self._inner.request_finished(
            tenant, model, code, duration_s, version, inference, owner, busy
        )
        if tenant:
            self._add(tenant, "requests", code, 1)

    def request_timing(self, tenant: str, model: str, queue_s: float, compute_s: float) -> None:
        self._inner.request_timing(tenant, model, queue_s, compute_s)

    def batch_executed(
        self,
        model: str,
        size: int,
        compute_s: float,
        rows_by_tenant: Mapping[str, int],
        owner: str = "",
    ) -> None:
        self._inner.batch_executed(model, size, compute_s, rows_by_tenant, owner)
        total_rows = sum(rows_by_tenant.values()) or 1
        for tenant, rows in rows_by_tenant.items():
            self._add(tenant, "rows", model, rows)
            self._add(tenant, "compute_seconds", model, compute_s * rows / total_rows)

    def batch_failed(self, model: str, size: int, owner: str = "") -> None:
        self._inner.batch_failed(model, size, owner)

    def admitted(self, tenant: str, model: str, rows: int) -> None:
        self._inner.admitted(tenant, model, rows)

    def refunded(self, tenant: str, model: str, rows: int, admitted_at: float = 0.0) -> None:
        self._inner.refunded(tenant, model, rows, admitted_at)

    def rejected(self, tenant: str, reason: str, model: str = "") -> None:
        self._inner.rejected(tenant, reason, model)
        if tenant:
            self._add(tenant, "rejections", reason, 1)

    def store_error(self, store: str) -> None:
        self._inner.store_error(store)

    def calls_gathered(self, calls: int) -> None:
        self._inner.calls_gathered(calls)


def _counts(fields: Mapping[str, float]) -> dict[str, Any]:
    """A fleet period's hash as the report's figures (the same names as this
    replica's)."""
    entry: dict[str, Any] = {}
    for name in ("requests", "rows", "compute_seconds", "rejections"):
        entry[name] = {}
        entry[f"{name}_total"] = 0.0 if name == "compute_seconds" else 0
    for field, value in fields.items():
        name, _, label = field.partition(":")
        if name not in entry:
            continue
        amount = value if name == "compute_seconds" else int(value)
        entry[name][label] = amount
        entry[f"{name}_total"] += amount
    return entry


class UsageReports:
    """Builds usage reports; the one place both front ends ask."""

    def __init__(
        self,
        counts: UsageCounts,
        tenants: Sequence[TenantConfig] | TenantDirectory,
        live: LiveStats,
        quota: QuotaUsage | None = None,
        fleet: RedisUsage | None = None,
        settle: Settle = recorded,
    ) -> None:
        """``counts``: this process's counters. ``tenants``: the tenant directory
        (reports list the tenants and quota limits of its current snapshot), or fixed
        configs. ``fleet``: the fleet-wide counters (the Redis store's), if any.
        ``settle``: until the events of calls already answered are recorded (a report
        counts every call whose client has its answer)."""
        self._settle = settle
        self._counts = counts
        self._directory = (
            tenants if isinstance(tenants, TenantDirectory) else TenantDirectory(tenants)
        )
        self._live = live
        self._quota = quota
        self._fleet = fleet

    def named(self, tenant_id: str) -> str:
        """``tenant_id`` if it is configured or was (a reload removed it), else
        InvalidInput (an admin naming one)."""
        if tenant_id in self._removed():
            return tenant_id
        return self._directory.named(tenant_id).id

    def _removed(self) -> set[str]:
        """The tenants a reload removed since this process started."""
        return self._directory.ever - self._directory.current.ids

    async def report(self, only: str | None = None) -> dict[str, Any]:
        """Every current tenant's usage and the removed ones', or ``only`` that
        tenant's."""
        await self._settle()
        removed = self._removed()
        tenants = [
            *(t for t in self._directory.current.configs if only is None or t.id == only),
            *(TenantConfig(id=id_) for id_ in sorted(removed) if only is None or id_ == only),
        ]
        # Both reads at once, each one batch for every tenant: a Redis that does not
        # answer costs one timeout, not one per tenant (none during a known outage).
        stored, fleet = await asyncio.gather(
            self._quotas_used([t.id for t in tenants if t.quota is not None]),
            self._fleet_counts([t.id for t in tenants]),
        )
        used = {t.id: _quota_use(t, stored.get(t.id), self._live.quota_used(t.id)) for t in tenants}
        report = usage_report(self._counts, tenants, used, only)
        fleet_scope = "replica" if self._quota is None else self._quota.quota_scope
        for tenant in tenants:
            if tenant.quota is not None:  # a tenant whose count could not be read: ours
                scope = fleet_scope if tenant.id in stored else "replica"
                report["tenants"][tenant.id]["quota"]["scope"] = scope
        for tenant_id, entry in report["tenants"].items():
            entry["fleet"] = fleet.get(tenant_id) if fleet is not None else None
            entry["removed"] = tenant_id in removed
        report["fleet_available"] = fleet is not None
        return report

    async def _fleet_counts(self, tenants: list[str]) -> dict[str, dict[str, Any]] | None:
        """Every replica's counts per tenant and period; None without Redis or while
        it does not answer."""
        if self._fleet is None:
            return None
        counts = await self._fleet.read(tenants)
        if counts is None:
            return None
        return {
            tenant: {period: _counts(fields) for period, fields in periods.items()}
            for tenant, periods in counts.items()
        }

    async def _quotas_used(self, tenants: list[str]) -> Mapping[str, Mapping[str, int]]:
        """The limits store's counts of tenants that have a quota (the others: the
        rows this process admitted today and this month, from ``live``)."""
        if not tenants or self._quota is None:
            return {}
        return await self._quota.quotas_used(tenants)


#: The periods of ``quota.used``, and the quota each is counted against.
QUOTA_PERIODS = {"rows_today": "rows_per_day", "rows_this_month": "rows_per_month"}


def _quota_use(
    tenant: TenantConfig, stored: Mapping[str, int] | None, live: Mapping[str, int]
) -> dict[str, int]:
    """A tenant's rows today and this month: the limits store's count where it has a
    quota for the period, else the rows this process admitted, net of refunds (a
    period without a quota has no count in the store: it showed 0)."""
    if stored is None or tenant.quota is None:
        return dict(live)
    quota = tenant.quota
    return {
        label: stored[label] if getattr(quota, name) is not None else live[label]
        for label, name in QUOTA_PERIODS.items()
    }


def usage_report(
    counts: UsageCounts,
    tenants: Sequence[TenantConfig],
    quota_used: Mapping[str, Mapping[str, int]] | None = None,
    only: str | None = None,
) -> dict[str, Any]:
    """Per configured tenant: calls by status, rows and compute seconds by model,
    rejections by reason, and its quota (limits, and use where admission knows it).
    Read from this process's counters; counts since it started. ``only``: ``tenants``
    is that tenant alone, whose counts alone are read."""
    report: dict[str, dict[str, Any]] = {
        t.id: {
            "requests": {},
            "requests_total": 0,
            "rows": {},
            "rows_total": 0,
            "compute_seconds": {},
            "compute_seconds_total": 0.0,
            "admitted_rows": 0,
            "rejections": {},
            "rejections_total": 0,
            "quota": {
                "limits": t.quota.model_dump(exclude_none=True) if t.quota else {},
                "used": dict(quota_used[t.id]) if quota_used and t.id in quota_used else None,
                "scope": "replica",
            },
        }
        for t in tenants
    }

    def add(entry: dict[str, Any], key: str, label: str, value: float) -> None:
        entry[key][label] = entry[key].get(label, 0) + value
        entry[f"{key}_total"] += value

    for name, labels, value in counts.usage_counts(only):
        entry = report.get(labels.get("tenant", ""))
        if entry is None:
            continue
        if name == "mandant_requests_total":
            add(entry, "requests", labels["code"], int(value))
        elif name == "mandant_rows_total":
            add(entry, "rows", labels["model"], int(value))
        elif name == "mandant_compute_seconds_total":
            add(entry, "compute_seconds", labels["model"], value)
        elif name == "mandant_rejections_total":
            add(entry, "rejections", labels["reason"], int(value))
        elif name == "mandant_admitted_rows_total":
            entry["admitted_rows"] += int(value)
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "replica": REPLICA,
        "scopes": SCOPES,
        "tenants": report,
    }
