"""Single-request latency through the server vs the model's own in-process time.

    .venv/bin/python -m benchmarks.latency [--requests 2000]

The server runs pinned to core 0, this client on core 1; one request at a time
(concurrency 1), one row per request, FP32 [1, 256]. Prints p50/p99 per model next to
the raw in-process forward time of the same model at batch size 1 on one thread, and
the same call against a bare grpc.aio server (no Mandant at all) as the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import grpc
import numpy as np
import torch

from benchmarks._server import bare_grpc_server, mandant_server
from mandant.demo.models import classifier, echo
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc

MODELS = {"echo": (echo, 256), "classifier": (classifier, 256)}


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples), q))


def raw_forward_us(name: str, iterations: int) -> list[float]:
    factory, width = MODELS[name]
    module = factory()
    x = torch.from_numpy(np.ones((1, width), np.float32))
    times = []
    with torch.inference_mode():
        for _ in range(50):
            module(x)
        for _ in range(iterations):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1e6)
    return times


def served_us(target: str, name: str, iterations: int) -> list[float]:
    width = MODELS[name][1]
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(np.ones((1, width), np.float32).tobytes())
    metadata = (("authorization", "Bearer acme-demo-key"),)
    times = []
    with grpc.insecure_channel(target) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer  # type: ignore[no-untyped-call]
        for _ in range(100):
            infer(request, metadata=metadata)
        for _ in range(iterations):
            start = time.perf_counter()
            infer(request, metadata=metadata)
            times.append((time.perf_counter() - start) * 1e6)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    torch.set_num_threads(1)
    rows = []
    with bare_grpc_server(cpus="0") as target:
        bare = served_us(target, "echo", args.requests)
    rows.append(("bare grpc.aio", 0.0, percentile(bare, 50), percentile(bare, 99)))
    with mandant_server(cpus="0", env={"OMP_NUM_THREADS": "1"}) as target:
        for name in MODELS:
            served = served_us(target, name, args.requests)
            raw = raw_forward_us(name, args.requests)
            rows.append(
                (name, statistics.median(raw), percentile(served, 50), percentile(served, 99))
            )
    print(
        f"{'model':<15}{'raw forward p50':>16}{'served p50':>13}"
        f"{'served p99':>13}{'served - raw':>14}"
    )
    for name, raw_p50, p50, p99 in rows:
        print(
            f"{name:<15}{raw_p50:>13.0f} µs{p50:>10.0f} µs{p99:>10.0f} µs{p50 - raw_p50:>11.0f} µs"
        )
    print("bare grpc.aio: the same call against a Python gRPC server that only echoes bytes")


if __name__ == "__main__":
    main()
