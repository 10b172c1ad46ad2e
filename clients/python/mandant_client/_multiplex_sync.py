"""The threaded multiplexer: concurrent ``Client.infer`` calls (from many threads) over
one stream.

One :class:`SyncStream` is one ``ModelStreamInfer`` call fed by an outbox (grpc's own
thread consumes it, stamping each message's time left as it takes it) and read by one
reader thread that resolves each pending future by wire id. When the call ends, for
any reason, every pending call fails with the call's typed error (for one message over
the server's limit, that call alone, see
:func:`mandant_client._multiplex.for_call`) and the next ``infer`` opens a new stream;
where the server ended it with OK, the calls it did not read are sent again on the new
stream (see :mod:`mandant_client._multiplex`).
One lock guards which stream is current, its pending calls and its failure, so that no
call is left waiting on a stream that has already ended. Once the client closes, every
call pending or to come fails Unavailable, and no stream opens again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from mandant_client import _multiplex
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._requests import Metadata, client_closed
from mandant_client.errors import (
    DeadlineExceeded,
    MandantClientError,
    ServerError,
    from_rpc_error,
)

_Answer = futures.Future[pb.ModelStreamInferResponse]
#: ``futures.TimeoutError`` is ``TimeoutError`` from Python 3.11 on, not on 3.10.
_TIMEOUTS = (TimeoutError, futures.TimeoutError)
_JOIN_TIMEOUT_S = 10.0


class SyncStream:
    """One open ``ModelStreamInfer`` call and the calls waiting on it. ``changed``: the
    condition (on the multiplexer's lock) every stream of the client waits on.
    ``previous``: the stream that ended for this one to open, whose unread calls go
    first (:func:`_multiplex.hold_s`; grpc's thread took the first message queued, often
    a newer call's)."""

    def __init__(
        self,
        stub: Any,
        metadata: Metadata,
        changed: threading.Condition,
        previous: SyncStream | None = None,
    ) -> None:
        self._lock = changed
        self._queued = changed  # an outbox took a message, a stream ended, a call came back
        self._outbox = _multiplex.Outbox()  # messages not written yet (under the lock)
        self._pending: dict[str, _Answer] = {}
        self._orders: dict[str, int] = {}  # the pending calls' order (wire id → order)
        self._previous = previous
        #: Set once (under the lock), when the call is over.
        self.failure: MandantClientError | None = None
        #: The server marked the stream's end (``_multiplex.END_MARK``): nothing more is
        #: written on it (its requests end: the client half-closes), and new calls go
        #: to a new stream.
        self.ending = False
        #: From the end mark: the calls then pending (the server read none of them) that
        #: their callers have not yet sent again, nor given up (wire id → order).
        self.resending: dict[str, int] = {}
        #: Messages the server has answered on this stream (it was serving; under the
        #: lock).
        self.answered = 0
        #: What the server reads at once (from its initial metadata) and what is
        #: written unanswered (under the lock): no more is written than it reads.
        self._window = _multiplex.Window()
        self._told = False  # the initial metadata came (or the call ended)
        self._call = stub.ModelStreamInfer(self._requests(), metadata=metadata)
        self._reader = threading.Thread(
            target=self._read, name="mandant-stream-reader", daemon=True
        )
        self._reader.start()

    def send(
        self,
        request: pb.ModelInferRequest,
        wire_id: str,
        order: int,
        deadline_s: float | None,
        size: int,
    ) -> _Answer:
        """Queue ``request``, whose call gives up at ``deadline_s`` (``size``: its bytes
        at most on the wire; the caller holds the lock and has checked ``failure``)."""
        answer: _Answer = futures.Future()
        self._pending[wire_id] = answer
        self._orders[wire_id] = order
        self._outbox.put(wire_id, _multiplex.Outgoing(request, deadline_s, order, size))
        if self._previous is not None:
            self._previous.resending.pop(wire_id, None)
        self._queued.notify_all()
        return answer

    def forget(self, wire_id: str, again: bool = False) -> None:
        """The caller stopped waiting: its message is not sent if it was not yet, and a
        late answer is dropped. ``again``: it sends the message again on a new stream
        (the stream after this one waits for it)."""
        with self._lock:
            self._pending.pop(wire_id, None)
            self._orders.pop(wire_id, None)
            # The message held back (``Window``) may have been this one.
            changed = self._outbox.discard(wire_id) and self._window.bounded
            if not again and self.resending.pop(wire_id, None) is not None:
                changed = True
            if changed:
                self._queued.notify_all()

    def _requests(self) -> Iterator[pb.ModelInferRequest]:
        """The messages, as grpc's thread takes them, oldest call first; ends (the
        client half-closes) once the call is over."""
        held_until = time.monotonic() + _multiplex.RESEND_WAIT_S
        # The first write waits for the initial metadata, as the async client's does.
        told_by = time.monotonic() + _multiplex.METADATA_WAIT_S
        outbox, window = self._outbox, self._window
        while True:
            with self._queued:
                while self.failure is None and not self.ending:
                    if not self._told and (metadata_s := told_by - time.monotonic()) > 0:
                        self._queued.wait(metadata_s)
                        continue
                    previous = self._previous
                    resending = previous.resending if previous is not None else {}
                    wait_s = _multiplex.hold_s(outbox, resending, held_until, time.monotonic())
                    first = outbox.first() if wait_s == 0.0 else None
                    if first is not None and window.fits(first.size):
                        break
                    # The server reads no more until it answers (``first`` too large),
                    # or the outbox waits (empty, or for the calls sent again).
                    self._queued.wait(wait_s if first is None else None)
                if self.failure is not None or self.ending:
                    return
                outgoing = outbox.pop()
                if not _multiplex.stamp(outgoing):
                    continue  # its caller gives up now: not sent
                window.wrote(outgoing.request.id, outgoing.size)
            yield outgoing.request

    def close(self) -> None:
        """Cancel the call; calls still pending fail with Unavailable."""
        self._fail(client_closed())
        self._call.cancel()
        if threading.current_thread() is not self._reader:
            self._reader.join(_JOIN_TIMEOUT_S)

    def _read(self) -> None:
        # Ended OK: every message the server read is answered.
        failure: MandantClientError = _multiplex.Unread(_multiplex.STREAM_ENDED)
        try:
            metadata: Any = ()
            try:
                metadata = self._call.initial_metadata()
            finally:
                with self._queued:
                    self._window.told(metadata)
                    self._told = True
                    self._queued.notify_all()
            for message in self._call:
                if _multiplex.is_end_mark(message):  # ended OK, whatever status follows
                    with self._queued:
                        self.ending = True
                        self.resending = dict(self._orders)
                        self._previous = None  # (no chain of every stream before)
                        self._queued.notify_all()  # the requests end: a half-close
                    continue
                with self._lock:  # not from a dict :meth:`_fail` has taken and reads
                    self.answered += 1
                    wire_id = _multiplex.answer_id(message)
                    self._window.answered(wire_id)
                    if self._window.bounded:
                        self._queued.notify_all()  # the requests may go on
                    answer = self._pending.pop(wire_id, None)
                    self._orders.pop(wire_id, None)
                if answer is not None:
                    answer.set_result(message)
        except grpc.RpcError as exc:
            failure = (
                _multiplex.Unread(_multiplex.STREAM_ENDED) if self.ending else from_rpc_error(exc)
            )
            failure.__cause__ = exc
        except Exception as exc:  # a malformed answer must not leave the callers waiting
            failure = ServerError(f"the stream failed ({type(exc).__name__})")
            failure.__cause__ = exc
        self._fail(failure)

    def _fail(self, failure: MandantClientError) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = failure
            pending, self._pending = self._pending, {}
            self._orders.clear()
            self._previous = None
            self._outbox.clear()
            self._queued.notify_all()  # lets grpc's request thread finish
        for answer in pending.values():
            answer.set_exception(self.failure)  # each caller raises its own copy


class SyncMultiplexer:
    """Sends each ``infer`` of one Client over its current stream, at most
    ``max_in_flight`` at once (other threads wait for a slot)."""

    def __init__(
        self, stub: Any, metadata: Metadata, max_in_flight: int, max_send_bytes: int | None
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._stub = stub
        self._metadata = (*metadata, _multiplex.RESENDS_UNREAD)
        self._max_send_bytes = max_send_bytes
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # what every stream waits on
        self._ids = _multiplex.WireIds()
        self._stream: SyncStream | None = None
        self._closed = False  # under the lock

    def open(self) -> SyncStream:
        """The open stream; a new one when there is none or the last one ended."""
        with self._lock:
            return self._current()

    def close(self) -> None:
        """Fail the calls pending on the stream; those waiting for a slot fail as they
        get one, in ``_current``."""
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def infer(
        self, request: pb.ModelInferRequest, raw_bytes: int, timeout_s: float | None
    ) -> pb.ModelInferResponse:
        """Send ``request`` (``raw_bytes``: the total of its ``raw_input_contents``) and
        wait for its answer."""
        request_id = request.id
        wire_id, order = self._ids.tag(request)
        started = time.monotonic()
        deadline_s = _multiplex.deadline(timeout_s, started)
        if not self._slots.acquire(timeout=timeout_s):
            raise _timed_out(timeout_s, request_id)
        try:
            left_s = _multiplex.time_left(timeout_s, started)
            size = _multiplex.ready(request, raw_bytes, left_s, self._max_send_bytes, request_id)
            idle_resends = 0
            while True:
                again = False
                with self._lock:
                    stream = self._current(request_id)
                    answer = stream.send(request, wire_id, order, deadline_s, size)
                try:
                    message = answer.result(_multiplex.seconds_to(deadline_s))
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

    def _current(self, request_id: str = "") -> SyncStream:
        if self._closed:
            raise client_closed(request_id)
        stream = self._stream
        if stream is None or stream.failure is not None or stream.ending:
            previous = stream if stream is not None and stream.resending else None
            stream = self._stream = SyncStream(self._stub, self._metadata, self._changed, previous)
        return stream


def _timed_out(timeout_s: float | None, request_id: str) -> DeadlineExceeded:
    return DeadlineExceeded(f"no answer on the stream within {timeout_s} s", request_id=request_id)
