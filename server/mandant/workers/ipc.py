"""What front ends and the engine say to each other (``workers: N``), in the messages
of ``framing.py``: a kind, a msgpack payload, and one frame per tensor, untouched.

Front end → engine::

    CALLS   [[request header, ...], [cancelled rid, ...], [observer event, ...],
             give_up_at] + the requests' input frames, in order
    PING    [accepting]               (its gRPC port accepts calls)
    SETTLED [n]                       (in answer to SETTLE n: its events are all sent)

Engine → front end::

    ANSWERS [answer header, ...] + the answers' output frames, in order; a header is
            [rid, model, version, error or None, [output header, ...], owner]
    STATUS  [ready]                   (on connecting, and in answer to each PING)
    SETTLE  [n]                       (send your observer events now, then SETTLED n)

Everything of one event-loop turn travels in one message; a header says how many
frames are its own (one per tensor). ``rid`` numbers a front end's requests; the
engine answers with it. ``give_up_at`` (``time.monotonic()``, one clock for every
process of the host): when the front end will have given up on the engine if it hears
nothing more from it (``EngineLink``'s ``silent_s``); the engine does not start the
requests of a message it reads after that (its calls were failed UNAVAILABLE, "retry").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from math import prod
from typing import Any, NamedTuple

import numpy as np

from mandant import errors
from mandant.config import DEFAULT_MAX_BYTES_ELEMENTS
from mandant.transport.grpc.codec import decode_typed
from mandant.types import DATATYPES, TensorHeader, datatype_of
from mandant.wire import join_bytes, raw_view, split_bytes
from mandant.workers.framing import Buffer

CALLS = 1
PING = 2
ANSWERS = 3
STATUS = 4
SETTLE = 5
SETTLED = 6


class RequestHeader(NamedTuple):
    """One inference request as a front end hands it on: the caller it authenticated,
    what the client asked for, and one frame per input: raw little-endian bytes (BYTES
    length-prefixed), whatever form the client sent it in, except typed contents with
    BYTES among them, which travel as they came (``typed``). A named tuple: made twice a
    call (packed by the front end, unpacked by the engine), in a seventh of the time a
    frozen dataclass of eleven fields takes (0.16 against 1.1 µs)."""

    rid: int
    tenant: str
    model_name: str
    model_version: str
    request_id: str
    parameters: Mapping[str, bool | int | float | str]
    outputs: Sequence[str]
    inputs: Sequence[TensorHeader]
    timeout_s: float | None
    #: When the front end took the call (``Call.arrived``: the host's monotonic clock,
    #: which the engine reads too), so that a v2 ``timeout`` counts its wait there.
    arrived: float
    #: Why the front end could not put the inputs in frames (then there are none): the
    #: engine raises it where the payload is checked, after resolution and validation,
    #: so that a call gets the same answer as from a single process.
    deferred_error: str | None = None
    #: Whether a single process finds ``deferred_error`` only when it decodes the inputs,
    #: after admission (typed contents, raw and typed both given), not when it checks
    #: the payload's sizes, before.
    deferred_to_decode: bool = False
    #: Why the front end could not read the inputs' or the requested outputs' headers
    #: (then they are empty): raised when the engine's validation asks for them, after
    #: the model is resolved, where a single process meets it (an unknown model is
    #: NOT_FOUND first).
    inputs_error: str | None = None
    outputs_error: str | None = None
    #: Whether the frames are the inputs' typed contents in the protocol's encoding
    #: (:meth:`EncodedRequest.typed_inputs`), decoded here, not the raw layout.
    typed: bool = False

    def pack(self) -> list[object]:
        return [
            self.rid,
            self.tenant,
            self.model_name,
            self.model_version,
            self.request_id,
            dict(self.parameters),
            list(self.outputs),
            [[h.name, h.datatype, list(h.shape)] for h in self.inputs],
            self.timeout_s,
            self.arrived,
            self.deferred_error,
            self.deferred_to_decode,
            self.inputs_error,
            self.outputs_error,
            self.typed,
        ]

    @classmethod
    def unpack(cls, fields: list[Any]) -> RequestHeader:
        (rid, tenant, model, version, request_id, parameters, outputs, inputs, timeout_s, arrived,
         error, to_decode, inputs_error, outputs_error, typed) = fields  # fmt: skip
        return cls(
            rid,
            tenant,
            model,
            version,
            request_id,
            parameters,
            outputs,
            [TensorHeader(name, datatype, tuple(shape)) for name, datatype, shape in inputs],
            timeout_s,
            arrived,
            error,
            to_decode,
            inputs_error,
            outputs_error,
            typed,
        )


class IpcRequest:
    """A request as the engine received it, seen through
    :class:`mandant.types.EncodedRequest`: inputs decode as views of the frames."""

    __slots__ = ("_frames", "_header", "_max_bytes_elements")

    def __init__(
        self,
        header: RequestHeader,
        frames: Sequence[Buffer],
        max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS,
    ) -> None:
        self._header = header
        self._frames = frames
        self._max_bytes_elements = max_bytes_elements

    @property
    def model_name(self) -> str:
        return self._header.model_name

    @property
    def model_version(self) -> str:
        return self._header.model_version

    @property
    def request_id(self) -> str:
        return self._header.request_id

    def input_headers(self) -> Sequence[TensorHeader]:
        if self._header.inputs_error is not None:
            raise errors.InvalidInput(self._header.inputs_error)
        return self._header.inputs

    def requested_outputs(self) -> Sequence[str]:
        if self._header.outputs_error is not None:
            raise errors.InvalidInput(self._header.outputs_error)
        return self._header.outputs

    def parameters(self) -> Mapping[str, bool | int | float | str]:
        return self._header.parameters

    def check_payload(self) -> None:
        """The front end checked the frames' sizes against the headers before it sent
        them (``EngineLink``); what is left is the error it found, where one process
        would raise it."""
        header = self._header
        if header.deferred_error is not None and not header.deferred_to_decode:
            raise errors.InvalidInput(header.deferred_error)

    def raw_inputs(self) -> None:
        """None: the engine does not hand a request on."""
        return None

    def typed_inputs(self) -> None:
        """None, as :meth:`raw_inputs`."""
        return None

    def decode_inputs(self) -> dict[str, np.ndarray]:
        header = self._header
        if header.deferred_error is not None:
            raise errors.InvalidInput(header.deferred_error)
        if header.typed:
            limit = self._max_bytes_elements
            return {
                input.name: decode_typed(frame, input, limit)
                for input, frame in zip(header.inputs, self._frames, strict=True)
            }
        return {
            input.name: decode_frame(frame, input)
            for input, frame in zip(header.inputs, self._frames, strict=True)
        }


def decode_frame(frame: Buffer, header: TensorHeader) -> np.ndarray:
    """A tensor frame (checked in size) as an array viewing it (BYTES: unframed)."""
    if header.datatype == "BYTES":
        try:
            return split_bytes(frame, prod(header.shape)).reshape(header.shape)
        except ValueError as exc:
            raise errors.InvalidInput(f"input '{header.name}': {exc}") from None
    return np.frombuffer(frame, dtype=DATATYPES[header.datatype]).reshape(header.shape)


def tensor_frame(array: np.ndarray, datatype: str) -> Buffer:
    """An array as one frame in ``datatype``'s wire form (a view where it already is)."""
    if datatype == "BYTES":
        return join_bytes(array)
    return raw_view(array, DATATYPES[datatype])


def output_frames(
    outputs: Mapping[str, np.ndarray], declared: Mapping[str, str]
) -> tuple[list[list[object]], list[Buffer]]:
    """Answer outputs as (``[name, datatype, shape]`` headers, frames)."""
    headers: list[list[object]] = []
    frames: list[Buffer] = []
    for name, array in outputs.items():
        datatype = declared.get(name) or datatype_of(array)
        headers.append([name, datatype, list(array.shape)])
        frames.append(tensor_frame(array, datatype))
    return headers, frames


# -- errors ---------------------------------------------------------------------------

#: The domain errors that cross from the engine to a front end, by name; anything else
#: the engine raised arrives as :class:`EngineFault` (INTERNAL, logged in the engine).
_ERRORS: dict[str, type[errors.MandantError]] = {
    kind.__name__: kind
    for kind in (
        errors.Unauthenticated,
        errors.ModelNotFound,
        errors.InvalidInput,
        errors.ModelFailed,
        errors.FailedPrecondition,
        errors.ResourceExhausted,
        errors.RateLimited,
        errors.QuotaExceeded,
        errors.QueueFull,
        errors.ServerBusy,
        errors.DeadlineExceeded,
        errors.DeadlinePassedWhileRunning,
        errors.Unavailable,
    )
}


class EngineFault(Exception):
    """The engine failed on a request for a reason of its own: it logged it there under
    ``request_id`` (the request's id, or one it made), which the front end's answer
    quotes, so that what the client reads finds the traceback."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"the engine failed on request {request_id} (its log has why)")
        self.request_id = request_id


def pack_error(exc: BaseException, logged_id: str = "") -> list[object]:
    """``[kind, message, retry_after_s]``; an unexpected exception says nothing of itself
    but ``logged_id``, the id the engine logged it under."""
    if isinstance(exc, errors.MandantError) and type(exc).__name__ in _ERRORS:
        retry_after = exc.retry_after_s if isinstance(exc, errors.ResourceExhausted) else 0.0
        return [type(exc).__name__, str(exc), retry_after]
    return ["", logged_id, 0.0]


def unpack_error(fields: Iterable[Any]) -> Exception:
    kind_name, message, retry_after_s = fields
    kind = _ERRORS.get(kind_name)
    if kind is None:
        return EngineFault(message)
    error: errors.MandantError = kind.__new__(kind)
    Exception.__init__(error, message)  # the engine's message, as it was built there
    if isinstance(error, errors.ResourceExhausted):
        error.retry_after_s = float(retry_after_s)
    return error
