"""The engine records a front end's observer events (``workers: N``) after the answers
of the loop turn they came in are written: a call's answer does not wait on the
bookkeeping of the calls before it; and before a report that settled reads them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mandant.events import NullObserver
from mandant.types import Call, EncodedRequest, InferResponse, Tenant, TensorHeader
from mandant.workers import ipc
from mandant.workers.engine_server import EngineServer, _FrontEnd
from mandant.workers.framing import Buffer, unpackb

FINISHED = ["request_finished", "t", "echo", "OK", 0.001, "1", True, ""]


class Log(list[str]):
    """What happened, in order: messages written to the front end, events recorded."""


class Transport:
    def __init__(self, log: Log) -> None:
        self._log = log

    def writelines(self, parts: list[Buffer]) -> None:
        (kind, _, _) = unpackb(parts[1])
        self._log.append({ipc.ANSWERS: "answers", ipc.STATUS: "status"}.get(kind, str(kind)))

    def get_extra_info(self, name: str) -> None:
        return None


class Plane:
    ready = True

    async def infer(
        self, call: Call, request: EncodedRequest, timeout_s: float | None
    ) -> InferResponse:
        return InferResponse("echo", "1", request.request_id)


class Recorder(NullObserver):
    def __init__(self, log: Log) -> None:
        self._log = log

    def request_finished(self, *args: Any, **kwargs: Any) -> None:
        self._log.append("recorded")


def _front_end(log: Log) -> _FrontEnd:
    engine = EngineServer(
        Plane(),  # type: ignore[arg-type]
        lambda tenant: Tenant(tenant),
        Recorder(log),
        Path("unused"),
        0,
    )
    peer = _FrontEnd(engine)
    peer.connection_made(Transport(log))  # type: ignore[arg-type]
    return peer


def _request(rid: int) -> list[object]:
    inputs = [TensorHeader("INPUT0", "FP32", (1, 1))]
    return ipc.RequestHeader(rid, "t", "echo", "", str(rid), {}, [], inputs, None).pack()


async def turns(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_events_are_recorded_after_the_answers_of_their_turn() -> None:
    log = Log()
    peer = _front_end(log)
    frame = memoryview(bytes(4))
    peer._message(ipc.CALLS, [[_request(1)], [], [FINISHED]], [frame])
    await turns()
    assert log == ["status", "answers", "recorded"]


async def test_events_without_calls_are_recorded_within_the_turn() -> None:
    log = Log()
    peer = _front_end(log)
    peer._message(ipc.CALLS, [[], [], [FINISHED, FINISHED]], [])
    await turns(1)
    assert log == ["status", "recorded", "recorded"]


async def test_a_settle_records_the_events_before_it_at_once() -> None:
    """The front end's SETTLED follows its events: a report waiting on it reads them."""
    log = Log()
    peer = _front_end(log)
    settled = peer.settle()
    peer._message(ipc.CALLS, [[], [], [FINISHED]], [])
    peer._message(ipc.SETTLED, [1], [])
    assert settled.done() and log.count("recorded") == 1
