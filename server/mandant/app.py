"""Composition root: builds every component from a configuration and wires them."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType

from prometheus_client import CollectorRegistry

from mandant import __version__
from mandant.backends.base import Backend
from mandant.backends.channels import ChannelPool
from mandant.config import MandantConfig, ModelSpec
from mandant.events import Observer
from mandant.observability.http import HttpServer
from mandant.observability.live import LiveStats
from mandant.observability.metrics import PrometheusObserver
from mandant.observability.slo import SloTracker
from mandant.observability.stats import InferenceStats
from mandant.observability.usage import UsageReports
from mandant.registry import ModelRegistry
from mandant.scheduling.base import Scheduler
from mandant.scheduling.batcher import DynamicBatcher
from mandant.scheduling.direct import DirectScheduler
from mandant.service import DataPlane
from mandant.tenancy.admission import TenantAdmission, shared_store_for
from mandant.tenancy.keys import KeyStore
from mandant.transport.grpc.server import GrpcServer
from mandant.types import Tenant

logger = logging.getLogger(__name__)


def make_backend(spec: ModelSpec, channels: ChannelPool | None = None) -> Backend:
    """``channels``: the App's shared connections to remote (Triton) servers."""
    if spec.backend == "torch":
        from mandant.backends.torch import TorchBackend

        return TorchBackend(spec)
    if spec.backend == "triton":
        from mandant.backends.triton import TritonBackend

        return TritonBackend(spec, channels if channels is not None else ChannelPool())
    raise ValueError(f"model {spec.name!r}: unknown backend {spec.backend!r}")


def make_scheduler(
    spec: ModelSpec, backend: Backend, observer: Observer | None = None
) -> Scheduler:
    """The dynamic batcher where the model has ``batching``, else one request at a time."""
    if spec.batching is None:  # Triton models without it: Triton's own batcher groups them
        return DirectScheduler(backend, spec.name, observer)
    return DynamicBatcher(backend, spec.batching, spec.name, observer)


class App:
    """The whole server. ``async with App(config, base_dir) as app`` starts it;
    ``app.grpc_port`` is the bound port."""

    def __init__(self, config: MandantConfig, base_dir: Path) -> None:
        self.config = config
        specs = config.model_specs(base_dir)
        model_names = sorted({spec.name for spec in specs})
        self.metrics = CollectorRegistry()
        self.slo = SloTracker({t.id: t.slo for t in config.tenants if t.slo is not None})
        self.live = LiveStats([t.id for t in config.tenants], model_names)
        self.observer = PrometheusObserver(
            self.metrics, config.tenants, model_names, slo=self.slo, live=self.live
        )
        self.stats = InferenceStats()  # ModelStatistics: per tenant, model and version
        self.channels = ChannelPool()
        self.registry = ModelRegistry(
            specs,
            lambda spec: make_backend(spec, self.channels),
            lambda spec, backend: make_scheduler(
                spec, backend, self.stats.observe(self.observer, spec.version)
            ),
        )
        self.admission = TenantAdmission(
            config, shared_store_for(config.limits), observer=self.observer
        )
        self.plane = DataPlane(
            _key_store(config), self.registry, admission=self.admission, version=__version__
        )
        self.usage = UsageReports(self.metrics, config.tenants, self.live, quota=self.admission)
        self.grpc = GrpcServer(
            self.plane,
            config.server,
            observer=self.stats.observe(self.observer),
            usage=self.usage,
            stats=self.stats,
        )
        self.grpc_port = 0
        self.http = HttpServer(
            config.server,
            config.tenants,
            self.metrics,
            self.plane,
            self.slo,
            self.live,
            usage=self.usage,
        )
        self.http_port = 0

    async def start(self) -> None:
        """Start every part in order; if one fails, stop those already started."""
        async with AsyncExitStack() as started:
            await self.admission.start()
            started.push_async_callback(self.admission.aclose)
            await self.registry.start()
            started.push_async_callback(self.registry.aclose)
            self.grpc_port = await self.grpc.start()
            started.push_async_callback(self.grpc.stop, 0)
            self.http_port = await self.http.start()
            started.pop_all()

    def reload(self, config: MandantConfig) -> list[str]:
        """Apply a new configuration to the running server: tenants, API keys, weights,
        priorities, rate limits, concurrency caps and quotas take effect at once (limit
        and quota counts are kept). Models, server settings and the limits store need a
        restart: they stay as they are, and the returned notes say so."""
        notes = [
            f"'{part}' changed: applied at the next restart"
            for part in ("server", "models", "limits")
            if getattr(config, part) != getattr(self.config, part)
        ]
        known = {t.id for t in self.config.tenants}
        added = sorted(t.id for t in config.tenants if t.id not in known)
        if added:
            notes.append(
                f"new tenant(s) {', '.join(added)} can call now; their metrics appear "
                'under tenant="" until the next restart'
            )
        self.admission.update(config)
        self.plane.replace_keys(_key_store(config))
        self.config = self.config.model_copy(update={"tenants": config.tenants})
        return notes

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


def _key_store(config: MandantConfig) -> KeyStore:
    return KeyStore(
        (Tenant(t.id, weight=t.weight, priority=t.priority), t.api_keys) for t in config.tenants
    )
