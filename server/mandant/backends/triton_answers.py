"""What Triton's answers and its errors mean, in Mandant's words: read here for
:class:`~mandant.backends.triton.TritonBackend`, whose docstring holds the overview.

* Errors: one table (:data:`TRANSLATION`, read by :func:`translate`) maps the status
  code of a failed call (and Triton's message, for its queue's refusals) to whose fault
  it was, as the caller is told (:class:`Fault`), and to what it says about Triton, as
  the circuit breaker counts it (:class:`CallOutcome`). :meth:`TritonAnswers.error` then
  words the exception: Triton's model name replaced by Mandant's, Triton's own message
  passed on only for the input errors of a call that held one request; a call holding
  several requests of a batch fails with :class:`TritonModelError`, which the batcher
  splits on.
* Answers: the outputs of Triton's answer are checked against the model's declared
  outputs (datatype, rank, fixed dimensions, rows, byte size) before they are decoded
  (:meth:`TritonAnswers.outputs`): one that does not match is the backend's fault,
  Unavailable, logged once per output and problem, never the caller's.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Mapping, Sequence
from math import prod

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from mandant.backends.circuit import CallOutcome
from mandant.config import TritonModelConfig
from mandant.errors import (
    DeadlinePassedWhileRunning,
    InvalidInput,
    QueueFull,
    Unavailable,
)
from mandant.observability.log_limits import FailureLog
from mandant.scheduling.clock import Clock
from mandant.types import DATATYPES, TensorSpec
from mandant.wire import split_bytes

logger = logging.getLogger(__name__)

#: Most characters of Triton's own message passed on to a client or a log line.
MAX_DETAILS_CHARS = 300


class TritonModelError(RuntimeError):
    """Triton refused (INVALID_ARGUMENT) or failed (its model raised) a call that held
    several requests of a Mandant batch, or failed (its model raised) any call.

    Deliberately not a :class:`MandantError`: the batcher splits a batch that raised
    anything else and reruns its parts until each failing request is alone, so only
    that request gets an error: Triton's message about its own inputs
    (:class:`InvalidInput`), or :class:`ModelFailed`, which the scheduler makes with the
    request's id (and logs its tenant). The message holds Triton's status code only,
    never its text, which may hold any batch-mate's values."""


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
#: Triton's UNAVAILABLE messages that are its scheduler's queue policy refusing a
#: request (``max_queue_size`` reached; ``default_timeout_microseconds`` passed in its
#: queue with ``timeout_action: REJECT``): a busy model, not a dead Triton, but no
#: answer of the model either (a wedged model's full queue refuses at once): they say
#: nothing to the breaker (ABANDONED), as an answer they kept the calls queued behind
#: a wedged model from ever counting.
_QUEUE_REFUSALS = ("exceeds maximum queue size", "request timeout expired")
#: Triton's INTERNAL message that is no model's word on a call's inputs but its
#: backend's failing whatever the inputs: the Python backend's model process is gone.
#: Every tenant's calls were answered INVALID_ARGUMENT as if their inputs had failed,
#: and charged, and the breaker never opened: a backend fault. Matched whole: a model's
#: own message can quote its caller's input, and a label "is not healthy" opened the
#: breaker for every tenant.
_STUB_GONE = re.compile(r"Stub process '[^']*' is not healthy\.?")


def translate(
    code: grpc.StatusCode, by_client_deadline: bool = False, details: str = ""
) -> tuple[Fault, CallOutcome]:
    """How a Triton call that ended with ``code`` (and Triton's message ``details``) is
    reported and counted."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and by_client_deadline:
        return Fault.BACKEND, CallOutcome.ABANDONED
    if code == grpc.StatusCode.UNAVAILABLE and any(
        refusal in details.lower() for refusal in _QUEUE_REFUSALS
    ):
        return Fault.BUSY, CallOutcome.ABANDONED
    if code == grpc.StatusCode.INTERNAL and _STUB_GONE.fullmatch(details.strip()):
        return Fault.BACKEND, CallOutcome.FAILED
    return TRANSLATION.get(code, _BACKEND_ANSWERED)


class TritonAnswers:
    """Reads the answers and errors of the Triton model (``triton``) that serves the
    Mandant model ``name``, and remembers which mismatched answers it logged already."""

    def __init__(self, name: str, triton: TritonModelConfig, clock: Clock | None = None) -> None:
        """``clock``: the failure log's windows' (``time.monotonic`` on the loop)."""
        self._name = name
        self._triton = triton
        #: (output, problem) of the mismatched answers logged at ERROR already.
        self._mismatches: set[tuple[str, str]] = set()
        #: the model's failures on a call's inputs: the first of a status code logged,
        #: the next ones counted (a client's calls it fails on cannot flood the log)
        self._failures = FailureLog(
            logger,
            "mandant_requests_total by code, a batch's in mandant_failed_batches_total",
            clock=clock,
        )

    def close(self) -> None:
        """The backend closes: log the failures counted and not logged yet."""
        self._failures.flush()

    def outputs(
        self,
        response: pb.ModelInferResponse,
        names: Sequence[str],
        declared: Sequence[TensorSpec],
        rows: int | None,
    ) -> dict[str, np.ndarray]:
        """The ``names`` outputs of Triton's answer, each checked against the model's
        ``declared`` output of its name (``rows``: the call's rows, where dimension 0
        holds them)."""
        raw = response.raw_output_contents
        if len(raw) != len(response.outputs):
            raise self._mismatch("*", "framing", "raw_output_contents do not match outputs")
        declared_by_name = {tensor.name: tensor for tensor in declared}
        wanted = set(names)
        by_name: dict[str, np.ndarray] = {}
        for index, tensor in enumerate(response.outputs):
            if tensor.name not in wanted:
                continue
            if tensor.name in by_name:
                raise self._mismatch(tensor.name, "twice", "the output twice")
            problem = _mismatch_of(tensor, len(raw[index]), declared_by_name.get(tensor.name), rows)
            if problem is not None:
                raise self._mismatch(tensor.name, *problem)
            try:
                by_name[tensor.name] = _decode(tensor.datatype, tuple(tensor.shape), raw[index])
            except ValueError as exc:
                raise self._mismatch(tensor.name, "bytes", str(exc)) from None
        for name in names:
            if name not in by_name:
                raise self._mismatch(name, "missing", "no such output")
        return {name: by_name[name] for name in names}

    def _mismatch(self, output: str, problem: str, detail: str) -> Unavailable:
        """An answer that does not match the model's declared outputs: the backend's
        fault (a misconfigured mapping, a changed model), logged at ERROR the first time
        for this output and problem, at DEBUG after."""
        seen = (output, problem) in self._mismatches
        self._mismatches.add((output, problem))
        logger.log(
            logging.DEBUG if seen else logging.ERROR,
            "model %s: Triton model %r at %s answered output %s not as declared "
            "(check models[].outputs): %s",
            self._name,
            self._triton.model,
            self._triton.url,
            output,
            detail,
        )
        return Unavailable(
            f"model '{self._name}' is unavailable "
            "(the backend's answer does not match the model's outputs)"
        )

    def error(
        self,
        exc: grpc.aio.AioRpcError,
        fault: Fault,
        by_client_deadline: bool,
        alone: bool,
        *,
        joined_by_triton: bool,
    ) -> Exception:
        """The exception for a failed Triton call, in Mandant's words: Triton's model
        name replaced by Mandant's, Triton's message passed on for input errors of a
        call that held one request only (``alone``). ``joined_by_triton``: Triton may
        have run the call in one batch with other calls."""
        code, name = exc.code(), self._name
        details = (exc.details() or "")[:MAX_DETAILS_CHARS]
        if fault is Fault.INPUT and not alone:  # whose inputs? the batcher finds out
            return TritonModelError(f"Triton's model {self._triton.model!r} refused a batch")
        if fault is Fault.INPUT:
            return InvalidInput(in_our_words(exc.details() or "", self._triton.model, name))
        if fault is Fault.MODEL:
            self._failures.failed(
                f"model {name}: Triton's model failed on a call's inputs ({code.name})",
                "model %s: Triton's model %r failed on a call's inputs: %s %s",
                name,
                self._triton.model,
                code.name,
                details,
                level=logging.WARNING,
            )
            if alone and joined_by_triton:
                # Triton's batcher may have joined this call with other tenants' calls:
                # whose inputs failed is unknown, so none is blamed (nor charged).
                return Unavailable(
                    f"model '{name}' failed on a batch its backend formed with other "
                    "calls; this call's inputs may not be at fault: retry"
                )
            # Not a MandantError: the scheduler makes it ModelFailed with the request's
            # id (and logs its tenant), a batched model's batcher first splits the batch.
            return TritonModelError(f"Triton's model {self._triton.model!r} failed: {code.name}")
        if fault is Fault.BUSY:
            return QueueFull(f"model '{name}' is busy", retry_after_s=0.05)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and by_client_deadline:
            return DeadlinePassedWhileRunning("deadline exceeded while the backend was running")
        if code == grpc.StatusCode.NOT_FOUND:
            self._failures.failed(
                f"model {name}: Triton has no such model",
                "model %s: Triton at %s has no model %r version %r (check models[].triton): %s",
                name,
                self._triton.url,
                self._triton.model,
                self._triton.version or "latest",
                details,
            )
        else:
            self._failures.failed(
                f"model {name}: Triton failed ({code.name})",
                "model %s: Triton at %s failed: %s %s",
                name,
                self._triton.url,
                code.name,
                details,
                level=logging.WARNING,
            )
        return Unavailable(f"model '{name}' is unavailable (backend error)")


#: What of Triton's words a caller is not shown: file paths, and addresses (an IPv4
#: address, a host with a port).
_INTERNALS = (
    (re.compile(r"(?:/[\w.@+-]+){2,}/?"), "<path>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "<address>"),
    (re.compile(r"\b[\w-]+(?:\.[\w-]+)*:\d{2,5}\b"), "<address>"),
)


def in_our_words(details: str, theirs: str, ours: str) -> str:
    """Triton's message about one caller's inputs as that caller may read it: Triton's
    model name, quoted or not and in the names Triton makes of it (an instance's
    ``<name>_0_cpu``), is Mandant's; file paths and addresses are left out; its
    ``[request id: …]`` goes; at most :data:`MAX_DETAILS_CHARS`, cut after all that
    (a name cut at the bound was not replaced). Only the exact ``'<name>'`` was
    replaced: an ensemble's step, a path or a host reached tenants."""
    named = re.compile(rf"(?<![\w.-]){re.escape(theirs)}(?:[_.-][\w.-]*)?(?![\w.-])")
    text = named.sub(lambda _: ours, _strip_request_id(details))
    for pattern, placeholder in _INTERNALS:
        text = pattern.sub(placeholder, text)
    return text[:MAX_DETAILS_CHARS]


def _strip_request_id(details: str) -> str:
    """Triton prefixes its messages with ``[request id: …] ``; that is ours to give."""
    if details.startswith("[request id:"):
        _, _, rest = details.partition("] ")
        return rest or details
    return details


def _mismatch_of(
    tensor: pb.ModelInferResponse.InferOutputTensor,
    size: int,
    declared: TensorSpec | None,
    rows: int | None,
) -> tuple[str, str] | None:
    """(problem, detail) where Triton's output ``tensor`` of ``size`` raw bytes does not
    match its ``declared`` spec and the call's ``rows``; None where it does."""
    datatype, shape = tensor.datatype, tuple(int(d) for d in tensor.shape)
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        return "datatype", f"unknown datatype {datatype[:32]!r}"
    if declared is not None and datatype != declared.datatype:
        return "datatype", f"{datatype} where {declared.datatype} is declared"
    if any(d < 0 for d in shape) or (declared is not None and not declared.accepts(shape)):
        want = f" where {list(declared.shape)} is declared" if declared is not None else ""
        return "shape", f"shape {list(shape)}{want}"
    if rows is not None and (not shape or shape[0] != rows):
        return "rows", f"shape {list(shape)} for a call of {rows} rows"
    if datatype != "BYTES" and size != prod(shape) * dtype.itemsize:
        return "size", f"{size} bytes for shape {list(shape)} of {datatype}"
    return None


def _decode(datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """An output checked by :func:`_mismatch_of`; ValueError for malformed BYTES."""
    if datatype != "BYTES":
        return np.frombuffer(raw, dtype=DATATYPES[datatype]).reshape(shape)
    return split_bytes(raw, prod(shape)).reshape(shape)
