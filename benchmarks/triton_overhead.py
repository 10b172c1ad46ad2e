"""What Mandant adds in front of Triton: the same load against Triton directly and
through Mandant (``backend: triton``, no Mandant batching: Triton's dynamic batcher
groups the requests), at several concurrencies, in one run.

    .venv/bin/python -m benchmarks.triton_overhead [--seconds 5] [--concurrency 1 16 64]

Starts Triton (PyTriton, ``.venv-triton``; ``make triton-venv``) serving the tests'
``tiny`` model and a ``mandant serve`` subprocess mapping ``tiny`` to it. The load is
closed-loop: N workers in one asyncio client process, each sending one request
(one row, FP32 [1, 4]) as soon as its previous one is answered, for ``--seconds``
after a warm-up. Both targets are called with the same raw KServe v2 stubs, so the
client's own cost is the same on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import yaml

from benchmarks._server import mandant_server
from mandant.tenancy.keys import hash_key
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.triton_server import MODEL, TritonProcess

API_KEY = "bench-triton-key"


def write_config(folder: Path, triton_url: str) -> Path:
    config = {
        "server": {"grace_s": 0},
        "tenants": [{"id": "bench", "api_keys": [hash_key(API_KEY)]}],
        "models": [
            {"name": "tiny", "backend": "triton", "triton": {"url": triton_url, "model": MODEL}}
        ],
    }
    path = folder / "mandant.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def closed_loop(
    target: str,
    concurrency: int,
    seconds: float,
    warmup_s: float,
    metadata: tuple[tuple[str, str], ...],
) -> tuple[float, list[float]]:
    """Requests per second and every latency (s) over ``seconds``, after ``warmup_s``."""
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        start = time.perf_counter()
        measure_from = start + warmup_s
        end = measure_from + seconds

        async def worker() -> None:
            while True:
                sent = time.perf_counter()
                if sent >= end:
                    return
                await infer(request, metadata=metadata)
                done = time.perf_counter()
                if sent >= measure_from:
                    latencies.append(done - sent)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies) / seconds, latencies


def run(
    concurrencies: Sequence[int], seconds: float, warmup_s: float, mandant_cpus: str | None
) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    with TritonProcess(instances=1) as triton, tempfile.TemporaryDirectory() as folder:
        config = write_config(Path(folder), triton.url)
        with mandant_server(config, cpus=mandant_cpus) as mandant:
            auth = (("authorization", f"Bearer {API_KEY}"),)
            for concurrency in concurrencies:
                direct = asyncio.run(closed_loop(triton.url, concurrency, seconds, warmup_s, ()))
                through = asyncio.run(closed_loop(mandant, concurrency, seconds, warmup_s, auth))
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

    def ms(samples: list[float], q: float) -> float:
        return float(np.percentile(np.array(samples), q)) * 1e3

    header = (
        f"{'conc':>4} | {'direct req/s':>12} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'mandant req/s':>13} {'p50 ms':>7} {'p99 ms':>7} | {'added p50 ms':>12} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for concurrency, (d_rps, d_lat), (m_rps, m_lat) in rows:  # type: ignore[misc]
        print(
            f"{concurrency:>4} | {d_rps:>12.0f} {ms(d_lat, 50):>7.2f} {ms(d_lat, 99):>7.2f} | "
            f"{m_rps:>13.0f} {ms(m_lat, 50):>7.2f} {ms(m_lat, 99):>7.2f} | "
            f"{ms(m_lat, 50) - ms(d_lat, 50):>12.2f} {m_rps / d_rps:>6.0%}"
        )


if __name__ == "__main__":
    main()
