"""The Redis store when Redis fails in part: one call of a batch refused, a stall
longer than ``timeout_ms``, a Redis that cannot be reached while refunds are due, a
refund after midnight, a usage flush Redis took in part or answered too late. Each
call is charged once, or not at all when it did not run; a usage report waits for
one timeout at most. A real redis-server; stalls are a busy script or ``CLIENT
PAUSE``, late replies a proxy that holds one back (:class:`LateReplies`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from mandant.config import MandantConfig, parse_config
from mandant.errors import QuotaExceeded, RateLimited, Unavailable
from mandant.tenancy import redis_store
from mandant.tenancy.admission import TenantAdmission, shared_store_for
from mandant.tenancy.keys import hash_key
from mandant.tenancy.redis_store import RedisStore
from mandant.tenancy.redis_usage import RedisUsage
from mandant.types import ModelKey, Tenant
from tests.clock_helpers import same_utc_day, utc_day
from tests.integration.redis_server import RedisServer, redis_server
from tests.servers import ECHO_MODEL, ServerThread

__all__ = ["redis_server"]  # the fixture

ECHO = ModelKey("echo", "1")
#: Fields of the usage flush whose reply comes too late (:class:`LateReplies`).
LATE_FLUSH_FIELDS = 50
ADMIN_KEY = "failures-admin-key"


def _config(url: str, prefix: str, *tenants: dict[str, Any], **limits: Any) -> MandantConfig:
    return parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "grace_s": 0},
            "limits": {
                "store": "redis",
                "url": url,
                "key_prefix": prefix,
                "retry_interval_s": 0.2,
                "timeout_ms": 1000,  # unless a test's own (250 ms: a loaded machine missed it)
                **limits,
            },
            "tenants": list(tenants),
            "models": [ECHO_MODEL],
        }
    )


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis(port=redis_server.port)
    try:
        yield connection
    finally:
        connection.close()


@contextlib.asynccontextmanager
async def _admission(config: MandantConfig) -> AsyncIterator[TenantAdmission]:
    """An admission on the configuration's shared store, started, closed at the end."""
    admission = TenantAdmission(config, shared_store_for(config.limits))
    await admission.start()
    try:
        yield admission
    finally:
        await admission.aclose()


class LateReplies:
    """A TCP proxy in front of Redis that can hold back the reply to the next script
    call (``EVALSHA``) past the client's ``timeout_ms``, as a network hiccup or a
    stalled Redis does: Redis has applied the call, this process never hears of it.
    Everything else passes at once. Runs on the test's event loop."""

    def __init__(self, redis_port: int) -> None:
        self._redis_port = redis_port
        self._server: asyncio.Server | None = None
        self._armed = False
        self._deliver_after_s: float | None = None
        self._refusal: bytes | None = None
        self.held = asyncio.Event()  # a reply has been held back

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    def hold_next_script_reply(self, deliver_after_s: float | None = None) -> None:
        """Hold back the reply to the next script call: thrown away, or delivered
        ``deliver_after_s`` later (the replies after it wait behind it)."""
        self._armed = True
        self._deliver_after_s = deliver_after_s

    def refuse_next_script(self, error: bytes) -> None:
        """Answer the next write holding a script call (alone) with the error reply
        ``error`` (``-LOADING …``) in Redis' place, as a Redis reading its data after a
        restart does; it never reaches Redis."""
        self._refusal = error

    async def __aenter__(self) -> LateReplies:
        self._server = await asyncio.start_server(self._proxy, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self._redis_port
        )
        holding = asyncio.Event()

        async def requests() -> None:
            while data := await reader.read(1 << 16):
                if self._refusal is not None and b"EVALSHA" in data:
                    writer.write(self._refusal + b"\r\n")
                    self._refusal = None
                    continue
                if self._armed and b"EVALSHA" in data:
                    self._armed = False
                    holding.set()
                upstream_writer.write(data)
                await upstream_writer.drain()
            upstream_writer.close()

        async def replies() -> None:
            while data := await upstream_reader.read(1 << 16):
                if holding.is_set():
                    self.held.set()
                    if self._deliver_after_s is None:
                        continue  # thrown away: the client times out and hangs up
                    await asyncio.sleep(self._deliver_after_s)
                    holding.clear()
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(requests(), replies())
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            upstream_writer.close()


async def _flush_losing_its_reply(usage: RedisUsage, proxy: LateReplies) -> None:
    """Add :data:`LATE_FLUSH_FIELDS` counts of t0 and flush them, the reply held back
    past ``timeout_ms``: Redis applies the flush, ``usage`` never hears of it."""
    for model in range(LATE_FLUSH_FIELDS):
        usage.add("t0", "rows", f"m{model}", 1)
    proxy.hold_next_script_reply()
    assert await usage.flush() is False  # no reply in time
    assert proxy.held.is_set()


async def _applied(client: redis.Redis, prefix: str, tenant: str, fields: int) -> None:
    """Until Redis has applied a flush of ``fields`` fields of ``tenant``'s day that
    this process gave up waiting for (at most 10 s: a slow machine takes longer)."""
    key = f"{prefix}:{{{tenant}}}:usage:day:{utc_day()}"
    deadline = time.monotonic() + 10
    while client.hlen(key) < fields:
        assert time.monotonic() < deadline, f"Redis applied {client.hlen(key)} of {fields}"
        await asyncio.sleep(0.02)


def _rows_today(client: redis.Redis, prefix: str, tenant: str) -> int:
    return int(client.get(f"{prefix}:{{{tenant}}}:*:rows_per_day:{utc_day()}") or 0)


async def test_one_refused_script_fails_only_its_own_call(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """Ten tenants' admits go in one batch; Redis refuses one script (its quota key
    holds the wrong type here; ``OOM`` near ``maxmemory`` does the same). The nine
    Redis admitted and charged are admitted, the tenth alone is refused: none is
    charged in Redis and refused (or charged again locally with ``allow``)."""
    with same_utc_day():
        tenants = [{"id": f"t{i}", "quota": {"rows_per_day": 1000}} for i in range(10)]
        config = _config(redis_server.url, "p1", *tenants, on_store_error="deny")
        client.hset(f"p1:{{t3}}:*:rows_per_day:{utc_day()}", "not", "a count")
        async with _admission(config) as admission:
            results = await asyncio.gather(
                *(admission.admit(Tenant(f"t{i}"), ECHO, 10) for i in range(10)),
                return_exceptions=True,
            )
        assert isinstance(results[3], Unavailable)
        admitted = [i for i, result in enumerate(results) if not isinstance(result, BaseException)]
        assert admitted == [0, 1, 2, 4, 5, 6, 7, 8, 9]
        assert [_rows_today(client, "p1", f"t{i}") for i in admitted] == [10] * 9


def _spoil(client: redis.Redis, key: str, how: str) -> None:
    """Make ``key`` what another program might have left there."""
    if how == "a hash":
        client.hset(key, "not", "a count")
    else:
        client.set(key, "1.5")


@pytest.mark.parametrize("how", ["a hash", "not an integer"])
async def test_a_refused_script_does_not_take_the_store_for_out(
    redis_server: RedisServer, client: redis.Redis, how: str
) -> None:
    """A key another program wrote is one tenant's: its refusal put the whole replica
    in outage mode for ``retry_interval_s``, refusing every other tenant's calls
    (``deny``; with ``allow`` they ran on local buckets, past their fleet quota). Now
    the tenant's call alone follows ``on_store_error``; the others go to Redis."""
    with same_utc_day():
        tenants = [{"id": t, "quota": {"rows_per_day": 1000}} for t in ("bad", "good")]
        config = _config(redis_server.url, f"p2{how[0]}", *tenants, on_store_error="deny")
        _spoil(client, f"p2{how[0]}:{{bad}}:*:rows_per_day:{utc_day()}", how)
        async with _admission(config) as admission:
            for _ in range(3):
                with pytest.raises(Unavailable):
                    await admission.admit(Tenant("bad"), ECHO, 1)
                permit = await admission.admit(Tenant("good"), ECHO, 1)
                permit.release(refund=False)
            assert admission.quota_scope == "fleet"
        assert _rows_today(client, f"p2{how[0]}", "good") == 3


async def test_a_quota_binds_whatever_the_replica_s_clock_says(redis_server: RedisServer) -> None:
    """A replica set its quota keys' expiry as a moment on its own clock, which Redis
    reads on its clock: with the replica's over an hour behind (here three days, which
    makes it so at any time of day), the moment was past, every take deleted the count,
    and the quota never bound. The key's lifetime now goes as a length."""

    def behind() -> float:
        return time.time() - 3 * 86_400

    config = _config(redis_server.url, "p3", {"id": "d", "quota": {"rows_per_day": 3}})
    admission = TenantAdmission(config, RedisStore(config.limits, wall=behind), wall=behind)
    await admission.start()
    try:
        for _ in range(3):
            (await admission.admit(Tenant("d"), ECHO, 1)).release(refund=False)
        with pytest.raises(QuotaExceeded):
            await admission.admit(Tenant("d"), ECHO, 1)
    finally:
        await admission.aclose()


async def test_a_replica_whose_clock_is_ahead_never_shortens_a_quota_key(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """A take sets its quota key's lifetime from its replica's clock; one over an hour
    ahead set a shorter one than its period's (the day's count gone before the day,
    the quota given again). A take only lengthens it. Fake clocks 6 h and 8 h into one
    UTC day: Redis counts lifetimes, not moments."""
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    key = f"p4:{{d}}:*:rows_per_day:{midnight.strftime('%Y-%m-%d')}"
    config = _config(redis_server.url, "p4", {"id": "d", "quota": {"rows_per_day": 10}})
    lifetimes = []
    for hours in (6, 8):

        def wall(hours: int = hours) -> float:
            return midnight.timestamp() + hours * 3600

        admission = TenantAdmission(config, RedisStore(config.limits, wall=wall), wall=wall)
        await admission.start()
        try:
            (await admission.admit(Tenant("d"), ECHO, 1)).release(refund=False)
        finally:
            await admission.aclose()
        lifetimes.append(client.ttl(key))
    assert lifetimes[0] > 18 * 3600  # the rest of its day, and the grace
    assert lifetimes[1] >= lifetimes[0] - 60  # not cut by the clock two hours ahead


@pytest.mark.parametrize("how", ["a hash", "not an integer"])
async def test_a_report_reads_every_tenant_s_fleet_count_but_a_refused_one_s(
    redis_server: RedisServer, client: redis.Redis, how: str
) -> None:
    """One tenant's key of the wrong type sent the whole usage report to this replica's
    counts (scope "replica"): every other tenant's fleet figure read 0 here; one that
    holds no integer failed the whole report (HTTP 500)."""
    with same_utc_day():
        tenants = [{"id": t, "quota": {"rows_per_day": 100}} for t in ("bad", "good")]
        prefix = f"p5{how[0]}"
        config = _config(redis_server.url, prefix, *tenants, on_store_error="allow")
        client.set(f"{prefix}:{{good}}:*:rows_per_day:{utc_day()}", 5)  # another replica's
        _spoil(client, f"{prefix}:{{bad}}:*:rows_per_day:{utc_day()}", how)
        async with _admission(config) as admission:
            used = await admission.quotas_used(["bad", "good"])
            assert admission.quota_scope == "fleet"
        assert used == {"good": {"rows_today": 5, "rows_this_month": 0}}


async def test_a_redis_that_refuses_every_write_by_acl_is_an_outage(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """An ACL user without write rights has every script refused with an error that
    names no key ("The user executing the script can't run this command"): it was
    taken for the call's own keys, so the replica never entered outage mode and kept
    sending every call of every tenant to the broken Redis."""
    client.execute_command("ACL", "SETUSER", "nowrite", "on", "nopass", "~*", "+@all", "-@write")
    try:
        url = redis_server.url.replace("redis://", "redis://nowrite@")
        tenant = {"id": "t", "quota": {"rows_per_day": 100}}
        config = _config(url, "p6", tenant, on_store_error="deny")
        async with _admission(config) as admission:
            with pytest.raises(Unavailable):
                await admission.admit(Tenant("t"), ECHO, 1)
            await admission.quotas_used(["t"])  # an outage: this replica's counts, at once
            assert admission.quota_scope == "replica"
    finally:
        client.execute_command("ACL", "DELUSER", "nowrite")


async def test_a_call_refused_for_another_program_s_count_charges_nothing(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """The script checked a quota count with Lua's ``tonumber`` (which takes ``1.5``),
    then wrote every bucket and quota in turn, and failed at the bad key's INCRBY: each
    call refused so had drained the tenant's buckets and charged its day, and once
    drained the tenant was refused for its rate, not by ``on_store_error``. A count
    that is not an integer is refused before anything is written."""
    with same_utc_day():
        tenant = {
            "id": "acme",
            "rate_limit": {"requests_per_s": 0.001, "burst": 3},
            "quota": {"rows_per_day": 100, "rows_per_month": 1000},
        }
        config = _config(redis_server.url, "p7", tenant, on_store_error="deny")
        month = f"p7:{{acme}}:*:rows_per_month:{utc_day()[:7]}"
        client.set(month, "1.5")
        async with _admission(config) as admission:
            for _ in range(5):
                with pytest.raises(Unavailable):
                    await admission.admit(Tenant("acme"), ECHO, 10)
            assert _rows_today(client, "p7", "acme") == 0
            client.delete(month)
            (await admission.admit(Tenant("acme"), ECHO, 10)).release(refund=False)


def _stall(port: int, seconds: float) -> threading.Thread:
    """Keep Redis busy with one script for ``seconds`` (as a slow command or a
    latency spike does): it reads no other command meanwhile and runs what was
    written to it afterwards, even from clients that closed their connection."""
    busy = (
        "local t = redis.call('TIME') local t0 = t[1] + t[2] / 1e6 repeat "
        "local n = redis.call('TIME') until n[1] + n[2] / 1e6 - t0 > tonumber(ARGV[1]) "
        "return 0"
    )

    def run() -> None:
        with redis.Redis(port=port) as connection:
            connection.eval(busy, 0, seconds)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.1)  # it runs now
    return thread


async def _admit_without_redis(admission: TenantAdmission, rows: int, on_store_error: str) -> None:
    """acme's call of ``rows`` while Redis does not answer in time: refused (deny), or
    admitted on this replica's own buckets (allow)."""
    if on_store_error == "deny":
        with pytest.raises(Unavailable):
            await admission.admit(Tenant("acme"), ECHO, rows)
    else:
        (await admission.admit(Tenant("acme"), ECHO, rows)).release()


@pytest.mark.parametrize("on_store_error", ["deny", "allow"])
async def test_a_call_redis_runs_after_a_stall_takes_nothing(
    redis_server: RedisServer, client: redis.Redis, on_store_error: str
) -> None:
    """Redis stalls longer than ``timeout_ms`` with a call's script written to it:
    the call is refused (deny) or charged locally (allow). When Redis runs the
    script afterwards, the script takes nothing."""
    with same_utc_day():
        prefix = f"p2{on_store_error}"
        config = _config(
            redis_server.url,
            prefix,
            {"id": "acme", "quota": {"rows_per_day": 1000}},
            on_store_error=on_store_error,
            timeout_ms=100,
        )
        async with _admission(config) as admission:
            (await admission.admit(Tenant("acme"), ECHO, 10)).release()
            stall = _stall(redis_server.port, 0.6)
            await _admit_without_redis(admission, 7, on_store_error)
            await asyncio.to_thread(stall.join)  # Redis has run the script since
            assert _rows_today(client, prefix, "acme") == 10
            await asyncio.sleep(0.2)  # retry_interval_s: the store decides again
            (await admission.admit(Tenant("acme"), ECHO, 5)).release()
            assert _rows_today(client, prefix, "acme") == 15


@pytest.mark.parametrize("on_store_error", ["deny", "allow"])
async def test_what_redis_took_for_a_call_answered_too_late_is_given_back(
    redis_server: RedisServer, client: redis.Redis, on_store_error: str
) -> None:
    """Redis runs a call's script in time, but its reply comes after ``timeout_ms``
    (this replica was paused, or the way back stalled): the call is refused (deny) or
    charged locally (allow), and the rows Redis took were kept in the fleet's count for
    good. The late reply is read on and those rows given back."""
    with same_utc_day():
        prefix = f"p9{on_store_error}"
        async with LateReplies(redis_server.port) as proxy:
            config = _config(
                proxy.url,
                prefix,
                {"id": "acme", "quota": {"rows_per_day": 1000}},
                on_store_error=on_store_error,
                timeout_ms=200,
            )
            async with _admission(config) as admission:
                (await admission.admit(Tenant("acme"), ECHO, 10)).release()
                proxy.hold_next_script_reply(deliver_after_s=0.5)
                await _admit_without_redis(admission, 7, on_store_error)
                assert _rows_today(client, prefix, "acme") == 17  # Redis took them
                give_back_by = time.monotonic() + 5
                while _rows_today(client, prefix, "acme") != 10:
                    assert time.monotonic() < give_back_by, _rows_today(client, prefix, "acme")
                    await asyncio.sleep(0.05)
                (await admission.admit(Tenant("acme"), ECHO, 5)).release()  # Redis again
                assert _rows_today(client, prefix, "acme") == 15


async def test_a_refund_redis_cannot_take_is_sent_when_it_can(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """A refund while no connection to Redis can be made (here: Redis at its
    ``maxclients``, our connections closed) is kept and sent with the next batch
    once Redis takes connections again; one Redis refuses (``OOM``) likewise."""
    with same_utc_day():
        config = _config(redis_server.url, "p3", {"id": "acme", "quota": {"rows_per_day": 100}})
        async with _admission(config) as admission:
            first = await admission.admit(Tenant("acme"), ECHO, 40)
            second = await admission.admit(Tenant("acme"), ECHO, 30)
            assert _rows_today(client, "p3", "acme") == 70

            client.config_set("maxclients", 1)
            client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            await asyncio.sleep(0.1)
            first.release(refund=True)  # no connection can be made: kept
            await asyncio.sleep(0.1)
            client.config_set("maxclients", 10000)

            client.config_set("maxmemory", 1)
            second.release(refund=True)  # Redis refuses the script (OOM): kept
            await asyncio.sleep(0.1)
            assert _rows_today(client, "p3", "acme") == 70
            client.config_set("maxmemory", 0)

            (await admission.admit(Tenant("acme"), ECHO, 1)).release()  # takes them along
            assert _rows_today(client, "p3", "acme") == 1


async def test_a_refund_redis_refuses_while_loading_is_sent_again(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """A Redis reading its data after a restart answers ``-LOADING``, which redis-py
    raises as a connection error: the refund was taken for sent and lost (sent again,
    it could have given back twice), and its rows stayed charged. It never ran: it is
    kept and sent with the next batch."""
    with same_utc_day():
        async with LateReplies(redis_server.port) as proxy:
            config = _config(proxy.url, "p10", {"id": "acme", "quota": {"rows_per_day": 100}})
            async with _admission(config) as admission:
                permit = await admission.admit(Tenant("acme"), ECHO, 40)
                assert _rows_today(client, "p10", "acme") == 40
                proxy.refuse_next_script(b"-LOADING Redis is loading the dataset in memory")
                permit.release(refund=True)
                await asyncio.sleep(0.2)
                assert _rows_today(client, "p10", "acme") == 40  # not taken yet
                (await admission.admit(Tenant("acme"), ECHO, 1)).release()  # takes it along
                assert _rows_today(client, "p10", "acme") == 1


async def test_a_refund_written_while_redis_holds_writes_is_sent_again_once(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """Redis holds writes (``CLIENT PAUSE WRITE``, as a failover does) longer than
    ``timeout_ms`` while a refund is on its way: the connection is closed, and Redis
    drops what it held. The refund was taken for sent and never sent again (its rows
    charged for good); now it is sent again, and its marker key makes it give back
    once, however many times it reaches Redis."""
    with same_utc_day():
        config = _config(
            redis_server.url, "p11", {"id": "acme", "quota": {"rows_per_day": 100}}, timeout_ms=250
        )
        async with _admission(config) as admission:
            kept = await admission.admit(Tenant("acme"), ECHO, 30)
            permit = await admission.admit(Tenant("acme"), ECHO, 40)
            assert _rows_today(client, "p11", "acme") == 70
            client.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
            permit.release(refund=True)  # written, held, its connection closed
            refunded_by = time.monotonic() + 10
            while _rows_today(client, "p11", "acme") != 30:
                assert time.monotonic() < refunded_by, _rows_today(client, "p11", "acme")
                await asyncio.sleep(0.05)
            kept.release()
            await asyncio.sleep(1.5)  # any copy of the refund still on its way: none
            assert _rows_today(client, "p11", "acme") == 30
            markers = client.keys("p11:{acme}:*:refund:*")
            assert len(markers) == 1 and 0 < client.ttl(markers[0]) <= redis_store.REFUND_MARK_S


async def test_a_refund_redis_runs_past_its_deadline_gives_back_nothing(
    redis_server: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refund sent again and again while Redis does not answer (here: busy) gives back
    once at most, whichever copy Redis runs: each carries the deadline of its first
    write on Redis' clock, within its marker's life (a copy that ran after the marker
    expired gave back twice). One Redis runs past it gives back nothing."""
    monkeypatch.setattr(redis_store, "REFUND_VALID_S", 0.5)
    with same_utc_day():
        config = _config(
            redis_server.url, "p12", {"id": "acme", "quota": {"rows_per_day": 100}}, timeout_ms=250
        )
        async with _admission(config) as admission:
            permit = await admission.admit(Tenant("acme"), ECHO, 40)
            stall = _stall(redis_server.port, 1.5)
            permit.release(refund=True)  # written, and again: all run after the stall
            await asyncio.to_thread(stall.join)
            await asyncio.sleep(1.0)
            assert _rows_today(client, "p12", "acme") == 40
            assert not client.keys("p12:{acme}:*:refund:*")  # none ran


async def test_scripts_flushed_from_redis_are_loaded_again(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """Redis lost its scripts (a restart, ``SCRIPT FLUSH``): the calls of that batch
    are answered ``NOSCRIPT``, ran nowhere, and are sent again with the scripts."""
    with same_utc_day():
        config = _config(redis_server.url, "p9", {"id": "acme", "quota": {"rows_per_day": 100}})
        async with _admission(config) as admission:
            permit = await admission.admit(Tenant("acme"), ECHO, 30)
            client.script_flush()
            permit.release(refund=True)
            client.script_flush()
            results = await asyncio.gather(
                *(admission.admit(Tenant("acme"), ECHO, 10) for _ in range(3))
            )
            for result in results:
                result.release()
        assert _rows_today(client, "p9", "acme") == 30


async def test_a_refund_after_midnight_goes_to_the_day_that_was_charged(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    midnight = datetime(2031, 5, 18, tzinfo=UTC).timestamp()
    wall = [midnight - 0.5]
    config = _config(redis_server.url, "p4", {"id": "acme", "quota": {"rows_per_day": 100}})
    store = RedisStore(config.limits, wall=lambda: wall[0])
    admission = TenantAdmission(config, store, wall=lambda: wall[0])
    await admission.start()
    try:
        late = await admission.admit(Tenant("acme"), ECHO, 40)  # charged on May 17
        wall[0] = midnight + 0.5
        (await admission.admit(Tenant("acme"), ECHO, 60)).release()  # ran on May 18
        late.release(refund=True)  # the May 17 call did not run
        (await admission.admit(Tenant("acme"), ECHO, 40)).release()  # May 18 is full now
        with pytest.raises(QuotaExceeded):
            await admission.admit(Tenant("acme"), ECHO, 1)
    finally:
        await admission.aclose()
    assert int(client.get("p4:{acme}:*:rows_per_day:2031-05-18") or 0) == 100
    assert int(client.get("p4:{acme}:*:rows_per_day:2031-05-17") or 0) == 0


async def test_pushback_is_the_wait_until_every_limit_fits(redis_server: RedisServer) -> None:
    """Both buckets short: the pushback is the rows bucket's 1 s, not the request
    bucket's 10 ms, so a client that waits as told is admitted."""
    config = _config(
        redis_server.url,
        "p5",
        {
            "id": "acme",
            "rate_limit": {"requests_per_s": 100, "burst": 1, "rows_per_s": 10, "rows_burst": 10},
        },
    )
    async with _admission(config) as admission:
        (await admission.admit(Tenant("acme"), ECHO, 10)).release()
        with pytest.raises(RateLimited, match="rows_per_s=10 exceeded") as refused:
            await admission.admit(Tenant("acme"), ECHO, 10)
        assert 0.95 < refused.value.retry_after_s <= 1.0
        await asyncio.sleep(refused.value.retry_after_s + 0.002)
        (await admission.admit(Tenant("acme"), ECHO, 10)).release()


async def test_a_usage_flush_redis_took_in_part_counts_each_tenant_once(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """Redis refuses one tenant's script of a flush (its day hash holds the wrong
    type here; ``OOM`` does the same): the others are counted, that one's sums go
    with the next flush, and nobody is counted twice."""
    with same_utc_day():
        config = _config(redis_server.url, "p6", {"id": "t0"})
        usage = RedisUsage(config.limits, flush_interval_s=3600)
        day_key = f"p6:{{t1}}:usage:day:{utc_day()}"
        client.set(day_key, "not a hash")
        try:
            for tenant in ("t0", "t1", "t2"):
                usage.add(tenant, "rows", "echo", 5)
            assert await usage.flush() is False
            client.delete(day_key)
            assert await usage.flush() is True
            counts = await usage.read(["t0", "t1", "t2"])
        finally:
            await usage.aclose()
        assert counts is not None
        assert [counts[t]["today"] for t in ("t0", "t1", "t2")] == [{"rows:echo": 5.0}] * 3
        assert [counts[t]["this_month"] for t in ("t0", "t1", "t2")] == [{"rows:echo": 5.0}] * 3


async def test_a_usage_flush_answered_too_late_is_counted_once(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """Redis applies a flush whose reply comes after this process gave up waiting for
    it (``timeout_ms``): the flush is sent again, and Redis applies it once (its
    sequence number is marked)."""
    with same_utc_day():
        async with LateReplies(redis_server.port) as proxy:
            config = _config(proxy.url, "p7", {"id": "t0"}, timeout_ms=100)
            usage = RedisUsage(config.limits, flush_interval_s=3600)
            try:
                usage.add("t1", "requests", "OK", 1)
                assert await usage.flush() is True  # the script is loaded
                usage.add("t1", "requests", "OK", 1)
                await _flush_losing_its_reply(usage, proxy)
                await _applied(client, "p7", "t0", LATE_FLUSH_FIELDS)  # Redis has applied it
                usage.add("t1", "requests", "OK", 1)
                assert await usage.flush() is True  # sent again, applied once
            finally:
                await usage.aclose()
        rows = client.hgetall(f"p7:{{t0}}:usage:day:{utc_day()}")
        assert len(rows) == LATE_FLUSH_FIELDS and set(rows.values()) == {b"1"}
        assert client.hgetall(f"p7:{{t1}}:usage:day:{utc_day()}") == {b"requests:OK": b"3"}


async def test_a_graceful_stop_sends_counts_held_back_behind_a_lost_reply(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """A tenant whose last flush lost its reply holds its newer counts back until that
    flush settles: the stop's one flush settled it and dropped them."""
    with same_utc_day():
        async with LateReplies(redis_server.port) as proxy:
            config = _config(proxy.url, "p9", {"id": "t0"}, timeout_ms=100)
            usage = RedisUsage(config.limits, flush_interval_s=3600)
            usage.add("t0", "requests", "OK", 1)
            assert await usage.flush() is True  # the script is loaded
            await _flush_losing_its_reply(usage, proxy)
            usage.add("t0", "requests", "OK", 1)  # held back behind that flush
            await _applied(client, "p9", "t0", LATE_FLUSH_FIELDS + 1)
            await usage.aclose()
        counts = client.hgetall(f"p9:{{t0}}:usage:day:{utc_day()}")
        assert counts[b"requests:OK"] == b"2" and len(counts) == LATE_FLUSH_FIELDS + 1


async def test_a_report_reads_counts_held_back_behind_a_lost_reply(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """A report flushes before it reads: one flush sent again the sums whose reply was
    lost, but held back the counts made since (the fleet figure came up short)."""
    with same_utc_day():
        async with LateReplies(redis_server.port) as proxy:
            config = _config(proxy.url, "p10", {"id": "t0"}, timeout_ms=100)
            usage = RedisUsage(config.limits, flush_interval_s=0.2)
            try:
                usage.add("t1", "requests", "OK", 1)
                assert await usage.flush() is True  # the script is loaded
                usage.add("t1", "requests", "OK", 1)
                await _flush_losing_its_reply(usage, proxy)
                usage.add("t1", "requests", "OK", 1)  # held back behind that flush
                failed_at = time.monotonic()
                await _applied(client, "p10", "t0", LATE_FLUSH_FIELDS)  # Redis has applied it
                await asyncio.sleep(max(0.0, failed_at + 0.25 - time.monotonic()))  # past 0.2 s
                counts = await usage.read(["t1"])
                assert counts is not None and counts["t1"]["today"]["requests:OK"] == 3
            finally:
                await usage.aclose()


def test_a_usage_report_waits_one_timeout_at_most_while_redis_stalls(
    redis_server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    """30 tenants with quotas, Redis stalled (every command waits): /usage answers
    after one ``timeout_ms`` (one batch for every tenant's quota counts and the fleet
    flush beside it), with this replica's own counts; not one timeout per tenant."""
    tenants = [
        {"id": f"t{i:02d}", "api_keys": [hash_key(f"k{i}")], "quota": {"rows_per_day": 10**6}}
        for i in range(30)
    ]
    config = _config(redis_server.url, "p8", *tenants, timeout_ms=800)
    server_config = config.server.model_copy(update={"admin_keys": (hash_key(ADMIN_KEY),)})
    config = config.model_copy(update={"server": server_config})

    with ServerThread(config, tmp_path) as server:

        def usage() -> tuple[float, dict[str, Any]]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{server.http_port}/usage",
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            started = time.monotonic()
            with urllib.request.urlopen(request, timeout=30) as response:
                report: dict[str, Any] = json.loads(response.read())
            return time.monotonic() - started, report

        took, report = usage()
        assert report["tenants"]["t00"]["quota"]["scope"] == "fleet"
        client.execute_command("CLIENT", "PAUSE", 3000, "ALL")
        took, report = usage()
        assert took < 2.0, took  # one timeout_ms, not one per tenant
        assert report["tenants"]["t00"]["quota"]["scope"] == "replica"
        assert report["fleet_available"] is False
        # The outage is known now: no wait at all (the fleet counters' read waited
        # its timeout_ms on every report: a flush with nothing to send saw no outage).
        took, report = usage()
        assert took < 0.4, took
        assert report["fleet_available"] is False
        client.execute_command("CLIENT", "UNPAUSE")
        back_by = time.monotonic() + 20  # flush_interval_s after the outage, read again
        while not report["fleet_available"]:
            assert time.monotonic() < back_by, report
            time.sleep(0.2)
            took, report = usage()


async def test_a_burst_far_beyond_its_rate_is_admitted(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """A bucket's key lived ``burst / rate`` seconds: past 1e14 s its PEXPIRE went to
    Redis as "1e+17", which it refuses: every call failed, blamed on the tenant's keys
    (the local store admitted them). It lives ten years at most now."""
    tenant = {"id": "t", "rate_limit": {"requests_per_s": 1, "burst": 1e15}}
    config = _config(redis_server.url, "p8", tenant, on_store_error="deny")
    async with _admission(config) as admission:
        (await admission.admit(Tenant("t"), ECHO, 1)).release(refund=False)
    (key,) = client.keys("p8:{t}:*")
    assert 0 < client.pttl(key) <= 10 * 365 * 86400 * 1000


@pytest.mark.parametrize("tokens", ["-inf", "-1e400"])
async def test_an_infinite_bucket_level_is_taken_as_a_new_bucket(
    redis_server: RedisServer, client: redis.Redis, tokens: str
) -> None:
    """Lua's ``tonumber`` reads "-inf": a bucket hash another program left so refused
    its tenant for a year, and for good (such a key has no expiry)."""
    prefix = f"p9{tokens}"
    tenant = {"id": "t", "rate_limit": {"requests_per_s": 5, "burst": 5}}
    config = _config(redis_server.url, prefix, tenant, on_store_error="deny")
    async with _admission(config) as admission:
        (await admission.admit(Tenant("t"), ECHO, 1)).release(refund=False)  # its key
        (key,) = client.keys(f"{prefix}:{{t}}:*")
        client.hset(key, mapping={"tokens": tokens, "ts": "1"})
        (await admission.admit(Tenant("t"), ECHO, 1)).release(refund=False)


async def test_one_tenant_s_unreadable_usage_leaves_the_others_fleet_figures(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    """One tenant's day hash of the wrong type (another program's key) made the whole
    report go without fleet figures, every tenant's."""
    with same_utc_day():
        config = _config(redis_server.url, "p10", {"id": "t0"})
        usage = RedisUsage(config.limits, flush_interval_s=3600)
        try:
            for tenant in ("t0", "t2"):
                usage.add(tenant, "rows", "echo", 5)
            assert await usage.flush() is True
            client.set(f"p10:{{t1}}:usage:day:{utc_day()}", "not a hash")
            counts = await usage.read(["t0", "t1", "t2"])
        finally:
            await usage.aclose()
        assert counts is not None
        assert sorted(counts) == ["t0", "t2"]
        assert counts["t2"]["today"] == {"rows:echo": 5.0}
