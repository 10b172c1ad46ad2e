"""The engine of ``workers: N`` (a real engine App, its ZeroMQ socket in a temporary
folder) when a front end gives up on a call: the call leaves nothing behind, and the
engine answers the cancellation at once with the model the call had resolved to (the
front end's report of the call names it, so SLOs and metrics count it), whether the
cancellation comes while the call runs or in the same message batch as the call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from mandant.app import App
from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant.types import TensorHeader
from mandant.workers import ipc
from mandant.workers.sockets import EngineSockets
from tests.servers import ECHO_MODEL

ROWS = np.ones((1, 4), np.float32)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[App]:
    sleepy = {
        **ECHO_MODEL,
        "name": "sleepy",
        "factory": "tests.integration.slow_models:sleepy",
        "factory_args": {"seconds": 0.5},
    }
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0},
            "tenants": [{"id": "t", "api_keys": [hash_key("t-key")]}],
            "models": [sleepy],
        }
    )
    app = App(config, tmp_path, engine_sockets=EngineSockets(tmp_path))
    await app.start()
    yield app
    await app.aclose(0)


def _request(rid: int) -> list[object]:
    header = ipc.RequestHeader(
        rid, "t", "sleepy", "", "", {}, [], [TensorHeader("INPUT0", "FP32", (1, 4))], None
    )
    return [ipc.REQUESTS, ipc.packb([header.pack()]), ROWS.tobytes()]


async def _answers(front_end: zmq.Socket[Any], wait_s: float = 10.0) -> list[list[Any]]:
    """The next answers message (polled: the test's loop is the engine's)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            kind, headers, *_ = front_end.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            await asyncio.sleep(0.01)
            continue
        if kind == ipc.ANSWERS:
            answers: list[list[Any]] = ipc.unpackb(headers)
            return answers
    raise AssertionError(f"no answer from the engine within {wait_s}s")


@pytest.mark.parametrize("at_once", [False, True], ids=["while it runs", "at once"])
async def test_a_cancelled_call_is_answered_with_its_model_and_leaves_nothing(
    engine: App, tmp_path: Path, at_once: bool
) -> None:
    assert engine.engine is not None
    context = zmq.Context()
    front_end = context.socket(zmq.DEALER)
    front_end.setsockopt(zmq.LINGER, 0)
    front_end.connect(EngineSockets(tmp_path).requests)
    try:
        front_end.send_multipart(_request(7))
        if at_once:
            front_end.send_multipart([ipc.CANCEL, ipc.packb([7])])
            # The engine's loop (this one) held still: it reads both in one go.
            time.sleep(0.1)  # noqa: ASYNC251
        else:
            for _ in range(1000):
                if engine.engine.in_flight:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # resolved, and waiting on the model
            front_end.send_multipart([ipc.CANCEL, ipc.packb([7])])
        (answer,) = await _answers(front_end)
    finally:
        front_end.close()
        context.term()
    rid, model, version, _error, outputs = answer
    assert rid == 7 and outputs == []
    assert (model, version) == (("", "") if at_once else ("sleepy", "1"))
    assert engine.engine.in_flight == 0
