"""What Mandant adds in front of Triton: the same load against Triton directly and
through Mandant (``backend: triton``, no Mandant batching: Triton's dynamic batcher
groups the requests), at several concurrencies, in one run.

    .venv/bin/python -m benchmarks.triton_overhead [--seconds 5] [--concurrency 1 16 64]

Starts Triton (PyTriton, ``.venv-triton``; ``make triton-venv``) serving the tests'
``tiny`` model and a ``mandant serve`` subprocess mapping ``tiny`` to it. The load is
closed-loop: N workers in one asyncio client process, each sending one request
(one row, FP32 [1, 4]) as soon as its previous one is answered, for ``--seconds``
after a warm-up (``benchmarks._load``'s loop). Both targets are called with the same
raw KServe v2 stubs, so the client's own cost is the same on both sides.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from benchmarks._load import Load, Result, closed_loop, demo_data
from benchmarks._server import mandant_server
from benchmarks._server import write_config as write_yaml
from tests.triton_server import MODEL, TritonProcess


def write_config(triton_url: str) -> Path:
    """The demo's tenants (no limits) and ``tiny`` forwarded to Triton, no batching."""
    model = {"name": MODEL, "backend": "triton", "triton": {"url": triton_url, "model": MODEL}}
    return write_yaml(demo_data([model]))


def run(
    concurrencies: Sequence[int], seconds: float, warmup_s: float, mandant_cpus: str | None
) -> list[tuple[int, Result, Result]]:
    """Per concurrency: Triton directly, then through Mandant (this process's client)."""
    rows = []
    with (
        TritonProcess(instances=1) as triton,
        mandant_server(write_config(triton.url), cpus=mandant_cpus) as mandant,
    ):
        for concurrency in concurrencies:
            load = Load("acme", MODEL, concurrency, rows=1, width=4)
            direct = closed_loop(triton.url, load, warmup_s, seconds)
            through = closed_loop(mandant, load, warmup_s, seconds)
            rows.append((concurrency, direct, through))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--mandant-cpus",
        default=None,
        help="pin Mandant (taskset -c); the client then runs on the other cores",
    )
    args = parser.parse_args()
    if args.mandant_cpus is not None:
        pinned = {int(c) for c in args.mandant_cpus.split(",")}
        others = set(range(os.cpu_count() or 1)) - pinned
        if others:
            os.sched_setaffinity(0, others)
    rows = run(args.concurrency, args.seconds, args.warmup, args.mandant_cpus)

    header = (
        f"{'conc':>4} | {'direct req/s':>12} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'mandant req/s':>13} {'p50 ms':>7} {'p99 ms':>7} | {'added p50 ms':>12} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for concurrency, d, m in rows:
        print(
            f"{concurrency:>4} | {d.rps:>12.0f} {d.p(50):>7.2f} {d.p(99):>7.2f} | "
            f"{m.rps:>13.0f} {m.p(50):>7.2f} {m.p(99):>7.2f} | "
            f"{m.p(50) - d.p(50):>12.2f} {m.rps / d.rps if d.rps else float('nan'):>6.0%}"
        )
        if d.errors or m.errors:
            print(f"     errors: direct {d.errors} {d.error}; Mandant {m.errors} {m.error}")


if __name__ == "__main__":
    main()
