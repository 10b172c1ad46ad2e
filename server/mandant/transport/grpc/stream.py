"""``ModelStreamInfer``, Triton's bidirectional inference stream.

The key was checked when the stream opened (the gate), which then sends the initial
metadata: a client that waits for it before writing never races a refusal. After a
configuration reload the stream's key (or certificate) is checked again: a revoked
key's stream ends UNAUTHENTICATED once its messages in flight are answered (its
messages read meanwhile answered UNAUTHENTICATED, as its unary calls), or at once,
its answers left dropped, once one of its writes has waited
:data:`REVOKED_WRITE_WAIT_S` for its client to read (a client that never read held
the stream, its tenant's place under ``server.max_tenant_streams`` and its unread
answers' bytes as long as its connection lived); and a tenant whose weight or limits
changed is served as it now is at its next message. Each message is parsed,
resolved, validated, admitted and batched exactly like a unary ``ModelInfer`` (the
same :meth:`DataPlane.infer`), and answered as soon as it completes, in any order,
with its request ``id``. A bad message gets its own ``error_message`` and the stream
goes on; Mandant also fills that response's ``infer_response`` with the message's id,
model, and parameters ``status_code`` (the gRPC status name) and, on
RESOURCE_EXHAUSTED, ``retry_pushback_ms``, so that clients can match errors to calls
and keep their typed errors (tritonclient reads ``error_message`` only).

Each message takes a place under the server-wide cap on calls in progress while it is
served (beyond the cap: its own RESOURCE_EXHAUSTED answer, with pushback) and passes
the front door like a unary call (``scheduling/door.py``). An open stream holds no
place of its own: a tenant holding streams open and idle takes nothing other tenants'
calls need (as it once did, one place of the server-wide cap per stream).

Backpressure: at most ``max_inflight`` messages of a stream, and ``max_bytes`` of
them, are being served or have answers not yet written (a message counts its bytes
while it is served, then its answer's tensors until they are written); beyond that
the stream is not read (HTTP/2 flow control then holds the client back), and an
answer that would take its unwritten answers past twice ``max_bytes`` is refused in
the stream unless it is alone (:meth:`InferStream._take`), so a client that sends
without reading cannot make the server buffer its answers (by count alone, 128
messages of 64 MiB held 21 GiB; by the bytes of its messages alone, 200 messages of 60
bytes answered 4 MiB each held 512 MiB). Across all of a tenant's streams and unary
calls, answers not yet written count toward ``server.max_unread_answer_bytes``; at that
bound its next messages, and answers that would pass twice it, are answered
RESOURCE_EXHAUSTED (``unread.py``).
When the client leaves, every message still in flight is cancelled: it leaves its
queue and frees its concurrency slot. When the server stops (:meth:`InferStream.end`),
a stream ends once the messages it has in flight are answered: its client's next call
opens a new stream (elsewhere, or on the restarted server) instead of waiting out the
drain on this one. It ends UNAVAILABLE ("server is shutting down"), as a unary call
then is, unless its client sends the messages left unread again (below: OK and a
mark) or has half-closed (nothing of its is left unanswered: OK): tritonclient takes a
stream that ends OK for one still open, and the messages written to it next were
never answered nor failed. A message read while the stream answers those in flight is
answered too (refused: the server drains). A stream also ends, OK, once it has lived
``max_age_s`` (``server.max_connection_age_s``, ±10% jitter as gRPC's, so that streams
opened together do not end together) if its client sends the messages left unread again (its
metadata ``mandant-stream-resends: unread``, as mandant_client's multiplexed mode
sends): gRPC's GOAWAY at a connection's age cannot end a stream gracefully (Python
gRPC gives no hook for it; the server kills the calls still open after the
connection's grace), so Mandant ends such a stream itself first. Other clients'
streams (tritonclient's, which would never hear of the messages left unread) are not
ended so: they live until gRPC's grace for their connection runs out. Either way no
message is served once the end is decided, and every message served is answered before
the status; the trailing metadata ``mandant-stream-end`` says why (``connection-age``,
``server-stop``), and a client sends the messages not answered again on a new stream.
To a client that does, the stream's last message says the same (no id, the parameter
``mandant-stream-end``): it stops writing there and half-closes, and the stream ends
then (the messages it wrote meanwhile read and dropped unread; after
:data:`END_MARK_WAIT_S` at most), so that no write of its is in flight as the status
comes: grpc.aio reports INTERNAL instead of the server's OK then (grpc/grpc#36066), and
under load every call waiting on a stream at its end failed. Such a stream's wait for
its next message is never cancelled before the mark: gRPC's read would stay pending,
the next one fail at once (as EOF), and the stream end under the client's writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from mandant.context import current_request_id
from mandant.errors import (
    InvalidInput,
    MandantError,
    ResourceExhausted,
    ServerBusy,
    Unauthenticated,
    Unavailable,
)
from mandant.events import Observer
from mandant.scheduling.door import CallCap, FrontDoor, count_if_busy
from mandant.service import DataPlane, request_deadline
from mandant.transport.grpc.codec import (
    ProtoInferRequest,
    encode_infer_response,
    parameter_value,
)
from mandant.transport.grpc.gateway import MAX_LOGGED_ID, Context, client_saw, parse
from mandant.transport.grpc.status import INTERNAL_MESSAGE, status_for, trailers_for
from mandant.transport.grpc.wire_bounds import naming_prefix
from mandant.transport.unread import (
    ANSWER_SLACK,
    UNREAD_REASON,
    UNREAD_RETRY_S,
    AnswersUnread,
    UnreadAnswers,
)
from mandant.types import Call, Tenant
from mandant_client._multiplex import END_MARK, TIMEOUT_PARAM
from mandant_client._proto import grpc_service_pb2 as pb

logger = logging.getLogger(__name__)

#: Triton marks each streamed answer with whether it is its request's last one (a
#: decoupled model may send several). Every model here answers a message once, so
#: every answer says so: clients written for Triton read answers until it does.
FINAL_RESPONSE = "triton_final_response"

#: Why the server ended a stream with OK: the value of ``END_MARK``
#: (``mandant-stream-end``) in its trailing metadata and, to a client that sends the
#: messages left unread again, in its last message (its status may not reach it:
#: ``mandant_client._multiplex``).
AGE_END = "connection-age"
STOP_END = "server-stop"
REVOKED_END = "key-revoked"
#: How long a stream waits, after its end mark, for its client to stop writing.
#: A client that half-closes at the mark ends the wait at once; a busy one on a loaded
#: machine may take a while to read it (1 s left little room), and a stream ended
#: under its writes fails every call waiting on it. The connection's grace covers it.
END_MARK_WAIT_S = 5.0
#: How long, once a stream's key is revoked, one of its writes may wait for its client
#: to read before the stream ends without the answers left (looked at this often: one
#: that began between two looks waits up to twice this). A client that never read held
#: the stream open as long as its connection lived, and with it its tenant's place
#: under ``server.max_tenant_streams`` and its unread answers' bytes.
REVOKED_WRITE_WAIT_S = 3.0
#: A stream's age is ``max_age_s`` times a factor within these (gRPC's jitter).
AGE_JITTER = (0.9, 1.1)


class InferStream:
    """Serves one open stream (see the module docstring)."""

    def __init__(
        self,
        plane: DataPlane,
        tenant: Tenant,
        authenticate: Callable[[], Tenant | None],
        context: Context,
        max_inflight: int,
        max_bytes: int,
        max_bytes_elements: int,
        observer: Observer,
        door: FrontDoor | None = None,
        cap: CallCap | None = None,
        unread: UnreadAnswers | None = None,
        max_age_s: float | None = None,
        resends_unread: bool = False,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        """``unread``: the server's count of each tenant's unread answers, which this
        stream's answers count in until written (``unread.py``; None: not counted).
        ``max_age_s``: when the stream ends (None: never). ``resends_unread``: the
        client sends the messages left unread again (module doc); its stream's last
        message then says that the server ended it. ``release``: gives back the stream's
        place under ``server.max_tenant_streams``, called once its end mark is written
        (the gate gives it back as the stream ends otherwise)."""
        self._plane = plane
        self._release = release
        self._cap = cap
        self._unread = unread
        self._tenant: Tenant | None = tenant  # None: its key was revoked
        self._opened_for = tenant.id  # whose place under max_tenant_streams it holds
        self._authenticate = authenticate
        # The tenants ``_tenant`` is as of: none yet, so the first message checks the
        # key again (a reload between the gate's check and here is not missed).
        self._snapshot: object = None
        self._context = context
        self._window = asyncio.Semaphore(max(1, max_inflight))
        self._max_bytes = max_bytes
        self._held = 0  # bytes of messages served and answers unwritten
        self._answers = 0  # bytes of answers unwritten, of those
        self._room = asyncio.Event()  # set while ``_held`` is within ``max_bytes``
        self._room.set()
        self._max_bytes_elements = max_bytes_elements
        self._observer = observer
        self._door = door
        self._writing = asyncio.Lock()  # one write at a time on a gRPC stream
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading: asyncio.Task[Any] | None = None  # the task of :meth:`serve`
        #: Writes the end mark, once (``_end_if_idle``); None until then.
        self._marking: asyncio.Task[None] | None = None
        self._mark_wait: asyncio.TimerHandle | None = None  # see :meth:`_mark_end`
        self._written = 0  # writes done: how :meth:`_watch_writes` sees one move
        #: Armed once the key is revoked (:meth:`_watch_writes`); None until then.
        self._write_watch: asyncio.TimerHandle | None = None
        self._cut = False  # ended without the answers left (:meth:`_watch_writes`)
        self._ending = False
        self._end_reason = STOP_END
        self._max_age_s = max_age_s
        self._resends_unread = resends_unread

    def end(self, reason: str = STOP_END) -> None:
        """End the stream once its messages in flight are answered (the server stops,
        or the stream reached its age), with status OK and ``reason`` in its trailing
        metadata. A revoked key's stream whose answers wait for its client ends
        without them (:meth:`_watch_writes`)."""
        if not self._ending:
            self._ending, self._end_reason = True, reason
            self._context.set_trailing_metadata(((END_MARK, reason),))
        if reason == REVOKED_END and self._write_watch is None:
            self._watch_writes(-1)
        self._end_if_idle()

    def _watch_writes(self, seen: int) -> None:
        """Once the key is revoked, every :data:`REVOKED_WRITE_WAIT_S`: if one write has
        waited all that time for the client to read (one was waiting at the last look,
        ``seen`` writes done then, and none done since), the stream ends at once,
        UNAUTHENTICATED, its messages in flight cancelled and answers unwritten dropped
        (a revoked key's answers need not be delivered); else it looks again. A stream
        that is not ending holds no timer: the client's reading is its own affair."""
        if self._reading is None and (self._marking is None or self._marking.done()):
            return  # the stream has ended: nothing waits (its last look, or the mark's)
        waiting = self._writing.locked()
        if waiting and self._written == seen:
            self._cut = True
            self._context.set_trailing_metadata(((END_MARK, REVOKED_END),))
            if self._marking is not None:
                self._marking.cancel()
            self._stop_reading()
            return
        self._write_watch = asyncio.get_running_loop().call_later(
            REVOKED_WRITE_WAIT_S, self._watch_writes, self._written if waiting else -1
        )

    def _end_if_idle(self) -> None:
        if not self._ending or self._tasks or self._reading is None:
            return
        if not self._resends_unread:
            self._stop_reading()  # it waits for the client's next message: stop that
        elif self._marking is None:
            # The reader may be waiting for a message: cancelling it there would leave
            # gRPC's read of it pending, and the next read would fail at once (as EOF)
            # and end the stream under the client's writes. It goes on reading instead,
            # dropping what comes, until the client half-closes at the mark.
            self._marking = asyncio.create_task(self._mark_end())

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._end_if_idle()

    async def serve(self) -> None:
        context = self._context
        tasks = self._tasks
        self._reading = asyncio.current_task()
        self._end_if_idle()  # ended before it began
        aging = None
        half_closed = False  # the client sent all it will: nothing of its goes unanswered
        if self._max_age_s is not None:
            age_s = self._max_age_s * random.uniform(*AGE_JITTER)
            aging = asyncio.get_running_loop().call_later(age_s, self.end, AGE_END)
        try:
            while not self._ending or self._resends_unread:
                await self._window.acquire()
                await self._room.wait()
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    half_closed = True
                    break
                if self._ending and self._resends_unread:
                    self._window.release()  # unread: its client sends it again elsewhere
                    continue
                self._hold(len(raw))
                task = asyncio.create_task(self._serve_one(raw))
                tasks.add(task)
                task.add_done_callback(self._done)
            if tasks:  # the client is done sending: answer what is in flight
                await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            if not self._cut and (not self._ending or tasks):
                for pending in (self._marking, self._write_watch):
                    if pending is not None:
                        pending.cancel()
                raise  # the client left (or the call was cancelled)
            reading = asyncio.current_task()
            if reading is not None:
                reading.uncancel()  # ended by end(): a normal end of the stream
        finally:
            for timer in (aging, self._mark_wait):
                if timer is not None:
                    timer.cancel()
            self._reading = None
            for task in tasks:
                # Once: a second cancellation cuts short what a cancelled message
                # still waits for (the engine's word on its model, a forward pass).
                # A write waiting for the client ends at once, its answer's bytes freed.
                if not task.cancelling():
                    task.cancel()
        if self._marking is not None and not self._cut:
            # Ending: the mark is on its way (``_end_if_idle``), unless its write waits
            # for a revoked key's client until the stream is cut (``_watch_writes``).
            await asyncio.wait((self._marking,))
        if self._write_watch is not None:
            self._write_watch.cancel()
        if self._cut:
            raise Unauthenticated()
        if self._marking is not None:
            self._marking.result()  # nothing to raise: its write ends quietly (``_write``)
        if self._ending and not self._resends_unread and not half_closed:
            # Ended OK, tritonclient's stream would stay "active": the messages its
            # application writes next would go nowhere, unanswered, for ever.
            if self._end_reason == REVOKED_END:
                raise Unauthenticated()
            raise Unavailable("server is shutting down: this stream has ended")

    def check_key(self) -> None:
        """After a reload: a stream whose key (or certificate) no longer authenticates
        ends, once its messages in flight are answered (or a write of it has waited
        too long: :meth:`_watch_writes`), and gives back its place under
        ``server.max_tenant_streams`` (:meth:`_caller`)."""
        with contextlib.suppress(Unauthenticated):
            self._caller()

    async def _mark_end(self) -> None:
        """Write the end mark, the stream's last message (every message read is
        answered), then give the client :data:`END_MARK_WAIT_S` to half-close, which
        ends the reader; ending only then, no write of its is in flight as the status
        comes (grpc.aio would report it as INTERNAL, and drop the mark unread). What it
        writes meanwhile is dropped unread (it sends that again)."""
        mark = pb.ModelStreamInferResponse()
        mark.infer_response.parameters[END_MARK].string_param = self._end_reason
        written = await self._write(mark)
        # Its place is given back now: the client opens the next stream on the mark,
        # while this one waits for its half-close, and a tenant at its streams' cap
        # had the next one refused (the calls sent again on it failed with it). What
        # comes now is read only to be dropped, for END_MARK_WAIT_S at most.
        self._release()
        if written:
            loop = asyncio.get_running_loop()
            self._mark_wait = loop.call_later(END_MARK_WAIT_S, self._stop_reading)
        else:
            self._stop_reading()

    def _stop_reading(self) -> None:
        if self._reading is not None:
            self._reading.cancel()

    async def _serve_one(self, raw: bytes) -> None:
        """Answer one message and write the answer; its place in the window (and its
        bytes) are freed only once the answer is written, so a client that does not
        read its answers holds at most ``max_inflight`` of them, and about
        ``max_bytes``, here."""
        held = len(raw)
        unread, answer, tenant = self._unread, 0, ""
        try:
            response, answer, tenant = await self._answer(raw)  # taken: its tenant's
            del raw  # the answer is what waits to be written now
            self._hold(answer - held)
            held = answer
            await self._write(response)
        finally:
            if unread is not None:
                unread.release(tenant, answer)
            self._answers -= answer
            self._hold(-held)
            self._window.release()

    async def _write(self, message: pb.ModelStreamInferResponse) -> bool:
        """Write ``message``, one write at a time; False if gRPC could not send it: the
        call ended under the write (the client cancelled or left; grpc.aio says so only
        later), or the server stopped at the end of its grace (grpc.aio's
        ``_ServerStoppedError``: it was logged as an internal error, with a traceback,
        for each stream still open), and nothing is left to answer on: the message ends
        here, quietly."""
        async with self._writing:
            try:
                await self._context.write(message)
            except grpc.aio.BaseError:
                logger.debug("a stream's message was not written: the call ended")
                return False
            self._written += 1
        return True

    def _take(self, tenant: str, size: int) -> None:
        """Count an answer of ``size`` bytes for the stream and for ``tenant``'s unread
        answers; or refuse it (AnswersUnread), unless it is alone, where it would take
        the stream's unwritten answers past :data:`ANSWER_SLACK` times ``max_bytes`` or
        the tenant's past its own cap (``unread.py``). The stream stops reading at
        ``max_bytes`` (backpressure), but only as answers come: its messages in flight
        were all served while their answers did not count yet, and one stream of 200
        messages of 60 bytes, each answered 4 MiB, held 512 MiB."""
        if not size:
            return
        answers, cap = self._answers, ANSWER_SLACK * self._max_bytes
        if answers and answers + size > cap:
            self._observer.rejected(tenant, UNREAD_REASON)
            raise AnswersUnread(
                f"{answers} bytes of this stream's answers are not read yet by its "
                f"client (at most {cap}): read them before sending more",
                UNREAD_RETRY_S,
            )
        if self._unread is not None:
            self._unread.take(tenant, size)
        self._answers = answers + size

    def _hold(self, change: int) -> None:
        self._held += change
        if self._held > self._max_bytes:
            self._room.clear()
        else:
            self._room.set()

    def _caller(self) -> Tenant:
        """The stream's tenant, authenticated again when the tenants have changed."""
        snapshot = self._plane.tenant_snapshot
        if snapshot is not self._snapshot:
            self._snapshot = snapshot
            try:
                tenant: Tenant | None = self._authenticate()
            except Unauthenticated:
                tenant = None
            # A key given to another tenant is revoked for this stream's: served on as
            # the other, it held its first tenant's place under max_tenant_streams (that
            # tenant, with its new key, could open none) and one more of the other's.
            self._tenant = tenant if tenant is not None and tenant.id == self._opened_for else None
        if self._tenant is None:
            # Its stream ends (UNAUTHENTICATED; to a client that resends, OK and the
            # mark, and its new stream is refused): open, it held one of the tenant's
            # places under server.max_tenant_streams, which its new key then lacked.
            self.end(REVOKED_END)
            raise Unauthenticated()
        return self._tenant

    async def _answer(self, raw: bytes) -> tuple[pb.ModelStreamInferResponse, int, str]:
        """One message's answer, the bytes of its tensors (read from the outputs, not
        the message: reading its repeated bytes field copies each tensor) and the
        tenant they count for (the one its unread answers were checked for); never
        raises but for cancellation."""
        start = time.perf_counter()
        call = Call(None)
        code = "OK"
        busy = False
        request: pb.ModelInferRequest | None = None
        entered = inside = False
        try:
            call.tenant = tenant = self._caller()
            if self._unread is not None:
                self._unread.check(tenant.id)
            if self._cap is not None:
                self._cap.enter(self._door, tenant.id)
                entered = True
            if self._door is not None:
                await self._door.enter(tenant)
                inside = True
            request = parse(pb.ModelInferRequest, raw)
            current_request_id.set(request.id[:MAX_LOGGED_ID])
            response = await self._plane.infer(
                call,
                ProtoInferRequest(request, self._max_bytes_elements),
                self._context.time_remaining(),
            )
            answer = pb.ModelStreamInferResponse()
            encode_infer_response(response, into=answer.infer_response)
            answer.infer_response.parameters[FINAL_RESPONSE].bool_param = True
            self._take(tenant.id, response.nbytes)  # last: counted until written
            return answer, response.nbytes, tenant.id
        except MandantError as exc:
            code, busy = status_for(exc).name, isinstance(exc, ServerBusy)
            count_if_busy(self._observer, call.tenant.id if call.tenant is not None else "", exc)
            if request is None:  # refused before it was parsed (the cap, the door)
                request = _parsed(raw)
            return _error_response(str(exc), code, request, exc), 0, ""
        except asyncio.CancelledError:  # the client left, or the stream's deadline passed
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            request_id = current_request_id.get() or uuid.uuid4().hex[:16]
            logger.exception(
                "internal error serving a ModelStreamInfer message (request id %s)", request_id
            )
            message = INTERNAL_MESSAGE.format(request_id=request_id)
            if request is None:  # failed before it was parsed: still answer its id
                request = _parsed(raw)
            return _error_response(message, code, request, None), 0, ""
        finally:
            if entered and self._cap is not None:
                self._cap.leave()
            if inside and self._door is not None:
                self._door.leave(call.caller)
            code = client_saw(self._context, code)
            if self._resends_unread and code != "DEADLINE_EXCEEDED" and _timed_out(request, call):
                code = "DEADLINE_EXCEEDED"  # its caller gave up then (mandant_client)
            self._observer.request_finished(
                call.tenant.id if call.tenant is not None else "",
                call.model,
                code,
                time.perf_counter() - start,
                call.version,
                inference=True,
                owner=call.owner,
                busy=busy,
            )


def _timed_out(request: pb.ModelInferRequest | None, call: Call) -> bool:
    """Whether the message's v2 ``timeout`` (from ``call.arrived``, as the data plane
    counts it) has passed: a client that resends its unread messages (mandant_client's
    multiplexed calls) sets it to its call's time left and gives up on the message then,
    so that the figures count such a message as a unary call whose deadline passed."""
    if request is None or TIMEOUT_PARAM not in request.parameters:
        return False
    try:
        timeout_us = parameter_value(request.parameters[TIMEOUT_PARAM])
        deadline = request_deadline(call.arrived, None, call.arrived, timeout_us)
    except InvalidInput:  # the message was refused for it
        return False
    return deadline is not None and time.monotonic() >= deadline


def _error_response(
    message: str,
    code: str,
    request: pb.ModelInferRequest | None,
    exc: MandantError | None,
) -> pb.ModelStreamInferResponse:
    response = pb.ModelStreamInferResponse(error_message=message)
    answer = response.infer_response
    if request is not None:  # echo only what is short enough to be an id or a name
        answer.id = _bounded(request.id)
        answer.model_name = _bounded(request.model_name)
        answer.model_version = _bounded(request.model_version)
    answer.parameters[FINAL_RESPONSE].bool_param = True
    answer.parameters["status_code"].string_param = code
    if isinstance(exc, ResourceExhausted):
        (_, pushback_ms), *_ = trailers_for(exc)
        answer.parameters["retry_pushback_ms"].int64_param = int(pushback_ms)
    return response


def _parsed(raw: bytes) -> pb.ModelInferRequest | None:
    """The id and names of the message in ``raw``, for its error answer, read from its
    leading fields only (``naming_prefix``: serializers write them first), never by
    parsing it whole: it was refused unparsed (the cap, the door: parsing it would cost
    what the refusal saves) or refused while parsed (read again, it would cost as much
    again). None if they are not there (this runs where an answer is being made, and
    must not raise)."""
    try:
        parsed: pb.ModelInferRequest = pb.ModelInferRequest.FromString(naming_prefix(raw))
    except Exception:
        return None
    return parsed


def _bounded(text: str) -> str:
    """``text`` if it is no longer than an id may be (in bytes, as ids are bounded)."""
    return text if len(text) <= MAX_LOGGED_ID and len(text.encode()) <= MAX_LOGGED_ID else ""
