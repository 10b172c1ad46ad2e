"""Start the servers the benchmarks measure as subprocesses (pinned to CPU cores with
taskset where available) and stop them afterwards: ``mandant serve``, the bare grpc.aio
floor, and configuration files for them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "examples" / "demo" / "mandant.yaml"
#: The demo's admin key (``server.admin_keys`` in the demo file): reads ``/metrics``.
ADMIN_KEY = "admin-demo-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(command: Sequence[str], cpus: str | None) -> list[str]:
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *command]
    return list(command)


def subprocess_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The caller's environment with the repository root first on PYTHONPATH (a git
    worktree keeps its own ``server/`` and ``clients/python`` after it)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


#: Put first on a server's PYTHONPATH, loads ``benchmarks/_probe/sitecustomize.py``.
PROBE_PATH = ROOT / "benchmarks" / "_probe"


def probe_env(flags: Mapping[str, str], base: Mapping[str, str] = {}) -> dict[str, str]:
    """``base`` plus what makes a server load the probe with ``flags`` (its
    ``MANDANT_PROBE_*`` variables; see ``benchmarks/_probe/sitecustomize.py``)."""
    path = subprocess_env()["PYTHONPATH"]
    return {**base, **flags, "PYTHONPATH": os.pathsep.join((str(PROBE_PATH), path))}


def write_config(data: Mapping[str, Any]) -> Path:
    """``data`` as a YAML file in a fresh temporary folder; its path."""
    path = Path(tempfile.mkdtemp(prefix="mandant-bench-")) / "mandant.yaml"
    path.write_text(yaml.safe_dump(dict(data)))
    return path


@dataclass(frozen=True)
class Served:
    """A running ``mandant serve``: its gRPC target and its HTTP side port."""

    target: str
    http_url: str
    pid: int
    rest_port: int = 0

    def batch_totals(self, model: str) -> tuple[float, float]:
        """(rows, batches) the server has run for ``model`` so far, from the
        ``mandant_batch_size`` histogram of ``/metrics`` (read with the admin key)."""
        rows, batches = metric_sums(
            f"{self.http_url}/metrics",
            ("mandant_batch_size_sum", "mandant_batch_size_count"),
            f'model="{model}"',
            {"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        return rows, batches


def metric_sums(
    url: str,
    names: Sequence[str],
    label: str,
    headers: Mapping[str, str] = {},
) -> list[float]:
    """Each Prometheus series ``name`` at ``url`` summed over the samples whose labels
    include ``label`` (e.g. ``model="mlp"``)."""
    request = urllib.request.Request(url, headers=dict(headers))
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    totals = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in totals and label in rest.split("}")[0]:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return [totals[name] for name in names]


@dataclass(frozen=True)
class Bare:
    """A running bare grpc.aio server: its target and process id."""

    target: str
    pid: int


@contextmanager
def bare_grpc_process(cpus: str | None = "0") -> Iterator[Bare]:
    """A running ``benchmarks._bare_server``: Python gRPC with nothing else."""
    port = free_port()
    command = pinned([sys.executable, "-m", "benchmarks._bare_server", str(port)], cpus)
    with _running(command, port, {}) as (target, pid):
        yield Bare(target, pid)


@contextmanager
def bare_grpc_server(cpus: str | None = "0") -> Iterator[str]:
    """Yield the target of :func:`bare_grpc_process`."""
    with bare_grpc_process(cpus) as bare:
        yield bare.target


@contextmanager
def mandant_process(
    config: Path = DEMO_CONFIG, cpus: str | None = "0", env: Mapping[str, str] = {}
) -> Iterator[Served]:
    """A running ``mandant serve --config config`` on free ports, pinned to ``cpus``."""
    port, http_port, rest_port = free_port(), free_port(), free_port()
    command = pinned(
        [
            sys.executable,
            "-m",
            "mandant",
            "serve",
            "--config",
            str(config),
            "--grpc-port",
            str(port),
            "--http-port",
            str(http_port),
            "--rest-port",
            str(rest_port),
            "--log-level",
            "WARNING",
        ],
        cpus,
    )
    with _running(command, port, env) as (target, pid):
        yield Served(target, f"http://127.0.0.1:{http_port}", pid, rest_port)


@contextmanager
def mandant_server(
    config: Path = DEMO_CONFIG, cpus: str | None = "0", env: dict[str, str] | None = None
) -> Iterator[str]:
    """Yield the gRPC target of a running ``mandant serve``."""
    with mandant_process(config, cpus, env or {}) as served:
        yield served.target


@contextmanager
def _running(
    command: Sequence[str], port: int, env: Mapping[str, str]
) -> Iterator[tuple[str, int]]:
    """The server's target and process id (taskset execs it: the same process)."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(env),
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited before it was ready:\n" + "".join(seen))
            seen.append(line)
            if "Mandant listening" in line:
                break
        # Keep reading what it prints (a full pipe would block the server's logging).
        threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _drain(stream: IO[str]) -> None:
    for _ in stream:
        pass


def thread_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds process ``pid`` has used so far: (its main thread, its other threads
    together), from ``/proc``."""
    ticks = os.sysconf("SC_CLK_TCK")
    main = other = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        if int(tid) == pid:
            main += seconds
        else:
            other += seconds
    return main, other
