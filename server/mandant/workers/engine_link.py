"""A front end's side of ``workers: N``: its one connection to the engine (a ZeroMQ
DEALER socket), through which its data plane's inference calls run.

The front end has authenticated the caller and parsed the message; it hands on the
request's headers and one frame per input (the client's raw bytes as they are, or
typed ``contents`` decoded here) and awaits the answer. Requests, cancellations and
reports of one event-loop turn leave in one message each.

Liveness: a heartbeat every ``heartbeat_s``; an engine silent for ``timeout_s`` is
down: the calls waiting on it fail UNAVAILABLE and new ones are refused UNAVAILABLE
until it answers again. An engine that answers with a new incarnation was restarted:
what was sent to the old one is lost, so those calls fail UNAVAILABLE too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zmq

from mandant.errors import InvalidInput, Unavailable
from mandant.types import (
    DATATYPES,
    Call,
    EncodedRequest,
    InferResponse,
    TensorHeader,
    TensorSpec,
)
from mandant.workers import ipc

logger = logging.getLogger(__name__)

_DOWN = "the inference engine is not reachable; retry shortly"
_RESTARTED = "the inference engine restarted while serving this call; retry"


class EngineLink:
    def __init__(self, address: str, heartbeat_s: float = 0.2, timeout_s: float = 1.5) -> None:
        self._address = address
        self._heartbeat_s = heartbeat_s
        self._timeout_s = timeout_s
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[list[Any], list[zmq.Frame]]]] = {}
        self._requests: list[object] = []
        self._frames: list[ipc.Buffer] = []
        self._cancels: list[int] = []
        self._events: list[list[object]] = []
        self._flushing = False
        self._up = False
        self._engine_ready = False
        self._incarnation: str | None = None
        self._last_reply = 0.0
        self._beat: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def up(self) -> bool:
        """The engine answers heartbeats."""
        return self._up

    @property
    def ready(self) -> bool:
        """The engine answers and is ready to serve."""
        return self._up and self._engine_ready

    async def start(self, wait_s: float = 60.0) -> None:
        """Connect, and wait until the engine answers (at most ``wait_s``)."""
        sock = self._socket
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queued for an engine not connected
        sock.connect(self._address)
        self._loop = loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._drain)
        self._beat = loop.create_task(self._heartbeat(), name="engine-heartbeat")
        try:
            await asyncio.wait_for(self._connected.wait(), wait_s)
        except TimeoutError:
            await self.aclose()
            raise Unavailable(f"no inference engine answered at {self._address}") from None

    async def aclose(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None
        if self._loop is not None:
            self._loop.remove_reader(self._socket.fileno())
            self._loop = None
        self._fail_pending(_DOWN)
        self._socket.close(linger=0)
        self._context.term()

    # -- calls ----------------------------------------------------------------------

    async def infer(
        self, call: Call, request: EncodedRequest, timeout_s: float | None
    ) -> InferResponse:
        """Run ``request`` of ``call.caller`` in the engine; ``call.model`` and
        ``call.version`` are set from the engine's answer."""
        if not self._up or self._loop is None:
            raise Unavailable(_DOWN)
        frames, deferred, to_decode = _frames(request)
        try:
            parameters = request.parameters()
        except InvalidInput as exc:  # found before a decode error, after a size error
            parameters, frames = {}, []
            if deferred is None or to_decode:
                deferred, to_decode = str(exc), False
        rid = next(self._rids)
        header = ipc.RequestHeader(
            rid,
            call.caller.id,
            request.model_name,
            request.model_version,
            request.request_id,
            parameters,
            request.requested_outputs(),
            request.input_headers(),
            timeout_s,
            deferred,
            to_decode,
        )
        future: asyncio.Future[tuple[list[Any], list[zmq.Frame]]] = self._loop.create_future()
        self._pending[rid] = future
        self._requests.append(header.pack())
        self._frames.extend(frames)
        self._schedule_flush()
        try:
            (_, model, version, error, outputs), out_frames = await future
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is not None:
                await self._abandon(call, rid)
            raise
        call.model = model
        call.version = version
        if error is not None:
            raise ipc.unpack_error(error)
        return _response(model, version, request.request_id, outputs, out_frames)

    async def _abandon(self, call: Call, rid: int) -> None:
        """Cancel a call in the engine, and wait for its last word on it: the model it
        had resolved, which the caller's report of the call names (the engine answers a
        cancellation at once; a lost engine fails the wait)."""
        assert self._loop is not None
        last: asyncio.Future[tuple[list[Any], list[zmq.Frame]]] = self._loop.create_future()
        self._pending[rid] = last
        self._cancels.append(rid)
        self._schedule_flush()
        try:
            (_, call.model, call.version, *_), _ = await last
        except Exception:  # Unavailable: the engine went away; the model stays unknown
            pass
        finally:
            self._pending.pop(rid, None)

    def report(self, event: str, *args: object) -> None:
        """Send an observer event to the engine (with the others of this loop turn)."""
        self._events.append([event, *args])
        self._schedule_flush()

    # -- sending --------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flushing and self._loop is not None:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if self._requests:
            requests, self._requests = self._requests, []
            frames, self._frames = self._frames, []
            if not self._send([ipc.REQUESTS, ipc.packb(requests), *frames]):
                for fields in requests:
                    self._fail(fields[0], _DOWN)  # type: ignore[index]
        if self._cancels:
            cancels, self._cancels = self._cancels, []
            self._send([ipc.CANCEL, ipc.packb(cancels)])
        if self._events:
            events, self._events = self._events, []
            self._send([ipc.EVENTS, ipc.packb(events)])
        self._drain()  # a send may have taken the socket's read edge

    def _send(self, parts: Sequence[ipc.Buffer]) -> bool:
        try:
            self._socket.send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.Again:  # no engine connected
            return False
        return True

    # -- receiving ------------------------------------------------------------------

    def _drain(self) -> None:
        sock = self._socket
        while ipc.readable(sock):
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            kind = parts[0].bytes
            if kind == ipc.ANSWERS:
                self._answers(ipc.unpackb(parts[1].buffer), parts[2:])
            elif kind == ipc.HEARTBEAT:
                incarnation, ready = ipc.unpackb(parts[1].buffer)
                self._alive(incarnation, ready)

    def _answers(self, answers: list[list[Any]], frames: Sequence[zmq.Frame]) -> None:
        offset = 0
        for answer in answers:
            count = len(answer[4])
            future = self._pending.pop(answer[0], None)
            if future is not None and not future.done():
                future.set_result((answer, list(frames[offset : offset + count])))
            offset += count

    def _alive(self, incarnation: str, ready: bool) -> None:
        assert self._loop is not None
        self._last_reply = self._loop.time()
        if self._incarnation is not None and incarnation != self._incarnation:
            logger.warning("the inference engine restarted; failing the calls sent to it")
            self._fail_pending(_RESTARTED)
        if not self._up:
            logger.info("inference engine reachable")
        self._incarnation = incarnation
        self._up = True
        self._engine_ready = bool(ready)
        self._connected.set()

    async def _heartbeat(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while True:
            self._send([ipc.HEARTBEAT])
            await asyncio.sleep(self._heartbeat_s)
            self._drain()
            silent = loop.time() - self._last_reply > self._timeout_s
            if self._up and silent:
                logger.error("the inference engine stopped answering; refusing calls")
                self._up = False
                self._fail_pending(_DOWN)

    def _fail(self, rid: int, message: str) -> None:
        future = self._pending.pop(rid, None)
        if future is not None and not future.done():
            future.set_exception(Unavailable(message))

    def _fail_pending(self, message: str) -> None:
        for rid in list(self._pending):
            self._fail(rid, message)


class RemoteObserver:
    """The :class:`~mandant.events.Observer` of a front end: every event (in practice
    the calls it answered) goes to the engine, which records it with the other front
    ends' (metrics, SLOs, statistics) — one view of the host."""

    def __init__(self, link: EngineLink) -> None:
        self._link = link

    def request_finished(
        self, tenant: str, model: str, code: str, duration_s: float, version: str = ""
    ) -> None:
        self._link.report("request_finished", tenant, model, code, duration_s, version)

    def request_timing(self, tenant: str, model: str, queue_s: float, compute_s: float) -> None:
        self._link.report("request_timing", tenant, model, queue_s, compute_s)

    def batch_executed(
        self, model: str, size: int, compute_s: float, rows_by_tenant: Mapping[str, int]
    ) -> None:
        self._link.report("batch_executed", model, size, compute_s, dict(rows_by_tenant))

    def batch_failed(self, model: str, size: int) -> None:
        self._link.report("batch_failed", model, size)

    def admitted(self, tenant: str, model: str, rows: int) -> None:
        self._link.report("admitted", tenant, model, rows)

    def refunded(self, tenant: str, model: str, rows: int) -> None:
        self._link.report("refunded", tenant, model, rows)

    def rejected(self, tenant: str, reason: str) -> None:
        self._link.report("rejected", tenant, reason)

    def inflight_changed(self, tenant: str, delta: int) -> None:
        self._link.report("inflight_changed", tenant, delta)

    def store_error(self, store: str) -> None:
        self._link.report("store_error", store)


def _frames(request: EncodedRequest) -> tuple[list[ipc.Buffer], str | None, bool]:
    """One frame per input in the raw layout (views where the client sent raw bytes),
    or none, the reason it could not be done (raised later, in the engine), and
    whether a single process finds that only when it decodes (after admission)."""
    headers = request.input_headers()
    if any(header.datatype not in DATATYPES for header in headers):
        return [], "unknown datatype", False  # validation in the engine refuses it first
    try:
        request.check_payload()
    except InvalidInput as exc:
        return [], str(exc), False
    try:
        arrays = request.decode_inputs()
    except InvalidInput as exc:
        return [], str(exc), True
    if len(arrays) != len(headers):  # a name twice: validation refuses it first
        return [], "an input is given twice", False
    return [ipc.tensor_frame(arrays[h.name], h.datatype) for h in headers], None, False


def _response(
    model: str,
    version: str,
    request_id: str,
    outputs: list[list[Any]],
    frames: list[zmq.Frame],
) -> InferResponse:
    arrays: dict[str, np.ndarray] = {}
    specs: list[TensorSpec] = []
    for (name, datatype, shape), frame in zip(outputs, frames, strict=True):
        header = TensorHeader(name, datatype, tuple(shape))
        arrays[name] = ipc.decode_frame(frame.buffer, header)
        specs.append(TensorSpec(name, datatype, header.shape))
    return InferResponse(model, version, request_id, arrays, tuple(specs))
