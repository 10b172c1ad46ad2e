"""``workers: 1`` (one process) against ``workers: 2`` (two gRPC front ends and one
engine, ``server/mandant/workers/``), in one run, on ``echo``:

- concurrency 1: p50/p99 of one-row calls (a light client: pre-serialized bytes over
  raw grpc.aio), in rounds alternating between the two servers, the p50 the extra
  processes add, and each process's CPU per call meanwhile (the one server core is
  nearly that busy: the latency a layout adds is about the CPU it adds);
- concurrency ``--inflight`` over ``--connections`` connections (each its own TCP
  connection, so the kernel spreads them over the front ends): calls/s, and the CPU
  each server process spent per call (from /proc, utime + stime);
- the data plane's own cost per call in process (``DataPlane.infer`` of a parsed
  request awaited back to back): what the engine runs per call in both layouts, so
  that engine CPU per call minus it is the engine's IPC and bookkeeping (the engine
  alone, driven through its link at ``--inflight`` calls at a time; and at one, where
  each call is a message of its own and its Python runs cold after each wake-up);
- front end and engine on cores apart (``--no-own-cores`` skips it): the front ends
  on core 0, the engine (and the supervisor) moved to core 1 beside the load, which
  uses one connection so that one front end serves it all; against one process on
  core 0 under the same load. What a GPU host's layout costs per call in each role: a
  front end's CPU per call sets what each front-end core serves, the engine's what
  the one engine could serve in all if that cost held (10⁶ / its µs per call: an
  extrapolation, the engine is far from busy here).

    .venv/bin/python -m benchmarks.workers [--seconds 5] [--inflight 64] [--connections 8]

``--cpus`` (default ``0``) pins every server process; the load runs on core 1. On the
2-core development machine the two layouts share one core, so the table shows what
the split costs, not what it gains (that needs cores to give the front ends:
``benchmarks/gpu_host.sh`` on a 16-core host).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from benchmarks._load import ECHO, KEYS, THREAD_ENV, demo_data, run_pinned
from benchmarks._server import free_port, pinned, subprocess_env, write_config

INFER = "/inference.GRPCInferenceService/ModelInfer"
METADATA = (("authorization", f"Bearer {KEYS['acme']}"),)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
#: Concurrency-1 measurements alternate between the layouts this many times.
ROUNDS = 6
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _payload(width: int = 256) -> bytes:
    from mandant_client._proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, width])
    request.raw_input_contents.append(np.ones((1, width), np.float32).tobytes())
    return request.SerializeToString()


# -- the server ----------------------------------------------------------------------


@dataclass
class Running:
    process: subprocess.Popen[str]
    target: str

    def pids(self) -> dict[str, list[int]]:
        """The server's processes by role: ``server`` (one process, or the supervisor),
        ``engine``, ``front-end``."""
        found: dict[str, list[int]] = {"server": [self.process.pid], "engine": [], "front-end": []}
        pid = self.process.pid
        for child in map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"worker" in argv:
                found[argv[argv.index(b"worker") + 1].decode()].append(child)
        return found


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


@contextmanager
def cpu_spent(pids: dict[str, list[int]]) -> Iterator[dict[str, float]]:
    """The CPU seconds each role's processes spend in the block, filled in at its end."""
    before = {role: sum(map(cpu_s, group)) for role, group in pids.items()}
    spent: dict[str, float] = {}
    yield spent
    spent.update({role: sum(map(cpu_s, group)) - before[role] for role, group in pids.items()})


@contextmanager
def started(command: list[str], cpus: str, ready: str) -> Iterator[subprocess.Popen[str]]:
    """``command`` pinned to ``cpus``, once a line of its output contains ``ready``; the
    rest of its output is read and dropped; terminated at the end."""
    process = subprocess.Popen(
        pinned(command, cpus),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=subprocess_env(THREAD_ENV),
    )
    try:
        stdout = process.stdout
        assert stdout is not None
        for line in stdout:
            if ready in line:
                break
        else:
            raise RuntimeError(f"{command[3]} exited before it served")
        threading.Thread(target=lambda: [None for _ in stdout], daemon=True).start()
        yield process
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def server(workers: int, cpus: str) -> Iterator[Running]:
    data = demo_data([ECHO])
    data["server"] = {**data["server"], "workers": workers}
    config = write_config(data)
    port = free_port()
    command = [
        sys.executable, "-m", "mandant", "serve", "--config", str(config),
        "--grpc-port", str(port), "--http-port", str(free_port()),
        "--rest-port", str(free_port()), "--log-level", "WARNING",
    ]  # fmt: skip
    with started(command, cpus, "Mandant listening") as process:
        yield Running(process, f"127.0.0.1:{port}")


@dataclass(frozen=True)
class LayoutRun:
    """One layout's figures: ``latencies_ms`` of one call at a time, ``calls_per_s`` at
    ``--inflight``, and the CPU seconds each role spent over ``calls`` calls."""

    workers: int
    latencies_ms: list[float]
    calls_per_s: float
    cpu_s_by_role: dict[str, float]
    calls: float


@dataclass
class Spent:
    """CPU seconds by role over a number of calls, summed over several windows."""

    cpu_s_by_role: dict[str, float] = field(default_factory=dict)
    calls: int = 0

    def add(self, cpu_s_by_role: dict[str, float], calls: int) -> None:
        for role, seconds in cpu_s_by_role.items():
            self.cpu_s_by_role[role] = self.cpu_s_by_role.get(role, 0.0) + seconds
        self.calls += calls

    def per_call_us(self) -> dict[str, float]:
        return {role: s / max(1, self.calls) * 1e6 for role, s in self.cpu_s_by_role.items()}


# -- load (in a process pinned to the client core) -------------------------------------


#: Calls :func:`latency` makes before it times any.
WARMUP_CALLS = 200


def latency(target: str, calls: int) -> list[float]:
    """Milliseconds of ``calls`` one-row calls made one at a time (after
    :data:`WARMUP_CALLS` untimed)."""
    payload = _payload()
    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary(INFER)
        for _ in range(WARMUP_CALLS):
            infer(payload, metadata=METADATA, timeout=30)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            infer(payload, metadata=METADATA, timeout=30)
            times.append((time.perf_counter() - start) * 1000)
    return times


def throughput(
    target: str, inflight: int, connections: int, warmup_s: float, seconds: float
) -> int:
    """Calls answered in ``seconds`` after ``warmup_s``, ``inflight`` at a time."""

    async def run() -> int:
        payload = _payload()
        channels = [
            grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(connections)
        ]
        calls = [channel.unary_unary(INFER) for channel in channels]
        answered = 0
        start = time.perf_counter()
        measure_from, end = start + warmup_s, start + warmup_s + seconds

        async def worker(n: int) -> None:
            nonlocal answered
            infer = calls[n % len(calls)]
            while (now := time.perf_counter()) < end:
                await infer(payload, metadata=METADATA, timeout=30)
                if now >= measure_from:
                    answered += 1

        await asyncio.gather(*(worker(n) for n in range(inflight)))
        for channel in channels:
            await channel.close()
        return answered

    return asyncio.run(run())


# -- the engine alone: its link driven directly, no gRPC ------------------------------------


@contextmanager
def engine_alone(cpus: str) -> Iterator[tuple[int, Path]]:
    """``mandant worker engine`` on ``cpus``: (its pid, its requests socket)."""
    from mandant.workers.process import ANNOUNCE
    from mandant.workers.sockets import EngineSockets

    data = demo_data([ECHO])
    config = write_config(data)
    folder = Path(tempfile.mkdtemp(prefix="mandant-bench-engine-"))
    command = [
        sys.executable, "-m", "mandant", "worker", "engine", "--config", str(config),
        "--sockets", str(folder), "--parent", str(os.getpid()),
        "--http-port", str(free_port()), "--rest-port", str(free_port()),
        "--log-level", "WARNING",
    ]  # fmt: skip
    with started(command, cpus, ANNOUNCE) as process:
        yield process.pid, EngineSockets(folder).requests


def drive_engine(path: Path, inflight: int, warmup_s: float, seconds: float) -> int:
    """Calls made through an :class:`EngineLink` (what a front end does after parsing),
    ``inflight`` at a time; how many were answered in ``seconds`` after ``warmup_s``."""
    from mandant.transport.grpc.codec import ProtoInferRequest
    from mandant.types import Call, Tenant
    from mandant.workers.engine_link import EngineLink
    from mandant_client._proto import grpc_service_pb2 as pb

    async def run() -> int:
        link = EngineLink(path)
        await link.start()
        message = pb.ModelInferRequest.FromString(_payload())
        tenant = Tenant("acme")
        answered = 0
        start = time.perf_counter()
        measure_from, end = start + warmup_s, start + warmup_s + seconds

        async def worker() -> None:
            nonlocal answered
            while (now := time.perf_counter()) < end:
                await link.infer(Call(tenant), ProtoInferRequest(message), None)
                if now >= measure_from:
                    answered += 1

        await asyncio.gather(*(worker() for _ in range(inflight)))
        await link.aclose()
        return answered

    return asyncio.run(run())


# -- the data plane in process -----------------------------------------------------------


def plane_cost_us(calls: int) -> float:
    """µs per ``DataPlane.infer`` of a parsed one-row echo request, back to back."""
    from mandant.app import App
    from mandant.config import parse_config
    from mandant.transport.grpc.codec import ProtoInferRequest
    from mandant.types import Call
    from mandant_client._proto import grpc_service_pb2 as pb

    async def run() -> float:
        data = demo_data([ECHO])
        data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0}
        app = App(parse_config(data, "bench"), Path(tempfile.mkdtemp()))
        await app.start()
        try:
            tenant = app.directory.authenticate(f"Bearer {KEYS['acme']}")
            message = pb.ModelInferRequest.FromString(_payload())
            for _ in range(500):
                await app.plane.infer(Call(tenant), ProtoInferRequest(message), None)
            start = time.perf_counter()
            for _ in range(calls):
                await app.plane.infer(Call(tenant), ProtoInferRequest(message), None)
            return (time.perf_counter() - start) / calls * 1e6
        finally:
            await app.aclose(0)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--cpus", default="0", help="cores of the server processes")
    parser.add_argument(
        "--no-own-cores", dest="own_cores", action="store_false",
        help="skip the table of front end and engine on cores of their own",
    )  # fmt: skip
    args = parser.parse_args()
    os.environ.update(THREAD_ENV)

    layouts: list[LayoutRun] = []
    with server(1, args.cpus) as one, server(2, args.cpus) as two:
        # Concurrency 1 in alternating rounds (both servers up, the other one idle), so
        # that drift of the machine hits both layouts alike.
        latencies_ms: dict[int, list[float]] = {1: [], 2: []}
        quiet = {1: Spent(), 2: Spent()}  # their CPU by role, over every call made
        for _ in range(ROUNDS):
            for workers, running in ((1, one), (2, two)):
                with cpu_spent(running.pids()) as spent:
                    (block,) = run_pinned([(latency, (running.target, args.requests // ROUNDS))])
                latencies_ms[workers].extend(block)
                quiet[workers].add(spent, len(block) + WARMUP_CALLS)
        for workers, running in ((1, one), (2, two)):
            load = (running.target, args.inflight, args.connections, args.warmup, args.seconds)
            with cpu_spent(running.pids()) as spent:
                (answered,) = run_pinned([(throughput, load)])
            # CPU of the whole window (warm-up included) over every call of the window.
            calls = answered * (args.warmup + args.seconds) / args.seconds
            layouts.append(
                LayoutRun(workers, latencies_ms[workers], answered / args.seconds, spent, calls)
            )

    (plane_us,) = run_pinned([(plane_cost_us, (20000,))], cpu=1)
    alone: dict[int, tuple[int, float]] = {}  # in flight: (calls answered, engine µs a call)
    with engine_alone("1") as (engine_pid, path):
        for inflight in (args.inflight, 1):
            before_s = cpu_s(engine_pid)
            (driven,) = run_pinned(
                [(drive_engine, (path, inflight, args.warmup, args.seconds))], cpu=0
            )
            calls = driven * (args.warmup + args.seconds) / args.seconds
            alone[inflight] = driven, (cpu_s(engine_pid) - before_s) / calls * 1e6
    driven, engine_alone_us = alone[args.inflight]

    print(f"echo, one row FP32[1,256]; server processes on core(s) {args.cpus}, load on core 1")
    print()
    load_column = f"calls/s (c={args.inflight}, {args.connections} conn.)"
    columns = "CPU µs/call: server | engine | front ends"
    print(f"| layout | p50 ms (c=1) | p99 ms (c=1) | {load_column} | {columns} |")
    print("|---|---|---|---|---|---|---|")
    for layout in layouts:
        workers, times = layout.workers, layout.latencies_ms
        name = "workers: 1" if workers == 1 else f"workers: {workers} (+ engine)"
        per_call = {role: s / layout.calls * 1e6 for role, s in layout.cpu_s_by_role.items()}
        engine = f"{per_call['engine']:.0f}" if workers > 1 else "—"
        fronts = f"{per_call['front-end']:.0f}" if workers > 1 else "—"
        print(
            f"| {name} | {statistics.median(times):.3f} | {np.percentile(times, 99):.3f} "
            f"| {layout.calls_per_s:,.0f} | {per_call['server']:.0f} | {engine} | {fronts} |"
        )
    one_worker, two_workers = layouts
    added_us = (
        statistics.median(two_workers.latencies_ms) - statistics.median(one_worker.latencies_ms)
    ) * 1000
    engine_us = two_workers.cpu_s_by_role["engine"] / two_workers.calls * 1e6
    print()
    print(f"added p50 at concurrency 1 (workers: 2 vs 1): {added_us:.0f} µs")
    print(f"data plane per call in process (DataPlane.infer, echo): {plane_us:.1f} µs")
    print(
        f"engine CPU per call in the server above: {engine_us:.1f} µs "
        f"(data plane {plane_us:.1f} µs, the rest IPC, bookkeeping and sharing one core)"
    )
    print(
        f"engine alone on core 1, driven through its link from core 0 at {args.inflight} "
        f"in flight: {driven / args.seconds:,.0f} calls/s, {engine_alone_us:.1f} µs engine CPU "
        f"per call = data plane {plane_us:.1f} + IPC and bookkeeping "
        f"{engine_alone_us - plane_us:.1f} µs"
    )
    driven_one, engine_one_us = alone[1]
    print(
        f"the same at 1 in flight: {driven_one / args.seconds:,.0f} calls/s, "
        f"{engine_one_us:.1f} µs engine CPU per call (one call per message, its Python cold "
        "after each wake-up)"
    )
    single, split = quiet[1].per_call_us(), quiet[2].per_call_us()
    print(
        f"CPU µs per call at concurrency 1 (the rounds above, warm-up calls included): "
        f"workers: 1 {single['server']:.0f}; workers: 2 engine {split['engine']:.0f}, "
        f"front ends {split['front-end']:.0f} (with one server core, nearly all of each call)"
    )
    if args.own_cores:
        print()
        own_cores_report(own_cores(args.inflight, args.warmup, args.seconds), args.inflight)


# -- front end and engine on cores of their own ------------------------------------------


def _move(pid: int, cpus: str) -> None:
    """Every thread of ``pid`` onto ``cpus``."""
    subprocess.run(["taskset", "-a", "-pc", cpus, str(pid)], capture_output=True, check=True)


@dataclass(frozen=True)
class OwnCores:
    """:func:`own_cores`' two runs, and the CPU seconds of each front end in the
    second (one should have served every call)."""

    single: LayoutRun
    split: LayoutRun
    front_end_s: list[float]


def _loaded(
    running: Running, inflight: int, warmup_s: float, seconds: float
) -> tuple[LayoutRun, list[float]]:
    """``inflight`` calls at a time over one connection: calls/s and CPU by role, and
    each front end's CPU seconds."""
    pids = running.pids()
    fronts = pids["front-end"]
    each = {str(pid): [pid] for pid in fronts}  # each front end apart
    with cpu_spent(pids) as spent, cpu_spent(each) as by_front_end:
        (answered,) = run_pinned([(throughput, (running.target, inflight, 1, warmup_s, seconds))])
    front_end_s = [by_front_end[str(pid)] for pid in fronts]
    calls = answered * (warmup_s + seconds) / seconds
    return LayoutRun(len(fronts) or 1, [], answered / seconds, spent, calls), front_end_s


def own_cores(inflight: int, warmup_s: float, seconds: float) -> OwnCores:
    """One process on core 0; then ``workers: 2`` with its front ends on core 0 and the
    engine and supervisor on core 1 (beside the load): the same load on each."""
    with server(1, "0") as one:
        single, _ = _loaded(one, inflight, warmup_s, seconds)
    with server(2, "0,1") as two:
        pids = two.pids()
        for pid in pids["front-end"]:
            _move(pid, "0")
        for pid in (*pids["engine"], *pids["server"]):
            _move(pid, "1")
        split, front_end_s = _loaded(two, inflight, warmup_s, seconds)
    return OwnCores(single, split, front_end_s)


def own_cores_report(runs: OwnCores, inflight: int) -> None:
    single, split = runs.single, runs.split
    engine_us = split.cpu_s_by_role["engine"] / split.calls * 1e6
    front_us = split.cpu_s_by_role["front-end"] / split.calls * 1e6
    single_us = single.cpu_s_by_role["server"] / single.calls * 1e6
    print(
        f"front end and engine on cores of their own: {inflight} in flight over one "
        "connection (one front end serves it), echo"
    )
    print()
    print("| layout | calls/s | CPU µs/call: process | front end | engine |")
    print("|---|---|---|---|---|")
    print(f"| workers: 1, core 0 | {single.calls_per_s:,.0f} | {single_us:.0f} | — | — |")
    print(
        f"| workers: 2, front ends core 0, engine core 1 (with the load) "
        f"| {split.calls_per_s:,.0f} | — | {front_us:.0f} | {engine_us:.0f} |"
    )
    shares = " / ".join(f"{s / (sum(runs.front_end_s) or 1):.0%}" for s in runs.front_end_s)
    print()
    print(f"the front ends' shares of their CPU: {shares} (the connection's one serves)")
    busy = engine_us * split.calls_per_s / 1e6
    print(
        f"one front-end core against one process: {split.calls_per_s / single.calls_per_s:.2f}x "
        f"the calls/s; the engine, {busy:.0%} busy, spent {engine_us:.0f} µs a call: if that "
        f"held, one engine would serve at most {1e6 / engine_us:,.0f} calls/s of echo, "
        f"{1e6 / engine_us / single.calls_per_s:.1f}x one process, however many front ends "
        "feed it (an extrapolation)"
    )


if __name__ == "__main__":
    main()
