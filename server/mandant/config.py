"""Configuration: frozen pydantic models, YAML in, validated once at start.

A file that does not validate raises :class:`ConfigError` listing every problem with
its field path (``models.2.inputs.0.datatype: …``). Model paths are relative to the
configuration file. :func:`load_config` replaces ``${NAME}`` in the file's string values
with the environment variable ``NAME`` (``$${`` is a literal ``${``), so secrets such as
key hashes and Redis passwords can come from the environment instead of the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mandant.errors import ConfigError
from mandant.types import DATATYPES, TensorSpec

logger = logging.getLogger(__name__)

# Patterns a whole value must match (``fullmatch``: with ``match``, ``$`` let a final
# newline through: "acme\n" was a second tenant that looked like acme).
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DIGITS = re.compile(r"^[0-9]{1,18}$")
#: ``${NAME}`` (group 2) or the escape ``$${…}`` (group 1 set): a literal ``${…}``.
_ENV_REFERENCE = re.compile(r"\$(\$?)\{([^{}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda)$|^cuda:(\d+)$")


class _Problems(ValueError):
    """Several problems found by one validator, each (field path relative to the model
    validated, reason): :func:`parse_config` reports each at its own path, where
    pydantic alone would report one message at the model's."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in problems))
        self.problems = problems


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _hashes_only(keys: tuple[str, ...]) -> tuple[str, ...]:
    for key in keys:
        if not _KEY_HASH.fullmatch(key):
            raise ValueError(
                "API keys are stored as 'sha256:<64 hex digits>' only; "
                "`mandant keygen` prints a key and its hash"
            )
    return keys


def _unreadable(path: Path) -> str | None:
    """Why ``path`` is not a file this process can read; None if it is."""
    if not path.exists():
        return f"no such file: {path}"
    if not path.is_file():
        return f"not a file: {path}"
    if not os.access(path, os.R_OK):
        return f"not readable: {path}"
    return None


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

    def missing_files(self, base_dir: Path) -> list[tuple[str, str]]:
        """Each of these files that cannot be read, as (field path, reason)."""
        tls = self.resolved(base_dir)
        named = {"cert": tls.cert, "key": tls.key, "client_ca": tls.client_ca}
        return [
            (f"server.tls.{field}", why)
            for field, path in named.items()
            if path is not None and (why := _unreadable(path)) is not None
        ]


#: Default of ``server.max_bytes_elements``: a BYTES tensor at this bound (262,144
#: elements) is unframed in about 1-50 ms (empty to mixed lengths) on one core of the
#: dev machine, and its answer framed in as much again.
DEFAULT_MAX_BYTES_ELEMENTS = 1 << 18

#: Default of ``server.max_json_bytes``: the JSON of a REST inference request is
#: parsed on the event loop, at about 16 ms per MB (float arrays, one core of the dev
#: machine), so this bounds what one request stalls every other call by to ~35 ms.
DEFAULT_MAX_JSON_BYTES = 2 << 20


class InternalHttpConfig(_Frozen):
    """A second HTTP listener for operators only (bind it to a private address): the
    dashboard, ``/metrics``, ``/usage``, ``/healthz`` and ``/readyz``, no key needed."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)]


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
    max_message_bytes: Annotated[int, Field(gt=0)] = 64 * 1024 * 1024
    grace_s: Annotated[float, Field(ge=0)] = 10.0
    #: How long one model version may take to load and warm up (at start, on a load or
    #: a reload) before it counts as failed to load; the other models and model
    #: changes never wait for it. An in-process model's loading thread cannot be
    #: stopped: it may run on in the background, its result dropped.
    model_load_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    #: Concurrent calls one client connection may have in the server; further calls
    #: wait in the client's HTTP/2 layer, costing this server nothing. Bounds how much
    #: of a CPU-bound front end one connection can occupy.
    max_concurrent_streams: Annotated[int, Field(gt=0)] = 1024
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
    max_connection_age_s: Annotated[float | None, Field(gt=0)] = None
    #: Calls (and stream messages) the whole server serves at once; one more is
    #: answered RESOURCE_EXHAUSTED (with pushback) before its message is parsed. With
    #: ``max_concurrent_streams`` it bounds what slow readers can make the server hold.
    #: An open stream takes a place only while a message of it is served.
    max_concurrent_rpcs: Annotated[int, Field(gt=0)] = 4096
    #: Inference calls (unary, and stream messages) in progress before tenants take
    #: turns at the front door, by weight, for the next free place: a flooding tenant's
    #: surplus waits there, undecoded, while a light tenant's call walks past it.
    front_door_slots: Annotated[int, Field(gt=0)] = 128
    #: Messages of one ModelStreamInfer stream served at once; beyond it the stream is
    #: not read until one is answered (backpressure, not buffering).
    max_stream_inflight: Annotated[int, Field(gt=0)] = 128
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

    @field_validator("admin_keys")
    @classmethod
    def _admin_hashes_only(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        return _hashes_only(keys)

    @model_validator(mode="after")
    def _ports(self) -> ServerConfig:
        port = self.internal_http.port if self.internal_http is not None else 0
        if port and port in (self.grpc_port, self.http_port):
            raise ValueError("'internal_http.port' must differ from grpc_port and http_port")
        return self


class RateLimitConfig(_Frozen):
    requests_per_s: Annotated[float, Field(gt=0)] | None = None
    burst: Annotated[float, Field(gt=0)] | None = None
    rows_per_s: Annotated[float, Field(gt=0)] | None = None
    rows_burst: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _bursts(self) -> RateLimitConfig:
        if self.burst is not None and self.requests_per_s is None:
            raise ValueError("'burst' needs 'requests_per_s'")
        if self.rows_burst is not None and self.rows_per_s is None:
            raise ValueError("'rows_burst' needs 'rows_per_s'")
        return self

    @field_validator("burst", "rows_burst")
    @classmethod
    def _whole_call(cls, value: float | None) -> float | None:
        if value is not None and value < 1:
            raise ValueError(
                "must be at least 1: a call takes at least one token, so a smaller "
                "burst refuses every call"
            )
        return value


class QuotaConfig(_Frozen):
    rows_per_day: Annotated[int, Field(gt=0)] | None = None
    rows_per_month: Annotated[int, Field(gt=0)] | None = None


class ModelLimitsConfig(_Frozen):
    """A tenant's limits on one model: each section set here replaces the tenant's
    section of the same name for calls to that model (own buckets, own counts)."""

    rate_limit: RateLimitConfig | None = None
    quota: QuotaConfig | None = None


class LimitsConfig(_Frozen):
    """Where rate-limit and quota state lives: ``local`` (this process) or ``redis``
    (shared by every replica). ``on_store_error`` decides what happens while Redis is
    unreachable: ``allow`` falls back to this process's own buckets, ``deny`` refuses."""

    store: Literal["local", "redis"] = "local"
    url: str | None = None
    on_store_error: Literal["allow", "deny"] = "allow"
    key_prefix: str = "mandant"
    timeout_ms: Annotated[float, Field(gt=0)] = 250.0
    retry_interval_s: Annotated[float, Field(gt=0)] = 1.0

    @model_validator(mode="after")
    def _url(self) -> LimitsConfig:
        if self.store == "redis" and not self.url:
            raise ValueError("store 'redis' needs a 'url' (redis://host:port/db)")
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("'url' starts with redis://, rediss:// or unix://")
        return self


class SloConfig(_Frozen):
    latency_ms: Annotated[float, Field(gt=0)]
    percentile: Annotated[float, Field(gt=0, lt=100)] = 99
    objective: Annotated[float, Field(gt=0, lt=1)] = 0.99


class TenantConfig(_Frozen):
    id: str
    api_keys: tuple[str, ...] = ()
    #: Client certificate identities that are this tenant (with ``server.tls.client_ca``):
    #: ``CN=<subject common name>`` or a subject alternative name (``spiffe://…`` URI,
    #: DNS name). A call without a key whose verified certificate carries one is this
    #: tenant; a call with a key is the key's tenant.
    client_certs: tuple[Annotated[str, Field(min_length=1, max_length=1024)], ...] = ()
    rate_limit: RateLimitConfig | None = None
    max_concurrency: Annotated[int, Field(gt=0)] | None = None
    quota: QuotaConfig | None = None
    weight: Annotated[float, Field(gt=0)] = 1.0
    priority: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0  # as a v2 priority
    slo: SloConfig | None = None
    models: Mapping[str, ModelLimitsConfig] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("must be 1-128 letters, digits, '_', '.', '-'")
        return value

    @field_validator("api_keys")
    @classmethod
    def _hashes_only(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        return _hashes_only(keys)


class TensorConfig(_Frozen):
    name: str
    datatype: str
    shape: tuple[int, ...]

    @field_validator("datatype")
    @classmethod
    def _datatype(cls, value: str) -> str:
        if value not in DATATYPES:
            raise ValueError(f"unknown datatype {value!r}; one of {', '.join(DATATYPES)}")
        return value

    @field_validator("shape")
    @classmethod
    def _shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(dim < -1 or dim == 0 for dim in shape):
            raise ValueError("dimensions are positive, or -1 for any size")
        return shape

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, self.shape)


class BatchingConfig(_Frozen):
    max_batch_size: Annotated[int, Field(gt=0)] = 64
    max_queue_delay_ms: Annotated[float, Field(ge=0)] = 2.0
    preferred_batch_sizes: tuple[int, ...] = ()
    policy: Literal["fair", "fifo"] = "fair"
    #: adaptive: at once when alone, else gather the loop turn and hold while company
    #: is expected (never past max_queue_delay_ms); eager: whenever a slot is idle;
    #: delay: Triton's rule (wait up to max_queue_delay_ms for a full/preferred batch).
    dispatch: Literal["adaptive", "eager", "delay"] = "adaptive"
    #: Rows one tenant may have waiting for this model; more: RESOURCE_EXHAUSTED with a
    #: retry hint. Rows an idle execution slot is about to take do not wait.
    max_queue_rows: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> BatchingConfig:
        if self.max_queue_rows is not None and self.max_queue_rows < self.max_batch_size:
            raise ValueError(
                f"max_queue_rows ({self.max_queue_rows}) is below max_batch_size "
                f"({self.max_batch_size}): calls the model accepts could never be queued"
            )
        return self


class VersionPolicyConfig(_Frozen):
    """Which of a model's configured versions are served (Triton's names), exactly one
    of: ``latest: N`` (the N highest), ``specific: [1, 3]``, ``all: {}``. A model whose
    entries set none serves all of them (:data:`SERVE_ALL`)."""

    latest: Annotated[int, Field(gt=0)] | None = None
    specific: tuple[Annotated[int, Field(gt=0)], ...] | None = None
    all: Mapping[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> VersionPolicyConfig:
        chosen = [name for name in ("latest", "specific", "all") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError("set exactly one of 'latest: N', 'specific: [...]' or 'all: {}'")
        if self.all:
            raise ValueError("'all' takes no settings: write 'all: {}'")
        if self.specific is not None and not self.specific:
            raise ValueError("'specific' lists at least one version")
        return self

    def served(self, versions: Sequence[str]) -> set[str]:
        """The ``versions`` (configured ones) this policy serves."""
        if self.latest is not None:
            return set(sorted(versions, key=int, reverse=True)[: self.latest])
        if self.specific is not None:
            return {v for v in versions if int(v) in self.specific}
        return set(versions)


#: The default policy: every configured version is served.
SERVE_ALL = VersionPolicyConfig(all={})

#: Most elements of one warm-up tensor (a typo in a shape must not exhaust memory).
MAX_WARMUP_ELEMENTS = 1 << 24


class WarmupTensorConfig(_Frozen):
    """One input of a warm-up request: ``value`` repeated over ``shape`` (zeros when
    neither ``value`` nor ``random`` is set), or uniform random numbers in [0, 1)
    (integers: 0 or 1) with ``random: true``."""

    datatype: str
    shape: tuple[Annotated[int, Field(gt=0)], ...]
    value: bool | int | float | str | None = None
    random: bool = False

    @field_validator("datatype")
    @classmethod
    def _datatype(cls, value: str) -> str:
        return TensorConfig._datatype(value)

    @model_validator(mode="after")
    def _data(self) -> WarmupTensorConfig:
        if self.random and self.value is not None:
            raise ValueError("set 'value' or 'random', not both")
        if self.random and self.datatype == "BYTES":
            raise ValueError("'random' is for numeric datatypes; give BYTES a 'value'")
        elements = 1
        for dim in self.shape:
            elements *= dim
        if elements > MAX_WARMUP_ELEMENTS:
            raise ValueError(f"more than {MAX_WARMUP_ELEMENTS} elements")
        return self


class WarmupConfig(_Frozen):
    """A warm-up request, run ``count`` times on the model version's backend before it
    is ready (Triton's ``model_warmup``); inputs by name."""

    inputs: Mapping[str, WarmupTensorConfig]
    count: Annotated[int, Field(gt=0, le=1000)] = 1

    @field_validator("inputs")
    @classmethod
    def _some(cls, inputs: Mapping[str, WarmupTensorConfig]) -> Mapping[str, WarmupTensorConfig]:
        if not inputs:
            raise ValueError("a warm-up request has at least one input")
        return inputs


class TritonModelConfig(_Frozen):
    """Where a ``backend: triton`` model runs. ``model``/``version`` name it on Triton
    (any Mandant name may map to any Triton model; "" is Triton's latest version)."""

    url: str
    model: str
    version: str = ""
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    tls: bool = False
    #: Calls in flight to Triton at once for this model (Triton queues and batches them).
    max_in_flight: Annotated[int, Field(gt=0)] = 256
    #: How often Triton's readiness and metadata are polled.
    health_interval_s: Annotated[float, Field(gt=0)] = 1.0


class ModelConfig(_Frozen):
    """One model version. ``tenant`` makes it private to that tenant; with ``base``
    it is that tenant's tuned variant of a shared model and inherits what it does
    not set."""

    name: str | None = None
    version: str = "1"
    tenant: str | None = None
    base: str | None = None
    backend: Literal["torch", "triton"] | None = None
    path: Path | None = None
    factory: str | None = None
    factory_args: Mapping[str, Any] | None = None
    weights_init: str | None = None
    #: Where the model runs: ``auto`` (every visible GPU, else the CPU), ``cpu``,
    #: ``cuda`` (every visible GPU) or ``cuda:N``; ``devices`` lists GPUs instead.
    device: str | None = None
    devices: tuple[str, ...] | None = None
    #: Copies of the model on each device (threads sharing one copy on the CPU).
    instances: Annotated[int, Field(gt=0)] | None = None
    inputs: tuple[TensorConfig, ...] | None = None
    outputs: tuple[TensorConfig, ...] | None = None
    batching: BatchingConfig | None = None
    triton: TritonModelConfig | None = None
    #: Which versions of the model are served; entries of one model that set it agree.
    version_policy: VersionPolicyConfig | None = None
    #: Requests run before the version is ready (a failing one fails the load).
    warmup: tuple[WarmupConfig, ...] | None = None

    @field_validator("name", "base")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.fullmatch(value):
            raise ValueError(
                "must be 1-128 letters, digits, '_', '.', '-' (a model name is part of "
                "REST paths and of '<tenant>/<name>')"
            )
        return value

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> str:
        """One spelling per version (``01`` and ``1`` are version 1), so that a
        version defined twice is caught."""
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not _DIGITS.fullmatch(text) or int(text) < 1:
            raise ValueError("versions are positive integers (1, 2, …; at most 18 digits)")
        return str(int(text))

    @field_validator("factory", "weights_init")
    @classmethod
    def _callable_ref(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[\w.]+:[\w.]+$", value):
            raise ValueError("expected 'package.module:callable'")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        return None if value is None else check_devices((value,))[0]

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if any(gpu_index(device) is None for device in value):
            raise ValueError("'devices' lists GPUs as cuda:N (for one device or all, use 'device')")
        return check_devices(value)

    @model_validator(mode="after")
    def _shape(self) -> ModelConfig:
        if self.name is None and self.base is None:
            raise ValueError("a model needs a name (or a base, for a tuned variant)")
        if self.device is not None and self.devices is not None:
            raise ValueError("set 'device' or 'devices', not both")
        if self.base is not None and self.tenant is None:
            raise ValueError("a tuned variant (base) belongs to a tenant: set 'tenant'")
        return self

    @property
    def model_name(self) -> str:
        name = self.name or self.base
        assert name is not None
        return name


class ModelSpec(_Frozen):
    """A model after inheritance from its base: everything a backend needs."""

    name: str
    version: str
    tenant: str | None
    backend: Literal["torch", "triton"]
    path: Path | None
    factory: str | None
    factory_args: Mapping[str, Any]
    weights_init: str | None
    #: The placement asked for (see :func:`check_devices`); ``instances`` per device.
    devices: tuple[str, ...]
    instances: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingConfig | None
    triton: TritonModelConfig | None
    version_policy: VersionPolicyConfig = SERVE_ALL
    warmup: tuple[WarmupConfig, ...] = ()

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_devices(value)

    # Read on every call: built once per spec (it is frozen; a changed copy made with
    # model_copy computes its own, see below).
    @cached_property
    def inputs_by_name(self) -> Mapping[str, TensorSpec]:
        return {t.name: t for t in self.inputs}

    @cached_property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy whose cached values are computed afresh from its own fields
        (pydantic copies them with the rest of the instance's ``__dict__``)."""
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("inputs_by_name", None)
        copy.__dict__.pop("output_names", None)
        return copy


class MandantConfig(_Frozen):
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    tenants: tuple[TenantConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> MandantConfig:
        problems = [*_tenant_problems(self), *_model_problems(self.models, self.tenants)]
        if problems:
            raise _Problems(problems)
        return self

    def with_server(self, changes: Mapping[str, object]) -> MandantConfig:
        """This configuration with ``changes`` to its ``server`` settings (command-line
        flags), validated as the file's are; ConfigError with paths ``server.<field>…``."""
        data = {**self.server.model_dump(exclude_unset=True), **changes}
        try:
            server = ServerConfig.model_validate(data)
        except ValidationError as exc:
            errors = [
                (f"server.{path}".replace(".(top level)", ""), why) for path, why in _errors(exc)
            ]
            raise ConfigError("server settings", errors) from None
        return self.model_copy(update={"server": server})

    def warnings(self) -> list[tuple[str, str]]:
        """What validates but is likely a mistake, each (field path, reason)."""
        keyless = "has no api_keys and no client_certs: no call can authenticate as it"
        return [
            (f"tenants.{index}", f"tenant {tenant.id!r} {keyless}")
            for index, tenant in enumerate(self.tenants)
            if not tenant.api_keys and not tenant.client_certs
        ]

    def resolved(self, base_dir: Path) -> MandantConfig:
        """This configuration with its server paths (``server.tls``) made absolute
        against ``base_dir``, the configuration file's directory."""
        tls = self.server.tls
        if tls is None:
            return self
        server = self.server.model_copy(update={"tls": tls.resolved(base_dir)})
        return self.model_copy(update={"server": server})

    def missing_files(self, base_dir: Path) -> list[tuple[str, str]]:
        """The files this configuration names that cannot be read, each (field path,
        reason): the TLS files, and each torch model's own ``path`` unless its
        ``weights_init`` builds it. Looks at the filesystem, which validation never
        does: for ``check-config`` and the start."""
        problems = self.server.tls.missing_files(base_dir) if self.server.tls else []
        shared = {m.model_name: m for m in self.models if m.tenant is None}
        for index, model in enumerate(self.models):
            base = shared.get(model.base) if model.base else None
            backend = model.backend or (base.backend if base else None) or "torch"
            builds = model.weights_init or (base.weights_init if base else None)
            if model.path is None or backend != "torch" or builds is not None:
                continue
            why = _unreadable(base_dir / model.path)
            if why is not None:
                problems.append((f"models.{index}.path", why))
        return problems

    def callable_refs(self) -> list[tuple[str, str]]:
        """Each ``factory`` and ``weights_init`` a model entry sets, as (field path,
        ``module:callable``)."""
        return [
            (f"models.{index}.{field}", ref)
            for index, model in enumerate(self.models)
            for field in ("factory", "weights_init")
            if (ref := getattr(model, field)) is not None
        ]

    def model_specs(self, base_dir: Path) -> list[ModelSpec]:
        """Every model version to serve (as its model's ``version_policy`` says) with
        its base's settings filled in and paths made absolute against ``base_dir``;
        raises ConfigError where one is incomplete."""
        shared = {m.model_name: m for m in self.models if m.tenant is None}
        policies = _version_policies(self.models)
        specs: list[ModelSpec] = []
        errors: list[tuple[str, str]] = []
        for index, model in enumerate(self.models):
            base = shared.get(model.base) if model.base else None
            policy, served = policies[(model.tenant, model.model_name)]
            if model.version not in served:
                continue
            try:
                specs.append(_resolve(model, base, base_dir, policy))
            except ValueError as exc:
                errors.append((f"models.{index}", str(exc)))
        if errors:
            raise ConfigError("configuration", errors)
        return specs

    def with_model_entries(self, name: str, text: str) -> MandantConfig:
        """This configuration with model ``name``'s entries replaced by ``text``: a JSON
        model entry (the fields of one ``models:`` item) or a list of them (one per
        version), each naming ``name``. Validated like the file; ConfigError if not."""
        source = "the load request's 'config'"
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(source, [("(json)", str(exc)[:200])]) from None
        except RecursionError:  # nested deeper than the parser goes
            raise ConfigError(source, [("(json)", "nested too deeply")]) from None
        entries = data if isinstance(data, list) else [data]
        if not entries or not all(isinstance(entry, dict) for entry in entries):
            raise ConfigError(source, [("(json)", "expected a model entry or a list of them")])
        for index, entry in enumerate(entries):
            if (entry.get("name") or entry.get("base")) != name:
                raise ConfigError(source, [(str(index), "the entry must name the model loaded")])
        kept = tuple(m for m in self.models if m.model_name != name)
        try:
            models = [ModelConfig.model_validate(entry) for entry in entries]
            return MandantConfig(
                server=self.server, limits=self.limits, tenants=self.tenants,
                models=(*kept, *models),
            )  # fmt: skip
        except ValidationError as exc:
            raise ConfigError(source, [_entry_path(e, len(kept)) for e in _errors(exc)]) from None


def _entry_path(error: tuple[str, str], kept: int) -> tuple[str, str]:
    """An error of the configuration a load request makes, ``models.N…`` of its own
    entries (after the ``kept`` ones) renamed as the request's ``N - kept…``."""
    path, reason = error
    parts = path.split(".")
    if len(parts) > 1 and parts[0] == "models" and parts[1].isdigit() and int(parts[1]) >= kept:
        path = ".".join([str(int(parts[1]) - kept), *parts[2:]])
    return path, reason


def _version_policies(
    models: Sequence[ModelConfig],
) -> dict[tuple[str | None, str], tuple[VersionPolicyConfig, set[str]]]:
    """Each model's (owner, name) → its policy and the versions it serves."""
    versions: dict[tuple[str | None, str], list[str]] = {}
    policies: dict[tuple[str | None, str], VersionPolicyConfig] = {}
    for model in models:
        key = (model.tenant, model.model_name)
        versions.setdefault(key, []).append(model.version)
        if model.version_policy is not None:
            policies[key] = model.version_policy
    return {
        key: (policy, policy.served(found))
        for key, found in versions.items()
        for policy in (policies.get(key, SERVE_ALL),)
    }


def _tenant_problems(config: MandantConfig) -> list[tuple[str, str]]:
    """Tenant ids, key hashes and certificate identities that clash, each (field path,
    reason)."""
    problems: list[tuple[str, str]] = []
    first: dict[str, int] = {}
    key_owner: dict[str, int] = {}
    identities: set[str] = set()
    admin_keys = set(config.server.admin_keys)
    for index, tenant in enumerate(config.tenants):
        where = f"tenants.{index}"
        if first.setdefault(tenant.id, index) != index:
            why = f"tenant ids must be unique: {tenant.id!r} is also tenants.{first[tenant.id]}"
            problems.append((f"{where}.id", why))
        for number, key in enumerate(tenant.api_keys):
            owner = key_owner.setdefault(key, index)
            if key in admin_keys:
                why = "an admin key hash is also a tenant's API key"
            elif number != tenant.api_keys.index(key):
                why = "an API key hash is listed twice"
            elif owner != index:
                why = f"an API key hash appears under two tenants (also tenants.{owner})"
            else:
                continue
            problems.append((f"{where}.api_keys.{number}", why))
        for number, identity in enumerate(tenant.client_certs):
            if identity in identities:
                why = "a client certificate identity appears twice"
                problems.append((f"{where}.client_certs.{number}", why))
            identities.add(identity)
    if identities and (config.server.tls is None or config.server.tls.client_ca is None):
        problems.append(("server.tls.client_ca", "tenants' client_certs need server.tls.client_ca"))
    return problems


def _model_problems(
    models: Sequence[ModelConfig], tenants: Sequence[TenantConfig]
) -> list[tuple[str, str]]:
    """Models that name an unknown tenant or base, versions defined twice, version
    policies that disagree, tenants' limits for unknown models; each (field path,
    reason)."""
    problems: list[tuple[str, str]] = []
    tenant_ids = {t.id for t in tenants}
    shared = {m.model_name for m in models if m.tenant is None}
    first: dict[tuple[str | None, str, str], int] = {}
    for index, model in enumerate(models):
        name, where = model.model_name, f"models.{index}"
        if model.tenant is not None and model.tenant not in tenant_ids:
            problems.append((f"{where}.tenant", f"model {name!r}: unknown tenant {model.tenant!r}"))
        key = (model.tenant, name, model.version)
        if first.setdefault(key, index) != index:
            owner = f" for tenant {model.tenant!r}" if model.tenant else ""
            why = f"model {name!r} version {model.version} is defined twice{owner}"
            problems.append((f"{where}.version", f"{why} (also models.{first[key]})"))
        if model.base is not None and model.base not in shared:
            why = f"model {name!r} of tenant {model.tenant!r}: base {model.base!r}"
            problems.append((f"{where}.base", f"{why} is not a shared model"))
    problems += _version_policy_problems(models)
    for index, tenant in enumerate(tenants):
        for name in tenant.models:
            if not any(m.model_name == name and m.tenant in (None, tenant.id) for m in models):
                why = f"tenant {tenant.id!r}: limits for unknown model {name!r}"
                problems.append((f"tenants.{index}.models.{name[:64]}", why))
    return problems


def _version_policy_problems(models: Sequence[ModelConfig]) -> list[tuple[str, str]]:
    """The entries of one model agree on its policy; ``specific`` names configured
    versions. Each problem (field path, reason)."""
    problems: list[tuple[str, str]] = []
    seen: dict[tuple[str | None, str], tuple[int, VersionPolicyConfig]] = {}
    for index, model in enumerate(models):
        policy = model.version_policy
        if policy is None:
            continue
        key = (model.tenant, model.model_name)
        if seen.setdefault(key, (index, policy))[1] != policy:
            why = f"model {model.model_name!r}: its entries set different version_policy"
            problems.append(
                (f"models.{index}.version_policy", f"{why} (see models.{seen[key][0]})")
            )
    for (tenant, name), (index, policy) in seen.items():
        configured = {int(m.version) for m in models if (m.tenant, m.model_name) == (tenant, name)}
        missing = sorted(set(policy.specific or ()) - configured)
        if missing:
            why = f"model {name!r}: version_policy names version {missing[0]}, which has no entry"
            problems.append((f"models.{index}.version_policy.specific", why))
    return problems


def _resolve(
    model: ModelConfig,
    base: ModelConfig | None,
    base_dir: Path,
    version_policy: VersionPolicyConfig = SERVE_ALL,
) -> ModelSpec:
    def pick(field: str) -> Any:
        own = getattr(model, field)
        return own if own is not None or base is None else getattr(base, field)

    backend: Literal["torch", "triton"] = pick("backend") or "torch"
    inputs, outputs = pick("inputs"), pick("outputs")
    if backend == "torch":
        if inputs is None or outputs is None:
            raise ValueError("torch models declare their inputs and outputs")
        if pick("path") is None and pick("factory") is None:
            raise ValueError("torch models need a 'path' (TorchScript or weights) or a 'factory'")
    if backend == "triton" and pick("triton") is None:
        raise ValueError("triton models need a 'triton: {url, model}' section")
    path = pick("path")
    return ModelSpec(
        name=model.model_name,
        version=model.version,
        tenant=model.tenant,
        backend=backend,
        path=(base_dir / path) if path is not None else None,
        factory=pick("factory"),
        factory_args=dict(pick("factory_args") or {}),
        weights_init=pick("weights_init"),
        devices=_placement(model, base),
        instances=pick("instances") or 1,
        inputs=tuple(t.spec() for t in inputs or ()),
        outputs=tuple(t.spec() for t in outputs or ()),
        batching=pick("batching"),
        triton=pick("triton"),
        version_policy=version_policy,
        warmup=pick("warmup") or (),
    )


def check_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    """``devices`` in their one spelling (``cuda:01`` is ``cuda:1``), or ValueError.
    Either one of ``auto``, ``cpu``, ``cuda`` (every visible GPU), ``cuda:N``; or
    several distinct ``cuda:N``."""
    if not devices:
        raise ValueError("expected at least one device")
    spelled = []
    for device in devices:
        match = _DEVICE.fullmatch(device)
        if match is None:
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        spelled.append(device if match.group(2) is None else f"cuda:{int(match.group(2))}")
    if len(spelled) > 1:
        if any(gpu_index(device) is None for device in spelled):
            raise ValueError("several devices are GPUs named cuda:N")
        if len(set(spelled)) != len(spelled):
            raise ValueError("a device is listed twice")
    return tuple(spelled)


def gpu_index(device: str) -> int | None:
    """``N`` of ``cuda:N``; None for any other device."""
    match = _DEVICE.fullmatch(device)
    return None if match is None or match.group(2) is None else int(match.group(2))


def _placement(model: ModelConfig, base: ModelConfig | None) -> tuple[str, ...]:
    """A tuned variant that names a device (either key) replaces its base's placement."""
    for source in (model, base):
        if source is not None and source.devices is not None:
            return source.devices
        if source is not None and source.device is not None:
            return (source.device,)
    return ("auto",)


def parse_config(data: object, source: str = "configuration") -> MandantConfig:
    try:
        return MandantConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _errors(exc)) from None


def _errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Each problem as (field path, message); parts of the path kept short. A
    ``_Problems`` is unpacked, each of its problems at its own path."""
    errors: list[tuple[str, str]] = []
    for err in exc.errors():
        where = ".".join(str(part)[:64] for part in err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, _Problems):
            errors += [(f"{where}.{path}" if where else path, why) for path, why in cause.problems]
        else:
            errors.append((where or "(top level)", err["msg"]))
    return errors


def _expand_text(text: str, env: Mapping[str, str]) -> str:
    """``text`` with each ``${NAME}`` replaced by ``env[NAME]``; raises ValueError for an
    unset variable or a malformed reference. Values are inserted as they are (never
    expanded again) and never appear in an error message."""

    def replace(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped:
            return "${" + name + "}"
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"'${{{name[:64]}}}' is not a variable reference (letters, digits, _)")
        if name not in env:
            raise ValueError(f"environment variable {name} is not set")
        return env[name]

    if "${" in _ENV_REFERENCE.sub("", text):
        raise ValueError("'${' without a closing '}' (write '$${' for a literal '${')")
    return _ENV_REFERENCE.sub(replace, text)


def _expand_env(
    data: object, env: Mapping[str, str], path: str, errors: list[tuple[str, str]]
) -> object:
    """``data`` with ``${NAME}`` expanded in every string value (not in mapping keys);
    problems are appended to ``errors`` with their field path."""
    if isinstance(data, str):
        try:
            return _expand_text(data, env)
        except ValueError as exc:
            errors.append((path or "(top level)", str(exc)))
            return data
    if isinstance(data, dict):
        return {
            key: _expand_env(value, env, f"{path}.{key}" if path else str(key), errors)
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [
            _expand_env(item, env, f"{path}.{index}" if path else str(index), errors)
            for index, item in enumerate(data)
        ]
    return data


def reloaded(load: Callable[[], MandantConfig], base_dir: Path) -> MandantConfig | None:
    """What ``load`` reads, if it validates with its models under ``base_dir``; else
    None, its errors logged: a reload keeps the configuration it runs."""
    try:
        config = load()
        config.model_specs(base_dir)
    except ConfigError as exc:
        logger.error("configuration reload refused, keeping the running one: %s", exc)
        return None
    return config


def load_config(path: Path, env: Mapping[str, str] | None = None) -> MandantConfig:
    """Read, expand ``${NAME}`` from ``env`` (default: the process environment) and
    validate the file at ``path``; a reference to an unset variable is an error."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(str(path), [("(file)", exc.strerror or str(exc))]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("(yaml)", str(exc).replace("\n", " "))]) from None
    errors: list[tuple[str, str]] = []
    data = _expand_env(data, os.environ if env is None else env, "", errors)
    if errors:
        raise ConfigError(str(path), errors)
    return parse_config(data if data is not None else {}, str(path))
