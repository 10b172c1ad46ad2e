"""The HTTP side port (Triton's 8002): ``/metrics`` (Prometheus), ``/healthz``,
``/readyz``, the live dashboard at ``/`` with its data at ``/api/dashboard``, and
``/usage``, a per-tenant usage report behind an admin key (``server.admin_keys``).

aiohttp on the server's event loop; ``start()`` returns the bound port (0 binds a
free one)."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any, Protocol, runtime_checkable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mandant.config import ServerConfig, TenantConfig
from mandant.observability.live import LiveStats
from mandant.observability.slo import SloTracker
from mandant.tenancy.keys import hash_key

logger = logging.getLogger(__name__)

_BEARER = "bearer "


class Health(Protocol):
    @property
    def live(self) -> bool: ...

    @property
    def ready(self) -> bool: ...


@runtime_checkable
class QuotaUsage(Protocol):
    """Rows counted against a tenant's quotas (``rows_today``, ``rows_this_month``),
    as the limits store counts them (every replica's, with Redis)."""

    async def quota_used(self, tenant: str) -> Mapping[str, int]: ...


def dashboard_page() -> bytes:
    return resources.files("mandant.observability").joinpath("dashboard.html").read_bytes()


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


class HttpServer:
    def __init__(
        self,
        config: ServerConfig,
        tenants: Sequence[TenantConfig],
        registry: CollectorRegistry,
        health: Health,
        slo: SloTracker,
        live: LiveStats,
        quota: QuotaUsage | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._tenants = tuple(tenants)
        self._registry = registry
        self._health = health
        self._slo = slo
        self._live = live
        self._quota = quota
        self._admin_hashes = tuple(config.admin_keys)
        self._percentiles = {t.id: t.slo.percentile for t in tenants if t.slo is not None}
        self._page = dashboard_page()
        self._clock = clock
        self._started = clock()
        app = web.Application()
        app.router.add_get("/", self._dashboard)
        app.router.add_get("/api/dashboard", self._dashboard_data)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/usage", self._usage)
        self._runner = web.AppRunner(app, access_log=None)
        self.port = 0

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._config.host, self._config.http_port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def aclose(self) -> None:
        await self._runner.cleanup()

    # -- handlers --------------------------------------------------------------------

    async def _dashboard(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def _dashboard_data(self, request: web.Request) -> web.Response:
        data = self._live.snapshot(self._slo, self._percentiles)
        data["uptime_s"] = self._clock() - self._started
        data["ready"] = self._health.ready
        return web.json_response(data, headers={"Cache-Control": "no-store"})

    async def _metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self._registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        live = self._health.live
        return web.json_response({"live": live}, status=200 if live else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self._health.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _usage(self, request: web.Request) -> web.Response:
        if not self._admin_hashes:
            return web.json_response(
                {"error": "no admin keys configured (server.admin_keys)"}, status=403
            )
        if not self._is_admin(request.headers.get("Authorization")):
            return web.json_response(
                {"error": "missing or invalid admin key"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        used = {t.id: await self._quota_used(t) for t in self._tenants}
        return web.json_response(usage_report(self._registry, self._tenants, used))

    async def _quota_used(self, tenant: TenantConfig) -> Mapping[str, int]:
        """The limits store's counts where the tenant has a quota; else the rows this
        process admitted today and this month."""
        if tenant.quota is not None and self._quota is not None:
            return await self._quota.quota_used(tenant.id)
        return self._live.quota_used(tenant.id)

    def _is_admin(self, authorization: str | None) -> bool:
        if not authorization or authorization[: len(_BEARER)].lower() != _BEARER:
            return False
        presented = hash_key(authorization[len(_BEARER) :].strip())
        matches = [hmac.compare_digest(presented, known) for known in self._admin_hashes]
        return any(matches)
