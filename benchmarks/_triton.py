"""A real Triton (PyTriton, ``.venv-triton``) serving ``benchmarks/_pytriton_mlp.py``'s
MLP, pinned to the server core; and its batch statistics.

The interpreter, the ``LD_LIBRARY_PATH`` fix for Triton's Python-backend stub and the
process-group shutdown follow ``tests/triton_server`` (which serves the tests' fixed
``tiny`` model only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks._server import free_port, metric_sums, pinned
from tests.triton_server import TRITON_PYTHON, available

__all__ = ["MLP_NAME", "TritonMlp", "available", "triton_mlp"]

SERVE = Path(__file__).resolve().parent / "_pytriton_mlp.py"
MLP_NAME = "mlp"
_PRINT_LIBDIR = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"


class TritonMlp:
    """The running server: gRPC target and the model's batch statistics."""

    def __init__(self, url: str, metrics_url: str) -> None:
        self.url = url
        self.metrics_url = metrics_url

    def batch_totals(self) -> tuple[float, float]:
        """(rows, executions) Triton has run for the MLP so far, from its Prometheus
        metrics (``nv_inference_count``, ``nv_inference_exec_count``; PyTriton keeps
        the gRPC statistics API behind an access token)."""
        rows, executions = metric_sums(
            self.metrics_url,
            ("nv_inference_count", "nv_inference_exec_count"),
            f'model="{MLP_NAME}"',
        )
        return rows, executions


def save_weights(state: Mapping[str, np.ndarray], path: Path) -> None:
    """An ``nn.Sequential`` of Linear/ReLU's state dict as ``W0, b0, W1, b1, …``."""
    weights = [v for k, v in state.items() if k.endswith(".weight")]
    biases = [v for k, v in state.items() if k.endswith(".bias")]
    arrays = {f"W{i}": w for i, w in enumerate(weights)} | {
        f"b{i}": b for i, b in enumerate(biases)
    }
    np.savez(path, **arrays)  # type: ignore[arg-type]


@contextmanager
def triton_mlp(
    state: Mapping[str, np.ndarray],
    cpus: str | None = "0",
    max_queue_delay_us: int = 100,
    env: Mapping[str, str] = {},
    timeout_s: float = 120.0,
    attempts: int = 2,
) -> Iterator[TritonMlp]:
    """PyTriton serving an MLP with the weights ``state`` (a torch state dict as numpy),
    Triton's dynamic batcher on, every process of it pinned to ``cpus``."""
    if reason := available():
        raise RuntimeError(reason)
    scratch = Path(tempfile.mkdtemp(prefix="mandant-bench-triton-"))
    save_weights(state, scratch / "weights.npz")
    grpc_port, metrics_port = free_port(), free_port()
    libdir = subprocess.run(
        [str(TRITON_PYTHON), "-c", _PRINT_LIBDIR], capture_output=True, text=True, check=True
    ).stdout.strip()
    run_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run_env |= {
        "LD_LIBRARY_PATH": os.pathsep.join(
            p for p in (libdir, run_env.get("LD_LIBRARY_PATH")) if p
        ),
        "TMPDIR": str(scratch),
        **env,
    }
    command = [
        str(TRITON_PYTHON),
        str(SERVE),
        f"--grpc-port={grpc_port}",
        f"--http-port={free_port()}",
        f"--metrics-port={metrics_port}",
        f"--workspace={scratch / 'workspace'}",
        f"--weights={scratch / 'weights.npz'}",
        f"--max-queue-delay-us={max_queue_delay_us}",
    ]
    server = TritonMlp(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics")
    process: subprocess.Popen[bytes] | None = None
    try:
        # PyTriton's model load sometimes dies on a loaded machine ("connection
        # closed" from its own load_model call): one more try before giving up.
        for attempt in range(attempts):
            with (scratch / "triton.log").open("ab") as log:
                process = subprocess.Popen(
                    pinned(command, cpus),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=run_env,
                    start_new_session=True,
                )
            try:
                _wait_ready(server.url, process, scratch / "triton.log", timeout_s)
                break
            except RuntimeError:
                _stop(process)
                process = None
                if attempt + 1 == attempts:
                    raise
        yield server
    finally:
        if process is not None:
            _stop(process)
        _remove_model_folders(scratch)
        shutil.rmtree(scratch, ignore_errors=True)


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            with contextlib.suppress(Exception):
                if client.is_server_ready() and client.is_model_ready(MLP_NAME):
                    return
            time.sleep(0.2)
    finally:
        client.close()
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise RuntimeError(f"Triton did not serve {MLP_NAME!r}:\n{tail}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the group, then SIGKILL whatever is left of it (tritonserver, stubs)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for region in Path("/dev/shm").glob(f"pytrtion{process.pid}-*"):
        region.unlink(missing_ok=True)


def _remove_model_folders(scratch: Path) -> None:
    """A killed Python backend leaves the model folder it unpacked under /tmp."""
    for folder in Path("/tmp").glob("folder*"):
        with contextlib.suppress(OSError):
            if str(scratch) in (folder / "config.pbtxt").read_text():
                shutil.rmtree(folder, ignore_errors=True)
