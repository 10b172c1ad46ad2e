"""Fleet usage: with the Redis store, every replica's usage counters live in Redis
beside the limits, and one report from any replica gives the fleet's totals, next to
this replica's own figures, each marked with its scope."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
import redis.asyncio.client

from mandant.config import parse_config
from mandant.tenancy.redis_usage import RedisUsage
from mandant_client import Client
from mandant_client import RateLimited as ClientRateLimited
from mandant_client._proto import admin_pb2, admin_pb2_grpc
from tests.clock_helpers import same_utc_day, utc_day
from tests.integration.redis_server import RedisServer, redis_server
from tests.integration.test_redis_limits import KEY, config_data
from tests.servers import SERVER_KINDS, ServerThread, serve

__all__ = ["redis_server"]  # the fixture

ADMIN_KEY = "fleet-admin-key"


def fleet_config(url: str) -> Any:
    from mandant.tenancy.keys import hash_key

    data = config_data(url, key_prefix="fleet")
    data["server"]["admin_keys"] = [hash_key(ADMIN_KEY)]
    data["tenants"][0]["rate_limit"] = {"requests_per_s": 0.001, "burst": 7}
    data["tenants"][0]["quota"] = {"rows_per_day": 1000}
    return parse_config(data)


def _usage(http_port: int) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/usage",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def _call(target: str, rows: int, times: int) -> None:
    with Client(target, api_key=KEY) as client:
        for _ in range(times):
            client.infer("echo", {"INPUT0": np.ones((rows, 2), np.float32)})


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_one_report_gives_the_fleet_sum_of_two_replicas(
    kind: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two replicas (each one process, or each ``workers: 2``: the front ends'
    calls are counted by the engine)."""
    config = fleet_config(redis_server.url)
    first = serve(kind, config, tmp_path)
    second = serve(kind, config, tmp_path)
    day = utc_day()  # the day whose counts "today" and rows_today are
    try:
        _call(first.target, rows=2, times=3)
        _call(second.target, rows=3, times=4)
        with pytest.raises(ClientRateLimited):  # the shared burst of 7 is spent
            _call(second.target, rows=1, times=1)
    finally:
        second.stop()  # a graceful stop sends its last counts to Redis
    try:
        report = _usage(first.app.http_port if isinstance(first, ServerThread) else first.http_port)
        with grpc.insecure_channel(first.target) as channel:
            reply = admin_pb2_grpc.AdminServiceStub(channel).GetUsage(
                admin_pb2.GetUsageRequest(tenant="acme"),
                metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
            )
    finally:
        first.stop()

    acme = report["tenants"]["acme"]
    # This replica's own figures, marked as such.
    assert report["scopes"]["requests"] == report["scopes"]["rows"] == "replica"
    assert report["replica"] == reply.replica != ""
    assert acme["requests"] == {"OK": 3} and acme["rows"] == {"echo": 6}
    # Quota use and the fleet figures: every replica's.
    assert acme["quota"]["scope"] == reply.tenants[0].quota_scope == "fleet"
    assert report["fleet_available"] is True
    with same_utc_day(since=day):
        assert acme["quota"]["used"]["rows_today"] == 6 + 12
        for period in ("today", "this_month"):
            fleet = acme["fleet"][period]
            assert fleet["requests"] == {"OK": 7, "RESOURCE_EXHAUSTED": 1}
            assert fleet["rows"] == {"echo": 18} and fleet["rows_total"] == 18
            assert fleet["rejections"] == {"requests_per_s": 1}
            assert fleet["compute_seconds_total"] > 0
    usage = reply.tenants[0]
    assert dict(usage.requests) == {"OK": 3}
    for counts in (usage.fleet_today, usage.fleet_this_month):
        assert dict(counts.requests) == {"OK": 7, "RESOURCE_EXHAUSTED": 1}
        assert dict(counts.rows) == {"echo": 18}


def test_a_local_store_has_no_fleet_figures(tmp_path: Path) -> None:
    data = config_data("redis://unused")
    data["limits"] = {"store": "local"}
    from mandant.tenancy.keys import hash_key

    data["server"]["admin_keys"] = [hash_key(ADMIN_KEY)]
    with ServerThread(parse_config(data), tmp_path) as server:
        _call(server.target, rows=1, times=1)
        assert server.app is not None
        report = _usage(server.app.http_port)
    assert report["fleet_available"] is False
    assert report["tenants"]["acme"]["fleet"] is None
    assert report["tenants"]["acme"]["requests"] == {"OK": 1}


async def test_counts_redis_did_not_take_go_with_a_later_flush(
    redis_server: RedisServer,
) -> None:
    limits = fleet_config(redis_server.url).limits
    usage = RedisUsage(limits, flush_interval_s=3600)
    await usage.start()
    try:
        usage.add("acme", "rows", "echo", 5)
        redis_server.stop()
        assert await usage.flush() is False
        usage.add("acme", "rows", "echo", 2)
        usage.add("acme", "compute_seconds", "echo", 0.25)
        redis_server.start()
        assert await usage.flush() is True
        counts = await usage.read(["acme", "globex"])
    finally:
        await usage.aclose()
    assert counts is not None
    assert counts["acme"]["today"] == {"rows:echo": 7.0, "compute_seconds:echo": 0.25}
    assert counts["acme"]["this_month"] == counts["acme"]["today"]
    assert counts["globex"] == {"today": {}, "this_month": {}}


class _Wall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("day", "month", "next_day", "next_month"),
    [(31, "2099-01", 1, "2099-02"), (14, "2099-01", 15, "2099-01")],
    ids=["month-end", "midnight"],
)
async def test_counts_of_an_outage_over_midnight_land_in_their_own_day_and_month(
    redis_server: RedisServer, day: int, month: str, next_day: int, next_month: str
) -> None:
    """Redis is down from 23:50 until 00:05: what was counted before midnight (sent
    late, or held back behind a flush that failed) goes to that day and its month,
    what was counted after it to the next day and its month. (Dates in the future:
    the hashes' expiry times are absolute.)"""
    limits = fleet_config(redis_server.url).limits
    wall = _Wall(datetime(2099, 1, day, 23, 50, tzinfo=UTC).timestamp())
    usage = RedisUsage(limits, wall=wall, flush_interval_s=3600)
    await usage.start()
    try:
        redis_server.stop()
        usage.add("acme", "rows", "echo", 10)
        assert await usage.flush() is False
        wall.now += 5 * 60  # 23:55
        usage.add("acme", "rows", "echo", 1000)
        usage.add("globex", "rows", "echo", 3)
        assert await usage.flush() is False
        wall.now += 10 * 60  # 00:05 the next day
        usage.add("acme", "rows", "echo", 5)
        redis_server.start()
        assert await usage.flush() is True  # the failed flush, sent again
        assert await usage.flush() is True  # what waited behind it
        counts = await usage.read(["acme", "globex"])
    finally:
        await usage.aclose()
    both = month == next_month
    assert counts is not None
    assert counts["acme"] == {
        "today": {"rows:echo": 5.0},
        "this_month": {"rows:echo": 1015.0 if both else 5.0},
    }
    assert counts["globex"] == {"today": {}, "this_month": {"rows:echo": 3.0} if both else {}}
    client = redis.Redis.from_url(redis_server.url)
    try:
        for tenant, rows in (("acme", b"1010"), ("globex", b"3")):
            stored = client.hgetall(f"fleet:{{{tenant}}}:usage:day:2099-01-{day:02d}")
            assert stored == {b"rows:echo": rows}
        if not both:
            assert client.hgetall("fleet:{acme}:usage:month:2099-01") == {b"rows:echo": b"1010"}
    finally:
        client.close()


async def test_a_flush_cancelled_on_its_way_is_sent_again(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A usage report whose caller left (its deadline) while the flush it started was on
    its way, Redis slow: the flush's sums were dropped, never sent nor counted again."""
    limits = fleet_config(redis_server.url).limits
    usage = RedisUsage(limits, flush_interval_s=3600)
    execute = redis.asyncio.client.Pipeline.execute

    async def slow(self: Any, raise_on_error: bool = True) -> Any:
        await asyncio.sleep(3600)  # never written: Redis is slow to take it

    try:
        usage.add("acme", "rows", "echo", 1000)
        monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", slow)
        with pytest.raises(TimeoutError):  # an admin's report: every tenant's flushed
            await asyncio.wait_for(usage.read(["acme", "globex"]), 0.1)
        monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", execute)
        counts = await usage.read(["acme", "globex"])
    finally:
        await usage.aclose()
    assert counts is not None and counts["acme"]["today"] == {"rows:echo": 1000.0}


async def test_a_tenant_s_own_report_flushes_no_other_tenant_s_sums(
    redis_server: RedisServer,
) -> None:
    """A tenant's own report (ten a second allowed) flushed every tenant's sums, one
    script each with the event loop held (1,000 tenants: up to 0.1 s a read). It reads
    what Redis holds and adds this process's sums of that tenant not sent yet: the
    same figures, nobody else's sent; a day's in its month (not today) after midnight."""
    limits = fleet_config(redis_server.url).limits
    wall = _Wall(datetime(2099, 1, 14, 23, 59, tzinfo=UTC).timestamp())
    usage = RedisUsage(limits, wall=wall, flush_interval_s=3600)
    client = redis.Redis.from_url(redis_server.url)
    try:
        usage.add("acme", "rows", "echo", 3)
        assert await usage.flush() is True
        usage.add("acme", "rows", "echo", 4)  # 23:59, not sent
        wall.now += 120  # 00:01 the next day
        usage.add("acme", "rows", "echo", 5)
        usage.add("acme", "requests", "OK", 1)
        usage.add("globex", "rows", "echo", 100)
        own = await usage.read(["acme"])
        assert own is not None
        assert own["acme"] == {
            "today": {"rows:echo": 5.0, "requests:OK": 1.0},
            "this_month": {"rows:echo": 12.0, "requests:OK": 1.0},
        }
        assert client.keys("fleet:{globex}:*") == []  # not flushed by acme's report
        assert await usage.flush() is True
        assert await usage.read(["acme"]) == own  # sent now, counted once
    finally:
        await usage.aclose()
        client.close()


async def test_a_refused_day_resent_after_a_later_day_applied_is_counted(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One flush sends a tenant's sums of two days; Redis refuses the first day's (an
    error before any write: OOM near maxmemory; a wrong-type key stands in for it here)
    and applies the second's, and both replies are lost. Sent again, the first day's
    met the tenant's marker, already past it, and was skipped for good: markers are
    per tenant and day."""
    limits = fleet_config(redis_server.url).limits
    wall = _Wall(datetime(2099, 1, 14, 23, 59, tzinfo=UTC).timestamp())
    usage = RedisUsage(limits, wall=wall, flush_interval_s=3600)
    client = redis.Redis.from_url(redis_server.url)
    execute = redis.asyncio.client.Pipeline.execute

    async def replies_lost(self: Any, raise_on_error: bool = True) -> Any:
        await execute(self, raise_on_error=raise_on_error)
        raise redis.exceptions.TimeoutError("the replies were lost")

    try:
        usage.add("acme", "rows", "echo", 10)
        wall.now += 120  # Jan 15
        usage.add("acme", "rows", "echo", 1000)
        client.set("fleet:{acme}:usage:day:2099-01-14", "not a hash")
        monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", replies_lost)
        assert await usage.flush() is False
        monkeypatch.setattr(redis.asyncio.client.Pipeline, "execute", execute)
        client.delete("fleet:{acme}:usage:day:2099-01-14")  # Redis would take it now
        assert await usage.flush() is True
        assert await usage.flush() is True
        assert client.hgetall("fleet:{acme}:usage:day:2099-01-14") == {b"rows:echo": b"10"}
        assert client.hgetall("fleet:{acme}:usage:day:2099-01-15") == {b"rows:echo": b"1000"}
        assert client.hgetall("fleet:{acme}:usage:month:2099-01") == {b"rows:echo": b"1010"}
    finally:
        client.close()
        await usage.aclose()


async def test_a_sum_redis_cannot_hold_leaves_the_tenant_s_other_sums_unwritten(
    redis_server: RedisServer,
) -> None:
    """A sum past Redis' 64-bit integers refuses the tenant's whole flush before anything
    is written: the script once failed part way, the sums before it stayed added, and
    the flush, taken for refused, added them again every second."""
    limits = fleet_config(redis_server.url).limits
    wall = _Wall(datetime(2099, 1, 14, 12, tzinfo=UTC).timestamp())
    usage = RedisUsage(limits, wall=wall, flush_interval_s=3600)
    client = redis.Redis.from_url(redis_server.url)
    day = "fleet:{acme}:usage:day:2099-01-14"
    try:
        client.hset(day, "rows:echo", 2**63 - 10)
        usage.add("acme", "requests", "OK", 3)
        usage.add("acme", "rows", "echo", 100)
        for _ in range(3):
            assert await usage.flush() is False
        assert client.hget(day, "requests:OK") is None
        client.hdel(day, "rows:echo")
        assert await usage.flush() is True
        assert client.hgetall(day) == {b"requests:OK": b"3", b"rows:echo": b"100"}
    finally:
        client.close()
        await usage.aclose()
