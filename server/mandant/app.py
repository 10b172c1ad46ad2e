"""Composition root: builds every component from a configuration and wires them."""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

from prometheus_client import CollectorRegistry

from mandant import __version__
from mandant.backends.base import Backend
from mandant.config import MandantConfig, ModelSpec
from mandant.observability.http import HttpServer
from mandant.observability.live import LiveStats
from mandant.observability.metrics import PrometheusObserver
from mandant.observability.slo import SloTracker
from mandant.registry import ModelRegistry
from mandant.scheduling.base import Scheduler
from mandant.scheduling.direct import DirectScheduler
from mandant.service import DataPlane
from mandant.tenancy.admission import TenantAdmission, shared_store_for
from mandant.tenancy.keys import KeyStore
from mandant.transport.grpc.server import GrpcServer
from mandant.types import Tenant

logger = logging.getLogger(__name__)


def make_backend(spec: ModelSpec) -> Backend:
    if spec.backend == "torch":
        from mandant.backends.torch import TorchBackend

        return TorchBackend(spec)
    raise NotImplementedError(f"model {spec.name!r}: backend {spec.backend!r} is not available")


def make_scheduler(spec: ModelSpec, backend: Backend) -> Scheduler:
    return DirectScheduler(backend)


class App:
    """The whole server. ``async with App(config, base_dir) as app`` starts it;
    ``app.grpc_port`` is the bound port."""

    def __init__(self, config: MandantConfig, base_dir: Path) -> None:
        self.config = config
        tenants = [
            (Tenant(t.id, weight=t.weight, priority=t.priority), t.api_keys) for t in config.tenants
        ]
        specs = config.model_specs(base_dir)
        model_names = sorted({spec.name for spec in specs})
        self.metrics = CollectorRegistry()
        self.slo = SloTracker({t.id: t.slo for t in config.tenants if t.slo is not None})
        self.live = LiveStats([t.id for t in config.tenants], model_names)
        self.observer = PrometheusObserver(
            self.metrics, config.tenants, model_names, slo=self.slo, live=self.live
        )
        self.registry = ModelRegistry(specs, make_backend, make_scheduler)
        self.admission = TenantAdmission(
            config, shared_store_for(config.limits), observer=self.observer
        )
        self.plane = DataPlane(
            KeyStore(tenants), self.registry, admission=self.admission, version=__version__
        )
        self.grpc = GrpcServer(self.plane, config.server, observer=self.observer)
        self.grpc_port = 0
        self.http = HttpServer(
            config.server, config.tenants, self.metrics, self.plane, self.slo, self.live
        )
        self.http_port = 0

    async def start(self) -> None:
        await self.admission.start()
        try:
            await self.registry.start()
        except BaseException:
            await self.admission.aclose()
            raise
        try:
            self.grpc_port = await self.grpc.start()
        except BaseException:
            await self.registry.aclose()
            await self.admission.aclose()
            raise
        try:
            self.http_port = await self.http.start()
        except BaseException:
            await self.grpc.stop(0)
            await self.registry.aclose()
            await self.admission.aclose()
            raise

    async def aclose(self, grace_s: float | None = None) -> None:
        await self.grpc.stop(self.config.server.grace_s if grace_s is None else grace_s)
        await self.http.aclose()
        await self.registry.aclose()
        await self.admission.aclose()

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
