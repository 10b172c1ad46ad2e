"""Shared limits in a real redis-server: two Mandant server processes, one Redis,
one tenant hammering both; a Redis outage and its return; quotas that outlive a
restart of the servers; ``on_store_error: deny``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
import yaml

from mandant.config import MandantConfig, parse_config
from mandant.errors import QuotaExceeded, RateLimited
from mandant.tenancy.admission import TenantAdmission, shared_store_for
from mandant.tenancy.keys import hash_key
from mandant.tenancy.limits import MAX_PEAKS
from mandant.types import ModelKey, Tenant
from mandant_client import AsyncClient, Client, Unavailable
from mandant_client import RateLimited as ClientRateLimited
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.integration.redis_server import RedisServer, redis_server
from tests.servers import ECHO_MODEL, ROOT, ServerThread

__all__ = ["redis_server"]  # the fixture

KEY = "replica-tenant-key"
RATE = 100.0
X = np.ones((1, 4), np.float32)


def config_data(url: str, **limits: Any) -> dict[str, Any]:
    return {
        "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "grace_s": 0},
        # 1 s, not 250 ms: a loaded machine running the suite in parallel answered
        # later than that, and the store fell back to each replica's own buckets.
        "limits": {"store": "redis", "url": url, "retry_interval_s": 0.2, "timeout_ms": 1000}
        | limits,
        "tenants": [
            {
                "id": "acme",
                "api_keys": [hash_key(KEY)],
                "rate_limit": {"requests_per_s": RATE, "burst": 10},
            }
        ],
        "models": [ECHO_MODEL],
    }


class Replica:
    """``mandant serve`` in a process of its own."""

    def __init__(self, config: Path, log: Path) -> None:
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mandant", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        )
        self.target = ""

    def wait_listening(self, timeout_s: float = 60) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"replica exited: {Path(self._log.name).read_text()}")
            if line.startswith("Mandant listening"):
                self.target = line.rsplit(" ", 1)[-1].strip()
                return
        raise AssertionError("replica did not start")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def replicas(redis_server: RedisServer, tmp_path: Path) -> Iterator[list[Replica]]:
    path = tmp_path / "mandant.yaml"
    path.write_text(yaml.safe_dump(config_data(redis_server.url)))
    started = [Replica(path, tmp_path / f"replica{i}.log") for i in range(2)]
    try:
        for replica in started:
            replica.wait_listening()
        yield started
    finally:
        for replica in started:
            replica.stop()


@dataclass
class Tally:
    admitted: list[tuple[float, int]] = field(default_factory=list)  # (when, replica)
    refused: int = 0
    other: list[str] = field(default_factory=list)

    def count(self, start: float, end: float, replica: int | None = None) -> int:
        return sum(
            start <= when < end and replica in (None, which) for when, which in self.admitted
        )


async def hammer(targets: list[str], until: float, tally: Tally, workers: int = 6) -> None:
    clients = [AsyncClient(target, api_key=KEY, timeout_s=5) for target in targets]

    async def worker(index: int, client: AsyncClient) -> None:
        while time.monotonic() < until:
            try:
                await client.infer("echo", {"INPUT0": X})
            except ClientRateLimited:
                tally.refused += 1
            except Exception as exc:
                tally.other.append(repr(exc))
                await asyncio.sleep(0.01)
            else:
                tally.admitted.append((time.monotonic(), index))

    try:
        await asyncio.gather(*(worker(i, c) for i, c in enumerate(clients) for _ in range(workers)))
    finally:
        for client in clients:
            await client.close()


async def test_two_replicas_share_one_budget_and_ride_out_a_redis_outage(
    replicas: list[Replica], redis_server: RedisServer
) -> None:
    targets = [replica.target for replica in replicas]
    tally = Tally()
    t0 = time.monotonic()
    load = asyncio.create_task(hammer(targets, t0 + 10.5, tally))
    await asyncio.sleep(5.5)
    redis_server.stop()  # outage: each replica falls back to its own buckets (allow)
    await asyncio.sleep(2.0)
    redis_server.start()  # same port: the replicas find it again by themselves
    await load

    shared = tally.count(t0 + 0.5, t0 + 5.5)  # 5 s after the initial burst
    outage = [tally.count(t0 + 6.0, t0 + 7.5, i) for i in (0, 1)]
    resumed = tally.count(t0 + 8.5, t0 + 10.5)
    print(f"shared {shared / 5.0:.1f}/s, outage {outage} in 1.5 s, resumed {resumed / 2.0:.1f}/s")
    # One budget: never the two replicas' 2 x RATE, nor over RATE + 5%. Below it on a
    # loaded machine: the suite in three processes saw 453 and 458 where 500 were due
    # (alone: 499-500, also beside three CPU hogs); the likely cause, a replica stalled
    # past its acquire's share of timeout_ms, whose token Redis took is given back
    # only once the late reply is read (redis_store.py), its call refused meanwhile.
    assert 0.85 * RATE <= shared / 5.0 <= 1.05 * RATE, shared
    assert tally.count(t0 + 0.5, t0 + 5.5, 0) > 50 and tally.count(t0 + 0.5, t0 + 5.5, 1) > 50
    assert tally.refused > shared  # it was truly over-demand (twice the rate and more)

    assert all(n >= 0.8 * RATE * 1.5 for n in outage), outage  # both kept serving, locally

    assert abs(resumed / 2.0 - RATE) <= 0.1 * RATE, resumed
    assert tally.other == []


def test_deny_refuses_while_redis_is_down_and_recovers(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    config = parse_config(config_data(redis_server.url, on_store_error="deny"))
    with ServerThread(config, tmp_path) as server, Client(server.target, api_key=KEY) as client:
        client.infer("echo", {"INPUT0": X})
        redis_server.stop()
        with pytest.raises(Unavailable, match="rate limit store unavailable"):
            client.infer("echo", {"INPUT0": X})
        redis_server.start()
        deadline = time.monotonic() + 5
        while True:
            try:
                client.infer("echo", {"INPUT0": X})
                break
            except Unavailable:
                assert time.monotonic() < deadline, "no recovery after Redis returned"
                time.sleep(0.05)


def _admission(config: MandantConfig) -> TenantAdmission:
    return TenantAdmission(config, shared_store_for(config.limits))


async def test_replicas_share_buckets_and_pushback_is_exact(redis_server: RedisServer) -> None:
    data = config_data(redis_server.url, key_prefix="t1")
    data["tenants"][0]["rate_limit"] = {"requests_per_s": 2, "burst": 2}
    config = parse_config(data)
    first, second = _admission(config), _admission(config)
    await first.start()
    await second.start()
    try:
        (await first.admit(Tenant("acme"), ModelKey("echo", "1"), 1)).release()
        (await second.admit(Tenant("acme"), ModelKey("echo", "1"), 1)).release()
        with pytest.raises(RateLimited, match="requests_per_s=2 exceeded for tenant acme") as err:
            await first.admit(Tenant("acme"), ModelKey("echo", "1"), 1)
        assert 0.45 < err.value.retry_after_s <= 0.5
        await asyncio.sleep(err.value.retry_after_s + 0.002)
        (await second.admit(Tenant("acme"), ModelKey("echo", "1"), 1)).release()
    finally:
        await first.aclose()
        await second.aclose()


async def test_quota_counts_live_in_redis_with_an_expiry_and_survive_restarts(
    redis_server: RedisServer,
) -> None:
    data = config_data(redis_server.url, key_prefix="t2")
    data["tenants"][0].pop("rate_limit")
    data["tenants"][0]["quota"] = {"rows_per_day": 10, "rows_per_month": 1000}
    acme, echo = Tenant("acme"), ModelKey("echo", "1")
    before = _admission(parse_config(data))
    await before.start()
    (await before.admit(acme, echo, 7)).release()
    await before.aclose()

    data["tenants"][0]["quota"]["rows_per_day"] = 12  # a restart with a new limit
    after = _admission(parse_config(data))
    await after.start()
    try:
        with pytest.raises(QuotaExceeded, match="quota rows_per_day=12 exceeded") as err:
            await after.admit(acme, echo, 6)
        (await after.admit(acme, echo, 5)).release()
    finally:
        await after.aclose()
    assert err.value.retry_after_s <= 86400
    client = redis.Redis(port=redis_server.port)
    try:
        keys = sorted(key.decode() for key in client.keys("t2:*"))
        assert [key.rsplit(":", 1)[0] for key in keys] == [
            "t2:{acme}:*:rows_per_day",
            "t2:{acme}:*:rows_per_month",
        ]
        assert [int(client.get(key) or 0) for key in keys] == [12, 12]
        assert all(0 < client.ttl(key) <= 32 * 86400 for key in keys)
    finally:
        client.close()


async def test_quota_use_is_read_from_redis_across_replicas(redis_server: RedisServer) -> None:
    """``quota_used`` (what /usage reports) counts every replica's rows from Redis,
    and falls back to this process's own counts while Redis is down."""
    data = config_data(redis_server.url)
    data["tenants"][0]["quota"] = {"rows_per_day": 1000, "rows_per_month": 5000}
    config = parse_config(data)
    replicas = [TenantAdmission(config, shared_store_for(config.limits)) for _ in range(2)]
    for admission in replicas:
        await admission.start()
    try:
        tenant, model = Tenant("acme"), ModelKey("echo", "1")
        (await replicas[0].admit(tenant, model, 3)).release()
        (await replicas[1].admit(tenant, model, 4)).release()
        for admission in replicas:
            assert await admission.quota_used("acme") == {"rows_today": 7, "rows_this_month": 7}
        redis_server.stop()
        assert await replicas[0].quota_used("acme") == {"rows_today": 0, "rows_this_month": 0}
    finally:
        for admission in replicas:
            await admission.aclose()


async def test_concurrent_admits_share_one_pipeline_and_stay_exact(
    redis_server: RedisServer,
) -> None:
    """Calls admitted in one event-loop turn go to Redis as one pipeline; each script
    still runs atomically, so a burst of 10 admits exactly 10 of 50 at once."""
    data = config_data(redis_server.url)
    data["tenants"][0]["rate_limit"] = {"requests_per_s": 0.001, "burst": 10}
    config = parse_config(data)
    admission = TenantAdmission(config, shared_store_for(config.limits))
    await admission.start()
    try:
        tenant, model = Tenant("acme"), ModelKey("echo", "1")
        results = await asyncio.gather(
            *(admission.admit(tenant, model, 1) for _ in range(50)), return_exceptions=True
        )
        admitted = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, RateLimited)]
        assert len(admitted) == 10 and len(refused) == 40
        for permit in admitted:
            permit.release()
    finally:
        await admission.aclose()


def _refund_config(url: str, prefix: str, **rate_limit: float) -> MandantConfig:
    data = config_data(url, key_prefix=prefix)
    data["tenants"][0]["rate_limit"] = rate_limit
    data["tenants"][0]["quota"] = {"rows_per_day": 60, "rows_per_month": 100}
    return parse_config(data)


async def test_refunds_give_back_tokens_and_quota_rows_in_redis_exactly_once(
    redis_server: RedisServer,
) -> None:
    """One replica charges two calls and refunds one of them (three times over);
    another replica then finds exactly that call's tokens and quota rows back."""
    config = _refund_config(
        redis_server.url, "r1", requests_per_s=0.001, burst=2, rows_per_s=0.001, rows_burst=21
    )  # one row to spare at the end: the refusal names the request limit alone
    tenant, model = Tenant("acme"), ModelKey("echo", "1")
    first = _admission(config)
    await first.start()
    ran = await first.admit(tenant, model, 12)
    refused = await first.admit(tenant, model, 8)  # every token is taken now
    ran.release()
    ran.release(refund=True)  # it ran: stays charged
    refused.release(refund=True)
    refused.release(refund=True)
    refused.release()
    await first.aclose()  # sends what is queued

    second = _admission(config)
    await second.start()
    try:
        assert await second.quota_used("acme") == {"rows_today": 12, "rows_this_month": 12}
        (await second.admit(tenant, model, 8)).release()  # 1 request token, 8 rows: back
        with pytest.raises(RateLimited, match="requests_per_s"):
            await second.admit(tenant, model, 1)  # but only once
    finally:
        await second.aclose()


async def test_tokens_refunded_in_redis_stop_at_the_burst(redis_server: RedisServer) -> None:
    config = _refund_config(redis_server.url, "r2", rows_per_s=20, rows_burst=20)
    tenant, model = Tenant("acme"), ModelKey("echo", "1")
    admission = _admission(config)
    await admission.start()
    try:
        permit = await admission.admit(tenant, model, 20)
        await asyncio.sleep(1.1)  # the bucket refills to its burst meanwhile
        permit.release(refund=True)
    finally:
        await admission.aclose()
    admission = _admission(config)
    await admission.start()
    try:
        (await admission.admit(tenant, model, 20)).release()
        with pytest.raises(RateLimited, match="rows_per_s"):  # not 40 saved up
            await admission.admit(tenant, model, 10)
    finally:
        await admission.aclose()


async def test_tokens_refunded_in_redis_are_what_the_bucket_would_hold(
    redis_server: RedisServer,
) -> None:
    """Rows 2000/s, burst 2000. A refunded call's rows come back only as far as the
    bucket would hold them had it never been charged: refill lost at the burst while
    it waited is not credited again, in either order of two refunds."""
    data = config_data(redis_server.url, key_prefix="r2b")
    data["tenants"][0]["rate_limit"] = {"rows_per_s": 2000, "rows_burst": 2000}
    tenant, model = Tenant("acme"), ModelKey("echo", "1")
    admission = _admission(parse_config(data))
    await admission.start()
    try:
        waiting = await admission.admit(tenant, model, 2000)
        await asyncio.sleep(1.05)  # full again: the 2000 rows' refill lost at the burst
        (await admission.admit(tenant, model, 2000)).release()
        waiting.release(refund=True)  # nothing to give back
        with pytest.raises(RateLimited, match="rows_per_s"):  # 1000 rows: 0.5 s away
            await admission.admit(tenant, model, 1000)

        await asyncio.sleep(1.05)
        first = await admission.admit(tenant, model, 1000)  # found 2000
        second = await admission.admit(tenant, model, 1000)  # found 1000
        await asyncio.sleep(0.25)
        (await admission.admit(tenant, model, 500)).release()  # found about 500
        second.release(refund=True)  # 1000 back: the bucket at about 1000
        first.release(refund=True)  # 500 back: without either, 2000 less the 500 taken
        with pytest.raises(RateLimited, match="rows_per_s"):  # about 1500: 0.2 s short
            await admission.admit(tenant, model, 1900)
        (await admission.admit(tenant, model, 1300)).release()
    finally:
        await admission.aclose()


async def test_a_call_admitted_before_a_reload_gets_nothing_back_in_redis(
    redis_server: RedisServer,
) -> None:
    """As the local store (``TokenBucket.reconfigure``): a call charged under the rate
    a reload then changed is given nothing back. Its refund credited the refill since
    at the old rate (100 rows/s for 0.3 s, where the bucket now refills at 0.001/s)."""
    data = config_data(redis_server.url, key_prefix="r2d")
    data["tenants"][0]["rate_limit"] = {"rows_per_s": 100, "rows_burst": 10}
    tenant, model = Tenant("acme"), ModelKey("echo", "1")
    admission = _admission(parse_config(data))
    await admission.start()
    try:
        waiting = await admission.admit(tenant, model, 1)  # found 10
        data["tenants"][0]["rate_limit"] = {"rows_per_s": 0.001, "rows_burst": 10}
        admission.update(parse_config(data))
        (await admission.admit(tenant, model, 9)).release()  # about 0 left
        await asyncio.sleep(0.3)
        waiting.release(refund=True)  # without it: 1 row (and 0.3 ms of refill)
        with pytest.raises(RateLimited, match=r"rows_per_s=0\.001"):
            await admission.admit(tenant, model, 2)
    finally:
        await admission.aclose()


async def test_a_call_older_than_the_levels_redis_keeps_gets_nothing_back(
    redis_server: RedisServer,
) -> None:
    data = config_data(redis_server.url, key_prefix="r2c")
    data["tenants"][0]["rate_limit"] = {"rows_per_s": 0.001, "rows_burst": 100}
    tenant, model = Tenant("acme"), ModelKey("echo", "1")
    admission = _admission(parse_config(data))
    await admission.start()
    try:
        permits = [await admission.admit(tenant, model, 1) for _ in range(MAX_PEAKS + 1)]
        cut = MAX_PEAKS + 1 - MAX_PEAKS // 2  # the older half of the levels goes
        permits[cut - 2].release(refund=True)  # the next take's level is gone: charged
        permits[cut - 1].release(refund=True)
        permits[-1].release(refund=True)
        (await admission.admit(tenant, model, 100 - MAX_PEAKS - 1 + 2)).release()
        with pytest.raises(RateLimited, match="rows_per_s"):
            await admission.admit(tenant, model, 1)
    finally:
        await admission.aclose()


async def _nothing_was_taken(config: MandantConfig, tenant: Tenant, model: ModelKey) -> None:
    """Redis holds none of ``tenant``'s quota rows, and its one request token."""
    admission = _admission(config)
    await admission.start()
    try:
        assert await admission.quota_used(tenant.id) == {"rows_today": 0, "rows_this_month": 0}
        (await admission.admit(tenant, model, 1)).release()  # the one request token
    finally:
        await admission.aclose()


async def test_a_caller_cancelled_while_redis_admits_it_is_refunded(
    redis_server: RedisServer,
) -> None:
    config = _refund_config(redis_server.url, "r3", requests_per_s=0.001, burst=1)
    tenant, model = Tenant("acme"), ModelKey("echo", "1")
    admission = _admission(config)
    await admission.start()
    try:
        admitting = asyncio.create_task(admission.admit(tenant, model, 12))
        await asyncio.sleep(0)  # its script is on the way to Redis
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        assert admission.inflight("acme") == 0
    finally:
        await admission.aclose()
    await _nothing_was_taken(config, tenant, model)


async def test_a_caller_cancelled_as_redis_admission_is_handed_over_is_refunded(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel comes in the loop turn in which Redis' reply is handed to the caller,
    before the caller resumes (a client's deadline or disconnect can): Redis had taken
    the token and the rows, and nothing gave them back."""
    config = _refund_config(redis_server.url, "r4", requests_per_s=0.001, burst=1)
    tenant, model = Tenant("acme"), ModelKey("echo", "1")
    admission = _admission(config)
    await admission.start()
    armed: list[asyncio.Task[Any]] = []
    release = redis.asyncio.ConnectionPool.release

    async def cancel_after_the_reply(pool: Any, connection: Any) -> None:
        await release(pool, connection)
        if armed:  # the reply is read; it is handed over in this turn: cancel first
            asyncio.get_running_loop().call_soon(armed.pop().cancel)

    monkeypatch.setattr(redis.asyncio.ConnectionPool, "release", cancel_after_the_reply)
    try:
        admitting = asyncio.create_task(admission.admit(tenant, model, 12))
        armed.append(admitting)
        with pytest.raises(asyncio.CancelledError):
            await admitting
        assert admission.inflight("acme") == 0
    finally:
        monkeypatch.undo()
        await admission.aclose()
    await _nothing_was_taken(config, tenant, model)


def test_refused_calls_are_not_charged_in_redis_end_to_end(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Undecodable tensors and a v2 ``timeout`` already past, through a real server
    whose limits live in Redis: the quota rows come back, the whole quota still fits."""
    config = _refund_config(redis_server.url, "r4", requests_per_s=0.001, burst=20)
    metadata = (("authorization", f"Bearer {KEY}"),)
    with ServerThread(config, tmp_path) as server, grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for rows in (3, 4, 5, 6):
            for bad, code in (
                (_garbled(rows), grpc.StatusCode.INVALID_ARGUMENT),
                (_echo(rows, timeout_us=1), grpc.StatusCode.DEADLINE_EXCEEDED),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ModelInfer(bad, metadata=metadata)
                assert caught.value.code() == code
        assert server.app is not None
        admission = server.app.admission
        deadline = time.monotonic() + 20
        while server.call(admission.quota_used("acme"))["rows_today"] != 0:
            assert time.monotonic() < deadline, "36 refused rows stayed charged"
            time.sleep(0.02)
        stub.ModelInfer(_echo(60), metadata=metadata)  # the whole day's quota is there


def _echo(rows: int, timeout_us: int | None = None) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="echo")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 2])
    message.raw_input_contents.append(bytes(rows * 8))
    if timeout_us is not None:
        message.parameters["timeout"].int64_param = timeout_us
    return message


def _garbled(rows: int) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="echo")
    tensor = message.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 2])
    tensor.contents.fp32_contents.extend([0.0] * (rows * 2 + 1))
    return message
