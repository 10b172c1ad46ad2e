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
- ``MANDANT_PROBE_BARE_ANSWER=1``: ModelInfer passes Mandant's gate as served (key,
  cap, door, gathering, parsing, the call's metrics), then the servicer answers with
  the bare server's echo: everything of the call path but the data plane and encoding.
- ``MANDANT_PROBE_NO_MODEL=1``: the in-process model's call (``TorchBackend.infer``)
  returns its inputs as its outputs, in order, without torch or the backend's own
  bookkeeping: everything of the call path but the model.
- ``MANDANT_PROBE_SECTIONS=FILE``: time the steps of Mandant's ModelInfer call path
  (:data:`SECTIONS`) in thread CPU, from entry to exit, nested ones inside their
  callers'; on SIGUSR1 write ``label calls total_s`` lines to FILE. An async step also
  counts what ran while it waited (nothing, for ``echo``: its model runs inline). Each
  timer adds about half a microsecond to every step around it.

It shadows any other ``sitecustomize`` of the interpreter (benchmarks only).
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

_GC_LOG = os.environ.get("MANDANT_PROBE_GC_LOG")
if _GC_LOG:
    _gc_log_path: str = _GC_LOG
    _started = [0.0]

    def _timed(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        took_ms = (time.perf_counter() - _started[0]) * 1000
        with open(_gc_log_path, "a") as log:
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

if os.environ.get("MANDANT_PROBE_BARE_ANSWER"):
    from benchmarks._bare_server import echo
    from mandant.transport.grpc.servicer import InferenceServicer
    from mandant_client._proto import grpc_service_pb2 as pb

    async def _bare_answer(self: Any, request: Any, call: Any, context: Any) -> Any:
        return echo(request, pb)

    InferenceServicer.ModelInfer = _bare_answer  # type: ignore[method-assign]

if os.environ.get("MANDANT_PROBE_NO_MODEL"):
    from mandant.backends.torch import TorchBackend

    async def _inputs_back(self: Any, inputs: Any, **_: Any) -> dict[str, Any]:
        return dict(zip(self._output_names, inputs.values(), strict=False))

    TorchBackend.infer = _inputs_back  # type: ignore[method-assign]

#: (module, attribute path, label) of the steps ``MANDANT_PROBE_SECTIONS`` times, in
#: call order; a module-level function is timed where its caller looks it up.
SECTIONS = (
    ("mandant.transport.grpc.gateway", "Gate._caller", "authentication"),
    ("mandant.transport.grpc.gateway", "parse", "parse the message"),
    ("mandant.service", "DataPlane.infer", "data plane, in all"),
    ("mandant.service", "check_inputs", "data plane: validate the inputs"),
    ("mandant.tenancy.admission", "TenantAdmission.admit", "data plane: admission"),
    ("mandant.transport.grpc.codec", "ProtoInferRequest.decode_inputs", "data plane: decode"),
    ("mandant.scheduling.direct", "DirectScheduler.submit", "data plane: scheduler, in all"),
    ("mandant.backends.torch", "TorchBackend._forward_on_cpu", "scheduler: model call (torch)"),
    ("mandant.observability.stats", "StatsObserver.request_timing", "scheduler: timing event"),
    ("mandant.observability.stats", "StatsObserver.batch_executed", "scheduler: batch event"),
    ("mandant.transport.grpc.servicer", "encode_infer_response", "encode the answer"),
    ("mandant.observability.stats", "StatsObserver.request_finished", "call-finished event"),
    ("mandant.transport.grpc.stream", "InferStream._answer", "ModelStreamInfer message, in all"),
    ("mandant.transport.grpc.stream", "parse", "parse the message"),
    ("mandant.transport.grpc.stream", "encode_infer_response", "encode the answer"),
)
#: The label of the whole ModelInfer handler (the steps above are parts of it).
HANDLER_SECTION = "ModelInfer handler, in all"
#: The label of a unary call's hold for company (``scheduling/gather.py``): the other
#: calls' work the loop did meanwhile, taken out of the handler's figure.
HELD_SECTION = "held for company (taken out of the handler)"
#: The label of one ModelStreamInfer message's answer (its key was checked at the
#: stream's start; the task, window and write around it are not in it).
STREAM_SECTION = "ModelStreamInfer message, in all"

_SECTIONS = os.environ.get("MANDANT_PROBE_SECTIONS")
if _SECTIONS:
    import asyncio
    import importlib
    import signal
    from collections.abc import Callable

    import grpc

    from mandant.transport.grpc import gateway

    _sections_path: str = _SECTIONS
    _spent: dict[str, list[float]] = {}  # label → [calls, thread CPU seconds]

    def _timed_sync(label: str, step: Callable[..., Any]) -> Callable[..., Any]:
        clock, tally = time.thread_time, _spent.setdefault(label, [0, 0.0])

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return step(*args, **kwargs)
            finally:
                tally[0] += 1
                tally[1] += clock() - start

        return timed

    def _timed_async(label: str, step: Callable[..., Any]) -> Callable[..., Any]:
        clock, tally = time.thread_time, _spent.setdefault(label, [0, 0.0])

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return await step(*args, **kwargs)
            finally:
                tally[0] += 1
                tally[1] += clock() - start

        return timed

    def _wrap(label: str, step: Callable[..., Any]) -> Callable[..., Any]:
        coroutine = asyncio.iscoroutinefunction(step)
        return (_timed_async if coroutine else _timed_sync)(label, step)

    for _module, _path, _label in SECTIONS:
        _owner: Any = importlib.import_module(_module)
        *_parents, _name = _path.split(".")
        for _parent in _parents:
            _owner = getattr(_owner, _parent)
        setattr(_owner, _name, _wrap(_label, getattr(_owner, _name)))

    _unary_unwrapped = gateway.Gate.unary

    def _timed_unary(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        handler = _unary_unwrapped(self, method, *args, **kwargs)
        if not method.endswith("/ModelInfer"):
            return handler
        return grpc.stream_unary_rpc_method_handler(  # the gate reads the message itself
            _wrap(HANDLER_SECTION, handler.stream_unary),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    gateway.Gate.unary = _timed_unary  # type: ignore[method-assign]

    from mandant.scheduling.gather import CallGather

    _wait_unwrapped = CallGather.wait
    _held = _timed_async(HELD_SECTION, lambda future: future)

    def _timed_wait(self: Any, *args: Any) -> Any:
        held = _wait_unwrapped(self, *args)
        return None if held is None else _held(held)

    CallGather.wait = _timed_wait  # type: ignore[method-assign,assignment]

    def _write_sections(*_: Any) -> None:
        """Write the totals beside FILE, then rename them into place: whoever waits
        for FILE reads it whole."""
        with open(f"{_sections_path}.part", "w") as out:
            for label, (calls, spent_s) in _spent.items():
                out.write(f"{label}\t{calls:.0f}\t{spent_s:.6f}\n")
        os.replace(f"{_sections_path}.part", _sections_path)

    signal.signal(signal.SIGUSR1, _write_sections)
