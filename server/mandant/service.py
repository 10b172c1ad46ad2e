"""The data plane: authenticate → resolve → admit → schedule → execute.

Transport-neutral: the gRPC servicer (and any other front end) calls these methods
with plain Python objects and gets plain Python objects back; every failure is a
:mod:`mandant.errors` exception.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from mandant.errors import (
    DeadlineExceeded,
    DeadlinePassedWhileRunning,
    InvalidInput,
    ModelFailed,
    Unavailable,
    shown,
)
from mandant.registry import Model, ModelRegistry
from mandant.scheduling.policy import MAX_PRIORITY
from mandant.tenancy.admission import NO_PERMIT, Admission, Unlimited
from mandant.tenancy.directory import TenantDirectory, TenantSnapshot
from mandant.types import Call, EncodedRequest, InferRequest, InferResponse, ModelKey, Tenant
from mandant.validation import check_batch_rows, check_inputs, check_no_sequence, check_outputs

SERVER_NAME = "mandant"
EXTENSIONS = (
    "model_repository",
    "model_configuration",
    "statistics",
    "parameters",
    "binary_tensor_data",  # REST's binary data extension
    "tenancy",
)
#: Longest ``config`` parameter a model load takes (characters of JSON).
MAX_LOAD_CONFIG_CHARS = 1 << 16
#: Longest request ``id`` accepted (bytes of UTF-8); ids are echoed in answers and logs.
MAX_REQUEST_ID_BYTES = 256


class Engine(Protocol):
    """Where a front end's inference calls run when the models live in another process
    (``workers: N``; ``workers/engine_link.py``): that process's :meth:`DataPlane.infer`."""

    @property
    def ready(self) -> bool: ...

    async def infer(
        self, call: Call, request: EncodedRequest, timeout_s: float | None
    ) -> InferResponse: ...


class DataPlane:
    def __init__(
        self,
        tenants: TenantDirectory,
        registry: ModelRegistry | None,
        admission: Admission | None = None,
        version: str = "0",
        ready_when: Literal["all_models", "any_model"] = "any_model",
        engine: Engine | None = None,
    ) -> None:
        """``tenants``: the tenant directory (a reload's keys apply to the next call; calls
        in flight keep the tenant they were authenticated as). ``ready_when``: whether
        one ready model (``any_model``) or every model makes the server ready.
        ``engine``: a front end's engine process, which then resolves, admits, batches
        and runs every inference call (the front end has no ``registry``: its model
        RPCs are forwarded to the engine too, ``transport/grpc/forward.py``)."""
        self._tenants = tenants
        self._registry = registry
        self._engine = engine
        self._admission: Admission = admission or Unlimited()
        self.version = version
        self._ready_when = ready_when
        self._draining = False

    # -- server -------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Tenant:
        return self._tenants.authenticate(authorization)

    @property
    def tenant_snapshot(self) -> TenantSnapshot:
        """The tenant directory's current snapshot: a new one after every reload."""
        return self._tenants.current

    def tenant_named(self, tenant_id: str) -> Tenant:
        """The configured tenant an admin names, or InvalidInput."""
        return self._tenants.named(tenant_id)

    @property
    def live(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        """Able to serve: not draining, and ``ready_when`` holds (no models: ready)."""
        if self._draining:
            return False
        if self._engine is not None:
            return self._engine.ready
        states = [m.ready for m in self._models.all()]
        if not states:
            return True
        return all(states) if self._ready_when == "all_models" else any(states)

    def drain(self) -> None:
        """Refuse new inference calls (UNAVAILABLE); those in flight finish."""
        self._draining = True

    def refuse_if_draining(self) -> None:
        """Unavailable once the server drains: no new inference call, nor stream."""
        if self._draining:
            raise Unavailable("server is shutting down")

    # -- models -------------------------------------------------------------------

    @property
    def _models(self) -> ModelRegistry:
        if self._registry is None:  # a front end: its model RPCs go to the engine
            raise Unavailable("models are served by the engine process")
        return self._registry

    def model(self, tenant: Tenant, name: str, version: str = "") -> Model:
        return self._models.resolve(tenant, name, version or None)

    def model_versions(self, tenant: Tenant, name: str) -> Sequence[Model]:
        return self._models.versions(tenant, name)

    def model_ready(self, tenant: Tenant, name: str, version: str = "") -> bool:
        return self.model(tenant, name, version).ready and not self._draining

    def repository_index(self, tenant: Tenant) -> list[Model]:
        return self._models.visible(tenant)

    def all_models(self) -> list[Model]:
        """Every model version of every owner (admin views)."""
        return self._models.all()

    async def load_model(self, name: str, parameters: Mapping[str, object] | None = None) -> None:
        """(Re)load ``name`` from the configuration, or from the ``config`` parameter
        (:func:`load_config_parameter`); the switch is atomic once ready."""
        await self._models.load(name, config=load_config_parameter(parameters or {}))

    async def unload_model(self, name: str) -> None:
        """Stop routing ``name``; calls already routed to it finish, then it is freed."""
        await self._models.unload(name)

    # -- inference ----------------------------------------------------------------

    def refuse_early(self, call: Call, name: str, version: str = "") -> None:
        """Before a request that costs much to parse (REST's JSON, served where the
        models are: one process, or the engine of ``workers: N``) is parsed: raise
        now what :meth:`infer` would for any request of ``call.caller`` to that
        model, where that is known without waiting (draining, a model the caller
        cannot see, ``Admission.refuse_early``)."""
        self.refuse_if_draining()
        key = self.model(call.caller, name, version).key
        _name(call, key)
        self._admission.refuse_early(call.caller, key)

    async def infer(
        self, call: Call, request: EncodedRequest, timeout_s: float | None = None
    ) -> InferResponse:
        """Run one request of ``call.caller``; ``call.model`` and ``call.version`` are
        set to the configured name and version of the model once resolved.
        ``timeout_s`` is what is left of the caller's deadline; the v2 ``timeout``
        parameter counts from ``call.arrived`` (a wait at the front door included)."""
        self.refuse_if_draining()
        start = time.monotonic()
        tenant = call.caller
        request_id = request.request_id
        if len(request_id) > MAX_REQUEST_ID_BYTES // 4 and (
            len(request_id.encode()) > MAX_REQUEST_ID_BYTES
        ):
            raise InvalidInput(f"request id is longer than {MAX_REQUEST_ID_BYTES} bytes")
        if self._engine is not None:
            return await self._engine.infer(call, request, timeout_s)
        model = self.model(tenant, request.model_name, request.model_version)
        model.enter()  # an unload waits for this call (no await since the resolve)
        try:
            key, spec = model.key, model.spec
            _name(call, key)
            if not model.ready:
                raise Unavailable(f"model '{key.name}' is not ready")
            rows = check_inputs(spec, request.input_headers())
            outputs = check_outputs(spec, request.requested_outputs())
            if spec.batching is not None:
                check_batch_rows(key.name, rows, spec.batching.max_batch_size)
            request.check_payload()  # framing and byte counts: refused before it costs quota
            parameters = request.parameters()
            if parameters:
                check_no_sequence(parameters)
            deadline = request_deadline(start, timeout_s, call.arrived, parameters.get("timeout"))
            priority = _priority(parameters.get("priority"), tenant.priority)
            permit = await self._admission.admit(tenant, key, rows)
            ran = False  # the model ran on this request: it stays charged, else refunded
            queued: InferRequest | None = None
            try:
                inputs = request.decode_inputs()
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineExceeded("deadline exceeded before the request was queued")
                queued = InferRequest(
                    tenant=tenant,
                    model=key,
                    inputs=inputs,
                    outputs=outputs,
                    request_id=request_id,
                    deadline=deadline,
                    priority=priority,
                    rows=rows,
                )
                results = await model.scheduler.submit(queued)
                ran = True
            except ModelFailed:
                ran = True
                raise
            except (asyncio.CancelledError, DeadlinePassedWhileRunning):
                # The caller left, or its deadline passed while the backend computed it:
                # charged if the model had its rows (Triton computes them all the same);
                # in a batch still running, as its end says (``InferRequest.running``).
                ran = queued is not None and queued.ran
                if queued is not None and queued.running:
                    queued.settle, permit = permit.release, NO_PERMIT
                raise
            finally:
                permit.release(refund=not ran)
            return InferResponse(
                model_name=key.name,
                model_version=key.version,
                request_id=request_id,
                outputs={name: results[name] for name in outputs},
                output_specs=spec.outputs,
            )
        finally:
            model.leave()


def _name(call: Call, key: ModelKey) -> None:
    """What the call's metrics and log name once its model is resolved."""
    call.model = key.name
    call.version = key.version
    call.owner = key.owner or ""


def load_config_parameter(parameters: Mapping[str, object]) -> str | None:
    """The model entry a load's parameters give (Triton's ``config``: here a JSON
    model entry or list of them, as ``models:`` items), or None: the configuration's.
    Any other parameter (Triton's ``file:`` overrides included) is refused."""
    config = None
    for name, value in parameters.items():
        if name.startswith("file:"):
            raise InvalidInput("'file:' overrides are not supported: models load from their path")
        if name != "config":
            raise InvalidInput(f"unknown model load parameter '{shown(name)}' (only 'config')")
        if not isinstance(value, str):
            raise InvalidInput("the 'config' parameter is a string: a JSON model entry")
        if len(value) > MAX_LOAD_CONFIG_CHARS:
            raise InvalidInput(f"the 'config' parameter is longer than {MAX_LOAD_CONFIG_CHARS}")
        config = value
    return config


#: The v2 ``timeout`` parameter is an int64 (REST's JSON numbers are not bounded).
MAX_TIMEOUT_US = 2**63 - 1


def request_deadline(
    start: float, timeout_s: float | None, arrived: float, timeout_us: object
) -> float | None:
    """The earlier of the transport deadline (``timeout_s`` left at ``start``) and the
    v2 ``timeout`` parameter (µs from ``arrived``)."""
    if timeout_us is None:
        return None if timeout_s is None else start + timeout_s
    if (
        isinstance(timeout_us, bool)
        or not isinstance(timeout_us, int)
        or not 0 <= timeout_us <= MAX_TIMEOUT_US
    ):
        raise InvalidInput("parameter 'timeout' is a non-negative 64-bit integer (microseconds)")
    limits = [] if timeout_s is None else [start + timeout_s]
    if timeout_us > 0:
        limits.append(arrived + timeout_us / 1e6)
    return min(limits) if limits else None


def _priority(value: object, default: int) -> int:
    """v2 ``priority``: 1 is the highest level, ``MAX_PRIORITY`` (2**31 - 1) the lowest;
    0 or absent means the tenant's default."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise InvalidInput(f"parameter 'priority' is an integer from 0 to {MAX_PRIORITY}")
    return value or default
