"""Batching gain: one-row requests to the demo classifier at concurrency 1, 16 and 64,
with the dynamic batcher eager (the default), in delay mode, and off, next to ``echo``
(no model work: the front end's own ceiling).

    .venv/bin/python -m benchmarks.batching [--seconds 3] [--concurrency 1 16 64]

One server (core 0) serves all four models; the load generator runs on core 1.
"""

from __future__ import annotations

import argparse

from benchmarks._load import ECHO, Load, classifier, demo_data, run, server, table

MODELS = {
    "classifier": "batching on (eager)",
    "classifier-delay": "batching on (delay 2 ms)",
    "classifier-off": "batching off",
    "echo": "echo (front-end ceiling)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    data = demo_data(
        [
            classifier(),
            classifier(
                "classifier-delay",
                batching={"max_batch_size": 64, "max_queue_delay_ms": 2, "dispatch": "delay"},
            ),
            classifier("classifier-off", batching=None),
            ECHO,
        ]
    )
    rows = []
    with server(data) as srv:
        for concurrency in args.concurrency:
            for model, label in MODELS.items():
                [result] = run(srv.target, [Load("acme", model, concurrency)], args.seconds)
                rows.append(
                    (concurrency, label, result.rps, result.p(50), result.p(99), result.errors)
                )
    batches = srv.batches()
    print(table(["conc", "model", "req/s", "p50 ms", "p99 ms", "errors"], rows))
    for model in ("classifier", "classifier-delay"):
        sizes = batches.get(model, {})
        total = sum(sizes.values())
        mean = sum(k * v for k, v in sizes.items()) / total if total else 0.0
        print(f"\n{model}: {total} batches, mean {mean:.1f} rows, largest {max(sizes, default=0)}")


if __name__ == "__main__":
    main()
