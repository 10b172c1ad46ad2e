"""Compute ceiling: 16-row requests to the classifier at concurrency 16. Rows/s served
against the model's raw in-process rows/s at the batch sizes the batcher formed (one
torch thread in both, on the server's core).

    .venv/bin/python -m benchmarks.compute_ceiling [--seconds 5] [--device cpu|cuda] [--width 512]

``--device cuda --width 4096`` widens the MLP's hidden layers for a GPU run.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks._load import SERVER_CPU, Load, classifier, demo_data, run, server, table


def raw_seconds(width: int, device: str, size: int, iterations: int = 50) -> float:
    """Seconds per forward pass at batch ``size``, input copied from host each time."""
    from mandant.demo.models import classifier as build

    module = build(seed=0, hidden=width).to(device)
    x = torch.randn(size, 256)
    with torch.inference_mode():
        for _ in range(5):
            module(x.to(device)).cpu()
        start = time.perf_counter()
        for _ in range(iterations):
            module(x.to(device)).cpu()
        return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    model = classifier(device=args.device, hidden=args.width)
    with server(demo_data([model])) as srv:
        [result] = run(
            srv.target, [Load("acme", "classifier", args.concurrency, args.rows)], args.seconds
        )
    sizes = srv.batches().get("classifier")
    if not sizes:  # every batch failed (an observer out of step): no figure to give
        raise SystemExit("no batch was recorded: see the server's errors above")
    os.sched_setaffinity(0, {int(SERVER_CPU)})
    torch.set_num_threads(1)
    rows = sum(size * count for size, count in sizes.items())
    busy = sum(raw_seconds(args.width, args.device, size) * count for size, count in sizes.items())
    raw = rows / busy
    print(
        table(
            [
                "device",
                "width",
                "conc",
                "rows/req",
                "served rows/s",
                "p50 ms",
                "p99 ms",
                "mean batch",
                "raw rows/s",
                "served/raw",
            ],
            [
                (
                    args.device,
                    args.width,
                    args.concurrency,
                    args.rows,
                    result.rows_per_s,
                    result.p(50),
                    result.p(99),
                    rows / sum(sizes.values()),
                    raw,
                    f"{100 * result.rows_per_s / raw:.0f}%",
                )
            ],
        )
    )
    print("\nbatch sizes formed:", dict(sorted(sizes.items())))


if __name__ == "__main__":
    main()
