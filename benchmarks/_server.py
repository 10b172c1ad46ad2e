"""Start a Mandant server as a subprocess for benchmarks (pinned to CPU cores with
taskset where available) and stop it afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "examples" / "demo" / "mandant.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(command: Sequence[str], cpus: str | None) -> list[str]:
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *command]
    return list(command)


@contextmanager
def bare_grpc_server(cpus: str | None = "0") -> Iterator[str]:
    """Yield the target of ``benchmarks._bare_server``: Python gRPC with nothing else."""
    port = free_port()
    command = pinned([sys.executable, "-m", "benchmarks._bare_server", str(port)], cpus)
    with _running(command, port, {}) as target:
        yield target


@contextmanager
def mandant_server(
    config: Path = DEMO_CONFIG, cpus: str | None = "0", env: dict[str, str] | None = None
) -> Iterator[str]:
    """Yield the gRPC target of a running ``mandant serve``."""
    port = free_port()
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
            str(free_port()),
            "--rest-port",
            str(free_port()),
            "--log-level",
            "WARNING",
        ],
        cpus,
    )
    with _running(command, port, env or {}) as target:
        yield target


@contextmanager
def _running(command: Sequence[str], port: int, env: dict[str, str]) -> Iterator[str]:
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
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
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
