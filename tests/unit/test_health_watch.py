"""A health Watch stream ends when the server stops (``probes.WatchCap.end``), and only
once the last status it wrote is NOT_SERVING: a watcher that saw NOT_SERVING earlier
(not ready at start), then SERVING, is still told NOT_SERVING before its stream ends."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from grpc_health.v1 import health, health_pb2

from mandant.transport.grpc.probes import WatchCap

Status = health_pb2.HealthCheckResponse
WHOLE_SERVER = health_pb2.HealthCheckRequest(service="")


class _Context:
    """What the stock Watch asks of its context: writes, each a loop turn or more."""

    def __init__(self) -> None:
        self.told: list[str] = []

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await asyncio.sleep(0.001)  # a write is a completion-queue round trip
        self.told.append(Status.ServingStatus.Name(message.status))


async def test_a_watch_ends_at_the_stop_once_it_said_not_serving_last() -> None:
    servicer = health.aio.HealthServicer()
    await servicer.set("", Status.NOT_SERVING)  # not ready at start
    cap = WatchCap(servicer, 10)
    context = _Context()
    watch = asyncio.create_task(cap.watch(WHOLE_SERVER, cast(Any, context)))
    await asyncio.sleep(0.02)
    await servicer.set("", Status.SERVING)
    await asyncio.sleep(0.02)
    await servicer.enter_graceful_shutdown()
    cap.end()
    await asyncio.wait_for(watch, 1)
    assert context.told == ["NOT_SERVING", "SERVING", "NOT_SERVING"]
    assert cap.watching == 0


async def test_a_watch_opened_after_the_end_says_not_serving_and_ends() -> None:
    servicer = health.aio.HealthServicer()
    await servicer.set("", Status.SERVING)
    await servicer.enter_graceful_shutdown()
    cap = WatchCap(servicer, 10)
    cap.end()
    context = _Context()
    await asyncio.wait_for(cap.watch(WHOLE_SERVER, cast(Any, context)), 1)
    assert context.told == ["NOT_SERVING"]
