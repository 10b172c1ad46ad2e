"""What recording costs per request on the hot path, in µs.

Times the observer calls one successful batched inference makes (request_finished,
request_timing, batch_executed of a 1-request batch, admitted) on a
PrometheusObserver with its in-process SLO windows and dashboard stats, against
the NullObserver baseline, over a configurable number of tenants and models; and
the same with ``FleetCounting`` in front (fleet-wide usage counters, summed in process
for Redis), plus what one flush of those sums to a real redis-server takes (once a
second per replica, whatever the call rate).

And ``--scrape T M``: what one ``/metrics`` scrape holds the event loop for, with T
tenants that each called M models (every series of theirs there): written on the loop
(``generate_latest`` of the registry, as it was) against the server's way now (the
series taken on the loop, ``Registry.scrape``, and written in a thread), the longest
the loop then waits between two turns while a ticker runs beside the scrape.

    .venv/bin/python -m benchmarks.metrics_cost [--requests 200000] [--scrape 1000 2]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from mandant.config import LimitsConfig, SloConfig, TenantConfig
from mandant.events import NullObserver, Observer
from mandant.heap import settle
from mandant.observability.live import LiveStats
from mandant.observability.metrics import PrometheusObserver
from mandant.observability.series import Registry
from mandant.observability.slo import SloTracker
from mandant.observability.usage import FleetCounting
from mandant.tenancy.redis_usage import RedisUsage


def build(
    tenants: int, models: int, registry: CollectorRegistry | None = None
) -> tuple[PrometheusObserver, list[str], list[str]]:
    ids = [f"tenant{i}" for i in range(tenants)]
    names = [f"model{i}" for i in range(models)]
    configs = [TenantConfig(id=t, slo=SloConfig(latency_ms=50)) for t in ids]
    slo = SloTracker({c.id: c.slo for c in configs if c.slo})
    live = LiveStats(ids, lambda: [(name, "") for name in names])
    registry = registry if registry is not None else CollectorRegistry()
    return PrometheusObserver(registry, configs, names, slo, live), ids, names


def per_request(observer: Observer, ids: list[str], names: list[str]) -> Callable[[int], None]:
    def run(i: int) -> None:
        record(observer, ids[i % len(ids)], names[i % len(names)], i)

    return run


def record(observer: Observer, tenant: str, model: str, i: int = 0) -> None:
    """What one successful batched call of ``tenant`` on ``model`` records."""
    observer.admitted(tenant, model, 4)
    observer.request_timing(tenant, model, 0.0004, 0.0021)
    observer.batch_executed(model, 4, 0.0021, {tenant: 4})
    observer.request_finished(tenant, model, "OK", 0.0031 + (i % 7) * 1e-4)


def measure(run: Callable[[int], None], requests: int) -> float:
    for i in range(1000):
        run(i)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(requests):
            run(i)
        best = min(best, (time.perf_counter() - start) / requests)
    return best * 1e6


async def scrape_cost(tenants: int, models: int) -> None:
    registry = Registry()
    observer, ids, names = build(tenants, models, registry)
    for tenant in ids:
        for model in names:
            record(observer, tenant, model)
    lines = generate_latest(registry).count(b"\n")
    settle()  # as the server's process does once it is up (``heap.py``)
    print(f"\nscrape of {tenants} tenants x {models} models: {lines:,} lines")
    print(f"{'written':<34}{'s':>8}{'loop held ms':>14}{'worst gap ms':>14}")
    for label in ("on the event loop (before)", "in a thread (Registry.scrape)"):
        gaps: list[float] = []
        ticking = asyncio.Event()
        tick = asyncio.create_task(_ticker(gaps, ticking))
        await ticking.wait()
        start = time.perf_counter()
        if label.startswith("on"):
            generate_latest(registry)
            held = time.perf_counter() - start
        else:
            scrape = registry.scrape()
            held = time.perf_counter() - start
            await asyncio.to_thread(scrape.text)
        took = time.perf_counter() - start
        await asyncio.sleep(0.01)
        tick.cancel()
        worst = max(gaps) * 1e3
        print(f"{label:<34}{took:>8.2f}{held * 1e3:>14.1f}{worst:>14.1f}")


async def _ticker(gaps: list[float], ticking: asyncio.Event) -> None:
    """Turns of the event loop every millisecond, the time between two in ``gaps``."""
    last = time.perf_counter()
    ticking.set()
    while True:
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--scrape", type=int, nargs=2, metavar=("TENANTS", "MODELS"))
    args = parser.parse_args()
    if args.scrape:
        asyncio.run(scrape_cost(*args.scrape))
        return
    print(f"{'observer':<22}{'tenants':>8}{'models':>8}{'µs/request':>12}{'overhead µs':>13}")
    for tenants, models in ((1, 1), (10, 4), (100, 10)):
        null = measure(per_request(NullObserver(), ["t"], ["m"]), args.requests)
        observer, ids, names = build(tenants, models)
        prom = measure(per_request(observer, ids, names), args.requests)
        print(f"{'NullObserver':<22}{tenants:>8}{models:>8}{null:>12.2f}{'':>13}")
        print(f"{'PrometheusObserver':<22}{tenants:>8}{models:>8}{prom:>12.2f}{prom - null:>13.2f}")
        usage = RedisUsage(LimitsConfig(store="redis", url="redis://127.0.0.1:1/0"))
        fleet = measure(per_request(FleetCounting(observer, usage), ids, names), args.requests)
        print(f"{'+ FleetCounting':<22}{tenants:>8}{models:>8}{fleet:>12.2f}{fleet - prom:>13.2f}")
        counting = FleetCounting(NullObserver(), usage)
        alone = measure(per_request(counting, ids, names), args.requests)
        name = "FleetCounting(Null)"
        print(f"{name:<22}{tenants:>8}{models:>8}{alone:>12.2f}{alone - null:>13.2f}")
    if shutil.which("redis-server"):
        asyncio.run(flush_cost())


async def flush_cost() -> None:
    """One flush of 100 tenants' sums (requests, rows, compute seconds by model:
    4 fields each) to a real redis-server on loopback."""
    from tests.integration.redis_server import RedisServer

    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory)).start()
        usage = RedisUsage(LimitsConfig(store="redis", url=server.url))
        try:
            timings = []
            for _ in range(20):
                for t in range(100):
                    for figure, label in (
                        ("requests", "OK"),
                        ("rows", "m"),
                        ("rejections", "quota"),
                    ):
                        usage.add(f"tenant{t}", figure, label, 3)
                    usage.add(f"tenant{t}", "compute_seconds", "m", 0.01)
                start = time.perf_counter()
                assert await usage.flush()
                timings.append(time.perf_counter() - start)
            print(f"flush of 100 tenants x 4 fields: {min(timings) * 1e3:.2f} ms (once a second)")
        finally:
            await usage.aclose()
            server.stop()


if __name__ == "__main__":
    main()
