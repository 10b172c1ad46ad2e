"""Real Mandant servers for tests: an :class:`App` on port 0, in a thread of its own
with its own event loop, so that sync clients (tritonclient.grpc, mandant_client) and
async ones (in the test's loop) both call it over real loopback gRPC."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mandant.app import App
from mandant.config import MandantConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "examples" / "demo" / "mandant.yaml"
#: The demo's identity model, for configurations built in tests.
ECHO_MODEL: dict[str, Any] = {
    "name": "echo",
    "backend": "torch",
    "factory": "mandant.demo.models:echo",
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
}
MANDANT = [sys.executable, "-m", "mandant"]
#: The repository root first, then whatever PYTHONPATH the tests run under (a git
#: worktree points it at its own ``server/``).
SUBPROCESS_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    "PYTHONUNBUFFERED": "1",
}
DEMO_KEYS = {"acme": "acme-demo-key", "globex": "globex-demo-key", "initech": "initech-demo-key"}

T = TypeVar("T")


def demo_config(batching: dict[str, Any] | None = None, **server: Any) -> MandantConfig:
    """The demo configuration, with ports 0 and any ``server`` overrides; ``batching``
    replaces the shared classifier's batching section."""
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0, **server}
    if batching is not None:
        data["models"][0]["batching"] = batching
    return parse_config(data, str(DEMO_CONFIG))


def auth(tenant_or_key: str) -> dict[str, str]:
    key = DEMO_KEYS.get(tenant_or_key, tenant_or_key)
    return {"authorization": f"Bearer {key}"}


class ServerThread:
    def __init__(
        self, config: MandantConfig, base_dir: Path, config_path: Path | None = None
    ) -> None:
        """A configuration that does not set ``server.rest_port`` gets 0, not Triton's
        8000: tests running side by side must not compete for one port. ``config_path``:
        the file model loads re-read (``App``'s)."""
        if "rest_port" not in config.server.model_fields_set:
            server = config.server.model_copy(update={"rest_port": 0})
            config = config.model_copy(update={"server": server})
        self._config = config
        self._base_dir = base_dir
        self._config_path = config_path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.app: App | None = None

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout_s)

    def start(self) -> ServerThread:
        self._thread.start()

        async def start() -> App:
            app = App(self._config, self._base_dir, self._config_path)
            await app.start()
            return app

        self.app = self.call(start())
        return self

    @property
    def target(self) -> str:
        assert self.app is not None
        return f"127.0.0.1:{self.app.grpc_port}"

    def stop(self, grace_s: float = 0) -> None:
        if self.app is not None:
            self.call(self.app.aclose(grace_s))
            self.app = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(proc: subprocess.Popen[str], text: str, timeout_s: float = 60) -> str:
    """Read the process's output until a line contains ``text``; return what was read."""
    seen = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"server exited early: {''.join(seen)}")
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"no {text!r} within {timeout_s}s: {''.join(seen)}")


@contextmanager
def mandant_serve(config: Path) -> Iterator[subprocess.Popen[str]]:
    """``mandant serve --config config`` as a user runs it, once it listens; killed
    at the end if the test has not stopped it."""
    proc = subprocess.Popen(
        [*MANDANT, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=SUBPROCESS_ENV,
    )
    try:
        wait_for(proc, "Mandant listening")
        yield proc
    finally:
        proc.kill()
        proc.wait()
