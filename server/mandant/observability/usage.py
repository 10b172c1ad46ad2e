"""Usage per tenant for cost allocation and support: what ``/usage`` on the HTTP port
and ``AdminService.GetUsage`` over gRPC both report. Read from the Prometheus
registry's series (counts since this process started) and, for quota use, from the
limits store (every replica's, with Redis)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry

from mandant.config import TenantConfig
from mandant.observability.live import LiveStats
from mandant.tenancy.directory import TenantDirectory


@runtime_checkable
class QuotaUsage(Protocol):
    """Rows counted against a tenant's quotas (``rows_today``, ``rows_this_month``),
    as the limits store counts them (every replica's, with Redis)."""

    async def quota_used(self, tenant: str) -> Mapping[str, int]: ...


class UsageReports:
    """Builds usage reports; the one place both front ends ask."""

    def __init__(
        self,
        registry: CollectorRegistry,
        tenants: Sequence[TenantConfig] | TenantDirectory,
        live: LiveStats,
        quota: QuotaUsage | None = None,
    ) -> None:
        """``tenants``: the tenant directory (reports list the tenants and quota limits
        of its current snapshot), or fixed configs."""
        self._registry = registry
        self._directory = (
            tenants if isinstance(tenants, TenantDirectory) else TenantDirectory(tenants)
        )
        self._live = live
        self._quota = quota

    @property
    def tenant_ids(self) -> tuple[str, ...]:
        return tuple(t.id for t in self._directory.current.configs)

    async def report(self, only: str | None = None) -> dict[str, Any]:
        """Every current tenant's usage, or ``only`` that tenant's."""
        tenants = [t for t in self._directory.current.configs if only is None or t.id == only]
        used = {t.id: await self._quota_used(t) for t in tenants}
        return usage_report(self._registry, tenants, used)

    async def _quota_used(self, tenant: TenantConfig) -> Mapping[str, int]:
        """The limits store's counts where the tenant has a quota; else the rows this
        process admitted today and this month."""
        if tenant.quota is not None and self._quota is not None:
            return await self._quota.quota_used(tenant.id)
        return self._live.quota_used(tenant.id)


def usage_report(
    registry: CollectorRegistry,
    tenants: Sequence[TenantConfig],
    quota_used: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """Per configured tenant: calls by status, rows and compute seconds by model,
    rejections by reason, and its quota (limits, and use where admission knows it).
    Read from the registry's series; counts since this process started."""
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
            },
        }
        for t in tenants
    }

    def add(entry: dict[str, Any], key: str, label: str, value: float) -> None:
        entry[key][label] = entry[key].get(label, 0) + value
        entry[f"{key}_total"] += value

    for family in registry.collect():
        for sample in family.samples:
            entry = report.get(sample.labels.get("tenant", ""))
            if entry is None:
                continue
            value = sample.value
            if sample.name == "mandant_requests_total":
                add(entry, "requests", sample.labels["code"], int(value))
            elif sample.name == "mandant_rows_total":
                add(entry, "rows", sample.labels["model"], int(value))
            elif sample.name == "mandant_compute_seconds_total":
                add(entry, "compute_seconds", sample.labels["model"], value)
            elif sample.name == "mandant_rejections_total":
                add(entry, "rejections", sample.labels["reason"], int(value))
            elif sample.name == "mandant_admitted_rows_total":
                entry["admitted_rows"] += int(value)
    return {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tenants": report}
