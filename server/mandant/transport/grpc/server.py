"""The grpc.aio server: inference service, health checking, reflection, TLS,
message-size limits, graceful stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc._cython import cygrpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from mandant.config import ServerConfig, TlsConfig
from mandant.events import NullObserver, Observer
from mandant.observability.stats import InferenceStats
from mandant.observability.usage import UsageReports
from mandant.scheduling.door import CallCap, FrontDoor
from mandant.scheduling.gather import CallGather
from mandant.service import DataPlane
from mandant.tenancy.keys import AdminKeys
from mandant.transport.grpc.admin import ADMIN_SERVICE, AdminServicer, admin_handlers
from mandant.transport.grpc.forward import PEER_IDENTITIES, Forwarder, decode_identities
from mandant.transport.grpc.gateway import (
    Access,
    AdminAuthenticator,
    Context,
    Gate,
    PeerAuthenticator,
    metadata_value,
)
from mandant.transport.grpc.probes import add_health, add_reflection
from mandant.transport.grpc.reads import MessageReads
from mandant.transport.grpc.servicer import (
    INFERENCE_SERVICE,
    InferenceServicer,
    method_access,
    method_handlers,
)
from mandant.transport.grpc.stream import AGE_JITTER, END_MARK_WAIT_S
from mandant.transport.listeners import Listener, host_port
from mandant.transport.tls import GrpcCertificates, grpc_identities
from mandant.transport.unread import UnreadAnswers
from mandant.types import Tenant
from mandant_client._proto import admin_pb2, model_config_pb2
from mandant_client._proto import grpc_service_pb2 as pb

logger = logging.getLogger(__name__)


class _ClientNoise(logging.Filter):
    """Records grpc.aio writes as ERRORs with a traceback for what any client can cause,
    each call: it could fill the server's error log. They go out at DEBUG, without the
    traceback; gRPC's other errors stay as they are.

    - an answer it could not send because its call had ended (the client cancelled, or
      left, while it was written: ``ExecuteBatchError``), about 1 KB each (about
      5 KiB/s, a reviewer's 4 MB answers dropped);
    - a metadata value that is not UTF-8 (``Invalid encoding on <value>``), even on a
      probe without a key: 250 KB/s from one client, and the value verbatim, so an
      ``authorization`` header with one stray byte logged its key. The value is left
      out;
    - a handler cancelled as the server stops, its grace run out (``Exception not
      handled by _handle_exceptions``, a CancelledError): one ERROR with a traceback
      per call still in progress, 110 of them at one stop under load (a hunt). The
      first is a WARNING that says so, without the traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._cancel_told = False

    def stopping(self) -> None:
        """A stop begins: its first cancelled handler is told again."""
        self._cancel_told = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], cygrpc.ExecuteBatchError):
            return _demoted(record)
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            if self._cancel_told:
                return _demoted(record)
            self._cancel_told = True
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
            record.msg = (
                "gRPC cancelled calls in progress (as the server stops, once server.grace_s "
                "has run out); further ones are logged at DEBUG"
            )
            record.args = ()
            return True
        if record.msg == UNDECODABLE:
            record.msg, record.args = "a metadata value is not UTF-8 (not logged)", ()
            return _demoted(record)
        return True


#: What grpcio logs of a metadata value that is not UTF-8 (with the value).
UNDECODABLE = "Invalid encoding on %s"


def _demoted(record: logging.LogRecord) -> bool:
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    record.exc_info = record.exc_text = None
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


CLIENT_NOISE = _ClientNoise()
#: Where grpc.aio's server logs them.
GRPC_CORE_LOGGER = "grpc._cython.cygrpc"

#: What a front end of ``workers: N`` serves itself (inference, and the probes: live
#: while the engine restarts, ready as its link says); it forwards the rest to the engine.
FRONT_END_METHODS = frozenset(
    {"ModelInfer", "ModelStreamInfer", "ServerLive", "ServerReady", "ServerMetadata"}
)
#: Calls received and not yet handed to a handler that gRPC keeps (see GrpcServer).
PENDING_CALLS = 1 << 15
#: ``grpc.compression_enabled_algorithms_bitset``: a bit per algorithm (identity 0,
#: deflate 1, gzip 2).
IDENTITY_ONLY = 0b001
ALL_COMPRESSION = 0b111
#: How often a client may ping (keepalive; see GrpcServer).
KEEPALIVE_MIN_PING_S = 10.0
#: How often the server pings each client connection, and how long it waits for the
#: answer before it closes the connection (see GrpcServer).
KEEPALIVE_TIME_S = 60.0
KEEPALIVE_TIMEOUT_S = 20.0
#: The metadata a forwarded call may carry to the engine's private socket: the client's
#: (gRPC's default bound on the public port, 16 KiB) and its certificate's identities
#: (``forward.PEER_IDENTITIES``), which JSON writes up to three times longer than the
#: certificate holds them (``é``, two bytes: ``\u00e9``). At gRPC's default (8 KiB
#: soft, 16 KiB hard) a client whose certificate had many or non-ASCII names (8 KiB of
#: them) had its forwarded calls fail RESOURCE_EXHAUSTED where one process serves them.
#: Soft and hard alike: none at random.
ENGINE_METADATA_BYTES = 256 * 1024


def name_path(method: str) -> str:
    return f"/{INFERENCE_SERVICE}/{method}"


def certificate_identities(context: Context) -> list[str]:
    """The identities of the call's verified client certificate (mTLS)."""
    return grpc_identities(context.auth_context())


def forwarded_identities(context: Context) -> list[str]:
    """The identities a front end named for a call it forwarded (``forward.py``)."""
    return decode_identities(metadata_value(context, PEER_IDENTITIES))


CertificateAuthenticator = Callable[[Iterable[str]], Tenant]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: How often gRPC health re-reads the server's readiness.
HEALTH_POLL_S = 0.5
#: Stopping: gRPC has handed over every call it received once none started in
#: QUIET_ROUNDS windows of this long in a row (:class:`Quiet`); it waits so at most
#: QUIET_MAX_S.
QUIET_S = 0.05
QUIET_ROUNDS = 2
QUIET_MAX_S = 2.0


class Quiet:
    """Whether gRPC has handed over every call it received, told after each window
    of :data:`QUIET_S`: no call started in :data:`QUIET_ROUNDS` windows in a row, each
    of which ended on time. A window that ended late (the process was not scheduled:
    a busy host) says nothing: gRPC's calls and the handlers it starts were held up
    with it, and one window without a start then ended a stop while calls were still
    being handed over (they were cancelled: CANCELLED, which clients do not retry)."""

    def __init__(self, started: int, now: float) -> None:
        self._started = started
        self._window_began = now
        self._quiet = 0

    def after_window(self, started: int, now: float) -> bool:
        on_time = now - self._window_began < 2 * QUIET_S
        self._quiet = self._quiet + 1 if started == self._started and on_time else 0
        self._started, self._window_began = started, now
        return self._quiet >= QUIET_ROUNDS


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """One pool holding every service we serve, for the reflection service (ours live
    in a private pool, the health and reflection protos in the default one)."""
    pool = descriptor_pool.DescriptorPool()
    for file in (
        model_config_pb2.DESCRIPTOR,  # before the service file, which imports it
        pb.DESCRIPTOR,
        admin_pb2.DESCRIPTOR,
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
    ):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    return pool


class GrpcServer:
    def __init__(
        self,
        plane: DataPlane,
        config: ServerConfig,
        observer: Observer | None = None,
        usage: UsageReports | None = None,
        stats: InferenceStats | None = None,
        authenticate_admin: AdminAuthenticator | None = None,
        authenticate_certificate: CertificateAuthenticator | None = None,
        cap: CallCap | None = None,
        door: FrontDoor | None = None,
        unread: UnreadAnswers | None = None,
        forward: Forwarder | None = None,
        bind: str | None = None,
    ) -> None:
        """``forward``: a front end of ``workers: N``: only ModelInfer and
        ModelStreamInfer are served here, every other RPC is forwarded to the engine
        (``forward.py``), and the port is shared with the other front ends
        (SO_REUSEPORT). ``bind``: the engine's private socket (``unix:/path``) instead
        of the configured port: plain (no TLS: the front ends hold the port's), and a
        forwarded call's client certificate is the one its front end names.

        ``usage``: serve ``mandant.admin.v1.AdminService`` from these reports;
        without it the admin service is not served. ``stats``: what ModelStatistics
        answers from (fed through ``observer``). ``authenticate_admin``: who is an
        admin (the App passes the tenant directory's, which a reload updates; default:
        ``config.admin_keys`` as they are now). ``authenticate_certificate``: the
        tenant of a client certificate's identities, asked for calls without a key
        where ``config.tls.client_ca`` is set."""
        self._plane = plane
        self._config = config
        self._health = health.aio.HealthServicer()
        self._health_watch: asyncio.Task[None] | None = None
        options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # Answers are not bounded by the request limit (an answer a little larger
            # than its request would fail once the model has run): as Triton.
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if forward is not None else 0),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            # Compressed messages: identity only unless ``grpc_compression`` (gRPC
            # inflates a message whole with the event loop waiting: see the setting).
            (
                "grpc.compression_enabled_algorithms_bitset",
                ALL_COMPRESSION if config.grpc_compression else IDENTITY_ONLY,
            ),
            # Calls gRPC has received but not handed to a handler yet: past its own
            # bound (1,000) gRPC cancels them, unseen (3,000 calls at once over 8
            # connections: a fifth ended CANCELLED, which clients do not retry). The
            # gate takes them as fast as the loop runs and answers what is over the
            # server-wide cap RESOURCE_EXHAUSTED with pushback, fairly by tenant; this
            # bound stays, far above it (32 connections' worth of HTTP/2 streams).
            ("grpc.server.max_pending_requests", PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
            # Keepalive: a client may ping every KEEPALIVE_MIN_PING_S, with calls or
            # without: gRPC's default sends a client pinging more often than every
            # 5 minutes without calls away (GOAWAY too_many_pings), so a client could
            # not use keepalive to find a dead connection.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", round(KEEPALIVE_MIN_PING_S * 1000)),
            # And the server pings each connection, calls or not, and closes one whose
            # client does not answer within KEEPALIVE_TIMEOUT_S: a client gone without a
            # word (its host or network gone) no longer holds its calls, its streams'
            # places (``server.max_tenant_streams``) and the parts of messages they
            # hold until TCP gives up. gRPC waits for a ping's answer as long as
            # ``ping_timeout_ms`` says (a minute by default), whatever the keepalive
            # timeout; without it a silent client kept its connection.
            ("grpc.keepalive_time_ms", round(KEEPALIVE_TIME_S * 1000)),
            ("grpc.keepalive_timeout_ms", round(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.http2.ping_timeout_ms", round(KEEPALIVE_TIMEOUT_S * 1000)),
        ]
        if bind is not None:
            options += [
                ("grpc.max_metadata_size", ENGINE_METADATA_BYTES),
                ("grpc.absolute_max_metadata_size", ENGINE_METADATA_BYTES),
            ]
        if config.max_connection_age_s is not None and bind is None:
            # A ModelStreamInfer stream ends itself (gracefully) at its own age, at most
            # 1.1 x max_connection_age_s, then drains and waits for its client to stop
            # writing (``stream.py``, END_MARK_WAIT_S); one opened just before the
            # GOAWAY must not be killed before that, so the connection's grace covers
            # it. Unary calls are only given longer.
            age_s = config.max_connection_age_s
            grace_s = config.grace_s + AGE_JITTER[1] * age_s + END_MARK_WAIT_S
            options += [
                ("grpc.max_connection_age_ms", round(age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", round(grace_s * 1000)),
            ]
        self._server = grpc.aio.server(options=options)
        logging.getLogger(GRPC_CORE_LOGGER).addFilter(CLIENT_NOISE)  # once: a set
        self._bind = bind
        tls = config.tls
        self._certificates = GrpcCertificates(tls) if tls is not None and bind is None else None
        peer: PeerAuthenticator | None = None
        if tls is not None and tls.client_ca is not None and authenticate_certificate is not None:
            by_identities = authenticate_certificate
            identities = forwarded_identities if bind is not None else certificate_identities

            def by_certificate(context: Context) -> Tenant:
                return by_identities(identities(context))

            peer = by_certificate

        self.door = door = door if door is not None else FrontDoor(config.front_door_slots)
        cap = cap if cap is not None else CallCap(config.max_concurrent_rpcs)
        observer = observer if observer is not None else NullObserver()
        # Each tenant's answers not read yet: the gate refuses its inference calls at
        # the bound, before they take a place; the servicer counts the answers.
        if unread is None:
            unread = UnreadAnswers(config.max_unread_answer_bytes, observer)
        # Unary inference calls of a busy front end wait for company (gather.py); held
        # calls hold their places at the door, so a group never outgrows it.
        group = min(config.front_gather_calls, config.front_door_slots)
        gather = (
            CallGather(config.front_gather_ms / 1000, group, report=observer.calls_gathered)
            if config.front_gather_ms > 0 and group > 1
            else None
        )
        # How long each call's message may take to come, how many come at once.
        reads = MessageReads(
            config.message_read_timeout_s, max_tenant_streams=config.max_tenant_streams
        )
        self.gate = gate = Gate(
            plane.authenticate,
            authenticate_admin or AdminKeys(config.admin_keys).authenticate,
            observer=observer,
            cap=cap,
            door=door,
            authenticate_peer=peer,
            unread=unread,
            gather=gather,
            reads=reads,
        )
        self.servicer = servicer = InferenceServicer(
            plane, config, observer, door, stats or InferenceStats(), cap, unread
        )
        handlers = method_handlers(servicer, gate)
        if forward is not None:
            handlers = {
                name: handler
                if name in FRONT_END_METHODS
                else gate.forwarded(method_access(name), forward.forward(name_path(name)))
                for name, handler in handlers.items()
            }
        self._server.add_registered_method_handlers(INFERENCE_SERVICE, handlers)
        self.watches = add_health(self._server, self._health, reads)
        services = [INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME]
        if forward is not None:
            admin = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
            self._server.add_registered_method_handlers(
                ADMIN_SERVICE,
                {
                    m.name: gate.forwarded(
                        Access.ADMIN, forward.forward(f"/{ADMIN_SERVICE}/{m.name}")
                    )
                    for m in admin.methods
                },
            )
            services.append(ADMIN_SERVICE)
        elif usage is not None:
            self._server.add_registered_method_handlers(
                ADMIN_SERVICE, admin_handlers(AdminServicer(usage), gate)
            )
            services.append(ADMIN_SERVICE)
        add_reflection(
            self._server,
            reflection.aio.ReflectionServicer(services, pool=_reflection_pool()),
            reads,
        )
        self.port = 0

    @property
    def listeners(self) -> list[Listener]:
        """The gRPC port; none where it serves a private socket (``bind``)."""
        if self._bind is not None:
            return []
        return [Listener("gRPC port", "server.host", self._config.host, self._config.grpc_port)]

    async def start(self) -> int:
        """Bind and start; returns the bound port (useful with port 0). A failure to bind
        the gRPC port is an OSError naming it, its setting and the address (gRPC's own
        says "Failed to bind to address", and why only in its log)."""
        config = self._config
        address = self._bind or host_port(config.host, config.grpc_port)
        try:
            if self._certificates is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, self._certificates.credentials)
        except RuntimeError as exc:
            if self._bind is not None:
                raise
            (listener,) = self.listeners
            raise listener.bind_error(
                "gRPC's log line before this one says why (a port in use, an address not "
                "on this machine)"
            ) from exc
        await self._server.start()
        await self._set_health(self._ready())
        self._health_watch = asyncio.create_task(self._follow_readiness(), name="grpc-health")
        return self.port

    def tenants_changed(self) -> None:
        """The tenant directory was replaced (a reload): open streams check their key."""
        self.servicer.check_streams()

    def reload_tls(self, tls: TlsConfig) -> None:
        """Serve the certificates (and client CA) at ``tls``'s paths to connections
        made from now on; nothing where the server was started without TLS."""
        if self._certificates is not None:
            self._certificates.reload(tls)

    async def _set_health(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", INFERENCE_SERVICE):
            await self._health.set(service, status)

    def _ready(self) -> bool:
        """The data plane's readiness; a check that raises counts as not ready."""
        try:
            return self._plane.ready
        except Exception:
            logger.exception("readiness check failed; reporting NOT_SERVING")
            return False

    async def _follow_readiness(self) -> None:
        """gRPC health says what ``/readyz`` and ServerReady say: the data plane's
        readiness, polled every :data:`HEALTH_POLL_S` (and set at once on drain)."""
        ready = self._ready()
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            now = self._ready()
            if now != ready:
                ready = now
                logger.warning("server %s", "ready" if ready else "not ready")
                await self._set_health(ready)

    async def stop(self, grace_s: float) -> None:
        """Stop taking calls, let those in flight finish within ``grace_s``.

        gRPC cancels the calls it has received but not yet handed to a handler when
        it stops (their clients see CANCELLED, which they do not retry): under load a
        few milliseconds of them. So the server first goes on handing them over (new
        inference calls are refused UNAVAILABLE, health says NOT_SERVING) until no
        call has started for a while (:class:`Quiet`), for at most :data:`QUIET_MAX_S`
        (a client calling again at once after each refusal keeps it from going quiet)."""
        self._plane.drain()
        CLIENT_NOISE.stopping()
        self.servicer.end_streams()
        watch, self._health_watch = self._health_watch, None
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await self._health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        began = loop.time()
        quiet = Quiet(self.gate.started, began)
        while loop.time() - began < min(grace_s, QUIET_MAX_S):
            await asyncio.sleep(QUIET_S)
            if quiet.after_window(self.gate.started, loop.time()):
                break
        left_s = max(0.0, grace_s - (loop.time() - began))
        stopping = asyncio.ensure_future(self._server.stop(left_s))
        await asyncio.sleep(0)  # the stop's first step: gRPC takes no new call
        self.watches.end()  # so a Watch that ends now is not opened again at once
        await stopping

    async def wait(self) -> None:
        await self._server.wait_for_termination()
