"""Garbage-collection pauses under load, with and without the heap freeze: the same
server (the 4096-wide classifier, batches of 16: issue 11's noisy-neighbour set-up) run
twice, as it is and with ``gc.freeze`` made a no-op (the server before
``mandant/heap.py``), under tenant A flooding at concurrency 64 while tenant B calls
one at a time. Per server: the full (oldest-generation) collections during the measured
window, timed inside the server by ``benchmarks/_probe``, and what the tenants saw.

    .venv/bin/python -m benchmarks.gc_pauses [--seconds 15] [--flood 64]

Each server runs alone on core 0 (one torch thread); A and B are load-generator
processes of their own on core 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks._load import SERVER_CPU, THREAD_ENV, Load, classifier, demo_data, prime, run, table
from benchmarks._server import mandant_process, probe_env, write_config

VARIANTS = [
    ("heap frozen (as served)", {}),
    ("no freeze (before)", {"MANDANT_PROBE_NO_FREEZE": "1"}),
]


def pauses_ms(log: Path, start: float, end: float) -> list[float]:
    """Durations of the full collections the probe logged between two wall-clock times."""
    if not log.exists():
        return []
    found = []
    for line in log.read_text().splitlines():
        ended, took_ms = (float(x) for x in line.split())
        if start <= ended <= end:
            found.append(took_ms)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--flood", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args()
    model = classifier(hidden=args.hidden, batching={"max_batch_size": 16, "max_queue_delay_ms": 2})
    config = write_config(demo_data([model]))
    rows = []
    for label, flags in VARIANTS:
        log = Path(tempfile.mkdtemp(prefix="mandant-gc-")) / "collections.log"
        env = probe_env({"MANDANT_PROBE_GC_LOG": str(log), **flags}, THREAD_ENV)
        with mandant_process(config, SERVER_CPU, env) as served:
            prime(served.target, "classifier")
            loads = [Load("initech", "classifier", 1), Load("acme", "classifier", args.flood)]
            window_start = time.time() + args.warmup
            b, a = run(served.target, loads, args.seconds, args.warmup)
            window_end = time.time()
        found = pauses_ms(log, window_start, window_end)
        rows.append(
            (
                label,
                len(found),
                max(found, default=0.0),
                sum(found),
                b.p(50),
                b.p(99),
                a.rps,
                a.p(99),
            )
        )
    print(
        f"classifier 256→{args.hidden}→{args.hidden}→16 (max_batch_size 16), A (acme) at "
        f"concurrency {args.flood}, B (initech) at 1; {args.seconds:g} s after "
        f"{args.warmup:g} s warm-up; server on core {SERVER_CPU}, clients on core 1"
    )
    print(
        table(
            ["server", "full collections", "longest ms", "total ms", "B p50 ms", "B p99 ms",
             "A req/s", "A p99 ms"],
            rows,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
