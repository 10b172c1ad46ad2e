"""Looks inside a benchmarked server process where ``/proc`` and ``/metrics`` cannot.

Python imports this module at start-up (``sitecustomize``) when a benchmark puts this
folder first on the server's PYTHONPATH (:data:`benchmarks._server.PROBE_PATH`). It does
nothing unless one of these variables is set:

- ``MANDANT_PROBE_GC_LOG=FILE``: append one line per collection of the oldest
  generation to FILE: wall-clock end time, duration in ms.
- ``MANDANT_PROBE_NO_FREEZE=1``: ``gc.freeze`` does nothing: the server as it ran
  before ``mandant/heap.py`` moved its start-up heap out of the collector's way.
- ``MANDANT_PROBE_BARE_HANDLER=1``: ModelInfer is answered by the bare server's echo
  (``benchmarks/_bare_server.py``) inside a full ``mandant serve``: everything of the
  server but its call path.

It shadows any other ``sitecustomize`` of the interpreter (benchmarks only).
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

_GC_LOG = os.environ.get("MANDANT_PROBE_GC_LOG")
if _GC_LOG:
    _started = [0.0]

    def _timed(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        took_ms = (time.perf_counter() - _started[0]) * 1000
        with open(_GC_LOG, "a") as log:
            log.write(f"{time.time():.6f} {took_ms:.3f}\n")

    gc.callbacks.append(_timed)

if os.environ.get("MANDANT_PROBE_NO_FREEZE"):
    gc.freeze = lambda: None

if os.environ.get("MANDANT_PROBE_BARE_HANDLER"):
    import grpc

    from benchmarks._bare_server import echo
    from mandant.transport.grpc import gateway
    from mandant_client._proto import grpc_service_pb2 as pb

    _unary = gateway.Gate.unary

    def _bare_unary(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        handler = _unary(self, method, *args, **kwargs)
        if not method.endswith("/ModelInfer"):
            return handler

        async def handle(raw: bytes, context: Any) -> Any:
            return echo(pb.ModelInferRequest.FromString(raw), pb)

        return grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=None, response_serializer=handler.response_serializer
        )

    gateway.Gate.unary = _bare_unary  # type: ignore[method-assign]
