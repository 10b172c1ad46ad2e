"""Shared parts of the batching benchmarks: a Mandant server subprocess pinned to one
core that records every batch it runs, a closed-loop grpc.aio load generator pinned
to the other core, and table printing.

    python -m benchmarks._load serve CONFIG STATS   # the server half (internal)
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from traceback import format_exc
from typing import Any, TypeVar

import grpc
import numpy as np
import yaml

from benchmarks._server import DEMO_CONFIG, free_port, pinned, subprocess_env

SERVER_CPU = "0"
CLIENT_CPU = 1
KEYS = {"acme": "acme-demo-key", "globex": "globex-demo-key", "initech": "initech-demo-key"}
#: One torch thread in the server and in raw measurements ("same thread settings").
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
T = TypeVar("T")


def demo_data(models: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The demo configuration with ``models`` instead of its own, limits removed
    (the benchmarks measure scheduling, not admission), model paths absolute."""
    data: dict[str, Any] = yaml.safe_load(DEMO_CONFIG.read_text())
    for tenant in data["tenants"]:
        for key in ("rate_limit", "max_concurrency", "quota"):
            tenant.pop(key, None)
    data.pop("limits", None)
    base = DEMO_CONFIG.parent
    resolved = []
    for model in models:
        model = dict(model)
        if "path" in model:
            model["path"] = str(base / model["path"])
        resolved.append(model)
    data["models"] = resolved
    return data


def classifier(name: str = "classifier", hidden: int = 512, **overrides: Any) -> dict[str, Any]:
    """The demo's shared classifier under another name, with ``overrides``; ``hidden``
    widens its hidden layers (weights built from the same seed into their own file)."""
    model: dict[str, Any] = {
        "name": name,
        "backend": "torch",
        "factory": "mandant.demo.models:classifier",
        "path": f"models/classifier-h{hidden}.safetensors",
        "weights_init": "mandant.demo.models:build_classifier_weights",
        "factory_args": {"seed": 0, "hidden": hidden},
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 256]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 16]}],
        "batching": {"max_batch_size": 64, "max_queue_delay_ms": 2},
    }
    model.update(overrides)
    return {k: v for k, v in model.items() if v is not None}


# On the CPU wherever the benchmark runs: echo measures the front end, and ``auto``
# would put it on a GPU, where every call is a copy to the device and back.
ECHO = {
    "name": "echo",
    "backend": "torch",
    "factory": "mandant.demo.models:echo",
    "device": "cpu",
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
}


# -- server -------------------------------------------------------------------------------


@dataclass
class Server:
    target: str
    stats_path: Path

    def batches(self) -> dict[str, Counter[int]]:
        """Batch sizes run per model (read after the server stopped)."""
        data = json.loads(self.stats_path.read_text())
        return {model: Counter({int(k): v for k, v in c.items()}) for model, c in data.items()}


@contextmanager
def server(data: Mapping[str, Any]) -> Iterator[Server]:
    """The server subprocess on core 0 with ``data`` as its configuration."""
    folder = Path(tempfile.mkdtemp(prefix="mandant-bench-"))
    config, stats = folder / "mandant.yaml", folder / "stats.json"
    port = free_port()
    data = dict(data)
    ports = {"grpc_port": port, "http_port": free_port(), "rest_port": free_port()}
    data["server"] = {**data["server"], **ports}
    config.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "benchmarks._load", "serve", str(config), str(stats)]
    proc = subprocess.Popen(
        pinned(command, SERVER_CPU),
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(THREAD_ENV),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening"):
            raise RuntimeError(f"server did not start: {line!r}")
        yield Server(f"127.0.0.1:{port}", stats)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


async def _serve(config_path: Path) -> dict[str, Counter[int]]:
    from mandant import app as app_module
    from mandant.config import load_config

    sizes: dict[str, Counter[int]] = {}

    class Recorder:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def batch_executed(self, model: str, size: int, *rest: Any) -> None:
            # The rest passed on as it came: a copy of the observer's signature fell
            # out of step with it once (every batch failed).
            sizes.setdefault(model, Counter())[size] += 1
            self._inner.batch_executed(model, size, *rest)

    make_scheduler = app_module.make_scheduler
    app_module.make_scheduler = lambda spec, backend, observer=None: make_scheduler(  # type: ignore[assignment]
        spec, backend, Recorder(observer)
    )
    app = app_module.App(load_config(config_path), config_path.parent)
    await app.start()
    print("listening", app.grpc_port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await app.aclose(0)
    return sizes


# -- load -----------------------------------------------------------------------------------


@dataclass
class Load:
    """``concurrency`` closed-loop callers of ``model`` as ``tenant``; ``client`` is
    ``raw`` (KServe v2 stubs over grpc.aio) or ``tritonclient`` (tritonclient.grpc.aio)."""

    tenant: str
    model: str
    concurrency: int
    rows: int = 1
    width: int = 256
    client: str = "raw"


@dataclass
class Result:
    load: Load
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    #: Calls (or stream messages) answered inside the measured window.
    answered: int = 0
    errors: int = 0
    #: The first error seen (status and message), "" when none.
    error: str = ""
    #: The server's CPU seconds over the measured window (main thread, other threads),
    #: where the load generator measured them.
    server_cpu_s: tuple[float, float] | None = None

    @property
    def rps(self) -> float:
        return self.answered / self.seconds

    def record(self, latency_ms: float | None = None) -> None:
        """One call answered inside the window (its latency where it was measured)."""
        self.answered += 1
        if latency_ms is not None:
            self.latencies_ms.append(latency_ms)

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.load.rows

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def failed(self, exc: BaseException | str) -> None:
        self.errors += 1
        if not self.error:
            self.error = exc if isinstance(exc, str) else describe(exc)


def describe(exc: BaseException) -> str:
    """One short line for a failed call: the gRPC status and the start of its details."""
    if isinstance(exc, grpc.aio.AioRpcError):
        text = f"{exc.code().name}: {exc.details() or ''}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text.replace("|", "/").replace("\n", " ")[:80]


def _input(load: Load) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((load.rows, load.width), dtype=np.float32)


async def _closed_loop(target: str, load: Load, warmup_s: float, seconds: float) -> Result:
    from mandant_client._proto import grpc_service_pb2 as pb
    from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name=load.model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[load.rows, load.width])
    request.raw_input_contents.append(_input(load).tobytes())
    metadata = (("authorization", f"Bearer {KEYS[load.tenant]}"),)
    channels = [grpc.aio.insecure_channel(target) for _ in range(max(1, load.concurrency // 32))]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
    result = Result(load, seconds)
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + seconds

    async def worker(n: int) -> None:
        infer = stubs[n % len(stubs)].ModelInfer
        while (now := time.perf_counter()) < end:
            try:
                await infer(request, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:
                result.failed(exc)  # counted, as fast as the server refuses
                continue
            if now >= measure_from:
                result.record((time.perf_counter() - now) * 1000)

    await asyncio.gather(*(worker(n) for n in range(load.concurrency)))
    for channel in channels:
        await channel.close()
    return result


async def _tritonclient_loop(target: str, load: Load, warmup_s: float, seconds: float) -> Result:
    """The same closed loop through ``tritonclient.grpc.aio`` as a Triton user writes it."""
    import tritonclient.grpc.aio as triton

    client = triton.InferenceServerClient(target)
    tensor = triton.InferInput("INPUT0", [load.rows, load.width], "FP32")
    tensor.set_data_from_numpy(_input(load))
    headers = {"authorization": f"Bearer {KEYS[load.tenant]}"}
    result = Result(load, seconds)
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + seconds

    async def worker() -> None:
        while (now := time.perf_counter()) < end:
            try:
                await client.infer(load.model, [tensor], headers=headers, client_timeout=30)
            except Exception as exc:  # tritonclient raises its own exception type
                result.failed(exc)
                continue
            if now >= measure_from:
                result.record((time.perf_counter() - now) * 1000)

    await asyncio.gather(*(worker() for _ in range(load.concurrency)))
    await client.close()
    return result


def prime(target: str, model: str, width: int = 256, calls: int = 100) -> None:
    """A few one-row calls before any measurement (first-call costs stay out of the
    figures); raises if the server does not answer them."""
    from mandant_client._proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(np.zeros((1, width), np.float32).tobytes())
    payload = request.SerializeToString()
    metadata = (("authorization", f"Bearer {KEYS['acme']}"),)
    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for _ in range(calls):
            infer(payload, metadata=metadata, timeout=60)


def closed_loop(target: str, load: Load, warmup_s: float, seconds: float) -> Result:
    """Run ``load`` against ``target`` for ``seconds`` after ``warmup_s`` (this process)."""
    loop = _tritonclient_loop if load.client == "tritonclient" else _closed_loop
    return asyncio.run(loop(target, load, warmup_s, seconds))


class JobFailed(RuntimeError):
    """A job of :func:`run_pinned` raised in its process (its traceback in the message)."""


def _call_pinned(
    index: int, cpu: int, function: Callable[..., Any], args: tuple[Any, ...], out: Any
) -> None:
    os.sched_setaffinity(0, {cpu})
    try:
        result = function(*args)
    except BaseException:
        # Said, not raised: the parent waits for one answer per job and would wait on.
        out.put((index, JobFailed(f"job {index} ({function.__name__}) raised:\n{format_exc()}")))
        raise
    out.put((index, result))


def run_pinned(
    jobs: Sequence[tuple[Callable[..., T], tuple[Any, ...]]], cpu: int = CLIENT_CPU
) -> list[T]:
    """Each ``function(*args)`` in a process of its own on ``cpu`` (the client core),
    all at the same time; their results in order. Functions and results must pickle;
    the processes start with :data:`THREAD_ENV` (one BLAS/OpenMP thread). A job that
    raises makes this raise :class:`JobFailed` once every job has ended."""
    os.environ.update(THREAD_ENV)  # read by numpy and torch when the children import them
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [
        context.Process(target=_call_pinned, args=(n, cpu, function, args, queue))
        for n, (function, args) in enumerate(jobs)
    ]
    for proc in procs:
        proc.start()
    results = dict(queue.get() for _ in procs)
    for proc in procs:
        proc.join()
    failed = [result for result in results.values() if isinstance(result, JobFailed)]
    if failed:
        raise failed[0]
    return [results[n] for n in range(len(jobs))]


def run(
    target: str,
    loads: Sequence[Load],
    seconds: float,
    warmup_s: float = 1.0,
    cpu: int = CLIENT_CPU,
) -> list[Result]:
    """Each load in a process of its own on the client core ``cpu``, all at once."""
    jobs = [(closed_loop, (target, load, warmup_s, seconds)) for load in loads]
    return run_pinned(jobs, cpu)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pastes straight into the README)."""

    def cell(value: object) -> str:
        return f"{value:,.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        import uvloop

        sizes = uvloop.run(_serve(Path(sys.argv[2])))
        Path(sys.argv[3]).write_text(json.dumps(sizes))
