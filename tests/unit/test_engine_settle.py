"""``EngineServer.settle``: reports wait for the front ends' events in shared rounds."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mandant.events import NullObserver
from mandant.workers.engine_server import EngineServer


class FakeFrontEnd:
    pinged = True

    def __init__(self) -> None:
        self.asked: list[asyncio.Future[None]] = []

    def settle(self) -> asyncio.Future[None]:
        self.asked.append(asyncio.get_running_loop().create_future())
        return self.asked[-1]


async def turns(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_reports_at_once_share_rounds_and_none_uses_one_begun_before_it() -> None:
    engine = EngineServer(Any, lambda tenant: None, NullObserver(), Path("unused"), 0)  # type: ignore[arg-type]
    front = FakeFrontEnd()
    engine.joined(front)  # type: ignore[arg-type]
    first = asyncio.ensure_future(engine.settle())
    await turns()
    assert len(front.asked) == 1  # round 1 asked the front end
    later = [asyncio.ensure_future(engine.settle()) for _ in range(5)]
    await turns()
    assert len(front.asked) == 1  # they wait for a round that starts after them
    front.asked[0].set_result(None)
    await first
    await turns()
    assert len(front.asked) == 2 and not any(report.done() for report in later)
    front.asked[1].set_result(None)
    await asyncio.gather(*later)  # all five shared round 2
    assert len(front.asked) == 2
