"""The HTTP side port (Triton's 8002): ``/metrics`` (Prometheus), ``/healthz``,
``/readyz``, the live dashboard at ``/`` with its data at ``/api/dashboard``, and
``/usage``, a per-tenant usage report behind an admin key (``server.admin_keys``).

aiohttp on the server's event loop; ``start()`` returns the bound port (0 binds a
free one)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mandant.config import ServerConfig, TenantConfig
from mandant.observability.live import LiveStats
from mandant.observability.slo import SloTracker
from mandant.observability.usage import UsageReports
from mandant.tenancy.keys import AdminKeys

logger = logging.getLogger(__name__)

_BEARER = "bearer "


class Health(Protocol):
    @property
    def live(self) -> bool: ...

    @property
    def ready(self) -> bool: ...


def dashboard_page() -> bytes:
    return resources.files("mandant.observability").joinpath("dashboard.html").read_bytes()


class HttpServer:
    def __init__(
        self,
        config: ServerConfig,
        tenants: Sequence[TenantConfig],
        registry: CollectorRegistry,
        health: Health,
        slo: SloTracker,
        live: LiveStats,
        usage: UsageReports | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._tenants = tuple(tenants)
        self._registry = registry
        self._health = health
        self._slo = slo
        self._live = live
        self._reports = usage or UsageReports(registry, tenants, live)
        self._admins = AdminKeys(config.admin_keys)
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
        if not self._admins.configured:
            return web.json_response(
                {"error": "no admin keys configured (server.admin_keys)"}, status=403
            )
        if not self._admins.is_admin(request.headers.get("Authorization")):
            return web.json_response(
                {"error": "missing or invalid admin key"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return web.json_response(await self._reports.report())
