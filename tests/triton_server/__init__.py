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
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from tests.ports import free_port
from tests.triton_server.tiny import NAME as MODEL
from tests.triton_server.tiny import NAMES, expected
from tests.triton_server.tiny import POISON_NAME as POISON_MODEL

__all__ = ["MODEL", "POISON_MODEL", "TritonProcess", "available", "expected", "free_port"]


ROOT = Path(__file__).resolve().parent.parent.parent
SERVE = Path(__file__).resolve().parent / "serve.py"
TRITON_PYTHON = Path(os.environ.get("MANDANT_TRITON_PYTHON", ROOT / ".venv-triton/bin/python"))


_PRINT_LIBDIR = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"


def available() -> str | None:
    """None when Triton can be started here, else the reason it cannot."""
    if not TRITON_PYTHON.exists():
        return f"{TRITON_PYTHON} is missing: run `make triton-venv`"
    return None


class TritonProcess:
    """The models of ``tiny.NAMES`` on Triton on free gRPC, HTTP and metrics ports
    (kept across restarts)."""

    def __init__(self, instances: int = 1) -> None:
        # One instance by default: PyTriton's second instance fetches its config from
        # the first over a unix socket and, on a loaded machine, can connect between
        # the socket's bind and listen (ECONNREFUSED), failing the model's load.
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
        libdir = subprocess.run(
            [str(TRITON_PYTHON), "-c", _PRINT_LIBDIR],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip() or sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p
        )
        env.pop("PYTHONPATH", None)
        env["TMPDIR"] = str(self._scratch)  # PyTriton writes its model folders there
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
                    if client.is_server_ready() and all(
                        client.is_model_ready(name) for name in NAMES
                    ):
                        return
                time.sleep(0.2)
        finally:
            client.close()
        self.kill()
        raise RuntimeError(f"Triton was not ready within {timeout_s} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would; returns once it is gone."""
        self._shutdown(graceful_s=0)

    def stop(self) -> None:
        """Shut Triton down gracefully, then SIGKILL whatever is left of the group."""
        self._shutdown(graceful_s=10)

    def close(self) -> None:
        self.stop()
        self._log.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _shutdown(self, graceful_s: float) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if graceful_s > 0 and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(graceful_s)
        # The group outlives its leader (tritonserver, the model's stubs): kill all of it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        # A killed Python backend leaves its shared-memory regions and the model folder
        # it unpacked (always under /tmp, naming our workspace) behind.
        for region in Path("/dev/shm").glob(f"pytrtion{process.pid}-*"):
            region.unlink(missing_ok=True)
        for folder in Path("/tmp").glob("folder*"):
            with contextlib.suppress(OSError):
                if str(self._scratch) in (folder / "config.pbtxt").read_text():
                    shutil.rmtree(folder, ignore_errors=True)

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
