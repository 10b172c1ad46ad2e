"""Admission benchmark: what per-tenant limits cost.

1. Admission cost per call (``admit`` + ``release``), in process, in µs: no limits,
   local limits (both buckets, both quotas, a concurrency cap; not binding), a
   refusal, and the Redis store (one Lua script per call; sequential, and 64 at once).
   Then Redis' own time per admitting script (``INFO commandstats``), one bucket: kept
   full, and drained (each take finds the bucket lower than the last did: the most
   levels kept for exact refunds), 20,000 scripts each.
2. ``echo`` throughput at concurrency 64 over gRPC, the server pinned to core 0 and
   the load generator to core 1: a tenant without limits vs one with limits
   configured but not binding, alternated on the same server; then the same on a
   server using Redis; and the rate at which the server refuses a flooding tenant.

    .venv/bin/python -m benchmarks.admission [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
import yaml

from benchmarks._load import CLIENT_CPU, ECHO, THREAD_ENV, Load, Result, demo_data, table
from benchmarks._load import _closed_loop as closed_loop
from benchmarks._server import mandant_server
from mandant.config import LimitsConfig, parse_config
from mandant.errors import RateLimited
from mandant.tenancy.admission import Permit, TenantAdmission, Unlimited, shared_store_for
from mandant.tenancy.limits import Rate
from mandant.tenancy.policy import Plan
from mandant.tenancy.redis_store import ACQUIRE_LUA, RedisStore
from mandant.types import ModelKey, Tenant
from tests.integration.redis_server import RedisServer

#: Limits that never bind at benchmark rates, but are all checked on every call.
NOT_BINDING: dict[str, Any] = {
    "rate_limit": {"requests_per_s": 1e9, "burst": 1e9, "rows_per_s": 1e12, "rows_burst": 1e12},
    "quota": {"rows_per_day": 10**15, "rows_per_month": 10**15},
    "max_concurrency": 10**6,
}
FLOODED: dict[str, Any] = {"rate_limit": {"requests_per_s": 1, "burst": 1}}
MODEL = ModelKey("echo", "1")
WARMUP_S = 0.5
Admit = Callable[[Tenant, ModelKey, int], Awaitable[Permit]]


def config_data(store: dict[str, Any]) -> dict[str, Any]:
    """The demo's tenants: acme unlimited, globex not binding, initech flooded."""
    data = demo_data([ECHO])
    data["limits"] = store
    for tenant in data["tenants"]:
        tenant.update({"globex": NOT_BINDING, "initech": FLOODED}.get(tenant["id"], {}))
    return data


async def _per_call_us(admit: Admit, tenant: Tenant, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        with contextlib.suppress(RateLimited):
            (await admit(tenant, MODEL, 1)).release()
    return (time.perf_counter() - start) / calls * 1e6


async def _concurrent_us(admit: Admit, tenant: Tenant, calls: int, concurrency: int) -> float:
    async def worker() -> None:
        for _ in range(calls // concurrency):
            (await admit(tenant, MODEL, 1)).release()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - start) / (calls // concurrency * concurrency) * 1e6


async def micro(redis_url: str) -> list[tuple[str, float]]:
    local = TenantAdmission(parse_config(config_data({"store": "local"})))
    redis_config = parse_config(config_data({"store": "redis", "url": redis_url}))
    shared = TenantAdmission(redis_config, shared_store_for(redis_config.limits))
    await shared.start()
    acme, globex, initech = Tenant("acme"), Tenant("globex"), Tenant("initech")
    n = 50_000
    try:
        await _per_call_us(local.admit, globex, n)  # warm up
        return [
            (
                "Unlimited (the data plane's default)",
                await _per_call_us(Unlimited().admit, acme, n),
            ),
            ("local, tenant without limits", await _per_call_us(local.admit, acme, n)),
            ("local, all limits, admitted", await _per_call_us(local.admit, globex, n)),
            ("local, refused (RateLimited raised)", await _per_call_us(local.admit, initech, n)),
            ("redis, admitted, one at a time", await _per_call_us(shared.admit, globex, 3000)),
            ("redis, admitted, 64 at once", await _concurrent_us(shared.admit, globex, 6400, 64)),
        ]
    finally:
        await shared.aclose()


#: A bucket that each take finds full, and one that each finds lower than the last.
SCRIPT_BUCKETS = {"kept full": (1e9, 1e6), "drained": (1e-3, 1e6)}
SCRIPTS = 20_000


def redis_script_us(redis_url: str) -> list[tuple[str, float]]:
    """Redis' own µs per admitting script, by :data:`SCRIPT_BUCKETS` (the store's
    arguments as it sends them, pipelined)."""
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(LimitsConfig(store="redis", url=redis_url, key_prefix="bench"))
    sha = client.script_load(ACQUIRE_LUA)
    costs = []
    for label, (per_s, burst) in SCRIPT_BUCKETS.items():
        plan = Plan(
            "bench", label, buckets=((("bench", label), Rate("requests_per_s", per_s, burst)),)
        )
        keys, args, _ = store._arguments(plan, 1, time.time())
        client.config_resetstat()
        pipe = client.pipeline(transaction=False)
        for _ in range(SCRIPTS):
            pipe.evalsha(sha, len(keys), *keys, "9999999999", *args)
        pipe.execute()
        costs.append(
            (label, float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]))
        )
    client.close()
    return costs


def _client(target: str, tenants: list[str], seconds: float, out: Any) -> None:
    """The load generator: one process on the client core, one load after another."""
    os.sched_setaffinity(0, {CLIENT_CPU})

    async def each() -> list[Result]:
        loads = [Load(tenant, "echo", concurrency=64, width=16) for tenant in tenants]
        await closed_loop(target, loads[0], 0.0, 1.0)  # a fresh server's first second
        return [await closed_loop(target, load, WARMUP_S, seconds) for load in loads]

    out.put(asyncio.run(each()))


def throughput(store: dict[str, Any], tenants: list[str], seconds: float) -> list[Result]:
    folder = Path(tempfile.mkdtemp(prefix="mandant-admission-"))
    config = folder / "mandant.yaml"
    config.write_text(yaml.safe_dump(config_data(store)))
    with mandant_server(config, cpus="0", env=THREAD_ENV) as target:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        client = context.Process(target=_client, args=(target, tenants, seconds, queue))
        client.start()
        results: list[Result] = queue.get()
        client.join()
    return results


#: Unlimited (A) and limited (B) runs in A B B A order, so that drift cancels out.
ABBA = ["acme", "globex", "globex", "acme"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    began = time.monotonic()
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="mandant-redis-"))).start()
    try:
        costs = asyncio.run(micro(redis_server.url))
        print("\nAdmission cost per call (admit + release, in process)\n")
        print(table(["path", "µs/call"], [(name, round(us, 2)) for name, us in costs]))
        print("\nRedis' own time per admitting script, one requests bucket\n")
        print(table(["bucket", "µs/script in Redis"], redis_script_us(redis_server.url)))
        local = throughput({"store": "local"}, ABBA * 2 + ["initech"], args.seconds)
        remote = throughput({"store": "redis", "url": redis_server.url}, ABBA, args.seconds)
    finally:
        redis_server.stop()

    labels = {"acme": "no limits", "globex": "limits, not binding", "initech": "flooded (1/s)"}
    rows: list[tuple[object, ...]] = []
    losses = {}
    for store, results in (("local", local), ("redis", remote)):
        by_tenant: dict[str, list[Result]] = {}
        for result in results:
            by_tenant.setdefault(result.load.tenant, []).append(result)
        for tenant, runs in by_tenant.items():
            rps = [r.rps for r in runs]
            refused = sum(r.errors for r in runs) / (len(runs) * (args.seconds + WARMUP_S))
            rows.append(
                (store, labels[tenant], len(runs), round(sum(rps) / len(rps)),
                 f"{min(rps):.0f}–{max(rps):.0f}", round(refused),
                 round(float(np.median([r.p(50) for r in runs])), 1),
                 round(float(np.median([r.p(99) for r in runs])), 1))
            )  # fmt: skip
        ok = {t: sum(r.rps for r in by_tenant[t]) for t in ("acme", "globex")}
        losses[store] = 1 - ok["globex"] / ok["acme"]
    print(
        f"\necho, FP32 [1, 16], concurrency 64, {args.seconds:g} s per run after "
        f"{WARMUP_S:g} s warm-up; server on core 0, load generator on core 1\n"
    )
    headers = ["store", "tenant", "runs", "ok req/s", "range", "refused/s", "p50 ms", "p99 ms"]
    print(table(headers, rows))
    for store, loss in losses.items():
        print(f"\n{store}: throughput loss with limits configured, not binding: {loss:+.1%}")
    print(f"\n(total {time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
