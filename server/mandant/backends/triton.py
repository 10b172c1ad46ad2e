"""Forwards a model's requests (or its batches) to an NVIDIA Triton Inference Server.

* One shared, long-lived gRPC channel per Triton URL (:class:`ChannelPool`), called
  through ``tritonclient.grpc``'s generated KServe v2 stubs: tensors go as raw bytes,
  a request's own bytes passed on without a copy of ours when they are one whole
  buffer; only the requested outputs are asked for.
* Readiness is polled in the background (ModelReady, then ModelMetadata); a model
  whose ``inputs``/``outputs`` are not configured takes them from Triton's metadata,
  refreshed on every poll, so a model reloaded on Triton with new tensors is followed.
* Faults: every call is bounded by the caller's deadline or ``timeout_s``; a connect
  failure (nothing was sent) is retried at most twice with jittered backoff; a
  :class:`CircuitBreaker` refuses calls at once after repeated failures and lets a
  probe through after its reset time. Triton's errors are translated here, at the
  boundary, by one table (:data:`TRANSLATION`): only transport failures and timeouts
  count against the breaker, which every tenant shares; a model that fails on one
  caller's inputs (Triton's INTERNAL) is that caller's error, never UNAVAILABLE for all.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from math import prod

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from mandant.backends.channels import ChannelPool
from mandant.backends.circuit import CallOutcome, CircuitBreaker
from mandant.config import ModelSpec, TritonModelConfig
from mandant.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelFailed,
    QueueFull,
    Unavailable,
)
from mandant.types import DATATYPES, TensorSpec, datatype_of
from mandant.wire import join_bytes, split_bytes

logger = logging.getLogger(__name__)

#: Retries of a call that never reached Triton (connection refused / not connected).
CONNECT_RETRIES = 2
RETRY_BACKOFF_S = 0.05
#: Timeout of one health poll RPC.
PROBE_TIMEOUT_S = 1.0
_CONNECT_FAILURE_MARKERS = ("failed to connect", "connection refused", "no route to host")
#: Most characters of Triton's own message passed on to a client or a log line.
MAX_DETAILS_CHARS = 300


class TritonModelError(RuntimeError):
    """Triton's model failed on the inputs of one call that held a Mandant batch.

    Deliberately not a :class:`MandantError`: the batcher splits a batch that raised
    anything else to find the request(s) at fault and answers only those with
    :class:`ModelFailed`. A call that holds one request alone (a model without
    Mandant batching) is answered :class:`ModelFailed` at once instead."""


class Fault(enum.Enum):
    """Whose fault a failed Triton call was, as the caller is told."""

    INPUT = "input"  # the request does not fit Triton's model: InvalidInput
    MODEL = "model"  # the model raised on the call's inputs: ModelFailed
    BUSY = "busy"  # Triton's queue is full: QueueFull, retry later
    BACKEND = "backend"  # Triton, its mapping or the network: Unavailable


#: Triton's status code ⇒ (whose fault, what it says about Triton). Codes not listed
#: are a backend fault that Triton answered. DEADLINE_EXCEEDED is the caller's own
#: when their deadline was the call's timeout (:func:`translate`).
TRANSLATION: Mapping[grpc.StatusCode, tuple[Fault, CallOutcome]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (Fault.INPUT, CallOutcome.ANSWERED),
    grpc.StatusCode.INTERNAL: (Fault.MODEL, CallOutcome.ANSWERED),
    grpc.StatusCode.UNKNOWN: (Fault.MODEL, CallOutcome.ANSWERED),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (Fault.BUSY, CallOutcome.ANSWERED),
    grpc.StatusCode.UNAVAILABLE: (Fault.BACKEND, CallOutcome.FAILED),
    grpc.StatusCode.DEADLINE_EXCEEDED: (Fault.BACKEND, CallOutcome.FAILED),
}
_BACKEND_ANSWERED = (Fault.BACKEND, CallOutcome.ANSWERED)


def translate(code: grpc.StatusCode, by_client_deadline: bool = False) -> tuple[Fault, CallOutcome]:
    """How a Triton call that ended with ``code`` is reported and counted."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and by_client_deadline:
        return Fault.BACKEND, CallOutcome.ABANDONED
    return TRANSLATION.get(code, _BACKEND_ANSWERED)


class TritonBackend:
    """One Mandant model version served by a model on a Triton server."""

    def __init__(
        self,
        spec: ModelSpec,
        channels: ChannelPool,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if spec.triton is None:
            raise ValueError(f"model {spec.name!r} has no 'triton' section")
        self._spec = spec
        self._triton: TritonModelConfig = spec.triton
        self._channels = channels
        self._breaker = breaker or CircuitBreaker(clock=clock)
        self._clock = clock
        self._stub: pb_grpc.GRPCInferenceServiceStub | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._model_ready = False
        self._platform = "triton"
        self._discover = not (spec.inputs and spec.outputs)

    # -- the Backend protocol ---------------------------------------------------------

    @property
    def ready(self) -> bool:
        return (
            self._stub is not None
            and self._model_ready
            and bool(self._spec.inputs and self._spec.outputs)
        )

    @property
    def platform(self) -> str:
        return self._platform

    @property
    def max_concurrency(self) -> int:
        return self._triton.max_in_flight

    @property
    def spec(self) -> ModelSpec:
        """The configured spec, with the tensors Triton reported where none were set."""
        return self._spec

    async def start(self) -> None:
        if self._stub is not None:
            raise RuntimeError(f"model {self._spec.name!r} is already started")
        channel = self._channels.acquire(self._triton.url, self._triton.tls)
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await self.refresh()
        if not self.ready:
            logger.warning(
                "model %s: Triton model %r at %s is not ready yet; serving once it is",
                self._spec.name,
                self._triton.model,
                self._triton.url,
            )
        self._watcher = asyncio.create_task(self._watch(), name=f"triton-health-{self._spec.name}")

    async def aclose(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if self._stub is not None:
            self._stub = None
            self._model_ready = False
            await self._channels.release(self._triton.url, self._triton.tls)

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """One Triton call for ``inputs`` (a request or a batch), asking for
        ``outputs`` only, with what is left until ``deadline`` as its timeout."""
        stub = self._stub
        if stub is None:
            raise Unavailable(f"model '{self._spec.name}' is not loaded")
        if not outputs:
            outputs = tuple(t.name for t in self._spec.outputs)
        request = self._request(inputs, outputs)
        cap = self._clock() + self._triton.timeout_s
        client_deadline = deadline
        deadline = cap if client_deadline is None else min(cap, client_deadline)
        if not self._breaker.allow():
            raise Unavailable(f"model '{self._spec.name}' is unavailable (backend is failing)")
        try:
            response = await self._call(stub, request, deadline)
        except (asyncio.CancelledError, DeadlineExceeded):
            self._breaker.record_abandoned()
            raise
        except grpc.aio.AioRpcError as exc:
            by_client = client_deadline is not None and client_deadline < cap
            fault, outcome = translate(exc.code(), by_client)
            self._breaker.record(outcome)
            raise self._error(exc, fault, by_client) from exc
        self._breaker.record_success()
        return self._outputs(response, outputs)

    # -- calls ------------------------------------------------------------------------

    async def _call(
        self, stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, deadline: float
    ) -> pb.ModelInferResponse:
        attempt = 0
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise DeadlineExceeded("deadline exceeded before the backend answered")
            try:
                response: pb.ModelInferResponse = await stub.ModelInfer(request, timeout=remaining)
                return response
            except grpc.aio.AioRpcError as exc:
                backoff = random.uniform(0, RETRY_BACKOFF_S * 2**attempt)
                retry = attempt < CONNECT_RETRIES and _never_sent(exc)
                if not retry or self._clock() + backoff >= deadline:
                    raise
            attempt += 1
            await asyncio.sleep(backoff)

    def _request(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> pb.ModelInferRequest:
        tensors, raw = [], []
        for name, array in inputs.items():
            tensors.append(
                pb.ModelInferRequest.InferInputTensor(
                    name=name, datatype=datatype_of(array), shape=array.shape
                )
            )
            raw.append(_raw_bytes(array))
        return pb.ModelInferRequest(
            model_name=self._triton.model,
            model_version=self._triton.version,
            inputs=tensors,
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs],
            raw_input_contents=raw,
        )

    def _outputs(
        self, response: pb.ModelInferResponse, names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        raw = response.raw_output_contents
        if len(raw) != len(response.outputs):
            raise Unavailable(f"model '{self._spec.name}': malformed response from the backend")
        by_name = {
            tensor.name: _decode(tensor.datatype, tuple(tensor.shape), raw[index])
            for index, tensor in enumerate(response.outputs)
        }
        missing = [name for name in names if name not in by_name]
        if missing:
            logger.error(
                "model %s: Triton model %r answered without output(s) %s",
                self._spec.name,
                self._triton.model,
                ", ".join(missing),
            )
            raise Unavailable(f"model '{self._spec.name}': the backend returned no {missing[0]}")
        return {name: by_name[name] for name in names}

    def _error(
        self, exc: grpc.aio.AioRpcError, fault: Fault, by_client_deadline: bool
    ) -> Exception:
        """The exception for a failed Triton call, in Mandant's words: Triton's model
        name replaced by Mandant's, Triton's message passed on for input errors only."""
        code, name = exc.code(), self._spec.name
        details = (exc.details() or "")[:MAX_DETAILS_CHARS]
        if fault is Fault.INPUT:
            mine = details.replace(f"'{self._triton.model}'", f"'{name}'")
            return InvalidInput(_strip_request_id(mine))
        if fault is Fault.MODEL:
            logger.warning(
                "model %s: Triton's model %r failed on a call's inputs: %s %s",
                name,
                self._triton.model,
                code.name,
                details,
            )
            if self._spec.batching is None:  # the call holds one request: its own fault
                return ModelFailed(name)
            return TritonModelError(f"Triton's model {self._triton.model!r} failed: {code.name}")
        if fault is Fault.BUSY:
            return QueueFull(f"model '{name}' is busy", retry_after_s=0.05)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and by_client_deadline:
            return DeadlineExceeded("deadline exceeded while the backend was running")
        if code == grpc.StatusCode.NOT_FOUND:
            logger.error(
                "model %s: Triton at %s has no model %r version %r (check models[].triton): %s",
                name,
                self._triton.url,
                self._triton.model,
                self._triton.version or "latest",
                details,
            )
        else:
            logger.warning(
                "model %s: Triton at %s failed: %s %s", name, self._triton.url, code.name, details
            )
        return Unavailable(f"model '{name}' is unavailable (backend error)")

    # -- health -----------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._triton.health_interval_s)
            await self.refresh()

    async def refresh(self) -> None:
        """Poll Triton once: model readiness, then (when ready) its metadata."""
        stub = self._stub
        if stub is None:
            return
        model, version = self._triton.model, self._triton.version
        try:
            ready = await stub.ModelReady(
                pb.ModelReadyRequest(name=model, version=version), timeout=PROBE_TIMEOUT_S
            )
            metadata = (
                await stub.ModelMetadata(
                    pb.ModelMetadataRequest(name=model, version=version), timeout=PROBE_TIMEOUT_S
                )
                if ready.ready
                else None
            )
        except grpc.aio.AioRpcError as exc:
            self._set_ready(False, f"{exc.code().name}: {exc.details()}")
            return
        if metadata is not None:
            self._platform = metadata.platform or "triton"
            if self._discover:
                self._adopt(metadata)
        self._set_ready(ready.ready, "Triton reports the model not ready")

    def _adopt(self, metadata: pb.ModelMetadataResponse) -> None:
        inputs = tuple(_tensor_spec(t) for t in metadata.inputs)
        outputs = tuple(_tensor_spec(t) for t in metadata.outputs)
        if (inputs, outputs) != (self._spec.inputs, self._spec.outputs):
            if self._spec.inputs:
                logger.info("model %s: Triton's model changed its tensors", self._spec.name)
            self._spec = self._spec.model_copy(update={"inputs": inputs, "outputs": outputs})

    def _set_ready(self, ready: bool, reason: str) -> None:
        if ready != self._model_ready:
            if ready:
                logger.info("model %s: Triton at %s is ready", self._spec.name, self._triton.url)
            else:
                logger.warning(
                    "model %s: Triton at %s is not ready (%s)",
                    self._spec.name,
                    self._triton.url,
                    reason,
                )
        self._model_ready = ready


def _never_sent(exc: grpc.aio.AioRpcError) -> bool:
    """A call that failed to connect never reached Triton: safe to send again."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = (exc.details() or "").lower()
    return any(marker in details for marker in _CONNECT_FAILURE_MARKERS)


def _strip_request_id(details: str) -> str:
    """Triton prefixes its messages with ``[request id: …] ``; that is ours to give."""
    if details.startswith("[request id:"):
        _, _, rest = details.partition("] ")
        return rest or details
    return details


def _tensor_spec(tensor: pb.ModelMetadataResponse.TensorMetadata) -> TensorSpec:
    return TensorSpec(tensor.name, tensor.datatype, tuple(int(d) for d in tensor.shape))


def _raw_bytes(array: np.ndarray) -> bytes:
    """The tensor's wire bytes; the request's own buffer when ``array`` views all of it."""
    if array.dtype == np.object_ or array.dtype.kind in ("S", "U"):
        return join_bytes(array)
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if (
        isinstance(base, bytes)
        and array.flags.c_contiguous
        and array.nbytes == len(base)
        and array.dtype.byteorder in "<|="
    ):
        return base
    little = array.dtype.newbyteorder("<")
    return np.ascontiguousarray(array, dtype=little).tobytes()


def _decode(datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise Unavailable(f"the backend returned unknown datatype {datatype}")
    if datatype != "BYTES":
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    try:
        return split_bytes(raw, prod(shape)).reshape(shape)
    except ValueError as exc:
        raise Unavailable(f"the backend returned malformed BYTES: {exc}") from None
