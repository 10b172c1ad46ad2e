"""A front end's link to the engine (``workers/engine_link.py``) closes whatever its
keeper was doing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from mandant.context import current_request_id
from mandant.events import NullObserver
from mandant.transport.grpc.codec import ProtoInferRequest
from mandant.types import Call, EncodedRequest, Tenant
from mandant.workers import engine_link, ipc
from mandant.workers.engine_link import EngineLink
from mandant.workers.engine_server import EngineServer
from mandant_client._proto import grpc_service_pb2 as pb


async def test_closing_ends_a_keeper_whose_cancel_was_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's ``wait_for`` drops a cancel that comes as its wait completes (the
    engine gone just then): the keeper went on reconnecting, and a stopping front end
    waited for it for good. Here every sleep of the keeper swallows its cancel."""
    sleep = asyncio.sleep

    async def deaf(delay: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # the cancel is lost
            await sleep(delay)

    link = EngineLink(tmp_path / "no-engine.sock", retry_s=0.01)
    monkeypatch.setattr(engine_link.asyncio, "sleep", deaf)
    keeper = asyncio.ensure_future(link.start(wait_s=60))
    await sleep(0.05)  # the keeper retries, its sleeps deaf to cancels
    await asyncio.wait_for(link.aclose(), 2)
    keeper.cancel()
    await asyncio.gather(keeper, return_exceptions=True)


class FailingPlane:
    """An engine's data plane with a bug: every call raises something unexpected."""

    ready = True

    async def infer(self, call: Call, request: EncodedRequest, timeout_s: float | None) -> Any:
        raise KeyError("internals")


@pytest.mark.parametrize("request_id", ["r-9", ""])
async def test_an_engine_s_internal_error_is_quoted_under_the_id_it_logged(
    tmp_path: Path, request_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine logs the traceback under the request's id, or one it makes; the front
    end's INTERNAL answer quotes that id (it made one of its own, which no log held)."""
    path = tmp_path / "engine.sock"
    engine = EngineServer(FailingPlane(), Tenant, NullObserver(), path, 0)  # type: ignore[arg-type]
    await engine.start()
    link = EngineLink(path, retry_s=0.01)
    await link.start(wait_s=5)
    message = pb.ModelInferRequest(model_name="echo", id=request_id)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    message.raw_input_contents.append(bytes(4))
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(ipc.EngineFault) as failed:
            await link.infer(Call(Tenant("t")), ProtoInferRequest(message), None)
        quoted = current_request_id.get()
    finally:
        await link.aclose()
        await engine.aclose()
    assert failed.value.request_id == quoted
    assert quoted == request_id or (not request_id and len(quoted) == 16)
    (logged,) = [r for r in caplog.records if "internal error serving" in r.getMessage()]
    assert f"request id {quoted}," in logged.getMessage()
    assert "internals" not in str(failed.value)


async def test_a_front_end_that_did_not_run_for_a_while_keeps_its_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A front end whose own event loop did not run for longer than the engine's
    allowed silence (the process stopped, its container paused, a long GC) judged the
    engine silent as it resumed, before reading the answers waiting for it: it closed
    a healthy connection and failed its waiting calls. Its own stall is not the
    engine's silence: the next ping's answer decides."""
    path = tmp_path / "engine.sock"
    engine = EngineServer(FailingPlane(), Tenant, NullObserver(), path, 0)  # type: ignore[arg-type]
    await engine.start()
    link = EngineLink(path, ping_s=0.05, retry_s=0.01, silent_s=0.3)
    await link.start(wait_s=5)
    try:
        await asyncio.sleep(0.2)  # pinged and answered
        with caplog.at_level(logging.ERROR):
            time.sleep(0.6)  # noqa: ASYNC251 (the whole process stalls: twice the allowed silence)
            await asyncio.sleep(0.4)  # it runs again: pings, answers
        assert link.up, caplog.text
        assert "silent" not in caplog.text and "lost" not in caplog.text
    finally:
        await link.aclose()
        await engine.aclose()
