"""Poisoned neighbour: tenant A (acme) sends calls the model raises on (ids past its
embedding table: ``IndexError``, as a real lookup model's) while tenant B (initech)
sends one valid call at a time, 20 ms apart (``--b-pause-ms``). Every batch A's calls
are in fails, and the batcher splits it until it finds them; B's latency alone and beside A, and, as
the control, beside A sending valid calls at the same concurrency (a plain flood).

    .venv/bin/python -m benchmarks.poisoned_neighbour [--seconds 6] [--callers 16 64]
        [--b-pause-ms 20]

A light tenant that calls rarely (``--b-pause-ms 1000``) finds the model suspect
(only A's failed batches ran since its last call), and its batch split in the slot.

The model: an embedding of 100 rows of 256 (ids [-1, 1] INT64) into the demo
classifier's MLP (256-512-512-16), and ``--run-ms`` (10) of waiting per run, whatever
its rows, as a device or a remote backend takes (a run of a GPU model, a Triton round
trip; the CPU is free meanwhile); batched (``max_batch_size`` 64, 2 ms); its module is
built here (``lookup_classifier``, a fixed seed). The server runs on core 0 (one torch thread),
A and B are load processes of their own on core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import grpc
import numpy as np
import torch
from torch import nn

from benchmarks._load import KEYS, demo_data, run_pinned, server, table

#: Ids of the embedding table (A's poisoned calls ask for one past it).
TABLE_ROWS = 100
MODEL = "lookup"
LOOKUP: dict[str, Any] = {
    "name": MODEL,
    "backend": "torch",
    "factory": "benchmarks.poisoned_neighbour:lookup_classifier",
    "factory_args": {"hidden": 512, "run_s": 0.01},
    "inputs": [{"name": "INPUT0", "datatype": "INT64", "shape": [-1, 1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 16]}],
    "batching": {"max_batch_size": 64, "max_queue_delay_ms": 2},
}
#: B's pause between its calls, by default.
B_PAUSE_MS = 20.0


def lookup_classifier(hidden: int = 512, run_s: float = 0.01) -> nn.Module:
    """Embedding (``TABLE_ROWS`` x 256) then an MLP 256 -> hidden -> hidden -> 16, from
    a fixed seed; each run waits ``run_s`` first (a device's time)."""
    generator = torch.Generator().manual_seed(0)

    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(TABLE_ROWS, 256)
            self.mlp = nn.Sequential(
                nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                nn.Linear(hidden, 16),
            )  # fmt: skip
            with torch.no_grad():
                for parameter in self.parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            time.sleep(run_s)
            return self.mlp(self.table(ids[:, 0]))  # type: ignore[no-any-return]

    return Lookup().eval()


def _request(poisoned: bool) -> bytes:
    from mandant_client._proto import grpc_service_pb2 as pb

    ids = np.full((1, 1), TABLE_ROWS if poisoned else 3, np.int64)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="INPUT0", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.append(ids.tobytes())
    return request.SerializeToString()


async def _loop(
    target: str, tenant: str, callers: int, poisoned: bool, pause_s: float, seconds: float
) -> tuple[list[float], dict[str, int]]:
    """``callers`` closed loops for ``seconds`` (after 1 s of warm-up): each call's
    latency (ms) in the window, and the count of each status."""
    payload = _request(poisoned)
    metadata = (("authorization", f"Bearer {KEYS[tenant]}"),)
    latencies: list[float] = []
    codes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        start = time.perf_counter()
        measure_from, end = start + 1.0, start + 1.0 + seconds

        async def caller() -> None:
            while (now := time.perf_counter()) < end:
                try:
                    await infer(payload, metadata=metadata, timeout=30)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                if now >= measure_from:
                    codes[code] = codes.get(code, 0) + 1
                    if code == "OK":
                        latencies.append((time.perf_counter() - now) * 1000)
                if pause_s:
                    await asyncio.sleep(pause_s)

        await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies, codes


def closed_loop(
    target: str, tenant: str, callers: int, poisoned: bool, pause_s: float, seconds: float
) -> tuple[list[float], dict[str, int]]:
    return asyncio.run(_loop(target, tenant, callers, poisoned, pause_s, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--callers", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--run-ms", type=float, default=10.0, help="each run's device time")
    parser.add_argument("--b-pause-ms", type=float, default=B_PAUSE_MS, help="B's pause")
    args = parser.parse_args()
    b_pause_s = args.b_pause_ms / 1000

    scenarios: list[tuple[str, tuple[int, bool] | None]] = [("B alone", None)]
    for callers in args.callers:
        for poisoned in (False, True):
            kind = "poisoned" if poisoned else "valid"
            scenarios.append((f"beside A: {callers} callers, {kind} calls", (callers, poisoned)))
    rows = []
    lookup = {**LOOKUP, "factory_args": {"hidden": 512, "run_s": args.run_ms / 1000}}
    with server(demo_data([lookup])) as running:
        for label, attack in scenarios:
            jobs: list[Any] = [
                (closed_loop, (running.target, "initech", 1, False, b_pause_s, args.seconds))
            ]
            if attack is not None:
                callers, poisoned = attack
                jobs.append(
                    (closed_loop, (running.target, "acme", callers, poisoned, 0.0, args.seconds))
                )
            results = run_pinned(jobs)
            (b_ms, b_codes), a_codes = results[0], results[1][1] if attack else {}
            ms = np.array(b_ms) if b_ms else np.array([np.nan])
            rows.append(
                [
                    label,
                    len(b_ms),
                    float(np.percentile(ms, 50)),
                    float(np.percentile(ms, 99)),
                    ", ".join(f"{k} {v}" for k, v in sorted(b_codes.items())),
                    float(sum(a_codes.values()) / args.seconds) if attack else "–",
                    ", ".join(f"{k} {v}" for k, v in sorted(a_codes.items())) or "–",
                ]
            )
    print(
        f"lookup model (embedding {TABLE_ROWS} x 256, MLP 256-512-512-16, {args.run_ms:g} ms "
        f"a run), batched 64 / 2 ms; B one call at a time, {args.b_pause_ms:g} ms apart; "
        f"{args.seconds:g} s per scenario"
    )
    print(
        table(
            ["scenario", "B answered", "B p50 ms", "B p99 ms", "B codes", "A calls/s", "A codes"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
