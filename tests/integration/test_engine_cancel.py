"""The engine of ``workers: N`` (a real engine App, its Unix socket in a temporary
folder) when a front end gives up on a call: the call leaves nothing behind, and the
engine answers the cancellation at once with the model the call had resolved to (the
front end's report of the call names it, so SLOs and metrics count it), whether the
cancellation comes while the call runs or in the same message as the call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mandant.app import App
from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant.types import TensorHeader
from mandant.workers import ipc
from mandant.workers.framing import PREFIX, encode, unpackb
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


def _calls(requests: list[int], cancels: list[int]) -> list[Any]:
    headers = [
        ipc.RequestHeader(
            rid,
            "t",
            "sleepy",
            "",
            "",
            {},
            [],
            [TensorHeader("INPUT0", "FP32", (1, 4))],
            None,
            time.monotonic(),
        ).pack()
        for rid in requests
    ]
    give_up_at = time.monotonic() + 60
    return encode(ipc.CALLS, [headers, cancels, [], give_up_at], [ROWS.tobytes()] * len(requests))


async def _answers(reader: asyncio.StreamReader) -> list[list[Any]]:
    """The next ANSWERS message's headers (the engine says its STATUS first)."""
    while True:
        body_bytes, header_bytes = PREFIX.unpack(await reader.readexactly(PREFIX.size))
        body = await reader.readexactly(body_bytes)
        kind, payload, _ = unpackb(body[:header_bytes])
        if kind == ipc.ANSWERS:
            answers: list[list[Any]] = payload
            return answers


@pytest.mark.parametrize("at_once", [False, True], ids=["while it runs", "in one message"])
async def test_a_cancelled_call_is_answered_with_its_model_and_leaves_nothing(
    engine: App, tmp_path: Path, at_once: bool
) -> None:
    assert engine.engine is not None
    reader, writer = await asyncio.open_unix_connection(EngineSockets(tmp_path).requests)
    try:
        if at_once:
            writer.writelines(_calls([7], [7]))
        else:
            writer.writelines(_calls([7], []))
            for _ in range(1000):
                if engine.engine.in_flight:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # resolved, and waiting on the model
            writer.writelines(_calls([], [7]))
        (answer,) = await asyncio.wait_for(_answers(reader), 10)
    finally:
        writer.close()
    rid, model, version, _error, outputs, owner = answer
    assert rid == 7 and outputs == []
    # In one message the call never ran: the engine names the model it would have
    # reached, as one process (which resolves before anything can cancel) reports it.
    assert (model, version, owner) == ("sleepy", "1", "")
    assert engine.engine.in_flight == 0


async def test_an_answer_too_large_for_one_message_is_answered_with_a_status(
    engine: App, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer larger than one gRPC message carries fails with a clear status: one
    of 4 GiB overflowed the IPC message's u32 length, and that message, with every
    answer gathered in it, was lost (those calls never answered)."""
    from mandant.workers import engine_server

    monkeypatch.setattr(engine_server, "MAX_ANSWER_BYTES", 15)  # one row of 4 floats: 16
    reader, writer = await asyncio.open_unix_connection(EngineSockets(tmp_path).requests)
    try:
        writer.writelines(_calls([1], []))
        ((rid, model, _, error, outputs, _),) = await asyncio.wait_for(_answers(reader), 10)
    finally:
        writer.close()
    assert (rid, model, outputs) == (1, "sleepy", [])
    failure = ipc.unpack_error(error)
    assert type(failure).__name__ == "FailedPrecondition"
    assert "16 bytes, more than one gRPC message carries" in str(failure)
