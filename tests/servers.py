"""Real Mandant servers for tests: an :class:`App` on port 0, in a thread of its own
with its own event loop, so that sync clients (tritonclient.grpc, mandant_client) and
async ones (in the test's loop) both call it over real loopback gRPC."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from mandant.app import App
from mandant.config import MandantConfig, parse_config
from tests.ports import free_port as free_port  # the tests' one source of ports

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


#: A host in the start-up banner: a name, or an IPv6 address in brackets ([::1]:8001).
HOST = r"(?:\[[^\]]*\]|[^:\s]+)"


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
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def grpc_port(self) -> int:
        assert self.app is not None
        return self.app.grpc_port

    @property
    def http_port(self) -> int:
        assert self.app is not None
        return self.app.http_port

    @property
    def rest_port(self) -> int:
        assert self.app is not None
        return self.app.rest_port

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


class WorkersServer:
    """``mandant serve`` with ``server.workers`` front-end processes and one engine, as
    a user runs it (a supervisor process and its children; ``workers=1``: the single
    process), with the interface of
    :class:`ServerThread` that tests use (``target``, the ports; no ``app``: the
    server's insides are in other processes). The configuration is written to a YAML
    file in ``base_dir``, so its relative paths mean what they meant."""

    def __init__(
        self,
        config: MandantConfig,
        base_dir: Path,
        config_path: Path | None = None,
        workers: int = 2,
    ) -> None:
        server = {"workers": workers}
        if "rest_port" not in config.server.model_fields_set:
            server["rest_port"] = 0
        self._config = config.model_copy(update={"server": config.server.model_copy(update=server)})
        self._base_dir = base_dir
        self.config_path = config_path or base_dir / f".mandant-workers-{id(self):x}.yaml"
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self.grpc_port = self.rest_port = self.http_port = 0

    def start(self) -> WorkersServer:
        if not self.config_path.exists() or self.config_path.name.startswith(".mandant-workers"):
            data = self._config.model_dump(mode="json", exclude_defaults=True)
            self.config_path.write_text(yaml.safe_dump(data))
        else:  # a test's own file: served with these workers (it ran one process before)
            data = yaml.safe_load(self.config_path.read_text())
            data.setdefault("server", {})["workers"] = self._config.server.workers
            self.config_path.write_text(yaml.safe_dump(data))
        self.process = subprocess.Popen(
            [*MANDANT, "serve", "--config", str(self.config_path)],
            stdout=subprocess.PIPE,
            text=True,
            env=SUBPROCESS_ENV,
        )
        banner = wait_for(self.process, "Dashboard:", timeout_s=90)
        self.grpc_port = int(re.search(rf"gRPC \(KServe v2\) on {HOST}:(\d+)", banner)[1])  # type: ignore[index]
        self.rest_port = int(re.search(rf"REST on https?://{HOST}:(\d+)", banner)[1])  # type: ignore[index]
        self.http_port = int(re.search(rf"Dashboard: https?://{HOST}:(\d+)", banner)[1])  # type: ignore[index]
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def children(self) -> dict[str, list[int]]:
        """The supervisor's children by role (``engine``, ``front-end``), from /proc."""
        assert self.process is not None
        found: dict[str, list[int]] = {"engine": [], "front-end": []}
        pid = self.process.pid
        listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in map(int, listed):
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if b"worker" in argv:
                found[argv[argv.index(b"worker") + 1].decode()].append(child)
        return found

    def stop(self, grace_s: float = 0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> WorkersServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: How a parametrised test runs its server: one process, or ``workers: 2``.
SERVER_KINDS = ("one process", "workers: 2")
#: A started server of either kind.
Server = ServerThread | WorkersServer


def serve(
    kind: str, config: MandantConfig, base_dir: Path, config_path: Path | None = None
) -> ServerThread | WorkersServer:
    """A started server of ``kind`` (one of :data:`SERVER_KINDS`)."""
    if kind == SERVER_KINDS[0]:
        return ServerThread(config, base_dir, config_path).start()
    return WorkersServer(config, base_dir, config_path).start()


@contextmanager
def serving(
    kind: str, config: MandantConfig, base_dir: Path, config_path: Path | None = None
) -> Iterator[Server]:
    """:func:`serve` for a ``with`` block: the server stops at its end."""
    server = serve(kind, config, base_dir, config_path)
    try:
        yield server
    finally:
        server.stop()


def http_get(server: Server, path: str, key: str | None = None) -> tuple[int, bytes]:
    """GET ``path`` on the server's HTTP port (``/metrics``, ``/usage``, …) with an
    optional bearer key: the status and the body."""
    return http_get_port(server.http_port, path, key)


def http_get_port(port: int, path: str, key: str | None = None) -> tuple[int, bytes]:
    """:func:`http_get` on any local HTTP port (an internal listener, say)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(server: Server, admin_key: str, name: str, **labels: str) -> float | None:
    """One sample of the server's ``/metrics`` (the whole host in ``workers`` mode),
    or None where there is none."""
    return _samples(server, admin_key).get((name, frozenset(labels.items())))


def metric_sum(server: Server, admin_key: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = labels.items()
    found = _samples(server, admin_key)
    return sum(v for (n, have), v in found.items() if n == name and have >= wanted)


def _samples(server: Server, admin_key: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = http_get(server, "/metrics", admin_key)
    assert status == 200, body
    return {
        (sample.name, frozenset(sample.labels.items())): float(sample.value)
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def wait_for_calls(server: Server, admin_key: str, calls: int, timeout_s: float = 30) -> None:
    """Wait until ``/metrics`` counts ``calls`` answered calls in all: in ``workers``
    mode a front end reports each call to the engine just after answering it, so a
    client may look before the report is in (one process: at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        counted = metric_sum(server, admin_key, "mandant_requests_total")
        if counted >= calls:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{counted} calls counted, not {calls}, after {timeout_s}s")
        time.sleep(0.01)


def wait_for(proc: subprocess.Popen[str], text: str, timeout_s: float = 60) -> str:
    """Read the process's output until a line contains ``text``; return what was read."""
    seen: list[str] = []
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
def mandant_serve(
    config: Path, env: Mapping[str, str] = SUBPROCESS_ENV
) -> Iterator[subprocess.Popen[str]]:
    """``mandant serve --config config`` as a user runs it (in ``env``), once it
    listens; killed at the end if the test has not stopped it."""
    proc = subprocess.Popen(
        [*MANDANT, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        wait_for(proc, "Mandant listening")
        yield proc
    finally:
        proc.kill()
        proc.wait()
