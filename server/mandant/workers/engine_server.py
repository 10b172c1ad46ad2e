"""The engine's side of ``workers: N``: one ZeroMQ ROUTER socket that every front end
talks to (``ipc.py`` says what travels on it).

Each request runs as the single-process server runs it, through the engine's own
:meth:`DataPlane.infer` — resolution, validation, admission, the fair batcher and the
model — so fair shares, token buckets, quotas and concurrency caps are those of one
process, whatever the number of front ends. Answers of one event-loop turn go back to
each front end in one message. A front end that gives up on a call (its client left
or its deadline passed) sends a cancellation: the call leaves its queue and frees its
concurrency slot, and the front end is told at once which model the call had resolved
to (what its report of the call names: SLOs count it). Calls of a front end that died
finish and their answers are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from mandant.context import current_request_id, current_tenant
from mandant.errors import MandantError, Unauthenticated
from mandant.events import Observer
from mandant.service import MAX_REQUEST_ID_BYTES, DataPlane
from mandant.types import Call, Tenant
from mandant.workers import ipc

logger = logging.getLogger(__name__)

#: The observer events a front end may report (``RemoteObserver``): the Observer's.
FORWARDED_EVENTS = frozenset(name for name in dir(Observer) if not name.startswith("_"))


class EngineServer:
    """``tenants``: the current tenant of an id (the engine's directory: a tenant a
    reload removed is refused even if a front end has not reloaded yet). ``events``:
    where the calls the front ends answered are reported (metrics, SLOs, statistics)."""

    def __init__(
        self,
        plane: DataPlane,
        tenants: Callable[[str], Tenant | None],
        events: Observer,
        address: str,
        max_bytes_elements: int,
    ) -> None:
        self._plane = plane
        self._tenants = tenants
        self._events = events
        self._address = address
        self._max_bytes_elements = max_bytes_elements
        #: Tells front ends that this engine is a new one (calls sent to an old one are lost).
        self.incarnation = os.urandom(8).hex()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._tasks: dict[tuple[bytes, int], tuple[asyncio.Task[None], Call]] = {}
        self._outbox: dict[bytes, tuple[list[object], list[ipc.Buffer]]] = {}
        self._flushing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        sock = self._socket
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # bounded by the front ends' call caps instead
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(self._address)
        self._loop = loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._drain)
        self._drain()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._socket.fileno())
        tasks = [task for task, _ in self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._socket.close(linger=0)
        self._context.term()

    # -- receiving ------------------------------------------------------------------

    def _drain(self) -> None:
        """Read every waiting message (the socket's descriptor is edge-triggered)."""
        sock = self._socket
        while ipc.readable(sock):
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            try:
                self._dispatch(parts)
            except Exception:  # a malformed message from a front end: never the loop's end
                logger.exception("dropped a malformed message from a front end")

    def _dispatch(self, parts: Sequence[zmq.Frame]) -> None:
        peer = parts[0].bytes
        kind = parts[1].bytes
        if kind == ipc.REQUESTS:
            self._requests(peer, ipc.unpackb(parts[2].buffer), parts[3:])
        elif kind == ipc.HEARTBEAT:
            reply = ipc.packb([self.incarnation, self._plane.ready])
            self._socket.send_multipart([peer, ipc.HEARTBEAT, reply])
        elif kind == ipc.CANCEL:
            for rid in ipc.unpackb(parts[2].buffer):
                self._cancel(peer, rid)
        elif kind == ipc.EVENTS:
            for name, *args in ipc.unpackb(parts[2].buffer):
                if name in FORWARDED_EVENTS:
                    getattr(self._events, name)(*args)

    def _requests(self, peer: bytes, headers: list[Any], frames: Sequence[zmq.Frame]) -> None:
        assert self._loop is not None
        offset = 0
        for fields in headers:
            header = ipc.RequestHeader.unpack(fields)
            count = len(header.inputs) if header.deferred_error is None else 0
            buffers: list[ipc.Buffer] = [frame.buffer for frame in frames[offset : offset + count]]
            offset += count
            call = Call(None)
            task = self._loop.create_task(self._serve(peer, header, buffers, call))
            self._tasks[(peer, header.rid)] = (task, call)

    def _cancel(self, peer: bytes, rid: int) -> None:
        """Drop a call its front end gave up on, and answer it now (a task cancelled
        before it ran never runs its body) with the model it resolved to, if any."""
        entry = self._tasks.pop((peer, rid), None)
        if entry is None:
            return  # answered already: the answer is on its way
        task, call = entry
        task.cancel()
        self._answer(peer, [rid, call.model, call.version, ipc.pack_error(Exception()), []], [])

    # -- serving --------------------------------------------------------------------

    async def _serve(
        self, peer: bytes, header: ipc.RequestHeader, buffers: Sequence[ipc.Buffer], call: Call
    ) -> None:
        frames: list[ipc.Buffer] = []
        try:
            tenant = self._tenants(header.tenant)
            if tenant is None:  # removed by a reload since the front end checked its key
                raise Unauthenticated()
            call.tenant = tenant
            current_tenant.set(tenant)
            current_request_id.set(header.request_id[:MAX_REQUEST_ID_BYTES])
            request = ipc.IpcRequest(header, buffers, self._max_bytes_elements)
            response = await self._plane.infer(call, request, header.timeout_s)
            declared = {spec.name: spec.datatype for spec in response.output_specs}
            outputs, frames = ipc.output_frames(response.outputs, declared)
            answer: list[object] = [header.rid, call.model, call.version, None, outputs]
        except asyncio.CancelledError:
            return  # the front end gave up on it: nobody to answer
        except MandantError as exc:
            answer = [header.rid, call.model, call.version, ipc.pack_error(exc), []]
        except Exception as exc:
            logger.exception("internal error serving a front end's request")
            answer = [header.rid, call.model, call.version, ipc.pack_error(exc), []]
        finally:
            self._tasks.pop((peer, header.rid), None)
        self._answer(peer, answer, frames)

    def _answer(self, peer: bytes, answer: list[object], frames: list[ipc.Buffer]) -> None:
        headers, all_frames = self._outbox.setdefault(peer, ([], []))
        headers.append(answer)
        all_frames.extend(frames)
        if not self._flushing:
            self._flushing = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send each front end its answers of this loop turn as one message."""
        self._flushing = False
        outbox, self._outbox = self._outbox, {}
        sock = self._socket
        for peer, (headers, frames) in outbox.items():
            # A front end that is gone is dropped by the ROUTER socket, silently.
            sock.send_multipart([peer, ipc.ANSWERS, ipc.packb(headers), *frames], copy=False)
        self._drain()  # a send may have taken the socket's read edge
