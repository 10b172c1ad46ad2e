"""Composition root: builds every component from a configuration and wires them."""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

from mandant import __version__
from mandant.backends.base import Backend
from mandant.config import MandantConfig, ModelSpec
from mandant.registry import ModelRegistry
from mandant.scheduling.base import Scheduler
from mandant.scheduling.direct import DirectScheduler
from mandant.service import DataPlane
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
        self.registry = ModelRegistry(config.model_specs(base_dir), make_backend, make_scheduler)
        self.plane = DataPlane(KeyStore(tenants), self.registry, version=__version__)
        self.grpc = GrpcServer(self.plane, config.server)
        self.grpc_port = 0

    async def start(self) -> None:
        await self.registry.start()
        try:
            self.grpc_port = await self.grpc.start()
        except BaseException:
            await self.registry.aclose()
            raise

    async def aclose(self, grace_s: float | None = None) -> None:
        await self.grpc.stop(self.config.server.grace_s if grace_s is None else grace_s)
        await self.registry.aclose()

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
