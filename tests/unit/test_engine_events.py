"""The engine records a front end's observer events (``workers: N``) after the answers
of the loop turn they came in are written, so an answer ready at once does not wait on
the bookkeeping of the calls before it; and before a report that settled reads them.
A real engine socket, with a plain socket as the front end."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mandant.events import NullObserver
from mandant.types import Call, EncodedRequest, InferResponse, Tenant, TensorHeader
from mandant.workers import ipc
from mandant.workers.engine_server import EngineServer
from mandant.workers.framing import PREFIX, encode, unpackb
from tests.servers import SUBPROCESS_ENV

FINISHED = ["request_finished", "t", "echo", "OK", 0.001, "1", True, ""]


class Plane:
    """Answers every call in the turn it came (as a model run inline does)."""

    ready = True

    async def infer(
        self, call: Call, request: EncodedRequest, timeout_s: float | None
    ) -> InferResponse:
        return InferResponse("echo", "1", request.request_id)


class FrontEnd:
    """The front end's end of the engine's socket, read without consuming."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.sock.setblocking(False)

    def send(self, kind: int, payload: object, frames: Sequence[bytes] = ()) -> None:
        self.sock.sendall(b"".join(encode(kind, payload, frames)))

    def kinds_written(self) -> list[int]:
        """The kinds of the messages the engine has written so far."""
        try:
            data = self.sock.recv(1 << 16, socket.MSG_PEEK)
        except BlockingIOError:
            return []
        kinds, at = [], 0
        while at + PREFIX.size <= len(data):
            body_bytes, header_bytes = PREFIX.unpack_from(data, at)
            start = at + PREFIX.size
            kinds.append(unpackb(data[start : start + header_bytes])[0])
            at = start + body_bytes
        return kinds


class Recorder(NullObserver):
    """Notes, for each call it records, which messages the engine had written then."""

    def __init__(self) -> None:
        self.front_end: FrontEnd | None = None
        self.recorded: list[list[int]] = []

    def request_finished(self, *args: Any, **kwargs: Any) -> None:
        assert self.front_end is not None
        self.recorded.append(self.front_end.kinds_written())


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[EngineServer, FrontEnd, Recorder]]:
    recorder = Recorder()
    path = tmp_path / "engine.sock"
    engine = EngineServer(Plane(), Tenant, recorder, path, 0)  # type: ignore[arg-type]
    await engine.start()
    recorder.front_end = front_end = FrontEnd(path)
    yield engine, front_end, recorder
    front_end.sock.close()
    await engine.aclose()


async def until(done: Any) -> None:
    for _ in range(1000):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("the engine did not get there")


def _request(rid: int) -> list[object]:
    inputs = [TensorHeader("INPUT0", "FP32", (1, 1))]
    return ipc.RequestHeader(
        rid, "t", "echo", "", str(rid), {}, [], inputs, None, time.monotonic()
    ).pack()


async def test_events_are_recorded_after_the_answers_of_their_turn(
    engine: tuple[EngineServer, FrontEnd, Recorder],
) -> None:
    _, front_end, recorder = engine
    front_end.send(ipc.CALLS, [[_request(1)], [], [FINISHED], time.monotonic() + 60], [bytes(4)])
    await until(lambda: recorder.recorded)
    assert recorder.recorded == [[ipc.STATUS, ipc.ANSWERS]]


async def test_events_without_calls_are_recorded_soon(
    engine: tuple[EngineServer, FrontEnd, Recorder],
) -> None:
    _, front_end, recorder = engine
    front_end.send(ipc.CALLS, [[], [], [FINISHED, FINISHED], 0.0])
    await until(lambda: len(recorder.recorded) == 2)


async def test_a_report_that_settled_counts_the_events_sent_before(
    engine: tuple[EngineServer, FrontEnd, Recorder],
) -> None:
    """The front end answers SETTLE with its events, then SETTLED: once the report's
    settle returns, they are recorded."""
    server, front_end, recorder = engine
    front_end.send(ipc.PING, [True])  # a front end: reports wait for it
    await until(lambda: server.accepting)
    settled = asyncio.ensure_future(server.settle())
    await until(lambda: ipc.SETTLE in front_end.kinds_written())
    front_end.sock.sendall(
        b"".join([*encode(ipc.CALLS, [[], [], [FINISHED], 0.0]), *encode(ipc.SETTLED, [1])])
    )
    await asyncio.wait_for(settled, 5)
    assert len(recorder.recorded) == 1


#: A front end as the engine sees one: it pings every 0.1 s; after 0.5 s (the engine
#: silent, it gives up on its connection) it connects again and pings on.
PINGING = """
import socket, sys, time
from mandant.workers import ipc
from mandant.workers.framing import encode
for pings in (5, 100):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    for _ in range(pings):
        sock.sendall(b"".join(encode(ipc.PING, [True])))
        time.sleep(0.1)
    sock.close()
"""


#: An engine alone, as ``mandant worker engine`` serves one (uvloop), its watch's
#: bounds shortened: it kills a front end silent for 1 s.
ENGINE = """
import asyncio, sys, uvloop
from pathlib import Path
from mandant.events import NullObserver
from mandant.types import Tenant
from mandant.workers import engine_server

engine_server.FRESH_S, engine_server.SILENT_S = 0.4, 1.0

class Plane:
    ready = True

async def main():
    engine = engine_server.EngineServer(Plane(), Tenant, NullObserver(), Path(sys.argv[1]), 0)
    await engine.start()
    await asyncio.sleep(30)

uvloop.run(main())
"""


def test_an_engine_that_did_not_run_for_a_while_kills_no_front_end(tmp_path: Path) -> None:
    """After the engine itself was stopped longer than ``SILENT_S`` (SIGSTOP, a paused
    container), its watch ran before it read what had come meanwhile (the stopped
    epoll_wait returns EINTR, and the due timers run first): the front ends' old
    connections (closed as the engine went silent) looked silent, and it killed every
    healthy front end by their pids. A late round now judges no one."""
    path = tmp_path / "engine.sock"
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, str(path)], env=SUBPROCESS_ENV)
    peer = None
    try:
        for _ in range(500):
            if path.exists():
                break
            time.sleep(0.02)
        peer = subprocess.Popen([sys.executable, "-c", PINGING, str(path)], env=SUBPROCESS_ENV)
        time.sleep(0.3)  # connected, pinging
        engine.send_signal(signal.SIGSTOP)
        time.sleep(1.5)  # the peer gives up on its connection and opens another
        engine.send_signal(signal.SIGCONT)
        time.sleep(1.0)  # rounds of the engine's watch
        assert peer.poll() is None, "a pinging front end was killed"
    finally:
        for process in (peer, engine):
            if process is not None:
                process.kill()
                process.wait()
