"""A health Watch stream ends when the server stops (``probes.WatchCap.end``), and only
once the last status it wrote is NOT_SERVING: a watcher that saw NOT_SERVING earlier
(not ready at start), then SERVING, is still told NOT_SERVING before its stream ends."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2

from mandant.transport.grpc.probes import WatchCap

Status = health_pb2.HealthCheckResponse
WHOLE_SERVER = health_pb2.HealthCheckRequest(service="")


class _Context:
    """What the stock Watch asks of its context: writes, each a loop turn or more; the
    client's address; an abort's status."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.told: list[str] = []
        self._address = address
        self.aborted: grpc.StatusCode | None = None

    def peer(self) -> str:
        return f"ipv4:{self._address}:40000"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = code

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


async def test_one_address_holds_at_most_its_share_of_watch_streams() -> None:
    """One client without a key held all 1,024 Watch places, and every other client's
    health checking was refused. Beyond its address's share (or the cap) a Watch is
    UNIMPLEMENTED, which gRPC clients take as "no health checking here"."""
    servicer = health.aio.HealthServicer()
    await servicer.set("", Status.SERVING)
    cap = WatchCap(servicer, 3, per_address=2)
    held = [_Context("10.0.0.1") for _ in range(2)]
    watches = [asyncio.create_task(cap.watch(WHOLE_SERVER, cast(Any, c))) for c in held]
    await asyncio.sleep(0.02)
    assert cap.watching == 2
    third = _Context("10.0.0.1")
    await asyncio.wait_for(cap.watch(WHOLE_SERVER, cast(Any, third)), 1)
    assert third.aborted == grpc.StatusCode.UNIMPLEMENTED
    other = _Context("10.0.0.2")
    watches.append(asyncio.create_task(cap.watch(WHOLE_SERVER, cast(Any, other))))
    await asyncio.sleep(0.02)
    assert other.told == ["SERVING"] and other.aborted is None and cap.watching == 3
    beyond = _Context("10.0.0.3")  # the server-wide cap
    await asyncio.wait_for(cap.watch(WHOLE_SERVER, cast(Any, beyond)), 1)
    assert beyond.aborted == grpc.StatusCode.UNIMPLEMENTED
    watches[0].cancel()
    await asyncio.gather(watches[0], return_exceptions=True)
    again = _Context("10.0.0.1")  # its place is given back
    watches.append(asyncio.create_task(cap.watch(WHOLE_SERVER, cast(Any, again))))
    await asyncio.sleep(0.02)
    assert again.told == ["SERVING"]
    for watch in watches:
        watch.cancel()
    await asyncio.gather(*watches, return_exceptions=True)
    assert cap.watching == 0
