"""Composition root: builds every component from a configuration and wires them."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Collection, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mandant import __version__
from mandant.backends.base import Backend, circuit_open
from mandant.backends.channels import ChannelPool
from mandant.config import MandantConfig, ModelSpec, TlsConfig, config_folder, load_config
from mandant.errors import ConfigError, InvalidInput, MandantError, Unavailable
from mandant.events import Observer
from mandant.observability.http import Health, HttpServer
from mandant.observability.live import LiveStats
from mandant.observability.metrics import (
    InflightRequests,
    ModelReadiness,
    PrometheusObserver,
    forget_load_failures,
    load_failures,
)
from mandant.observability.series import Registry
from mandant.observability.slo import SloTracker
from mandant.observability.stats import InferenceStats
from mandant.observability.usage import FleetCounting, UsageReports
from mandant.registry import ModelRegistry
from mandant.scheduling.base import Scheduler
from mandant.scheduling.batcher import DynamicBatcher
from mandant.scheduling.direct import DirectScheduler
from mandant.scheduling.door import CallCap, FrontDoor
from mandant.service import DataPlane
from mandant.tenancy.admission import TenantAdmission, shared_store_for
from mandant.tenancy.directory import TenantDirectory
from mandant.tenancy.redis_usage import shared_usage_for
from mandant.transport.grpc.server import GrpcServer
from mandant.transport.listeners import check_listeners
from mandant.transport.rest.server import RestServer
from mandant.transport.tls import CERTIFICATES_KEPT, rotated, same_tls_shape, server_ssl_context
from mandant.transport.unread import UnreadAnswers
from mandant.workers.sockets import EngineSockets

if TYPE_CHECKING:
    from mandant.workers.engine_server import EngineServer

logger = logging.getLogger(__name__)


def make_backend(
    spec: ModelSpec, channels: ChannelPool | None = None, compute_nice: int = 0
) -> Backend:
    """``channels``: the App's shared connections to remote (Triton) servers;
    ``compute_nice``: ``server.compute_nice`` (in-process models' threads)."""
    if spec.backend == "torch":
        from mandant.backends.torch import TorchBackend

        return TorchBackend(spec, compute_nice=compute_nice)
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


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: ``applied`` at once (tenants, keys, admin keys; never key
    material), ``deferred`` until the next restart."""

    applied: tuple[str, ...]
    deferred: tuple[str, ...]


#: Server settings a reload applies at once; any other server change waits for a restart.
_LIVE_SERVER_SETTINGS = frozenset({"admin_keys"})


def as_reloaded(running: MandantConfig, new: MandantConfig) -> tuple[MandantConfig, list[str]]:
    """What a server running ``running`` holds once it reloads ``new``: ``new``'s
    tenants, models and admin keys, and its TLS files (in the running TLS shape where
    the file changed it, :func:`rotated`); every other server setting and the limits as they were,
    until a restart; and those, in words. (``workers: N``: a process started again
    after a reload starts as this, so that it serves what its siblings serve.)"""
    server_changed = sorted(
        name
        for name in type(new.server).model_fields
        if name not in _LIVE_SERVER_SETTINGS
        and getattr(new.server, name) != getattr(running.server, name)
        and not (name == "tls" and same_tls_shape(new.server.tls, running.server.tls))
    )
    deferred = [
        f"'{part}' changed: applied at the next restart"
        for part in ("limits",)
        if getattr(new, part) != getattr(running, part)
    ]
    if server_changed:
        deferred.insert(
            0, f"'server' ({', '.join(server_changed)}) changed: applied at the next restart"
        )
    live: dict[str, object] = {"admin_keys": new.server.admin_keys}
    if (tls := rotated(running.server.tls, new.server.tls)) is not None:
        live["tls"] = tls  # new files, in the running shape where that changed
    server = running.server.model_copy(update=live)
    held = running.model_copy(
        update={"tenants": new.tenants, "server": server, "models": new.models}
    )
    return held, deferred


class App:
    """The whole server. ``async with App(config, base_dir) as app`` starts it;
    ``app.grpc_port`` is the bound port. ``config_path``: the file ``config`` came
    from; RepositoryModelLoad re-reads a model's entry from it (without one, from
    ``config``)."""

    def __init__(
        self,
        config: MandantConfig,
        base_dir: Path,
        config_path: Path | None = None,
        engine_sockets: EngineSockets | None = None,
        on_models_retired: Callable[[], object] | None = None,
    ) -> None:
        """``engine_sockets``: this App is the engine of ``workers: N`` (the
        supervisor's ``workers/``): the front ends' inference calls arrive on
        ``requests`` and their other RPCs on ``control``, instead of a gRPC port;
        REST, the HTTP port, models, admission and metrics are the host's, here.
        ``on_models_retired``: called once replaced or unloaded model versions are
        closed (the serving process re-settles its heap: ``heap.py``)."""
        self._base_dir = base_dir
        self.config_path = config_path
        self.config = config = config.resolved(self.base_dir)
        specs = config.model_specs(self.base_dir)
        #: The model names served: the registry adds the names a reload or load
        #: brings, ``_forget_unserved`` takes out those gone; metrics and statistics
        #: label these (and no client text).
        self.model_names = {spec.name for spec in specs}
        model_names = self.model_names
        #: The one source of tenant facts; every component below reads it.
        self.directory = TenantDirectory.from_config(config)
        self.metrics = Registry()
        self.slo = SloTracker(self.directory)
        # In flight: the admission's count (made below), read when the dashboard draws.
        self.live = LiveStats(
            self.directory,
            lambda: ((m.key.name, m.key.owner or "") for m in self.registry.all()),
            inflight=lambda tenant: self.admission.inflight(tenant),
        )
        self.prometheus = PrometheusObserver(
            self.metrics, self.directory, model_names, slo=self.slo, live=self.live
        )
        #: Fleet-wide usage counters in Redis (with ``limits.store: redis``).
        self.fleet_usage = shared_usage_for(config.limits)
        self.observer: Observer = (
            self.prometheus
            if self.fleet_usage is None
            else FleetCounting(self.prometheus, self.fleet_usage)
        )
        # ModelStatistics: per tenant, model and version.
        self.stats = InferenceStats(
            settle=self._events_settled, models=model_names, configured=self.directory.configured
        )
        self.channels = ChannelPool()
        compute_nice = config.server.compute_nice  # the value at start (a restart changes it)
        self.load_failures = failures = load_failures(self.metrics)
        self.registry = ModelRegistry(
            specs,
            lambda spec: make_backend(spec, self.channels, compute_nice),
            lambda spec, backend: make_scheduler(
                spec, backend, self.stats.observe(self.observer, spec.version, spec.tenant or "")
            ),
            spec_source=self._model_specs,
            on_failure=lambda key, reason: failures.labels(key.name).inc(),
            grace_s=config.server.grace_s,
            names=self.model_names,
            on_retired=on_models_retired,
            load_timeout_s=config.server.model_load_timeout_s,
            on_unserved=self._forget_unserved,
        )
        self.metrics.register(
            ModelReadiness(
                lambda: (
                    (m.key.name, m.key.version, m.key.owner or "", m.ready, circuit_open(m.backend))
                    for m in self.registry.all()
                )
            )
        )
        self.admission = TenantAdmission(
            config, shared_store_for(config.limits), observer=self.observer
        )
        self.metrics.register(InflightRequests(self.directory, self.admission.inflight_counts))
        self.plane = DataPlane(
            self.directory,
            self.registry,
            admission=self.admission,
            version=__version__,
            ready_when=config.server.ready_when,
        )
        self.usage = UsageReports(
            self.prometheus,
            self.directory,
            self.live,
            quota=self.admission,
            fleet=self.fleet_usage,
            settle=self._events_settled,
        )
        # One cap on calls in progress and one front door for every port: a flood on
        # REST takes its turn with the gRPC calls, and the cap counts both.
        self.calls = CallCap(config.server.max_concurrent_rpcs)
        self.door = FrontDoor(config.server.front_door_slots)
        # And one count of each tenant's answers not read yet, over both ports.
        self.unread = UnreadAnswers(
            config.server.max_unread_answer_bytes, self.stats.observe(self.observer)
        )
        self.grpc = GrpcServer(
            self.plane,
            config.server,
            cap=self.calls,
            door=self.door,
            unread=self.unread,
            observer=self.stats.observe(self.observer),
            usage=self.usage,
            stats=self.stats,
            authenticate_admin=self.directory.authenticate_admin,
            authenticate_certificate=self.directory.authenticate_certificate,
            bind=engine_sockets.control if engine_sockets is not None else None,
        )
        self.grpc_port = 0
        self.engine: EngineServer | None = None
        health: Health = self.plane  # what /readyz reads
        if engine_sockets is not None:
            from mandant.workers.engine_server import EngineHealth, EngineServer

            self.engine = EngineServer(
                self.plane,
                lambda tenant_id: self.directory.current.tenants.get(tenant_id),
                self.stats.observe(self.observer),
                engine_sockets.requests,
                config.server.max_bytes_elements,
            )
            health = EngineHealth(self.plane, self.engine)
        self.rest = RestServer(
            self.plane,
            config.server,
            cap=self.calls,
            door=self.door,
            unread=self.unread,
            observer=self.stats.observe(self.observer),
            stats=self.stats,
            authenticate_admin=self.directory.authenticate_admin,
            authenticate_certificate=self.directory.authenticate_certificate,
        )
        self.rest_port = 0
        self.http = HttpServer(
            config.server,
            self.directory,
            self.metrics,
            health,
            self.slo,
            self.live,
            usage=self.usage,
        )
        self.http_port = 0
        self.internal_http_port = 0
        #: The model changes of the last reload, applied in the background (its lines).
        self.model_changes: asyncio.Task[list[str]] | None = None
        #: Every reload's model changes still in progress (shutdown cancels them).
        self._applying: set[asyncio.Task[list[str]]] = set()

    @property
    def base_dir(self) -> Path:
        """Where the configuration's relative paths resolve: with ``config_path``, its
        folder now (``config_folder``: a ConfigMap's changes at each edit), else the
        folder given."""
        return self._base_dir if self.config_path is None else config_folder(self.config_path)

    async def _events_settled(self) -> None:
        """Until the events of every call answered so far are recorded (``workers: N``:
        the front ends' reach the engine a little after their answers)."""
        if self.engine is not None:
            await self.engine.settle()

    async def _forget_unserved(self) -> None:
        """Drop every per-model figure of the models the registry no longer serves
        (the series of ``/metrics``, the dashboard's batch sizes and rejections,
        ModelStatistics), after the events of the calls answered so far are recorded
        (``workers: N``: the front ends'), so that the last calls of a model count in
        its figures before they go, not in new ones after. A call whose answer is still
        on its way then (it outlived ``grace_s``, or its REST answer was still being
        written: the model counts a call until the data plane returns it, the transport
        reports it after sending) is counted under the model "" and not in statistics:
        its name is no longer a label. What a tenant is billed stays: usage reports
        keep counting it (``PrometheusObserver.forget``), and the admission keeps its
        limit and quota counts (by configured scope; only its cached plans go)."""
        await self._events_settled()
        served = self.registry.served()
        self.model_names.intersection_update(served.names)
        self.prometheus.forget(served)
        self.live.forget(served)
        self.stats.forget(served)
        forget_load_failures(self.load_failures, served)
        self.admission.forget_models(served)

    def _model_specs(self, name: str, entry: str | None) -> list[ModelSpec]:
        """The versions of ``name`` to load: as configured now (the file re-read where
        the App has one), or as ``entry`` (a load's JSON ``config``) gives them within
        that configuration."""
        try:
            config = self.config if self.config_path is None else load_config(self.config_path)
            specs = config.model_specs(self.base_dir)
        except ConfigError as exc:
            logger.error("model load refused: %s", exc)
            raise Unavailable(
                "the configuration file does not validate (see the server log)"
            ) from None
        if entry is not None:
            try:
                specs = config.entry_specs(name, entry, self.base_dir)
            except ConfigError as exc:
                raise InvalidInput(f"model config refused: {str(exc)[:800]}") from None
        return [spec for spec in specs if spec.name == name]

    async def start(self) -> None:
        """Start every part in order; if one fails, stop those already started. A port
        that cannot be bound stops it before the models load (``Listener.check``)."""
        check_listeners((*self.grpc.listeners, *self.rest.listeners, *self.http.listeners))
        async with AsyncExitStack() as started:
            await self.admission.start()
            started.push_async_callback(self.admission.aclose)
            if self.fleet_usage is not None:
                await self.fleet_usage.start()
                started.push_async_callback(self.fleet_usage.aclose)
            await self.registry.start()
            started.push_async_callback(self.registry.aclose)
            self.grpc_port = await self.grpc.start()
            started.push_async_callback(self.grpc.stop, 0)
            if self.engine is not None:
                await self.engine.start()
                started.push_async_callback(self.engine.aclose)
            self.rest_port = await self.rest.start()
            started.push_async_callback(self.rest.aclose, 0)
            self.http_port = await self.http.start()
            self.internal_http_port = self.http.internal_port
            started.pop_all()

    def reload(self, config: MandantConfig) -> ReloadResult:
        """Apply a new configuration to the running server: the tenant directory
        (tenants, API keys, weights, priorities, SLOs, admin keys) is swapped at once,
        so authentication, metrics labels, SLOs, usage reports and the dashboard all
        see it; admission's rate limits, concurrency caps and quotas follow (limit and
        quota counts are kept). Model changes start at once in the background
        (``model_changes``, as ``ModelRegistry.apply``: each loads beside the old and
        switches once ready). Other server settings and the limits store need a
        restart: they stay as they are, and ``deferred`` says so."""
        config = config.resolved(self.base_dir)
        held, deferred = as_reloaded(self.config, config)
        tls = held.server.tls if config.server.tls is not None else None
        if tls is not None:  # its files read again (``as_reloaded``: rotated)
            try:
                self._reload_certificates(tls)
            except (OSError, ssl.SSLError) as exc:
                deferred.append(f"{CERTIFICATES_KEPT}: {exc}")
        before, ever = self.directory.current.ids, set(self.directory.ever)
        applied = self.directory.replace(config.tenants, config.server.admin_keys)
        self.admission.update(config)
        self.grpc.tenants_changed()
        tenants = self.directory.current.ids
        if before - tenants:
            # A removed tenant's figures and its models loaded with a ``config`` (in no
            # file) go: a tenant added later under its id was served both.
            for figures in (self.stats, self.live, self.slo):
                figures.forget_tenants(tenants)
            self.prometheus.retire_tenants(before - tenants)
            self.http.forget_tenants(tenants)
            self._in_background(self._unload_owners(before - tenants))
        if back := (tenants - before) & ever:
            # Its usage counters too, kept until now for its last usage report.
            self.prometheus.forget_tenants(back)
        self.prometheus.slos_changed()
        specs = config.model_specs(self.base_dir)
        failed = sorted(
            ({m.key.name for m in self.registry.all() if m.failure is not None}
             | self.registry.unapplied)
            & {spec.name for spec in specs}
        )  # fmt: skip
        if config.models != self.config.models:
            # Not behind the previous reload's changes: the registry orders the changes
            # to each name, and a name still loading holds up no other.
            self.model_changes = self._in_background(self._apply_models(specs))
            applied.append("models: changes loading in the background")
        elif failed:  # the operator fixed what failed (a file, a path) and says so
            self.model_changes = self._in_background(self._load_again(failed))
            applied.append(f"models: loading again what failed ({', '.join(failed)})")
        self.config = held
        return ReloadResult(tuple(applied), tuple(deferred))

    def _in_background(self, changes: Coroutine[Any, Any, list[str]]) -> asyncio.Task[list[str]]:
        """Model changes of a reload, made in the background (cancelled at close)."""
        task = asyncio.create_task(changes)
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)
        return task

    async def _unload_owners(self, owners: Collection[str]) -> list[str]:
        return await self.registry.unload_owners(
            owners, on_change=lambda change: logger.info("configuration reload: %s", change)
        )

    async def _apply_models(self, specs: list[ModelSpec]) -> list[str]:
        """A reload's model changes, each logged as it is made."""
        return await self.registry.apply(
            specs, on_change=lambda change: logger.info("configuration reload: %s", change)
        )

    async def _load_again(self, names: list[str]) -> list[str]:
        """A reload's second try of the named models that had failed to load (the
        entries unchanged: a reload that changes them tries every failed one anyway),
        each logged as it ends."""

        async def load(name: str) -> str:
            try:
                await self.registry.load(name)
            except MandantError as exc:
                change = f"model '{name}' failed to load again: {exc}"
            else:
                change = f"model '{name}' loaded"
            logger.info("configuration reload: %s", change)
            return change

        return list(await asyncio.gather(*(load(name) for name in names)))

    def _reload_certificates(self, tls: TlsConfig) -> None:
        """Read the certificate, key and client CA again (also where the paths did not
        change: the files may have); new connections on every TLS port get them."""
        server_ssl_context(tls)  # refuses a key that does not match its certificate
        self.grpc.reload_tls(tls)
        self.rest.reload_tls(tls)
        self.http.reload_tls(tls)

    async def aclose(self, grace_s: float | None = None) -> None:
        grace_s = self.config.server.grace_s if grace_s is None else grace_s
        applying = list(self._applying)
        for changes in applying:  # models still loading: a thread may linger, not us
            changes.cancel()
        await asyncio.gather(*applying, return_exceptions=True)
        draining = [self.grpc.stop(grace_s), self.rest.aclose(grace_s)]
        if self.engine is not None:  # its front ends' calls (the supervisor stops them
            draining.append(self.engine.drain(grace_s))  # first: none left, mostly)
        await asyncio.gather(*draining)
        if self.engine is not None:
            await self.engine.aclose()
        await self.http.aclose()
        await self.registry.aclose()
        await self.admission.aclose()
        if self.fleet_usage is not None:
            await self.fleet_usage.aclose()

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
