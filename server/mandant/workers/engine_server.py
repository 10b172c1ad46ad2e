"""The engine's side of ``workers: N``: a Unix socket every front end connects to
(``ipc.py`` says what travels on it, ``framing.py`` how).

Each request runs as the single-process server runs it, through the engine's own
:meth:`DataPlane.infer` — resolution, validation, admission, the fair batcher and the
model — so fair shares, token buckets, quotas and concurrency caps are those of one
process, whatever the number of front ends. Answers of one event-loop turn go back to
each front end in one message. The observer events a front end sends (the calls it
answered) are recorded once the answers of the turn they came in are written, so that
an answer ready in the turn its call came (a model run inline, as ``echo``) does not
wait on the bookkeeping of the calls before it (at concurrency 1, each call's events
ride with the next call). A front end that gives up on a call (its client left or its
deadline passed) sends a cancellation: the call leaves its queue and frees its
concurrency slot, and the front end is told at once which model the call had resolved
to (what its report of the call names: SLOs count it). When a front end's connection
closes (it died), its calls are cancelled the same way.

Stopping, the engine refuses new calls of the front ends still taking calls
(UNAVAILABLE: retry), serves those of the front ends that stop too (calls they
accepted), and gives all that ``grace_s`` before it closes the front ends' connections
(:meth:`EngineServer.drain`). The supervisor stops the front ends first, so none is
left by then; but a SIGTERM can reach the engine itself (``kill`` of its pid, a service
manager signalling every process of the service at once), and then every call it had
failed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from mandant.context import current_request_id, current_tenant
from mandant.errors import (
    ENGINE_LOST,
    FailedPrecondition,
    MandantError,
    Unauthenticated,
    Unavailable,
)
from mandant.events import Observer
from mandant.service import MAX_REQUEST_ID_BYTES, DataPlane
from mandant.types import Call, Tenant
from mandant.workers import ipc
from mandant.workers.framing import Buffer, Gathered, MessageReader, encode

logger = logging.getLogger(__name__)

#: The largest answer a front end is handed (what one gRPC message can carry): a
#: message's length prefix is a u32, and an answer of 4 GiB overflowed it, failing
#: every answer of its message, none of them ever answered.
MAX_ANSWER_BYTES = (1 << 31) - 1
#: A front end pings every 0.5 s (``EngineLink``). One not heard for ``FRESH_S`` no
#: longer counts as accepting calls (``/readyz``); one silent for ``SILENT_S`` (stopped,
#: or its event loop stuck) is killed, for the supervisor to start again: its listening
#: socket kept taking its share of new connections, which nobody answered, and
#: ``/readyz`` said ready with every front end stopped.
FRESH_S = 2.0
SILENT_S = 10.0
#: Longest a report waits for the front ends' observer events (``EngineServer.settle``):
#: a stuck front end holds no report up for longer.
SETTLE_WAIT_S = 1.0
#: The observer events a front end may report (``RemoteObserver``): the Observer's.
FORWARDED_EVENTS = frozenset(name for name in dir(Observer) if not name.startswith("_"))


class EngineServer:
    """``path``: the Unix socket to listen on. ``tenants``: the current tenant of an id
    (the engine's directory: a tenant a reload removed is refused even if a front end
    has not reloaded yet). ``events``: where the calls the front ends answered are
    reported (metrics, SLOs, statistics)."""

    def __init__(
        self,
        plane: DataPlane,
        tenants: Callable[[str], Tenant | None],
        events: Observer,
        path: Path,
        max_bytes_elements: int,
    ) -> None:
        self.plane = plane
        self.tenants = tenants
        self.events = events
        self.max_bytes_elements = max_bytes_elements
        self._path = path
        self._server: asyncio.AbstractServer | None = None
        self._peers: set[_FrontEnd] = set()
        self._watch: asyncio.Task[None] | None = None
        #: The SETTLE round running, and the one the reports that came since wait for.
        self._round: asyncio.Future[None] | None = None
        self._next_round: asyncio.Future[None] | None = None
        self.stopping = False  # new calls are refused (:meth:`drain`)
        self._drained: asyncio.Event | None = None  # set once none is in progress

    async def start(self) -> None:
        if self._path.exists():  # left by an engine that was killed
            self._path.unlink()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _FrontEnd(self), str(self._path))
        os.chmod(self._path, 0o600)
        self._watch = asyncio.create_task(self._watch_peers(), name="front-end watch")

    async def _watch_peers(self) -> None:
        """Kill a front end silent for :data:`SILENT_S` (see there). Not in a round
        that comes late: this process itself did not run meanwhile (stopped, its
        container paused), and what the front ends sent is not read yet (the timer
        runs before the reads): it killed every healthy front end after a 12 s stop."""
        loop = asyncio.get_running_loop()
        while True:
            asleep_from = loop.time()
            await asyncio.sleep(FRESH_S / 2)
            if loop.time() - asleep_from > FRESH_S:
                continue
            for peer in list(self._peers):
                silent_s = loop.time() - peer.heard_at
                if silent_s > SILENT_S and peer.pinged and peer.pid is not None:
                    logger.error(
                        "front end (pid %d) silent for %.1fs (stopped or stuck): killing it"
                        " for the supervisor to start again",
                        peer.pid,
                        silent_s,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(peer.pid, signal.SIGKILL)
                    peer.close()

    async def settle(self) -> None:
        """Until every front end has sent the observer events of the calls it has
        answered (they ride with its next requests, or leave within
        ``EVENTS_WAIT_S``): a usage report or ModelStatistics read after that counts
        every call whose client has its answer. At most ``SETTLE_WAIT_S`` a round.

        Reports at once share rounds: one round (a SETTLE to each front end) runs at a
        time; a report that comes while one runs waits for the next, which starts
        after it (a round that started before the report might miss its calls), and
        every report that comes meanwhile shares that next round."""
        if self._next_round is None:
            self._next_round = asyncio.ensure_future(self._round_after(self._round))
        await asyncio.shield(self._next_round)

    async def _round_after(self, running: asyncio.Future[None] | None) -> None:
        if running is not None:
            await asyncio.wait([running])
        self._round, self._next_round = self._next_round, None
        try:
            waits = [peer.settle() for peer in self._peers if peer.pinged]
            if waits:
                await asyncio.wait(waits, timeout=SETTLE_WAIT_S)
        finally:
            if self._round is asyncio.current_task():
                self._round = None

    @property
    def in_flight(self) -> int:
        return sum(len(peer.tasks) for peer in self._peers)

    @property
    def accepting(self) -> bool:
        """Whether a front end's gRPC port accepts calls (they start after the engine,
        and stop before it)."""
        return any(peer.accepting for peer in self._peers)

    async def drain(self, grace_s: float) -> None:
        """Refuse new calls of the front ends still taking calls; serve the ones that
        stop theirs (calls they accepted may come yet) until they have gone; wait up to
        ``grace_s`` for that and for the calls in progress (module doc)."""
        self.stopping = True
        if not self._idle():
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace_s)

    def ended(self) -> None:
        """A call in progress ended, a front end left, or one stopped taking calls."""
        if self._drained is not None and self._idle():
            self._drained.set()

    def _idle(self) -> bool:
        """No call in progress, and no front end that stopped taking calls connected
        (its accepted calls may still come)."""
        return not self.in_flight and not any(
            peer.pinged and not peer.accepting for peer in self._peers
        )

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            self._server.close()
        for peer in list(self._peers):
            peer.close()
        if self._server is not None:
            await self._server.wait_closed()

    def joined(self, peer: _FrontEnd) -> None:
        self._peers.add(peer)

    def left(self, peer: _FrontEnd) -> None:
        self._peers.discard(peer)
        self.ended()


class _FrontEnd(asyncio.BufferedProtocol):
    """One front end's connection: its calls in progress and its answers to send."""

    def __init__(self, engine: EngineServer) -> None:
        self._engine = engine
        self._reader = MessageReader(self._message)
        self._transport: asyncio.Transport | None = None
        self.tasks: dict[int, tuple[asyncio.Task[None], Call, ipc.RequestHeader]] = {}
        self._answers: list[list[object]] = []
        self._frames = Gathered()
        self._flushing = False
        #: Its observer events not recorded yet: they wait for the answers of the turn
        #: they came in (:meth:`_flush`).
        self._events: list[list[Any]] = []
        self._loop = asyncio.get_running_loop()
        self._accepting = False  # its gRPC port accepts calls (its pings say)
        #: When it last said something (the loop's clock), and its process.
        self.heard_at = self._loop.time()
        self.pid: int | None = None
        self.pinged = False  # a front end (which pings), not some other client
        #: SETTLE messages sent, by number, until its SETTLED comes back.
        self._settles: dict[int, asyncio.Future[None]] = {}
        self._settle_numbers = itertools.count(1)

    @property
    def accepting(self) -> bool:
        """Its gRPC port accepts calls, as its last ping said, not long ago."""
        return self._accepting and self._loop.time() - self.heard_at < FRESH_S

    # -- connection -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.pid = _peer_pid(transport)
        self._engine.joined(self)
        self._status()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._engine.left(self)
        self._settled(max(self._settles, default=0))  # nothing more is coming
        for task, _, _ in self.tasks.values():  # nobody to answer: free their places at once
            task.cancel()
        self._record_events()  # before a report waiting on the settle above reads

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._reader.buffer_updated(nbytes)

    def settle(self) -> asyncio.Future[None]:
        """Done when this front end has sent its observer events (``EngineServer.settle``)."""
        future: asyncio.Future[None] = self._loop.create_future()
        if self._transport is None:
            future.set_result(None)
            return future
        number = next(self._settle_numbers)
        self._settles[number] = future
        self._transport.writelines(encode(ipc.SETTLE, [number]))
        return future

    def _settled(self, upto: int) -> None:
        for number in [n for n in self._settles if n <= upto]:
            future = self._settles.pop(number)
            if not future.done():
                future.set_result(None)

    def _status(self) -> None:
        if self._transport is not None:
            self._transport.writelines(encode(ipc.STATUS, [self._engine.plane.ready]))

    # -- receiving ------------------------------------------------------------------

    def _message(self, kind: int, payload: Any, frames: list[memoryview]) -> None:
        self.heard_at = self._loop.time()
        if kind == ipc.CALLS:
            requests, cancels, events, give_up_at = payload
            if requests:
                self._requests(requests, frames, time.monotonic() > give_up_at)
            for rid in cancels:
                self._cancel(rid)
            if events:
                # Recorded once this turn's answers are written (their calls come first,
                # then the bookkeeping of the calls before them).
                self._events.extend(events)
                self._schedule_flush()
        elif kind == ipc.PING:
            self._accepting = bool(payload and payload[0])
            self.pinged = True
            self._status()
            self._engine.ended()  # a stopping engine waits for front ends that stop
        elif kind == ipc.SETTLED:
            self._record_events()  # what a report reads next counts them
            self._settled(payload[0])

    def _requests(self, requests: list[Any], frames: Sequence[memoryview], late: bool) -> None:
        """Start serving ``requests``; none if they came ``late``: after their front end
        gave up on this engine (it was stopped or stuck), their calls were failed
        UNAVAILABLE with "retry" (answered so here too, for a front end that was
        stopped with it and still waits)."""
        if late:
            logger.warning(
                "%d call(s) of front end %s were read after it gave up on this engine "
                "(silent too long): not run",
                len(requests),
                self.pid,
            )
        offset = 0
        create_task = self._loop.create_task
        for fields in requests:
            header = ipc.RequestHeader.unpack(fields)
            count = len(header.inputs) if header.deferred_error is None else 0
            mine = frames[offset : offset + count]
            offset += count
            call = Call(None, arrived=header.arrived)
            if late:
                self._refuse(call, header, Unavailable(ENGINE_LOST))
                continue
            if self._engine.stopping and self.accepting:  # (a stopping front end's
                # calls were accepted before it stopped: they are served)
                self._refuse(call, header, Unavailable("the inference engine is stopping: retry"))
                continue
            task = create_task(self._serve(header, mine, call))
            self.tasks[header.rid] = (task, call, header)

    def _refuse(self, call: Call, header: ipc.RequestHeader, error: MandantError) -> None:
        """Answer a call ``error`` without running it, naming the model it resolved to."""
        self._resolve(call, header)
        self._answer(
            [header.rid, call.model, call.version, ipc.pack_error(error), [], call.owner], []
        )

    def _cancel(self, rid: int) -> None:
        """Drop a call its front end gave up on, and answer it now (a task cancelled
        before it ran never runs its body) with the model it resolved to, if any."""
        entry = self.tasks.pop(rid, None)
        if entry is None:
            return  # answered already: the answer is on its way
        self._engine.ended()
        task, call, header = entry
        task.cancel()
        if not call.model:  # cancelled before it ran: name the model it would have reached
            self._resolve(call, header)
        self._answer(
            [rid, call.model, call.version, ipc.pack_error(Exception()), [], call.owner], []
        )

    def _resolve(self, call: Call, header: ipc.RequestHeader) -> None:
        """The configured name and version of the model ``header`` names for its tenant
        (one process resolves a call before anything can cancel it); nothing where it
        names none."""
        engine = self._engine
        tenant = engine.tenants(header.tenant)
        if tenant is None:
            return
        with contextlib.suppress(MandantError):
            model = engine.plane.model(tenant, header.model_name, header.model_version)
            call.model, call.version = model.key.name, model.key.version
            call.owner = model.key.owner or ""

    # -- serving --------------------------------------------------------------------

    async def _serve(
        self, header: ipc.RequestHeader, buffers: Sequence[Buffer], call: Call
    ) -> None:
        engine = self._engine
        frames: list[Buffer] = []
        try:
            tenant = engine.tenants(header.tenant)
            if tenant is None:  # removed by a reload since the front end checked its key
                raise Unauthenticated()
            call.tenant = tenant
            current_tenant.set(tenant)
            current_request_id.set(header.request_id[:MAX_REQUEST_ID_BYTES])
            request = ipc.IpcRequest(header, buffers, engine.max_bytes_elements)
            response = await engine.plane.infer(call, request, header.timeout_s)
            declared = {spec.name: spec.datatype for spec in response.output_specs}
            outputs, frames = ipc.output_frames(response.outputs, declared)
            size = sum(map(len, frames))
            if size > MAX_ANSWER_BYTES:
                frames = []
                raise FailedPrecondition(
                    f"the answer is {size} bytes, more than one gRPC message carries "
                    f"({MAX_ANSWER_BYTES}): ask for fewer rows"
                )
            answer: list[object] = [header.rid, call.model, call.version, None, outputs, call.owner]
        except asyncio.CancelledError:
            return  # the front end gave up on it (or is gone): nobody to answer
        except MandantError as exc:
            answer = [header.rid, call.model, call.version, ipc.pack_error(exc), [], call.owner]
        except Exception as exc:
            logged = current_request_id.get() or uuid.uuid4().hex[:16]
            logger.exception(
                "internal error serving a front end's request (request id %s, tenant %s)",
                logged,
                header.tenant,
            )
            error = ipc.pack_error(exc, logged)
            answer = [header.rid, call.model, call.version, error, [], call.owner]
        finally:
            self.tasks.pop(header.rid, None)
            self._engine.ended()
        self._answer(answer, frames)

    def _answer(self, answer: list[object], frames: list[Buffer]) -> None:
        self._answers.append(answer)
        if self._frames.add(frames):
            self._flush()
        else:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """This loop turn's answers, in one message; then the events that came."""
        self._flushing = False
        answers, self._answers = self._answers, []
        frames = self._frames.take()
        if self._transport is not None and answers:
            self._transport.writelines(encode(ipc.ANSWERS, answers, frames))
        self._record_events()

    def _record_events(self) -> None:
        events, self._events = self._events, []
        observer = self._engine.events
        for name, *args in events:
            if name in FORWARDED_EVENTS:
                getattr(observer, name)(*args)


def _peer_pid(transport: asyncio.BaseTransport) -> int | None:
    """The process at the other end of a Unix socket (SO_PEERCRED), if it says."""
    sock = transport.get_extra_info("socket")
    try:
        pid, _, _ = _CREDENTIALS.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
        )
    except (AttributeError, OSError):
        return None
    return int(pid) if pid > 0 else None


_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class EngineHealth:
    """The engine's ``/readyz`` (its HTTP port answers for the whole server): ready
    when the engine is and a front end accepts calls on the gRPC port. The engine
    starts first: on its readiness alone, a probe sent traffic to a port that refused
    connections for half a second."""

    def __init__(self, plane: DataPlane, engine: EngineServer) -> None:
        self._plane = plane
        self._engine = engine

    @property
    def live(self) -> bool:
        return self._plane.live

    @property
    def ready(self) -> bool:
        return self._plane.ready and self._engine.accepting
