"""Noisy neighbour: tenant A (acme) floods the shared classifier at concurrency 256
while tenant B (initech) sends one request at a time. B's latency alone, under the
flood with fair scheduling, and under the flood with FIFO batching; A's throughput
in both; and B on ``echo`` under the flood (the shared front end's share of B's wait).

    .venv/bin/python -m benchmarks.noisy_neighbour [--seconds 5] [--flood 256]
        [--hidden 512] [--max-concurrent-streams N]

``--hidden 512`` is the demo classifier: on a CPU core its batch of 64 costs less
than the front end spends receiving 64 calls, so requests wait in the gRPC front end,
not in the batcher's queue. ``--hidden 2048`` makes the model the bottleneck (the
case the batcher's fairness is for): A's requests then queue in the batcher.
``--max-concurrent-streams`` caps concurrent calls per client connection
(``server.max_concurrent_streams``), which bounds A's share of the front end.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks._load import ECHO, Load, classifier, demo_data, run, server, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--flood", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--max-concurrent-streams", type=int, default=None)
    args = parser.parse_args()
    fifo = {"max_batch_size": 64, "max_queue_delay_ms": 2, "policy": "fifo"}
    data: dict[str, Any] = demo_data(
        [
            classifier(hidden=args.hidden),
            classifier("classifier-fifo", hidden=args.hidden, batching=fifo),
            ECHO,
        ]
    )
    if args.max_concurrent_streams:
        data["server"] = {**data["server"], "max_concurrent_streams": args.max_concurrent_streams}
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
    streams = args.max_concurrent_streams or "grpc default"
    print(f"classifier hidden={args.hidden}, flood={args.flood}, streams/connection: {streams}")
    print(table(["scenario", "B p50 ms", "B p99 ms", "B req/s", "A req/s", "errors"], rows))


if __name__ == "__main__":
    main()
