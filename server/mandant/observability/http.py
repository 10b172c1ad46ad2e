"""The HTTP side port (Triton's 8002): ``/metrics`` (Prometheus), ``/healthz``,
``/readyz``, the live dashboard at ``/`` with its data at ``/api/dashboard`` (an
overview row per tenant, worst burn rate first; ``?tenant=<id>``: one tenant's
history for the charts), and
``/usage``, a per-tenant usage report.

Who sees what (``server.metrics_auth``): ``/healthz``, ``/readyz`` and the dashboard
page itself (static HTML naming nobody) are open. With ``admin`` (the default),
``Authorization: Bearer <admin key>`` reads every tenant's figures; a tenant's own API
key reads its own (``/api/dashboard``, ``/usage``) and never ``/metrics``; anything
else is 401 with a body that names no tenant or model. With ``none`` the port is
open. ``server.internal_http`` adds a second listener, for a private address, where
everything is open.

aiohttp on the server's event loop; ``start()`` returns the bound port (0 binds a
free one)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Container
from importlib import resources
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mandant.config import ServerConfig, TlsConfig
from mandant.errors import Unauthenticated
from mandant.observability.live import LiveStats
from mandant.observability.series import Registry
from mandant.observability.slo import SloTracker
from mandant.observability.usage import UsageReports
from mandant.tenancy.directory import TenantDirectory
from mandant.tenancy.limits import Rate, TokenBucket
from mandant.transport.http import runner, serve
from mandant.transport.listeners import Listener
from mandant.transport.tls import ServerTls, transport_identities

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Health(Protocol):
    @property
    def live(self) -> bool: ...

    @property
    def ready(self) -> bool: ...


class _Everyone:
    """The caller may read every tenant's figures (an admin, or an open listener)."""


EVERYONE = _Everyone()
#: Who is asking: every tenant's figures, or one tenant id's.
Viewer = _Everyone | str


def dashboard_page() -> bytes:
    return resources.files("mandant.observability").joinpath("dashboard.html").read_bytes()


def page_security_headers(page: bytes) -> dict[str, str]:
    """What keeps the dashboard page from being framed (clickjacking), sniffed as
    another type, or running any script but its own inline ones (each allowed by its
    SHA-256, computed from the page as served); it fetches its data from this origin
    only. Styles stay inline (the page sets ``style`` attributes as it draws)."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(page)
    ]
    scripts = " ".join(hashes) or "'none'"
    policy = (
        "default-src 'none'; "
        f"script-src {scripts}; "
        "style-src 'unsafe-inline'; "
        "connect-src 'self'; "
        "img-src 'self' data:; "
        "base-uri 'none'; "
        "form-action 'self'; "
        "frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }


#: The text of each inline ``<script>`` element (the page has no attributes on them).
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


#: How often one tenant's key may read its figures (the dashboard's data, ``/usage``)
#: on the HTTP port; beyond, 429 with Retry-After. Each read costs the event loop
#: that serves every tenant's calls (0.1–0.3 ms), and the HTTP port has no front door:
#: one tenant's key reading its own figures in a loop over 16 connections (2,400
#: reads/s) slowed another tenant's gRPC calls from 1 ms to 55 ms p50. The dashboard
#: reads every few seconds. Admin keys (and the internal listener) are not limited.
TENANT_FIGURE_READS = Rate("tenant figure reads", per_s=10.0, burst=20.0)


class HttpServer:
    def __init__(
        self,
        config: ServerConfig,
        directory: TenantDirectory,
        registry: Registry,
        health: Health,
        slo: SloTracker,
        live: LiveStats,
        usage: UsageReports,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._directory = directory
        self._registry = registry
        self._health = health
        self._slo = slo
        self._live = live
        self._reports = usage
        self._page = dashboard_page()
        self._page_headers = {"Cache-Control": "no-cache", **page_security_headers(self._page)}
        self._clock = clock
        self._started = clock()
        self._reads: dict[str, TokenBucket] = {}  # tenant id → its figure reads
        tls = config.tls
        #: HTTPS on ``http_port`` (never on ``internal_http``) where ``tls.http`` is set.
        self._tls = ServerTls(tls) if tls is not None and tls.http else None
        self._mtls = self._tls is not None and tls is not None and tls.client_ca is not None
        self._runner = runner(self._app(open_access=config.metrics_auth == "none"))
        internal = config.internal_http
        self._internal = runner(self._app(open_access=True)) if internal is not None else None
        self.port = 0
        self.internal_port = 0

    def _app(self, open_access: bool) -> web.Application:
        def guarded(handler: Callable[[web.Request, Viewer], Awaitable[web.Response]],
                    tenants_allowed: bool = True) -> Handler:  # fmt: skip
            async def serve(request: web.Request) -> web.StreamResponse:
                viewer = EVERYONE if open_access else self._viewer(request)
                if viewer is None:
                    response = self._refused(tenants_allowed)
                elif not tenants_allowed and viewer is not EVERYONE:
                    response = web.json_response({"error": "needs an admin key"}, status=403)
                elif isinstance(viewer, str) and (wait_s := self._read_wait_s(viewer)):
                    response = web.json_response(
                        {"error": "too many reads of this tenant's figures; retry shortly"},
                        status=429,
                        headers={"Retry-After": str(math.ceil(wait_s))},
                    )
                else:
                    response = await handler(request, viewer)
                # A viewer's figures (or refusal): no shared or browser cache keeps them.
                response.headers["Cache-Control"] = "no-store"
                return response

            return serve

        app = web.Application()
        app.router.add_get("/", self._dashboard)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/api/dashboard", guarded(self._dashboard_data))
        app.router.add_get("/usage", guarded(self._usage))
        app.router.add_get("/metrics", guarded(self._metrics, tenants_allowed=False))
        return app

    @property
    def listeners(self) -> list[Listener]:
        """The HTTP port, and the internal one if configured."""
        config = self._config
        host_setting = "server.http_host" if config.http_host is not None else "server.host"
        found = [Listener("HTTP port", host_setting, config.http_bind_host, config.http_port)]
        internal = config.internal_http
        if self._internal is not None and internal is not None:
            host, port = internal.host, internal.port
            found.append(Listener("internal HTTP port", "server.internal_http.host", host, port))
        return found

    async def start(self) -> int:
        """Bind and serve (and the internal listener, if configured); returns the
        bound port."""
        public, *internal = self.listeners
        self.port = await serve(self._runner, public, self._tls.context if self._tls else None)
        if self._internal is not None and internal:
            try:
                self.internal_port = await serve(self._internal, internal[0])
            except BaseException:
                await self._runner.cleanup()
                raise
        return self.port

    def reload_tls(self, tls: TlsConfig) -> None:
        """Serve the files at ``tls``'s paths to connections made from now on."""
        if self._tls is not None:
            self._tls.reload(tls)

    async def aclose(self) -> None:
        if self._internal is not None:
            await self._internal.cleanup()
        await self._runner.cleanup()

    # -- who is asking ---------------------------------------------------------------

    def _viewer(self, request: web.Request) -> Viewer | None:
        """Everyone's figures for an admin key; a tenant's for its key or, without a
        key, its verified client certificate (``tls.http`` with ``client_ca``: as on
        the other ports); else None."""
        authorization = request.headers.get("Authorization")
        if self._directory.is_admin(authorization):
            return EVERYONE
        try:
            if authorization is None and self._mtls:
                identities = transport_identities(request.transport)
                return self._directory.authenticate_certificate(identities).id
            return self._directory.authenticate(authorization).id
        except Unauthenticated:
            return None

    def forget_tenants(self, kept: Container[str]) -> None:
        """A reload removed every tenant not ``kept``: their figure reads go."""
        self._reads = {tenant: bucket for tenant, bucket in self._reads.items() if tenant in kept}

    def _read_wait_s(self, tenant: str) -> float:
        """Take one of ``tenant``'s figure reads (:data:`TENANT_FIGURE_READS`): 0.0, or
        how long until one is there (none taken)."""
        now = self._clock()
        bucket = self._reads.get(tenant)
        if bucket is None:
            bucket = self._reads[tenant] = TokenBucket(TENANT_FIGURE_READS, now)
        return bucket.try_take(1.0, now)

    def _refused(self, tenants_allowed: bool) -> web.Response:
        """No key, or one nobody has: 401; but 403 on an admin-only endpoint while
        there is no admin key (no key could read it; a tenant's mistyped key on its own
        figures was told the server had no admin keys)."""
        if not tenants_allowed and not self._directory.current.admin_key_hashes:
            return web.json_response(
                {"error": "no admin keys configured (server.admin_keys)"}, status=403
            )
        return web.json_response(
            {"error": "missing or invalid key"},
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    # -- handlers --------------------------------------------------------------------

    async def _dashboard(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers=self._page_headers,
        )

    async def _dashboard_data(self, request: web.Request, viewer: Viewer) -> web.Response:
        """The overview (every tenant the viewer may see, no history), or with
        ``?tenant=<id>`` that tenant's figures and history; a tenant it may not see
        is 404, like one that does not exist, and the body names neither."""
        only = viewer if isinstance(viewer, str) else None
        wanted = request.query.get("tenant")
        data: dict[str, Any] | None
        if wanted is None:
            data = self._live.snapshot(self._slo, only=only)
        elif only is None or wanted == only:
            data = self._live.detail(self._slo, wanted)
        else:
            data = None
        if data is None:
            return web.json_response({"error": "no such tenant"}, status=404)
        data["uptime_s"] = round(self._clock() - self._started, 1)
        data["ready"] = self._health.ready
        body = _compact(data).encode()
        response = web.Response(
            body=body, content_type="application/json", headers={"Cache-Control": "no-store"}
        )
        if len(body) >= COMPRESS_FROM_BYTES:
            response.enable_compression()  # where the client accepts it (a browser does)
        return response

    async def _metrics(self, request: web.Request, viewer: Viewer) -> web.Response:
        scrape = self._registry.scrape()  # on the loop; written in a thread (Registry)
        response = web.Response(body=await asyncio.to_thread(scrape.text))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _usage(self, request: web.Request, viewer: Viewer) -> web.Response:
        only = viewer if isinstance(viewer, str) else None
        return web.json_response(await self._reports.report(only=only))

    async def _healthz(self, request: web.Request) -> web.Response:
        live = self._health.live
        return web.json_response({"live": live}, status=200 if live else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self._health.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)


#: Dashboard data this large or larger goes gzipped to clients that accept it (an
#: overview of 300 tenants is ~130 kB of JSON, ~15 kB gzipped).
COMPRESS_FROM_BYTES = 8192


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))
