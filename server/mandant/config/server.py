"""``server:``: the listeners and what they accept: ports and bind addresses, TLS
(and mTLS), message and tensor bounds, connection and concurrency limits, admin keys,
metrics access, readiness and the number of front-end workers; with the defaults other
modules bound requests by."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from mandant.config._base import _Frozen, _hashes_only, _unreadable


class EncryptedKey(ssl.SSLError):
    """A server key encrypted with a passphrase: not taken (decrypt it, and keep it as a
    secret file). OpenSSL asked for the passphrase on the terminal (a server in one
    froze at a SIGHUP), or failed with a bare OSError without one."""


def no_passphrase() -> bytes:
    """The password callback of every server key load: refuses an encrypted key."""
    raise EncryptedKey("an encrypted key (passphrase) is not supported: decrypt it")


class TlsConfig(_Frozen):
    """``server.tls``: the server's certificate and key (PEM) for the gRPC and REST
    ports. ``client_ca``: require client certificates signed by this CA (mTLS) there;
    ``http``: serve the HTTP port over TLS too, with the same settings. Relative paths
    are relative to the configuration file; files are read again on SIGHUP."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    http: bool = False

    def resolved(self, base_dir: Path) -> TlsConfig:
        """These settings with every path made absolute against ``base_dir``."""
        return self.model_copy(
            update={
                "cert": base_dir / self.cert,
                "key": base_dir / self.key,
                "client_ca": base_dir / self.client_ca if self.client_ca else None,
            }
        )

    def file_problems(self, base_dir: Path) -> list[tuple[str, str]]:
        """Each of these files that cannot be read, or whose contents TLS cannot use
        (not PEM, a key not the certificate's), as (field path, reason): the server
        refused to start on them with OpenSSL's words alone, naming no file."""
        tls = self.resolved(base_dir)
        named = {"cert": tls.cert, "key": tls.key, "client_ca": tls.client_ca}
        unreadable = [
            (f"server.tls.{field}", why)
            for field, path in named.items()
            if path is not None and (why := _unreadable(path)) is not None
        ]
        if unreadable:
            return unreadable
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(tls.cert, tls.key, password=no_passphrase)
        except EncryptedKey:
            return [("server.tls.key", "an encrypted key (passphrase) is not supported")]
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                return [("server.tls.key", "is not the key of server.tls.cert")]
            if b"-----BEGIN CERTIFICATE-----" not in Path(tls.cert).read_bytes():
                return [("server.tls.cert", "not a PEM certificate")]
            if b"PRIVATE KEY-----" not in Path(tls.key).read_bytes():
                return [("server.tls.key", "not a PEM private key")]
            return [("server.tls.cert", f"TLS cannot use it with server.tls.key: {exc}")]
        if (kind := unserved_key_type(tls.cert)) is not None:
            return [("server.tls.cert", f"{kind} {NOT_SERVED}")]
        if tls.client_ca is not None:
            try:
                context.load_verify_locations(cafile=tls.client_ca)
            except ssl.SSLError as exc:
                return [("server.tls.client_ca", f"not a PEM certificate ({exc.reason})")]
        return []


#: Why a certificate of a key type gRPC's TLS does not take is refused.
NOT_SERVED = "keys are not served by gRPC's TLS: use an RSA or EC key"


def unserved_key_type(cert: Path) -> str | None:
    """The key type of the (PEM, readable) certificate ``cert`` where gRPC's TLS does
    not serve it (Ed25519 and Ed448: the gRPC port failed to bind, blaming the address,
    or every handshake failed), else None."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = x509.load_pem_x509_certificate(Path(cert).read_bytes()).public_key()
    except Exception:  # what cryptography cannot read (BER a legacy CA wrote): OpenSSL's
        return None
    if isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        return None
    return type(key).__name__.removeprefix("_").removesuffix("PublicKey") or "these"


#: Default of ``server.max_bytes_elements``: a BYTES tensor at this bound (262,144
#: elements) is unframed in about 1-50 ms (empty to mixed lengths) on one core of the
#: dev machine, and its answer framed in as much again.
DEFAULT_MAX_BYTES_ELEMENTS = 1 << 18
#: Default of ``server.message_read_timeout_s``: a 64 MiB message at about 1 MB/s.
DEFAULT_MESSAGE_READ_TIMEOUT_S = 60.0
#: Default of ``server.max_tenant_streams``: at the default ``max_message_bytes``, one
#: tenant's streams hold at most 4 GiB of messages in part.
DEFAULT_MAX_TENANT_STREAMS = 64

#: Default of ``server.max_json_bytes``: the JSON of a REST inference request is
#: parsed and made into tensors on the event loop, at 16 ms (float arrays) to 75 ms
#: (rows of one value each) per MB on one core of the dev machine, so this bounds what
#: one request stalls every other call by to about 20 ms (2 MiB let one stall them for
#: 0.56 s: ``benchmarks/isolation.py --attacks json-bodies``). Larger tensors travel as
#: binary data (Triton's extension; ``tritonclient.http`` sends them so by default).
DEFAULT_MAX_JSON_BYTES = 256 << 10


class InternalHttpConfig(_Frozen):
    """A second HTTP listener for operators only (bind it to a private address): the
    dashboard, ``/metrics``, ``/usage``, ``/healthz`` and ``/readyz``, no key needed."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)]


#: gRPC takes its settings as C ints: a larger one passed ``check-config`` and then
#: stopped ``serve`` with a traceback once the models had loaded. Milliseconds too: the
#: connection's grace (``grace_s`` + 1.1 x ``max_connection_age_s`` + 5 s) stays within
#: it with these two bounds (a day; 11.6 days).
GRPC_INT_MAX = 2**31 - 1
MAX_GRACE_S = 86_400.0
MAX_CONNECTION_AGE_S = 1_000_000.0


class ServerConfig(_Frozen):
    #: Bind address of the gRPC and REST ports (and of the HTTP port without ``http_host``).
    host: str = "127.0.0.1"
    #: Bind address of ``http_port`` (dashboard, ``/metrics``, probes) where it must
    #: differ from ``host``, e.g. gRPC on ``0.0.0.0`` and the HTTP port on a private
    #: address; unset: ``host``. See :attr:`http_bind_host`.
    http_host: str | None = None
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = 8001
    http_port: Annotated[int, Field(ge=0, le=65535)] = 8002
    #: KServe v2 REST (Triton's HTTP/REST protocol), ``transport/rest``.
    rest_port: Annotated[int, Field(ge=0, le=65535)] = 8000
    max_message_bytes: Annotated[int, Field(gt=0, le=GRPC_INT_MAX)] = 64 * 1024 * 1024
    #: How long a gRPC call's message may take to arrive once the server reads it
    #: (a call with a key; one without has 5 s): gRPC holds what has come of a message
    #: until the rest does, so a client that sends part of one and stops is answered
    #: DEADLINE_EXCEEDED then, and the part is freed (``transport/grpc/reads.py``).
    #: The client's own deadline ends it sooner. Not applied between a stream's
    #: messages.
    message_read_timeout_s: Annotated[float, Field(gt=0)] = DEFAULT_MESSAGE_READ_TIMEOUT_S
    #: Accept gRPC messages a client compressed (``grpc-encoding: gzip`` or
    #: ``deflate``). Off by default: gRPC inflates a message whole, up to
    #: ``max_message_bytes``, while the process's event loop waits, so one tenant's
    #: 64 KiB of gzip (63 MiB of zeros) held every call of every tenant for about half
    #: a second, and a stream of them starved them all. Off, such a call is answered
    #: UNIMPLEMENTED ("Compression algorithm 'gzip' is disabled"); REST bodies inflate
    #: a step at a time whatever this says. Turn it on only for tenants you trust, or
    #: with a small ``max_message_bytes``.
    grpc_compression: bool = False
    grace_s: Annotated[float, Field(ge=0, le=MAX_GRACE_S)] = 10.0
    #: How long one model version may take to load and warm up (at start, on a load or
    #: a reload) before it counts as failed to load; the other models and model
    #: changes never wait for it. An in-process model's loading thread cannot be
    #: stopped: it may run on in the background, its result dropped.
    model_load_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    #: Concurrent calls one client connection may have in the server; further calls
    #: wait in the client's HTTP/2 layer, costing this server nothing. Bounds how much
    #: of a CPU-bound front end one connection can occupy.
    max_concurrent_streams: Annotated[int, Field(gt=0, le=GRPC_INT_MAX)] = 1024
    #: Close a client's HTTP/2 connection (GOAWAY) after about this long (gRPC adds
    #: ±10% jitter), its calls given ``grace_s`` to finish: a long-lived client then
    #: reconnects, and an L4 balancer (a Kubernetes Service) spreads it again, also
    #: onto replicas added since. None: connections live as long as the client's.
    #: A ModelStreamInfer stream of a client that sends unread messages again (a
    #: multiplexed mandant_client says so in its metadata) is ended by the server
    #: (status OK, trailing metadata ``mandant-stream-end: connection-age``) once it has
    #: lived about this long (±10%), after answering every message it read; the client
    #: sends the rest again on a new stream. Other clients' streams are not ended so.
    #: So the connection's grace is ``grace_s`` plus 1.1 x this (a stream opened just
    #: before the GOAWAY lives its own age, then drains); unary calls are only given
    #: longer.
    max_connection_age_s: Annotated[float | None, Field(gt=0, le=MAX_CONNECTION_AGE_S)] = None
    #: Calls (and stream messages) the whole server serves at once; one more is
    #: answered RESOURCE_EXHAUSTED (with pushback) before its message is parsed. With
    #: ``max_concurrent_streams`` it bounds what slow readers can make the server hold.
    #: An open stream takes a place only while a message of it is served.
    max_concurrent_rpcs: Annotated[int, Field(gt=0, le=GRPC_INT_MAX)] = 4096
    #: Inference calls (unary, and stream messages) in progress before tenants take
    #: turns at the front door, by weight, for the next free place: a flooding tenant's
    #: surplus waits there, undecoded, while a light tenant's call walks past it.
    front_door_slots: Annotated[int, Field(gt=0, le=GRPC_INT_MAX)] = 128
    #: How long a unary gRPC inference call may wait, once its message has come, for
    #: other calls, so that their Python runs back to back, when the front end is busy
    #: (``scheduling/gather.py``): more calls per second of a core under load; a caller
    #: alone never waits, nor a call whose deadline is nearer. 0 turns it off. Stream
    #: messages are not held (measured: no gain).
    front_gather_ms: Annotated[float, Field(ge=0, le=100)] = 3.0
    #: Most calls let go together (at most ``front_door_slots``; 1 turns it off).
    front_gather_calls: Annotated[int, Field(ge=1, le=1024)] = 32
    #: Messages of one ModelStreamInfer stream served at once; beyond it the stream is
    #: not read until one is answered (backpressure, not buffering).
    max_stream_inflight: Annotated[int, Field(gt=0)] = 128
    #: ModelStreamInfer streams one tenant may have open at once (per process: each
    #: front end of ``workers: N``); one more is refused RESOURCE_EXHAUSTED (pushback
    #: 1 s) as it opens. Between its messages a stream waits for the next one as long
    #: as its client likes, and gRPC holds whatever part of one has come: each stream
    #: may hold up to ``max_message_bytes`` so, and this bounds how many a tenant has.
    #: A multiplexed mandant_client, and a tritonclient ``start_stream``, open one.
    max_tenant_streams: Annotated[int, Field(gt=0)] = DEFAULT_MAX_TENANT_STREAMS
    #: Bytes of one tenant's inference answers that its clients have not read yet
    #: (HTTP/2 flow control, or TCP for REST, holds them in the server), over all its
    #: connections and streams on both ports, past which its next inference calls and
    #: stream messages are refused RESOURCE_EXHAUSTED (REST: 429; pushback 1 s) until
    #: they read; an answer that would take them past twice this is refused as it is
    #: handed over: a tenant that calls without reading holds at most twice this plus
    #: one answer (``transport/unread.py``). Per process holding the answers (each front
    #: end of ``workers: N``, and its engine for REST).
    max_unread_answer_bytes: Annotated[int, Field(gt=0)] = 256 * 1024 * 1024
    #: How much lower than the event loop the threads that run in-process (torch) models
    #: on the CPU are scheduled: a Linux nice increment, 0 (the same) to 19 (instances on
    #: CUDA keep the loop's priority: they mostly wait for the device). On a busy core the
    #: kernel then runs the front end's work for newly arrived calls (a light tenant's
    #: among them) before the rest of a batch, instead of time-slicing the two; the
    #: batch still gets the CPU the front end leaves (nice 5: about a quarter of it
    #: while both want it). Applies to models loaded after start-up too; a reload
    #: changes it at the next restart.
    compute_nice: Annotated[int, Field(ge=0, le=19)] = 5
    #: Most elements one BYTES tensor (raw or typed ``bytes_contents``) may hold; BYTES
    #: are unframed element by element on the event loop, so more is refused
    #: (INVALID_ARGUMENT) before any is read. Fixed-size tensors are zero-copy views
    #: bounded by ``max_message_bytes`` alone.
    max_bytes_elements: Annotated[int, Field(gt=0)] = DEFAULT_MAX_BYTES_ELEMENTS
    #: Largest JSON part of a REST inference request (the whole body, or what precedes
    #: the binary tensors): JSON is parsed on the event loop, so more is refused (413)
    #: before it is read; tensors that large travel as binary data (Triton's binary
    #: tensor extension, ``tritonclient.http``'s default), bounded by
    #: ``max_message_bytes`` alone.
    max_json_bytes: Annotated[int, Field(gt=0)] = DEFAULT_MAX_JSON_BYTES
    tls: TlsConfig | None = None
    #: Hashes of the operators' keys (``mandant keygen``): every tenant's figures on
    #: the HTTP port, and ``AdminService`` over gRPC. Reloaded on SIGHUP.
    admin_keys: tuple[str, ...] = ()
    #: Who may read ``/metrics``, ``/usage`` and the dashboard's data on ``http_port``:
    #: ``admin``: an admin key sees every tenant, a tenant key its own figures only
    #: (``/metrics``: admins only); ``none``: anyone who reaches the port.
    metrics_auth: Literal["admin", "none"] = "admin"
    #: Optional internal-only listener serving the same endpoints without a key.
    internal_http: InternalHttpConfig | None = None
    #: ``/readyz``, gRPC health and ServerReady report ready while ``any_model`` (at
    #: least one model) or ``all_models`` is ready; never while draining.
    ready_when: Literal["all_models", "any_model"] = "any_model"
    #: gRPC front-end processes: 1 serves everything in one process; N > 1 runs N front
    #: ends on the one gRPC port and one engine process that holds the models, the fair
    #: batcher, admission, metrics and the REST and HTTP ports (``workers/``);
    #: ``auto``: one per core but the engine's.
    workers: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = 1

    @property
    def http_bind_host(self) -> str:
        """The address ``http_port`` binds: ``http_host``, else ``host``."""
        return self.http_host if self.http_host is not None else self.host

    @field_validator("host")
    @classmethod
    def _host(cls, host: str) -> str:
        """gRPC cannot bind an empty host: the server stopped once its models had loaded."""
        if not host.strip():
            raise ValueError("empty: 0.0.0.0 binds every IPv4 address, :: every address")
        return host

    @field_validator("admin_keys")
    @classmethod
    def _admin_hashes_only(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        return _hashes_only(keys)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> object:
        """``auto`` or a whole number from 1 to 256, said once otherwise (the union's
        members each said why not, with pydantic's tags in the field path)."""
        if value == "auto" or (
            isinstance(value, int | str)
            and not isinstance(value, bool)
            and str(value).isdigit()
            and 1 <= int(value) <= 256
        ):
            return value
        raise ValueError("'auto', or a number of front-end processes from 1 to 256")

    @model_validator(mode="after")
    def _ports(self) -> ServerConfig:
        """No two listeners on one port: the second failed to bind only once every
        model had loaded. (Ports on different hosts may match.)"""
        port = self.internal_http.port if self.internal_http is not None else 0
        if port and port in (self.grpc_port, self.http_port, self.rest_port):
            raise ValueError(
                "'internal_http.port' must differ from grpc_port, http_port and rest_port"
            )
        if self.rest_port and self.rest_port == self.grpc_port:
            raise ValueError("'rest_port' must differ from grpc_port (both bind server.host)")
        shared_host = self.http_bind_host == self.host
        if self.http_port and shared_host and self.http_port in (self.grpc_port, self.rest_port):
            raise ValueError(
                "'http_port' must differ from grpc_port and rest_port (all three bind "
                "server.host; server.http_host puts it elsewhere)"
            )
        return self
