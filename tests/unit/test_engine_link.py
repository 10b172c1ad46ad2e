"""A front end's link to the engine (``workers/engine_link.py``) closes whatever its
keeper was doing."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from mandant.workers import engine_link
from mandant.workers.engine_link import EngineLink


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
