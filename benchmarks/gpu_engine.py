"""GPU engine: rows/s that Mandant's engine (the dynamic batcher and the torch backend:
instances, one CUDA stream each, pinned staging buffers) serves from an MLP widened to
4096 on CUDA, against raw torch at the batch sizes the batcher formed (issue 11's
target: served ≥ 90% of raw).

    PYTHONPATH=server:clients/python .venv/bin/python -m benchmarks.gpu_engine \\
        [--seconds 10] [--device cuda:0] [--width 4096] [--instances 1 2] \\
        [--rows 16 64 256] [--concurrency 64] [--max-batch-size 256]

In process, without gRPC: closed-loop asyncio callers (``--concurrency`` of them, one
tenant, ``--rows`` rows of 256 FP32 features each) submit to the batcher on one event
loop, as the engine process's loop does; the front ends' share of the work is
``benchmarks/frontend.py``'s, and the whole one-process path is
``python -m benchmarks.compute_ceiling --device cuda --width 4096``. Raw rows/s come
from :func:`benchmarks.compute_ceiling.raw_seconds` (the same MLP, one thread, one
stream, input copied from host and output back every pass) at each batch size formed,
weighted by how often it was formed; a served/raw ratio above 1 is possible where
several instances overlap copies and kernels. Without CUDA it says so and exits (0);
``--device cpu --width 256 --seconds 1`` is a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._load import classifier, demo_data, table
from benchmarks.compute_ceiling import raw_seconds
from mandant.backends.torch import TorchBackend
from mandant.config import ModelSpec, parse_config
from mandant.events import NullObserver
from mandant.scheduling.batcher import DynamicBatcher
from mandant.types import InferRequest, ModelKey, Tenant

FEATURES = 256


class BatchSizes(NullObserver):
    """Counts the batch sizes the batcher runs while ``recording``."""

    def __init__(self) -> None:
        self.sizes: Counter[int] = Counter()
        self.recording = False

    def batch_executed(self, model: str, size: int, *rest: Any) -> None:
        # Only the size is read: the rest of the observer's signature is not copied here
        # (a copy fell out of step with it once: every batch failed).
        if self.recording:
            self.sizes[size] += 1


@dataclass
class Measured:
    rows: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    sizes: Counter[int] = field(default_factory=Counter)
    staging_bytes: int = 0

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def model_spec(device: str, width: int, instances: int, max_batch_size: int) -> ModelSpec:
    """The benchmarks' classifier (``benchmarks._load.classifier``) widened to ``width``."""
    batching = {"max_batch_size": max_batch_size, "max_queue_delay_ms": 2}
    entry = classifier(hidden=width, device=device, instances=instances, batching=batching)
    [spec] = parse_config(demo_data([entry])).model_specs(Path("."))
    return spec


async def serve(
    spec: ModelSpec, rows: int, concurrency: int, warmup_s: float, seconds: float
) -> Measured:
    observer = BatchSizes()
    assert spec.batching is not None
    backend = TorchBackend(spec)
    batcher = DynamicBatcher(backend, spec.batching, spec.name, observer)
    x = np.random.default_rng(0).standard_normal((rows, FEATURES), dtype=np.float32)
    x.setflags(write=False)  # as the codec hands inputs over
    tenant, key, ids = Tenant("acme"), ModelKey(spec.name, spec.version), itertools.count()
    measured = Measured()
    await backend.start()
    await batcher.start()
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + seconds

    async def caller() -> None:
        while (now := time.perf_counter()) < end:
            request = InferRequest(
                tenant, key, {"INPUT0": x}, ("OUTPUT0",), str(next(ids)), rows=rows
            )
            await batcher.submit(request)
            if now >= measure_from:
                observer.recording = True
                measured.rows += rows
                measured.latencies_ms.append((time.perf_counter() - now) * 1000)

    try:
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        measured.sizes = observer.sizes
        measured.staging_bytes = backend.staging_bytes
    finally:
        await batcher.aclose()
        await backend.aclose()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--device", default="cuda:0", help="a model's device setting")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=256)
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        print("no CUDA device here: benchmarks/gpu_engine.py measures the engine on a GPU; skipped")
        return
    # The raw baseline runs on one device: the model's, or the first GPU for "cuda"/"auto".
    raw_device = args.device if args.device == "cpu" or ":" in args.device else "cuda:0"
    card = torch.cuda.get_device_name(0) if raw_device != "cpu" else "CPU (smoke test)"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {card}, torch {torch.__version__}, {stamp}")
    raw_cache: dict[int, float] = {}
    results = []
    for instances, rows in itertools.product(args.instances, args.rows):
        spec = model_spec(args.device, args.width, instances, args.max_batch_size)
        measured = asyncio.run(serve(spec, rows, args.concurrency, args.warmup, args.seconds))
        sizes = measured.sizes
        if not sizes:  # every batch failed (an observer out of step): no figure to give
            raise SystemExit("no batch was recorded: see the server's errors above")
        for size in sizes:
            if size not in raw_cache:
                raw_cache[size] = raw_seconds(args.width, raw_device, size)
        batch_rows = sum(size * count for size, count in sizes.items())
        busy = sum(raw_cache[size] * count for size, count in sizes.items())
        served = measured.rows / args.seconds
        raw = batch_rows / busy if busy else float("nan")
        results.append(
            (
                args.device,
                instances,
                rows,
                args.concurrency,
                served,
                measured.p(50),
                measured.p(99),
                batch_rows / max(1, sum(sizes.values())),
                raw,
                f"{100 * served / raw:.0f}%",
                f"{measured.staging_bytes // 1024} KiB",
            )
        )
        print(
            f"instances {instances}, rows/req {rows}: batch sizes {dict(sorted(sizes.items()))}",
            file=sys.stderr,
        )
    headers = [
        "device",
        "instances/device",
        "rows/req",
        "conc",
        "served rows/s",
        "p50 ms",
        "p99 ms",
        "mean batch",
        "raw rows/s",
        "served/raw",
        "staging",
    ]
    print(table(headers, results))


if __name__ == "__main__":
    main()
