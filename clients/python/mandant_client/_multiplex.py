"""Transport-neutral glue of the multiplexed mode, shared by both clients' streams.

In that mode every ``infer`` of one client travels as a message of one long-lived
``ModelStreamInfer`` call (Triton's bidirectional stream). Each message gets a wire id
unique on the client, ``<caller's id>#<n>`` (``n`` in hex), so the server's logs and
messages still show the caller's own id (just ``#<n>`` when that would pass
:data:`MAX_WIRE_ID_BYTES`); answers come back in any order and are matched on that id,
and the caller gets its own id back. Nothing here performs I/O.

A stream has no deadline per message: each message carries its call's time left as
the v2 ``timeout`` parameter (µs), which Mandant (and Triton) honour, so that a message
the caller gave up on leaves the server's queue instead of running late and holding its
place there and on the stream. gRPC fails a whole call for one message over the send
limit, i.e. every call on the stream: such a message is refused here, alone, with the
error a unary call gets for it. The check must stay cheap: it runs on every message, on
the event loop of the async client, and protobuf's upb backend computes ``ByteSize()``
by encoding the message (as long as ``SerializeToString()``, which gRPC then does again),
so an upper bound from the raw bytes' length and the small fields comes first and the
exact size is computed only for a message whose bound passes the limit.

That time left is computed when the message is written, not when it is queued: a
message waits in the client's outbox while gRPC's flow control holds the stream back.
A call given up on (timed out, cancelled) before its message is written is taken out of
the outbox and never sent. The outbox writes the oldest call first, by when the call
began: a call sent again goes ahead of those begun after it (at the back, under a
steady flow of new calls, it went unread at stream end after stream end and failed).

A Mandant server ends a stream with status OK (its trailing metadata
``mandant-stream-end`` says why: the stream reached the server's connection age, or the
server stops) once it has answered every message it read: the calls still pending on
it were never read, and are sent again on a new stream (on the same channel; after the
server's GOAWAY gRPC opens it on a new connection), oldest first (the new stream holds
calls begun after them back until they come, :data:`RESEND_WAIT_S` at most: they are
queued again only once the old stream's status comes), for as long as their
calls' time lasts while the server answers on each stream; a call is sent again after
streams that answered nothing :data:`MAX_IDLE_RESENDS` times in all, and fails
Unavailable when one more such stream ends (a server that keeps ending streams without
reading is stopping, or broken). Under overload with a short connection
age a call can wait out several streams before the server reads it; a fixed number of
resends failed it although the server was serving the calls ahead of it.

A message over the server's receive limit ends the whole stream too, with gRPC's
RESOURCE_EXHAUSTED "Received message larger than max (N vs. M)". Only the pending
call(s) whose message is N bytes long fail InvalidInput, as on a unary call; the others
fail Unavailable, which callers retry (sizes are computed only then, see
:func:`for_call`). An answer over the client's own receive limit ("CLIENT: Received …")
cannot be told from the others, so every pending call keeps the InvalidInput.

The server's answer to one message is a ``ModelStreamInferResponse``: on success the
``infer_response``; on error ``error_message`` plus, in ``infer_response.parameters``,
``status_code`` (the gRPC status name) and, for RESOURCE_EXHAUSTED,
``retry_pushback_ms``. They become the exceptions of the unary path (one table,
:data:`~mandant_client.errors.ERRORS_BY_CODE`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import grpc

from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client.errors import (
    InvalidInput,
    MandantClientError,
    ResourceExhausted,
    Unavailable,
    error_for,
    from_rpc_error,
    retry_after_from_metadata,
)

#: How many messages one client keeps in flight on its stream unless told otherwise.
DEFAULT_MAX_IN_FLIGHT = 64
STATUS_CODE_PARAM = "status_code"
RETRY_PUSHBACK_PARAM = "retry_pushback_ms"
#: The KServe v2 request parameter for the time a request may take, in microseconds.
TIMEOUT_PARAM = "timeout"
#: Parameters Mandant accepts on a request (its ``validation.MAX_PARAMETERS``).
MAX_PARAMETERS = 256
STREAM_ENDED = "the server ended the stream"
#: The status grpc.aio gives a call itself (cygrpc's ``set_internal_error``) when a
#: write finds the call already over: not the server's word (grpc/grpc#36066).
CORE_WRITE_FAILURE = "Internal error from Core"
#: Mandant refuses longer ids and cannot echo them in an error answer, which could then
#: not be matched to its call.
MAX_WIRE_ID_BYTES = 256
_ID_SEPARATOR = "#"
_CODES_BY_NAME = {code.name: code for code in grpc.StatusCode}
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
#: At most what protobuf adds around one field of ModelInferRequest: a tag (1 byte for
#: its field numbers, 2 allowed) and a length varint (at most 10 bytes).
_FIELD_OVERHEAD_BYTES = 12
#: gRPC's text when a receive limit ends a call: the server's ("SERVER: Received …", no
#: side named before grpc 1.55) or the client's own ("CLIENT: Received …").
_RECEIVED_TOO_LARGE = re.compile(r"(CLIENT: )?Received message larger than max \((\d+) vs\. \d+\)")


#: How long a new stream holds calls back for the calls the stream before it left
#: unread (their callers send them again as soon as that stream's status comes).
RESEND_WAIT_S = 1.0
#: How many times one call is sent again on a new stream after a stream that answered
#: no message ended with OK without reading it (see the module).
MAX_IDLE_RESENDS = 3
#: The stream's metadata saying that this client sends again the messages a stream
#: ended with OK left unread: only then does the server end a stream at its
#: connection age (a client that does not, tritonclient's, would never hear of them).
RESENDS_UNREAD = ("mandant-stream-resends", "unread")
#: The initial metadata in which a Mandant server says what of a stream it reads at
#: once: how many messages it serves (``server.max_stream_inflight``) and how many
#: bytes of them (and of their answers not yet written) it holds
#: (``STREAM_BYTES × server.max_message_bytes``). Past either it reads no more until
#: one is answered, so a client keeps no more written and unanswered (:class:`Window`)
#: and the rest in its outbox, where a call that gives up is withdrawn (written beyond
#: them, a message waited unread on the server, then ran with its whole time left
#: counted afresh, its caller long gone).
MAX_INFLIGHT_METADATA = "mandant-stream-max-inflight"
MAX_BYTES_METADATA = "mandant-stream-max-bytes"
#: How long a stream's first write waits for its initial metadata: Mandant sends it
#: once it accepts the key (writing before could race a refusal, grpc/grpc#36066, and
#: it holds the :class:`Window`'s bounds); other servers (Triton, a plain grpc.aio
#: servicer) send it with their first answer, so the first message then goes anyway.
METADATA_WAIT_S = 0.5


class Window:
    """A stream's messages written and not answered yet, against what the server reads
    at once (:data:`MAX_INFLIGHT_METADATA`, :data:`MAX_BYTES_METADATA`, from its initial
    metadata whenever it comes; a bound not said, or not a positive integer, is none: a
    server other than Mandant is written every message). A message that would pass a
    bound waits for an answer; one goes whatever its size when nothing else is
    unanswered (the server reads it then). A message counts the bytes it has at most on
    the wire (:func:`size_bound`; the server counts its length) until its answer comes.
    An answer larger than its message, held by the server until written, may still
    keep the next message unread a moment: the client cannot foresee its size."""

    __slots__ = ("_bytes", "_sizes", "max_bytes", "max_messages", "unanswered")

    def __init__(self) -> None:
        self.max_messages: int | None = None
        self.max_bytes: int | None = None
        self.unanswered = 0
        self._bytes = 0
        self._sizes: dict[str, int] = {}  # the messages unanswered: wire id → bytes

    @property
    def bounded(self) -> bool:
        """Whether the server said a bound (an answer may then let a message go)."""
        return self.max_messages is not None or self.max_bytes is not None

    def told(self, metadata: Any) -> None:
        """The stream's initial metadata came."""
        self.max_messages = _positive(metadata, MAX_INFLIGHT_METADATA)
        self.max_bytes = _positive(metadata, MAX_BYTES_METADATA)

    def fits(self, size: int) -> bool:
        """Whether a message of ``size`` bytes may be written now."""
        if self.unanswered <= 0:
            return True
        if self.max_messages is not None and self.unanswered >= self.max_messages:
            return False
        return self.max_bytes is None or self._bytes + size <= self.max_bytes

    def wrote(self, wire_id: str, size: int) -> None:
        self.unanswered += 1
        self._sizes[wire_id] = size
        self._bytes += size

    def answered(self, wire_id: str) -> None:
        """An answer came (to a message whose id the server could not echo: only its
        count is freed, and its bytes once nothing is left unanswered)."""
        self.unanswered -= 1
        self._bytes -= self._sizes.pop(wire_id, 0)
        if self.unanswered <= 0:
            self.unanswered = self._bytes = 0
            self._sizes.clear()


def _positive(metadata: Any, key: str) -> int | None:
    """The positive integer ``metadata`` holds for ``key`` (None: not said, or not one)."""
    for name, value in metadata or ():
        if name == key:
            try:
                bound = int(value)
            except (TypeError, ValueError):
                return None
            return bound if bound > 0 else None
    return None


#: To such a client, the last message of a stream the server ended with OK: no id, and
#: this parameter (why it ended). Every message the server read is answered before it,
#: so the calls still waiting were not read. The status after it may never reach the
#: client (a write in flight as the call ends turns it into INTERNAL,
#: grpc/grpc#36066): under load, every call waiting at a connection-age end failed.
END_MARK = "mandant-stream-end"


def is_end_mark(message: pb.ModelStreamInferResponse) -> bool:
    """Whether ``message`` is the server's end of the stream (:data:`END_MARK`)."""
    answer = message.infer_response
    return not answer.id and END_MARK in answer.parameters


class Unread(Unavailable):
    """The server ended the stream with status OK before reading this call's message
    (it answers every message it read first): the call may be sent again."""


@dataclass
class Outgoing:
    """A message in a stream's outbox, when its call gives up (``time.monotonic()``;
    None: never), its place in the client's order of calls (:class:`WireIds`) and the
    bytes it has at most on the wire (:func:`ready`), which its :class:`Window` counts."""

    request: pb.ModelInferRequest
    deadline_s: float | None
    order: int
    size: int = 0


class Outbox:
    """A stream's messages not written yet, by wire id; the oldest call's first (see
    the module). A message taken out (:meth:`discard`) leaves its place in the heap
    until it comes up or the heap is rebuilt."""

    __slots__ = ("_heap", "_messages")

    def __init__(self) -> None:
        self._messages: dict[str, Outgoing] = {}
        self._heap: list[tuple[int, str]] = []

    def __bool__(self) -> bool:
        return bool(self._messages)

    def put(self, wire_id: str, outgoing: Outgoing) -> None:
        self._messages[wire_id] = outgoing
        heapq.heappush(self._heap, (outgoing.order, wire_id))

    def pop(self) -> Outgoing:
        """The oldest call's message (the outbox must not be empty)."""
        while True:
            _, wire_id = heapq.heappop(self._heap)
            outgoing = self._messages.pop(wire_id, None)
            if outgoing is not None:
                return outgoing

    def oldest(self) -> int | None:
        """The order of the oldest call's message (None: the outbox is empty)."""
        first = self.first()
        return None if first is None else first.order

    def first(self) -> Outgoing | None:
        """The oldest call's message, left in the outbox (None: the outbox is empty)."""
        heap, messages = self._heap, self._messages
        while heap and heap[0][1] not in messages:
            heapq.heappop(heap)
        return messages[heap[0][1]] if heap else None

    def discard(self, wire_id: str) -> bool:
        """Take out ``wire_id``'s message; False if it is not here (written, or gone)."""
        if self._messages.pop(wire_id, None) is None:
            return False
        if len(self._heap) > 2 * len(self._messages) + 64:  # mostly places given up
            self._heap = [(m.order, i) for i, m in self._messages.items()]
            heapq.heapify(self._heap)
        return True

    def clear(self) -> None:
        self._messages.clear()
        self._heap.clear()


def hold_s(
    outbox: Outbox, resending: dict[str, int], held_until: float, now: float
) -> float | None:
    """0.0 once ``outbox``'s oldest message may be written; else how long to wait at most
    for a change (None: no limit, the outbox is empty). ``resending``: the calls the
    stream before left unread and not yet sent again (wire id → order): a call begun
    after the oldest of them waits for them, until ``held_until``."""
    oldest = outbox.oldest()
    if oldest is None:
        return None
    if resending and now < held_until and oldest > min(resending.values()):
        return held_until - now
    return 0.0


class WireIds:
    """Hands out the wire id of each message, unique for the life of the client, and
    its call's place in the client's order of calls."""

    def __init__(self) -> None:
        self._sequence = itertools.count(1)  # next() is atomic under the GIL

    def tag(self, request: pb.ModelInferRequest) -> tuple[str, int]:
        """Rewrite ``request.id`` to its wire id; return it and the call's order."""
        order = next(self._sequence)
        suffix = f"{_ID_SEPARATOR}{order:x}"
        wire_id = request.id + suffix
        if len(wire_id) > MAX_WIRE_ID_BYTES // 4 and len(wire_id.encode()) > MAX_WIRE_ID_BYTES:
            wire_id = suffix
        request.id = wire_id
        return wire_id, order


def time_left(timeout_s: float | None, started: float) -> float | None:
    """Seconds left of a call that began at ``started`` (``time.monotonic()``)."""
    if timeout_s is None:
        return None
    return max(0.0, timeout_s - (time.monotonic() - started))


def deadline(timeout_s: float | None, started: float) -> float | None:
    """When a call that began at ``started`` (``time.monotonic()``) gives up."""
    return None if timeout_s is None else started + timeout_s


def seconds_to(deadline_s: float | None) -> float | None:
    """Seconds left until ``deadline_s`` (never negative); None for none."""
    return None if deadline_s is None else max(0.0, deadline_s - time.monotonic())


def stamp(outgoing: Outgoing) -> bool:
    """Set the message's ``timeout`` to what is left of its call's time, as it is
    written; False if nothing is left (the caller is giving up: do not send it). Only
    ever lowers the value :func:`ready` set, so its size check holds."""
    left_s = seconds_to(outgoing.deadline_s)
    if left_s is None:
        return True
    if left_s <= 0:
        return False
    _limit_time(outgoing.request, max(1, math.ceil(left_s * 1e6)))
    return True


def ready(
    request: pb.ModelInferRequest,
    raw_bytes: int,
    left_s: float | None,
    max_send_bytes: int | None,
    request_id: str,
) -> int:
    """Ready a tagged message for the stream: its ``timeout`` for the server, and the
    size check gRPC would otherwise fail the whole stream for (see the module).
    ``raw_bytes`` is the total length of ``request.raw_input_contents``. Returns the
    bytes it has at most on the wire (:func:`size_bound`; :func:`stamp` keeps it so)."""
    if left_s is not None:
        _limit_time(request, max(1, math.ceil(left_s * 1e6)))
    bound = size_bound(request, raw_bytes)
    if max_send_bytes is None or bound <= max_send_bytes:
        return bound
    if (size := request.ByteSize()) > max_send_bytes:
        raise error_for(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"CLIENT: Sent message larger than max ({size} vs. {max_send_bytes})",
            request_id=request_id,
        )
    return size


def size_bound(request: pb.ModelInferRequest, raw_bytes: int) -> int:
    """At least ``request.ByteSize()``, without encoding the raw contents (``raw_bytes``
    long in all): the lengths of its strings, the small sizes of its tensors' metadata
    and parameters, and the most protobuf adds around each field."""
    strings = (request.model_name, request.model_version, request.id)
    sizes = [len(text.encode()) for text in strings]
    sizes += [tensor.ByteSize() for tensor in request.inputs]
    sizes += [tensor.ByteSize() for tensor in request.outputs]
    # A map entry is a field holding a key field and a value field.
    sizes += [
        len(key.encode()) + value.ByteSize() + 2 * _FIELD_OVERHEAD_BYTES
        for key, value in request.parameters.items()
    ]
    fields = len(sizes) + len(request.raw_input_contents)
    return raw_bytes + sum(sizes) + fields * _FIELD_OVERHEAD_BYTES


def _limit_time(request: pb.ModelInferRequest, timeout_us: int) -> None:
    """Set ``timeout`` to ``timeout_us`` unless the caller's own is earlier: the server
    takes the earlier of a unary call's deadline and its parameter, so the two paths
    agree. The caller's 0 (no timeout) gives way; a value the server refuses (not an
    int64, negative) stays, to be refused as on a unary call. A request that already
    has as many parameters as Mandant accepts gets none (it was refused, where the
    same unary call passed): the client still gives up at its deadline."""
    own = request.parameters.get(TIMEOUT_PARAM)
    if own is None and len(request.parameters) >= MAX_PARAMETERS:
        return
    if own is None or (
        own.WhichOneof("parameter_choice") == "int64_param"
        and (own.int64_param == 0 or own.int64_param > timeout_us)
    ):
        request.parameters[TIMEOUT_PARAM].int64_param = timeout_us


def answer_id(message: pb.ModelStreamInferResponse) -> str:
    """The wire id a stream message answers."""
    return message.infer_response.id


def outcome(message: pb.ModelStreamInferResponse, request_id: str) -> pb.ModelInferResponse:
    """The response of one answered message (its id back to the caller's), or raise
    the typed error the unary path raises for the same status."""
    response = message.infer_response
    if message.error_message:
        raise answer_error(message, request_id)
    response.id = request_id
    return response


def answer_error(message: pb.ModelStreamInferResponse, request_id: str) -> MandantClientError:
    """The exception for a message answered with ``error_message``. A server that names
    no status (Triton) gives UNKNOWN, i.e. ServerError."""
    parameters = message.infer_response.parameters
    name = parameters[STATUS_CODE_PARAM].string_param if STATUS_CODE_PARAM in parameters else ""
    code = _CODES_BY_NAME.get(name, grpc.StatusCode.UNKNOWN)
    retry_after_s = None
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and RETRY_PUSHBACK_PARAM in parameters:
        millis = parameters[RETRY_PUSHBACK_PARAM].int64_param
        retry_after_s = millis / 1000.0 if millis >= 0 else None
    return error_for(
        code, message.error_message, retry_after_s=retry_after_s, request_id=request_id
    )


def for_call(
    failure: MandantClientError, request_id: str, request: pb.ModelInferRequest, raw_bytes: int
) -> MandantClientError:
    """A copy of a whole stream's failure for one of its pending calls (each caller
    raises its own exception object, with its own id). Where the server ended the stream
    for one message over its receive limit, only a call whose ``request`` (as sent,
    ``raw_bytes`` of raw contents) is that long gets it; the others' messages were not
    at fault and get Unavailable: the stream ended under them."""
    match = _RECEIVED_TOO_LARGE.search(failure.message)
    if isinstance(failure, InvalidInput) and match and not match.group(1):
        culprit_bytes = int(match.group(2))
        if size_bound(request, raw_bytes) < culprit_bytes or request.ByteSize() != culprit_bytes:
            return Unavailable(
                f"{STREAM_ENDED}: another message on it was over the server's limit "
                f"({failure.message})",
                request_id=request_id,
            )
    retry_after_s = failure.retry_after_s if isinstance(failure, ResourceExhausted) else None
    error = error_for(
        failure.code, failure.message, retry_after_s=retry_after_s, request_id=request_id
    )
    return error


def stream_failure(
    server_status: MandantClientError | None, exc: grpc.RpcError
) -> MandantClientError:
    """Why a ``grpc.aio`` stream failed, its reader having raised ``exc``: the server's
    status where the done callback kept one (:func:`status_error`), else ``exc``'s. A
    write that found the call over (the server ended the stream with OK while it
    drains, or went away) makes grpc.aio report INTERNAL "Internal error from Core",
    sometimes before the server's status: the server ended the stream, so Unavailable,
    which callers retry, as the sync client reports it."""
    failure = server_status or from_rpc_error(exc)
    if failure.code is grpc.StatusCode.INTERNAL and failure.message == CORE_WRITE_FAILURE:
        failure = Unavailable(STREAM_ENDED)
    failure.__cause__ = exc
    return failure


def ended_ok(call: Any) -> bool:
    """Whether a finished ``grpc.aio`` call's first status is OK (read as in
    :func:`status_error`; False where it cannot be read)."""
    status = getattr(getattr(call, "_cython_call", None), "_status", None)
    try:
        return status is not None and status.code() == grpc.StatusCode.OK.value[0]
    except Exception:
        return False


def status_error(call: Any) -> MandantClientError | None:
    """The error for a finished ``grpc.aio`` call's status as it stands now (None if OK
    or unknown). Reads grpc's private status record: no public accessor is synchronous,
    and this runs in a done callback, before grpc/grpc#36066 can overwrite the status."""
    status = getattr(getattr(call, "_cython_call", None), "_status", None)
    if status is None:
        return None
    try:
        code = _CODES_BY_NUMBER.get(status.code(), grpc.StatusCode.UNKNOWN)
        details, trailing = status.details(), status.trailing_metadata()
    except Exception:  # a grpc without that record: the reader's error stands
        return None
    if code is grpc.StatusCode.OK:
        return None
    retry_after_s = None
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after_s = retry_after_from_metadata(trailing)
    return error_for(code, details, retry_after_s=retry_after_s)
