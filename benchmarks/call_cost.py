"""Mandant's own Python cost per inference call, in process: the demo server's gRPC
method handler for ModelInfer (the gate, the data plane, the scheduler, the model, the
metrics, the encoding) awaited back to back with a stand-in for grpc's context, so
that nothing of gRPC's own work is in the figure. A cProfile table of the same calls
says where the time goes (``CALL_COST_ROWS`` rows of it, 15 by default).

Front-end gathering (``server.front_gather_ms``) is off here: calls awaited back to
back from one coroutine, each answered within the loop turn it began in, look to it
like calls that arrive together, and it held each for its window waiting for company
that never came (642 µs a call instead of 185 on the AMD host, in the twenty-fifth
session): it measured the gather's timer, not the call's Python.

``--between-mb N`` times the same calls, and the model's backend call alone, once more
with N MiB of an array and about N MiB of Python objects written between calls,
outside the timed part: on a busy core gRPC's work between two of Mandant's calls
leaves the caches holding its data, not Mandant's, and this shows what that costs the
same Python.

    .venv/bin/python -m benchmarks.call_cost [--model echo] [--calls 20000] [--profile]
        [--between-mb 4]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mandant.app import App
from mandant.transport.grpc.servicer import method_handlers
from mandant_client._proto import grpc_service_pb2 as pb
from tests.servers import demo_config


class _Context:
    """What the handler asks of grpc's ServicerContext on a successful call."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    async def read(self) -> bytes:
        return self._raw  # the gate's streaming handler reads the call's one message

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer acme-demo-key"),)

    def time_remaining(self) -> None:
        return None

    def set_trailing_metadata(self, trailers: Any) -> None:
        return None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        callback(self)  # the answer is "written" at once: the call has ended

    async def abort(self, code: Any, message: str) -> None:
        raise RuntimeError(message)


async def main(args: argparse.Namespace) -> None:
    app = App(demo_config(front_gather_ms=0), Path(tempfile.mkdtemp()))
    await app.start()
    try:
        grpc_server = app.grpc
        handler = method_handlers(grpc_server.servicer, grpc_server.gate)["ModelInfer"]
        message = pb.ModelInferRequest(model_name=args.model)
        message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, args.width])
        message.raw_input_contents.append(np.ones((1, args.width), np.float32).tobytes())
        raw = message.SerializeToString()
        context, serialize = _Context(raw), handler.response_serializer
        stream_unary = handler.stream_unary  # unary methods: read by the gate (6915e33)

        async def behavior(_raw: bytes, context: _Context) -> Any:
            return await stream_unary(None, context)

        for _ in range(2000):
            serialize(await behavior(raw, context))
        start = time.perf_counter()
        for _ in range(args.calls):
            serialize(await behavior(raw, context))
        per_call_us = (time.perf_counter() - start) / args.calls * 1e6
        print(f"model {args.model}, FP32 [1, {args.width}], {args.calls} calls back to back, "
              f"pid {os.getpid()}: {per_call_us:.1f} µs per call")  # fmt: skip
        if args.between_mb:
            await _between(app, behavior, serialize, raw, context, args)
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(5000):
                serialize(await behavior(raw, context))
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(
                int(os.environ.get("CALL_COST_ROWS", "15"))
            )
    finally:
        await app.aclose(0)


async def _between(
    app: App, behavior: Any, serialize: Any, raw: bytes, context: _Context, args: argparse.Namespace
) -> None:
    """The handler, and the model's backend alone, timed back to back and with
    ``args.between_mb`` MiB written between calls (not timed)."""
    tenant = app.directory.authenticate("Bearer acme-demo-key")
    backend = app.plane.model(tenant, args.model).backend
    inputs = {"INPUT0": np.ones((1, args.width), np.float32)}
    junk = np.zeros(args.between_mb << 20, np.uint8)
    objects = [{"n": n} for n in range((args.between_mb << 20) // 256)]  # ≈ N MiB of them

    async def handler() -> None:
        serialize(await behavior(raw, context))

    async def model() -> None:
        await backend.infer(inputs)

    for label, step in (("handler, in all", handler), ("the model's backend call", model)):
        for between in (False, True):
            spent = 0.0
            for _ in range(args.calls // 4):
                if between:
                    junk += 1
                    for entry in objects:
                        entry["n"] += 1
                start = time.perf_counter()
                await step()
                spent += time.perf_counter() - start
            where = f"{args.between_mb} + {args.between_mb} MiB written between calls"
            where = where if between else "back to back"
            print(f"{label}, {where}: {spent / (args.calls // 4) * 1e6:.1f} µs per call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="echo")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--between-mb", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
