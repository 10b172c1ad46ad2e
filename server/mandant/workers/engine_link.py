"""A front end's side of ``workers: N``: its one connection to the engine's Unix
socket, through which its data plane's inference calls run.

The front end has authenticated the caller and parsed the message; it hands on the
request's headers and one frame per input (the client's raw bytes as they are, or
typed ``contents`` decoded here) and awaits the answer. Requests, cancellations and
observer events of one event-loop turn leave in one message.

Liveness: the engine says whether it is ready when the connection opens and in answer
to a ping every ``ping_s``. While there is no connection (the engine died, or is
starting) calls are refused UNAVAILABLE at once, and the calls that were waiting on a
connection that closed fail UNAVAILABLE; the link reconnects every ``retry_s``. An
engine that is there but says nothing for ``silent_s`` (stopped, or its event loop
stuck) is treated as gone: the link closes the connection (its calls fail
UNAVAILABLE) and connects again, and until the engine answers calls are refused at
once instead of waiting on it. The engine, when it wakes, runs none of the calls it
reads then that the link had given up on (each message says from when: ``ipc``), and
cancels those it had started.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from mandant.context import current_request_id
from mandant.errors import ENGINE_DOWN, ENGINE_LOST, InvalidInput, Unavailable
from mandant.types import (
    DATATYPES,
    Call,
    EncodedRequest,
    InferResponse,
    TensorHeader,
    TensorSpec,
)
from mandant.workers import ipc
from mandant.workers.framing import Buffer, Gathered, MessageReader, encode

logger = logging.getLogger(__name__)

#: Longest an observer event waits for requests to ride with (metrics, not answers).
EVENTS_WAIT_S = 0.05
#: A pending call's answer: its header and its output frames.
Answer = tuple[list[Any], list[memoryview]]


class EngineLink:
    def __init__(
        self, path: Path, ping_s: float = 0.5, retry_s: float = 0.1, silent_s: float = 5.0
    ) -> None:
        self._path = path
        self._ping_s = ping_s
        self._retry_s = retry_s
        self._silent_s = silent_s
        self._rids = itertools.count(1)
        self._connection: _Connection | None = None
        self._engine_ready = False
        #: Whether this front end's gRPC port accepts calls (told to the engine with
        #: every ping: its HTTP port's /readyz waits for one that does).
        self.accepting = False
        self._connected = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        #: Set by :meth:`aclose`: the keeper ends even where a cancel is lost (Python
        #: 3.11's ``wait_for`` drops one that comes as the wait completes: the engine
        #: gone at that moment, a stopping front end waited for its keeper for good).
        self._closing = False

    @property
    def silent_s(self) -> float:
        """How long the engine may say nothing before this link gives up on it."""
        return self._silent_s

    @property
    def ping_s(self) -> float:
        return self._ping_s

    @property
    def up(self) -> bool:
        """Connected to the engine."""
        return self._connection is not None

    @property
    def ready(self) -> bool:
        """Connected, and the engine is ready to serve."""
        return self._connection is not None and self._engine_ready

    async def start(self, wait_s: float = 60.0) -> None:
        """Connect (and keep connecting); wait until the engine answers (at most
        ``wait_s``)."""
        self._keeper = asyncio.create_task(self._keep_connected(), name="engine-link")
        try:
            await asyncio.wait_for(self._connected.wait(), wait_s)
        except TimeoutError:
            await self.aclose()
            raise Unavailable(f"no inference engine answered at {self._path}") from None

    async def aclose(self) -> None:
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        if self._connection is not None:
            self._connection.close()

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                _, connection = await loop.create_unix_connection(
                    lambda: _Connection(self), str(self._path)
                )
            except OSError:
                await asyncio.sleep(self._retry_s)
                continue
            await connection.opened.wait()
            if connection.closed.is_set():  # it died as it answered (opened is set then)
                await asyncio.sleep(self._retry_s)
                continue
            self._connection = connection
            logger.info("inference engine connected")
            # Whether this process itself did not run for a while (stopped, its
            # container paused): the engine's answers are not read yet, so its
            # silence is not judged until the next ping's wait (healthy calls failed).
            stalled = False
            while not (connection.closed.is_set() or self._closing):
                connection.looked_at = loop.time()
                # Never before a time a message told the engine (``_Connection.promised``).
                give_up_at = max(connection.heard_at + self._silent_s, connection.promised)
                if not stalled and loop.time() > give_up_at:
                    logger.error(
                        "inference engine silent for %.1fs (stopped or stuck); closing its"
                        " connection",
                        self._silent_s,
                    )
                    connection.abort()
                    break
                connection.ping()
                waiting_from = loop.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(connection.closed.wait(), self._ping_s)
                stalled = loop.time() - waiting_from > 2 * self._ping_s
            self._connection = None
            self._engine_ready = False
            logger.error("inference engine connection lost; refusing calls until it is back")

    async def lost(self) -> None:
        """Until the connection to the engine in use now is gone (at once if there is
        none): closed, or given up on after the engine's silence."""
        connection = self._connection
        if connection is not None:
            await connection.closed.wait()

    def set_accepting(self, accepting: bool) -> None:
        """This front end's gRPC port accepts calls, or no longer does: the engine
        hears it now, not at the next ping."""
        self.accepting = accepting
        if self._connection is not None:
            self._connection.ping()

    def engine_status(self, ready: bool) -> None:
        """What the engine said of its readiness (on connecting, and each ping)."""
        self._engine_ready = bool(ready)
        self._connected.set()

    # -- calls ----------------------------------------------------------------------

    async def infer(
        self, call: Call, request: EncodedRequest, timeout_s: float | None
    ) -> InferResponse:
        """Run ``request`` of ``call.caller`` in the engine; ``call.model`` and
        ``call.version`` are set from the engine's answer."""
        connection = self._connection
        if connection is None:
            raise Unavailable(ENGINE_DOWN)
        # What a single process refuses while validating, after it resolved the model
        # (an unknown one is NOT_FOUND first), the engine raises there too.
        inputs_error = outputs_error = None
        try:
            inputs = request.input_headers()
        except InvalidInput as exc:
            inputs, inputs_error = (), str(exc)
        try:
            outputs = request.requested_outputs()
        except InvalidInput as exc:
            outputs, outputs_error = (), str(exc)
        if inputs_error is None:
            frames, deferred, to_decode, typed = _frames(request, inputs)
        else:
            frames, deferred, to_decode, typed = [], None, False, False
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
            outputs,
            inputs,
            timeout_s,
            call.arrived,
            deferred,
            to_decode,
            inputs_error,
            outputs_error,
            typed,
        )
        future = connection.send(header, frames)
        try:
            (_, model, version, error, outputs, owner), out_frames = await future
        except asyncio.CancelledError:
            last = connection.cancel(rid)
            if last is not None:
                await _resolved(call, last)
            raise
        call.model = model
        call.version = version
        call.owner = owner
        if error is not None:
            failure = ipc.unpack_error(error)
            if isinstance(failure, ipc.EngineFault):  # INTERNAL: quote the engine's log's id
                current_request_id.set(failure.request_id)
            raise failure
        return _response(model, version, request.request_id, outputs, out_frames)

    def report(self, event: str, *args: object) -> None:
        """Send an observer event to the engine (with the others of this loop turn);
        dropped while the engine is away."""
        if self._connection is not None:
            self._connection.report([event, *args])


class _Connection(asyncio.BufferedProtocol):
    """One connection to the engine: its pending calls and what to send this turn."""

    def __init__(self, link: EngineLink) -> None:
        self._link = link
        self._reader = MessageReader(self._message)
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        #: Answers that came for calls whose caller had just given up (their futures
        #: cancelled, the callers not yet resumed): :meth:`cancel` hands each over.
        self._answered_late: dict[int, list[Any]] = {}
        self._requests: list[object] = []
        self._frames = Gathered()
        self._cancels: list[int] = []
        self._events: list[list[object]] = []
        self._flushing = False
        self._events_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.opened = asyncio.Event()  # the engine's first STATUS arrived
        self.closed = asyncio.Event()
        #: When the engine last said something (the loop's clock).
        self.heard_at = self._loop.time()
        #: The latest give-up time a message told the engine (the loop's clock): the
        #: link does not give up on it before.
        self.promised = 0.0
        #: When the link last looked at the engine's silence (every ``ping_s``).
        self.looked_at = self._loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(Unavailable(ENGINE_LOST))
        self.closed.set()
        self.opened.set()  # nobody waits for a STATUS that cannot come

    def abort(self) -> None:
        """Close at once, dropping what waits to be sent (the engine does not read)."""
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Send what waits (a stopping front end's last observer events), then close."""
        if self._transport is not None:
            if self._events or self._requests or self._cancels:
                self._flush()
            self._transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._reader.buffer_updated(nbytes)

    # -- sending --------------------------------------------------------------------

    def send(self, header: ipc.RequestHeader, frames: list[Buffer]) -> asyncio.Future[Answer]:
        if self._transport is None:
            raise Unavailable(ENGINE_DOWN)
        future: asyncio.Future[Answer] = self._loop.create_future()
        self._pending[header.rid] = future
        self._requests.append(header.pack())
        if self._frames.add(frames):
            self._flush()
        else:
            self._schedule_flush()
        return future

    def cancel(self, rid: int) -> asyncio.Future[Answer] | None:
        """Cancel a pending call in the engine; the engine's last word on it (None:
        it was not pending). One the engine answered as its caller gave up is not
        cancelled: that answer is the last word."""
        last: asyncio.Future[Answer] = self._loop.create_future()
        if self._pending.pop(rid, None) is None:
            answer = self._answered_late.pop(rid, None)
            if answer is None:
                return None
            last.set_result((answer, []))
            return last
        self._pending[rid] = last
        self._cancels.append(rid)
        self._schedule_flush()
        return last

    def report(self, event: list[object]) -> None:
        """Events ride with the next requests, or leave within ``EVENTS_WAIT_S``."""
        self._events.append(event)
        if self._events_timer is None:
            self._events_timer = self._loop.call_later(EVENTS_WAIT_S, self._flush)

    def ping(self) -> None:
        if self._transport is not None:
            self._transport.writelines(encode(ipc.PING, [self._link.accepting]))

    def _schedule_flush(self) -> None:
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """This loop turn's requests, cancellations and events, in one message."""
        self._flushing = False
        if self._events_timer is not None:
            self._events_timer.cancel()
            self._events_timer = None
        parts = [self._requests, self._cancels, self._events]
        frames = self._frames.take()
        self._requests, self._cancels, self._events = [], [], []
        if self._transport is not None and any(parts):
            link, now = self._link, self._loop.time()
            give_up_at = self.heard_at + link.silent_s
            if now - self.looked_at > 2 * link.ping_s:
                # This process itself did not run (stopped, its container paused): it
                # sends, as it wakes, the calls that came meanwhile, before it hears
                # from the engine again; the engine refused them as given up on,
                # though nobody had judged its silence (the link does not count its
                # own stop). They get two pings' time, and the link keeps to it.
                give_up_at = max(give_up_at, now + 2 * link.ping_s)
                self.promised = max(self.promised, give_up_at)
            monotonic = time.monotonic() + give_up_at - now  # the host's clock, for the engine
            self._transport.writelines(encode(ipc.CALLS, [*parts, monotonic], frames))

    # -- receiving ------------------------------------------------------------------

    def _message(self, kind: int, payload: Any, frames: list[memoryview]) -> None:
        self.heard_at = self._loop.time()
        if kind == ipc.ANSWERS:
            offset = 0
            for answer in payload:
                count = len(answer[4])
                future = self._pending.pop(answer[0], None)
                if future is not None and not future.done():
                    future.set_result((answer, frames[offset : offset + count]))
                elif future is not None and future.cancelled():  # its caller gave up
                    self._answered_late[answer[0]] = answer
                offset += count
        elif kind == ipc.STATUS:
            (ready,) = payload
            self._link.engine_status(ready)
            self.opened.set()
        elif kind == ipc.SETTLE:  # a report is about to read the figures: send ours
            # In a later turn: the calls whose answers came in the same read finish
            # first (their handlers run in the next turn and report then), so that
            # "settled" covers every call answered before it was asked.
            self._loop.call_soon(self._settle, payload)

    def _settle(self, payload: Any) -> None:
        self._flush()
        if self._transport is not None:
            self._transport.writelines(encode(ipc.SETTLED, payload))


class RemoteObserver:
    """The :class:`~mandant.events.Observer` of a front end: every event (in practice
    the calls it answered) goes to the engine, which records it with the other front
    ends' (metrics, SLOs, statistics) — one view of the host."""

    def __init__(self, link: EngineLink) -> None:
        self._link = link

    def request_finished(
        self,
        tenant: str,
        model: str,
        code: str,
        duration_s: float,
        version: str = "",
        inference: bool = False,
        owner: str = "",
        busy: bool = False,
    ) -> None:
        self._link.report(
            "request_finished", tenant, model, code, duration_s, version, inference, owner, busy
        )

    def request_timing(self, tenant: str, model: str, queue_s: float, compute_s: float) -> None:
        self._link.report("request_timing", tenant, model, queue_s, compute_s)

    def batch_executed(
        self,
        model: str,
        size: int,
        compute_s: float,
        rows_by_tenant: Mapping[str, int],
        owner: str = "",
    ) -> None:
        self._link.report("batch_executed", model, size, compute_s, dict(rows_by_tenant), owner)

    def batch_failed(self, model: str, size: int, owner: str = "") -> None:
        self._link.report("batch_failed", model, size, owner)

    def admitted(self, tenant: str, model: str, rows: int) -> None:
        self._link.report("admitted", tenant, model, rows)

    def refunded(self, tenant: str, model: str, rows: int, admitted_at: float = 0.0) -> None:
        self._link.report("refunded", tenant, model, rows, admitted_at)

    def rejected(self, tenant: str, reason: str, model: str = "") -> None:
        self._link.report("rejected", tenant, reason, model)

    def store_error(self, store: str) -> None:
        self._link.report("store_error", store)

    def calls_gathered(self, calls: int) -> None:
        self._link.report("calls_gathered", calls)


async def _resolved(call: Call, last: asyncio.Future[Answer]) -> None:
    """Wait for the engine's last word on a call given up on: the model it had
    resolved, which the caller's report of the call names (SLOs count it). The engine
    answers a cancellation at once; a lost connection ends the wait."""
    with contextlib.suppress(Unavailable):
        (_, call.model, call.version, _, _, call.owner), _ = await last


def _frames(
    request: EncodedRequest, headers: Sequence[TensorHeader]
) -> tuple[list[Buffer], str | None, bool, bool]:
    """One frame per input of ``headers`` (the request's), or none and the reason it
    could not be done (raised later, in the engine), whether a single process finds
    that only when it decodes (after admission), and whether the frames are typed
    contents. The client's own bytes where it can be
    (:meth:`EncodedRequest.raw_inputs`, :meth:`EncodedRequest.typed_inputs`: BYTES
    are split once, in the engine, after admission), else the raw layout."""
    if any(header.datatype not in DATATYPES for header in headers):
        return [], "unknown datatype", False, False  # validation in the engine refuses it
    try:
        request.check_payload()
    except InvalidInput as exc:
        return [], str(exc), False, False
    raw = request.raw_inputs()
    if raw is not None:  # the frames already (numpy and back: 10–24 µs a call at c=1);
        return list(raw), None, False, False  # one per header: a name twice is validation's
    typed = request.typed_inputs()
    if typed is not None:
        return list(typed), None, False, True
    try:
        arrays = request.decode_inputs()
    except InvalidInput as exc:
        return [], str(exc), True, False
    if len(arrays) != len(headers):  # a name twice: validation refuses it first
        return [], "an input is given twice", False, False
    frames = [ipc.tensor_frame(arrays[h.name], h.datatype) for h in headers]
    return frames, None, False, False


def _response(
    model: str,
    version: str,
    request_id: str,
    outputs: list[list[Any]],
    frames: list[memoryview],
) -> InferResponse:
    arrays: dict[str, np.ndarray] = {}
    specs: list[TensorSpec] = []
    for (name, datatype, shape), frame in zip(outputs, frames, strict=True):
        header = TensorHeader(name, datatype, tuple(shape))
        arrays[name] = ipc.decode_frame(frame, header)
        specs.append(TensorSpec(name, datatype, header.shape))
    return InferResponse(model, version, request_id, arrays, tuple(specs))
