"""The asyncio multiplexer: concurrent ``AsyncClient.infer`` calls over one stream.

One :class:`AioStream` is one ``ModelStreamInfer`` call with a writer task (grpc allows
one write at a time, and a caller's cancellation must not cancel the whole call) and a
reader task that resolves each pending future by wire id. When the call ends, for any
reason, every pending call fails with the call's typed error (UNAUTHENTICATED for a bad
key, UNAVAILABLE when the server goes away; for one message over the server's limit,
that call alone, see :func:`mandant_client._multiplex.for_call`) and the next ``infer``
opens a new stream; where the server ended it with OK, the calls it did not read are
sent again on the new stream (see :mod:`mandant_client._multiplex`).
Once the client closes, every call pending or to come fails Unavailable, and no stream
opens again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc

from mandant_client import _multiplex
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._requests import Metadata, client_closed
from mandant_client.errors import DeadlineExceeded, MandantClientError, ServerError, Unavailable

_Answer = asyncio.Future[pb.ModelStreamInferResponse]
#: ``asyncio.TimeoutError`` is ``TimeoutError`` from Python 3.11 on, not on 3.10.
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)


class AioStream:
    """One open ``ModelStreamInfer`` call and the calls waiting on it. ``previous``: the
    stream that ended for this one to open, whose unread calls go first
    (:func:`_multiplex.hold_s`)."""

    def __init__(self, stub: Any, metadata: Metadata, previous: AioStream | None = None) -> None:
        self._call = stub.ModelStreamInfer(metadata=metadata)
        self._loop = asyncio.get_running_loop()
        self._outbox = _multiplex.Outbox()  # messages not written yet
        self._queued = asyncio.Event()  # set when the outbox may hold a message
        self._pending: dict[str, _Answer] = {}
        self._orders: dict[str, int] = {}  # the pending calls' order (wire id → order)
        self._previous = previous
        self._next: AioStream | None = None  # the stream that opened after this one ended
        if previous is not None:
            previous._next = self
        #: From the end mark: the calls then pending (the server read none of them) that
        #: their callers have not yet sent again, nor given up (wire id → order).
        self.resending: dict[str, int] = {}
        #: Set once, when the call is over; the stream takes no message after that.
        #: A RuntimeError is the caller's misuse (a channel of another event loop),
        #: raised to each pending call as the unary path raises it.
        self.failure: MandantClientError | RuntimeError | None = None
        self._first_status: MandantClientError | None = None
        self._ended_ok = False
        #: The server marked the stream's end (``_multiplex.END_MARK``): nothing more is
        #: written on it, and new calls go to a new stream.
        self.ending = False
        #: Messages the server has answered on this stream (it was serving).
        self.answered = 0
        #: What the server reads at once (from its initial metadata) and what is
        #: written unanswered: the writer writes no more than it reads.
        self._window = _multiplex.Window()
        #: The writer waits for an answer: the server reads no more for now.
        self._full = False
        self._call.add_done_callback(self._on_done)
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    def send(
        self,
        request: pb.ModelInferRequest,
        wire_id: str,
        order: int,
        deadline_s: float | None,
        size: int,
    ) -> _Answer:
        """Queue ``request`` (its call gives up at ``deadline_s``; ``size``: its bytes at
        most on the wire); the future gets the server's answer to it."""
        answer: _Answer = self._loop.create_future()
        self._pending[wire_id] = answer
        self._orders[wire_id] = order
        self._outbox.put(wire_id, _multiplex.Outgoing(request, deadline_s, order, size))
        if self._previous is not None:
            self._previous.resending.pop(wire_id, None)
        self._queued.set()
        return answer

    def forget(self, wire_id: str, again: bool = False) -> None:
        """The caller stopped waiting: its message is not sent if it was not yet, and a
        late answer is dropped. ``again``: it sends the message again on a new stream
        (the stream after this one waits for it)."""
        self._pending.pop(wire_id, None)
        self._orders.pop(wire_id, None)
        if self._outbox.discard(wire_id) and self._full:
            self._queued.set()  # the message held back may have been this one
        if not again and self.resending.pop(wire_id, None) is not None and self._next:
            self._next._queued.set()

    def abandon(self) -> None:
        """Cancel the call without waiting for its tasks to end; calls still pending
        fail with Unavailable."""
        self._fail(client_closed())
        self._call.cancel()

    async def aclose(self) -> None:
        """:meth:`abandon`, and wait for the stream's tasks to end."""
        self.abandon()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)

    async def _write(self) -> None:
        # Mandant sends the stream's initial metadata once it accepts the key; writing
        # only after it keeps a write from racing a refusal, which grpc.aio would report
        # as INTERNAL instead of UNAUTHENTICATED (grpc/grpc#36066). Other servers
        # (Triton, a plain grpc.aio servicer) send it with their first answer: after
        # METADATA_WAIT_S without it, the first message goes anyway.
        # It says how many messages, and bytes, it reads at once, whenever its metadata
        # comes: no more are written unanswered from then on (``_multiplex.Window``).
        told = asyncio.ensure_future(self._call.initial_metadata())
        told.add_done_callback(self._told)
        try:
            await asyncio.wait_for(asyncio.shield(told), _multiplex.METADATA_WAIT_S)
        except _TIMEOUTS:
            pass
        except (grpc.RpcError, asyncio.InvalidStateError):
            return  # the call is over; the reader reports why
        outbox, window = self._outbox, self._window
        held_until = self._loop.time() + _multiplex.RESEND_WAIT_S
        while True:
            if self.ending:  # the server reads no more: say so, and let it end
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    await self._call.done_writing()
                return
            previous = self._previous
            resending = previous.resending if previous is not None else {}
            wait_s = _multiplex.hold_s(outbox, resending, held_until, self._loop.time())
            if wait_s != 0.0:
                self._queued.clear()
                with contextlib.suppress(*_TIMEOUTS):
                    await asyncio.wait_for(self._queued.wait(), wait_s)
                continue
            first = outbox.first()
            if first is not None and not window.fits(first.size):
                self._full = True  # until the reader has an answer (or a call gives up)
                self._queued.clear()
                await self._queued.wait()
                continue
            outgoing = outbox.pop()
            if not _multiplex.stamp(outgoing):
                continue  # its caller gives up now: not worth the server's time
            window.wrote(outgoing.request.id, outgoing.size)
            try:
                await self._call.write(outgoing.request)
            except (grpc.RpcError, asyncio.InvalidStateError):
                return  # the call is over; the reader reports why

    async def _read(self) -> None:
        failure: MandantClientError | RuntimeError = Unavailable(_multiplex.STREAM_ENDED)
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:  # ended OK: every message read is answered
                    failure = _multiplex.Unread(_multiplex.STREAM_ENDED)
                    break
                if _multiplex.is_end_mark(message):  # ended OK, whatever status follows
                    self._ended_ok = self.ending = True
                    self.resending = dict(self._orders)
                    self._previous = None  # (no chain of every stream before)
                    self._queued.set()  # the writer half-closes
                    continue
                self.answered += 1
                wire_id = _multiplex.answer_id(message)
                self._window.answered(wire_id)
                if self._full:
                    self._full = False
                    self._queued.set()  # the writer may write again
                self._orders.pop(wire_id, None)
                answer = self._pending.pop(wire_id, None)
                if answer is not None and not answer.done():
                    answer.set_result(message)
        except grpc.RpcError as exc:
            if not self._ended_ok:
                # The call's done callback (``_on_done``: the server's own status) may
                # not have run yet when the read fails: wait for the call to be over.
                with contextlib.suppress(Exception):
                    await self._call.code()
            if self._ended_ok:  # a write found the call over (grpc/grpc#36066)
                failure = _multiplex.Unread(_multiplex.STREAM_ENDED)
                failure.__cause__ = exc
            else:
                failure = _multiplex.stream_failure(self._first_status, exc)
        except RuntimeError as exc:  # grpc.aio's word for a channel of another loop
            failure = exc
        except Exception as exc:  # a malformed answer must not leave the callers waiting
            failure = ServerError(f"the stream failed ({type(exc).__name__})")
            failure.__cause__ = exc
        except asyncio.CancelledError:
            failure = Unavailable("the stream was cancelled")
        self._fail(failure)

    def _told(self, told: asyncio.Future[Any]) -> None:
        """The stream's initial metadata came (or the call ended without it)."""
        if not told.cancelled() and told.exception() is None:
            self._window.told(told.result())

    def _on_done(self, call: Any) -> None:
        # grpc.aio replaces the server's status with INTERNAL "Internal error from Core"
        # when a write was in flight as the call ended (grpc/grpc#36066), e.g. messages
        # sent while the server refuses the key. Done callbacks run on the first status,
        # the server's, so keep it here.
        self._first_status = _multiplex.status_error(call)
        self._ended_ok = self._ended_ok or _multiplex.ended_ok(call)  # (or marked)

    def _fail(self, failure: MandantClientError | RuntimeError) -> None:
        if self.failure is None:
            self.failure = failure
        self._writer.cancel()
        self._orders.clear()
        self._previous = None
        pending, self._pending = self._pending, {}
        for answer in pending.values():
            if not answer.done():
                answer.set_exception(self.failure)  # each caller raises its own copy


class AioMultiplexer:
    """Sends each ``infer`` of one AsyncClient over its current stream, at most
    ``max_in_flight`` at once (the rest wait for a slot instead of piling up)."""

    def __init__(
        self, stub: Any, metadata: Metadata, max_in_flight: int, max_send_bytes: int | None
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._stub = stub
        self._metadata = (*metadata, _multiplex.RESENDS_UNREAD)
        self._max_send_bytes = max_send_bytes
        self._slots = asyncio.Semaphore(max_in_flight)
        self._ids = _multiplex.WireIds()
        self._stream: AioStream | None = None
        self._closed = False

    def open(self, request_id: str = "") -> AioStream:
        """The open stream; a new one when there is none or the last one ended."""
        if self._closed:
            raise client_closed(request_id)
        stream = self._stream
        if stream is None or stream.failure is not None or stream.ending:
            previous = stream if stream is not None and stream.resending else None
            stream = self._stream = AioStream(self._stub, self._metadata, previous)
        return stream

    async def aclose(self) -> None:
        """Fail the calls pending on the stream; those waiting for a slot fail as they
        get one, in :meth:`open`."""
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()

    def abandon(self) -> None:
        """:meth:`aclose` without waiting: for a client collected unclosed, whose
        stream's tasks would keep the stream open (and its place among the tenant's
        streams on the server) for as long as the event loop runs."""
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abandon()

    async def infer(
        self, request: pb.ModelInferRequest, raw_bytes: int, timeout_s: float | None
    ) -> pb.ModelInferResponse:
        """Send ``request`` (``raw_bytes``: the total of its ``raw_input_contents``) and
        wait for its answer."""
        request_id = request.id
        wire_id, order = self._ids.tag(request)
        started = time.monotonic()
        deadline_s = _multiplex.deadline(timeout_s, started)
        if not self._slots.locked():
            await self._slots.acquire()
        else:
            try:
                await asyncio.wait_for(self._slots.acquire(), timeout_s)
            except _TIMEOUTS:
                raise _timed_out(timeout_s, request_id) from None
        try:
            left_s = _multiplex.time_left(timeout_s, started)
            size = _multiplex.ready(request, raw_bytes, left_s, self._max_send_bytes, request_id)
            idle_resends = 0
            while True:
                again = False
                stream = self.open(request_id)
                answer = stream.send(request, wire_id, order, deadline_s, size)
                try:
                    message = await asyncio.wait_for(answer, _multiplex.seconds_to(deadline_s))
                    break
                except _TIMEOUTS:
                    raise _timed_out(timeout_s, request_id) from None
                except MandantClientError as failure:  # the whole stream's
                    if isinstance(failure, _multiplex.Unread) and (
                        stream.answered or idle_resends < _multiplex.MAX_IDLE_RESENDS
                    ):  # never read: send it again, on a new stream
                        idle_resends += not stream.answered
                        again = True
                        continue
                    error = _multiplex.for_call(failure, request_id, request, raw_bytes)
                    raise error from failure.__cause__
                finally:
                    stream.forget(wire_id, again)
        finally:
            self._slots.release()
        return _multiplex.outcome(message, request_id)


def _timed_out(timeout_s: float | None, request_id: str) -> DeadlineExceeded:
    return DeadlineExceeded(f"no answer on the stream within {timeout_s} s", request_id=request_id)
