"""Mandant's own Python cost per inference call, in process: the demo server's gRPC
method handler for ModelInfer (the gate, the data plane, the scheduler, the model, the
metrics, the encoding) awaited back to back with a stand-in for grpc's context, so
that nothing of gRPC's own work is in the figure. A cProfile table of the same calls
says where the time goes.

    .venv/bin/python -m benchmarks.call_cost [--model echo] [--calls 20000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mandant.app import App
from mandant.transport.grpc.servicer import method_handlers
from mandant_client._proto import grpc_service_pb2 as pb
from tests.servers import demo_config


class _Context:
    """What the handler asks of grpc's ServicerContext on a successful call."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer acme-demo-key"),)

    def time_remaining(self) -> None:
        return None

    def set_trailing_metadata(self, trailers: Any) -> None:
        return None

    async def abort(self, code: Any, message: str) -> None:
        raise RuntimeError(message)


async def main(args: argparse.Namespace) -> None:
    app = App(demo_config(), Path(tempfile.mkdtemp()))
    await app.start()
    try:
        grpc_server = app.grpc
        handler = method_handlers(grpc_server.servicer, grpc_server.gate)["ModelInfer"]
        message = pb.ModelInferRequest(model_name=args.model)
        message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, args.width])
        message.raw_input_contents.append(np.ones((1, args.width), np.float32).tobytes())
        raw = message.SerializeToString()
        context, behavior, serialize = _Context(), handler.unary_unary, handler.response_serializer
        for _ in range(2000):
            serialize(await behavior(raw, context))
        start = time.perf_counter()
        for _ in range(args.calls):
            serialize(await behavior(raw, context))
        per_call_us = (time.perf_counter() - start) / args.calls * 1e6
        print(f"model {args.model}, FP32 [1, {args.width}], {args.calls} calls back to back, "
              f"pid {os.getpid()}: {per_call_us:.1f} µs per call")  # fmt: skip
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(5000):
                serialize(await behavior(raw, context))
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    finally:
        await app.aclose(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="echo")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    asyncio.run(main(parser.parse_args()))
