"""Unary ``echo`` calls/s with 1, 2, 4, 8, 12 gRPC front ends (``workers: N``; 1 is the
single process), for a host with cores to spare (issue 11's multi-core table).

    .venv/bin/python -m benchmarks.workers_scaling --front-ends 1,2,4,8,12 --cores 16

With ``--cores C``, N front ends get cores 0..N (one more for the engine; the single
process gets core 0) and the load the remaining ones, one load process per core;
otherwise every server runs on ``--server-cpus`` and ``--load-processes`` share
``--load-cpus``. The load: closed-loop load generators (light clients: pre-serialized bytes
over raw grpc.aio, ``--connections`` connections each, so the kernel spreads them over
the front ends) share ``--load-cpus``, each pinned to one of them. Prints calls/s per
layout and the ratio to one process; the load must not be the limit: the table says
the load generators' CPU use so a saturated client side shows.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks._load import THREAD_ENV
from benchmarks.workers import cpu_s, server, throughput


def cpu_list(text: str) -> list[int]:
    """``0-3,8`` → [0, 1, 2, 3, 8]."""
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def _pinned_call(cpu: int, function: Callable[..., Any], args: tuple[Any, ...], out: Any) -> None:
    os.sched_setaffinity(0, {cpu})
    started = time.process_time()
    result = function(*args)
    out.put((result, time.process_time() - started))


def run_spread(
    function: Callable[..., int], args: tuple[Any, ...], cpus: Sequence[int], processes: int
) -> tuple[int, float]:
    """``function(*args)`` in ``processes`` processes spread over ``cpus``: the sum of
    their results and of their CPU seconds."""
    os.environ.update(THREAD_ENV)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [
        context.Process(target=_pinned_call, args=(cpus[n % len(cpus)], function, args, queue))
        for n in range(processes)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    return sum(r for r, _ in results), sum(s for _, s in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--front-ends", default="1,2,4,8,12")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--load-cpus", default="1")
    parser.add_argument("--load-processes", type=int, default=1)
    parser.add_argument("--inflight", type=int, default=64, help="per load process")
    parser.add_argument("--connections", type=int, default=8, help="per load process")
    parser.add_argument("--cores", type=int, help="split 0..C-1 between server and load")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    print(
        f"echo, one row FP32[1,256]; load: {args.inflight} in flight and "
        f"{args.connections} connections per load process"
    )
    print()
    print("| gRPC front ends | server cores | load cores | calls/s | × one process "
          "| server CPU s/s | load CPU s/s |")  # fmt: skip
    print("|---:|---|---|---:|---:|---:|---:|")
    baseline = 0.0
    for count in (int(n) for n in args.front_ends.split(",")):
        if args.cores:
            last = min(count if count > 1 else 0, args.cores - 2)
            server_cpus, load_cpus = f"0-{last}", list(range(last + 1, args.cores))
            processes = len(load_cpus)
        else:
            server_cpus, load_cpus = args.server_cpus, cpu_list(args.load_cpus)
            processes = args.load_processes
        with server(count, ",".join(map(str, cpu_list(server_cpus)))) as running:
            pids = [p for group in running.pids().values() for p in group]
            before = sum(cpu_s(p) for p in pids)
            started = time.perf_counter()
            answered, load_cpu_s = run_spread(
                throughput,
                (running.target, args.inflight, args.connections, args.warmup, args.seconds),
                load_cpus,
                processes,
            )
            wall_s = time.perf_counter() - started
            server_cpu_s = sum(cpu_s(p) for p in pids) - before
        rps = answered / args.seconds
        baseline = baseline or rps
        name = "1 (one process)" if count == 1 else str(count)
        print(
            f"| {name} | {server_cpus} | {load_cpus[0]}-{load_cpus[-1]} | {rps:,.0f} "
            f"| {rps / baseline:.2f} | {server_cpu_s / wall_s:.1f} "
            f"| {load_cpu_s / wall_s:.1f} |"
        )


if __name__ == "__main__":
    main()
