"""A real NVIDIA Triton Inference Server for tests and benchmarks, started through
PyTriton in a subprocess of its own.

PyTriton pins its own numpy and protobuf, so it lives in ``.venv-triton`` (``make
triton-venv``); the main interpreter only needs ``tritonclient``. Triton's Python-backend
stub links ``libpython3.11.so.1.0``: the interpreter's own ``LIBDIR`` goes first on
``LD_LIBRARY_PATH`` so the loader does not pick another Python 3.11's library.

The process runs in a session of its own so that :meth:`TritonProcess.kill` takes down
the whole group (PyTriton, ``tritonserver`` and the model's stubs) at once, like a
crashed host. :meth:`TritonProcess.start` after a kill serves again on the same ports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent.parent
SERVE = Path(__file__).resolve().parent / "serve.py"
TRITON_PYTHON = Path(os.environ.get("MANDANT_TRITON_PYTHON", ROOT / ".venv-triton/bin/python"))

MODEL = "tiny"
W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 6.0) / 10.0
B = np.array([0.1, -0.2, 0.3], dtype=np.float32)


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    """What ``tiny`` answers for ``x`` (FP32 [n, 4]), computed here with numpy."""
    return {
        "OUTPUT0": np.tanh(x @ W + B).astype(np.float32),
        "OUTPUT1": x.sum(axis=1, keepdims=True).astype(np.float32),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def available() -> str | None:
    """None when Triton can be started here, else the reason it cannot."""
    if not TRITON_PYTHON.exists():
        return f"{TRITON_PYTHON} is missing: run `make triton-venv`"
    return None


class TritonProcess:
    """``tiny`` on Triton on free gRPC, HTTP and metrics ports (kept across restarts)."""

    def __init__(self, instances: int = 2) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self._instances = instances
        self._process: subprocess.Popen[bytes] | None = None
        self._scratch = Path(tempfile.mkdtemp(prefix="mandant-triton-"))
        self._log = (self._scratch / "triton.log").open("ab")

    @property
    def _workspace(self) -> Path:
        return self._scratch / "workspace"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 90.0) -> TritonProcess:
        if self.running:
            raise RuntimeError("Triton is already running")
        shutil.rmtree(self._workspace, ignore_errors=True)
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p
        )
        env.pop("PYTHONPATH", None)
        self._process = subprocess.Popen(
            [
                str(TRITON_PYTHON),
                str(SERVE),
                f"--grpc-port={self.grpc_port}",
                f"--http-port={self.http_port}",
                f"--metrics-port={self.metrics_port}",
                f"--instances={self._instances}",
                f"--workspace={self._workspace}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import tritonclient.grpc as triton_grpc

        client = triton_grpc.InferenceServerClient(self.url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if not self.running:
                    raise RuntimeError(f"Triton exited while starting:\n{self.log_tail()}")
                with contextlib.suppress(Exception):
                    if client.is_server_ready() and client.is_model_ready(MODEL):
                        return
                time.sleep(0.2)
        finally:
            client.close()
        self.kill()
        raise RuntimeError(f"Triton was not ready within {timeout_s} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would; returns once it is gone."""
        self._signal(signal.SIGKILL, wait_s=10)

    def stop(self) -> None:
        """Shut Triton down gracefully (SIGKILL if it takes too long)."""
        if self.running:
            self._signal(signal.SIGTERM, wait_s=10)
        self.kill()

    def close(self) -> None:
        self.stop()
        self._log.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _signal(self, sig: signal.Signals, wait_s: float) -> None:
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            return
        # The group may outlive its leader for a moment (tritonserver, stubs).
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            if sig == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            time.sleep(0.05)
        self._process = None
        # A killed Python backend leaves its shared-memory regions behind.
        for region in Path("/dev/shm").glob(f"pytrtion{process.pid}-*"):
            region.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        text = (self._scratch / "triton.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> TritonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":  # pragma: no cover - manual check: serve until Ctrl-C
    with TritonProcess() as triton:
        print(f"Triton serving {MODEL!r} at {triton.url}", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
