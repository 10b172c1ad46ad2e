"""Noisy neighbour: tenant A (acme) floods the shared classifier at concurrency 256
while tenant B (initech) sends one request at a time. B's latency alone, under the
flood with fair scheduling, and under the flood with FIFO batching; A's throughput
in both; and B on ``echo`` under the flood (the shared front end's share of B's wait).

    .venv/bin/python -m benchmarks.noisy_neighbour [--seconds 5] [--flood 256]
"""

from __future__ import annotations

import argparse

from benchmarks._load import ECHO, Load, classifier, demo_data, run, server, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--flood", type=int, default=256)
    args = parser.parse_args()
    fifo = {"max_batch_size": 64, "max_queue_delay_ms": 2, "policy": "fifo"}
    data = demo_data([classifier(), classifier("classifier-fifo", batching=fifo), ECHO])
    rows = []
    with server(data) as srv:
        scenarios = [
            ("B alone", "classifier", None),
            ("A floods, fair", "classifier", "classifier"),
            ("A floods, FIFO", "classifier-fifo", "classifier-fifo"),
            ("A floods (fair), B on echo", "echo", "classifier"),
        ]
        for label, b_model, a_model in scenarios:
            loads = [Load("initech", b_model, 1)]
            if a_model is not None:
                loads.append(Load("acme", a_model, args.flood))
            results = run(srv.target, loads, args.seconds)
            b = results[0]
            a_rps = results[1].rps if len(results) > 1 else float("nan")
            rows.append((label, b.p(50), b.p(99), b.rps, a_rps, sum(r.errors for r in results)))
    print(table(["scenario", "B p50 ms", "B p99 ms", "B req/s", "A req/s", "errors"], rows))


if __name__ == "__main__":
    main()
