"""The ``mandant`` command as a user runs it: serve (with graceful shutdown on
SIGTERM/SIGINT), keygen, check-config."""

from __future__ import annotations

import asyncio
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mandant.cli import DEMO_EXAMPLE
from mandant.tenancy.keys import hash_key
from mandant_client import AsyncClient, Client, MandantClientError, Unavailable
from tests.servers import (
    DEMO_CONFIG,
    ECHO_MODEL,
    MANDANT,
    SUBPROCESS_ENV,
    free_port,
    http_get_port,
    mandant_serve,
    wait_for,
)

ENV = SUBPROCESS_ENV


def test_keygen_prints_a_key_and_its_hash() -> None:
    out = subprocess.run([*MANDANT, "keygen"], capture_output=True, text=True, check=True, env=ENV)
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    key, key_hash = lines["key"].strip(), lines["hash"].strip()
    assert len(key) > 32 and hash_key(key) == key_hash


def test_check_config_accepts_the_demo() -> None:
    out = subprocess.run(
        [*MANDANT, "check-config", str(DEMO_CONFIG)], capture_output=True, text=True, env=ENV
    )
    assert out.returncode == 0, out.stderr
    assert "ok (3 tenants, 4 models)" in out.stdout


@pytest.mark.parametrize(
    ("text", "warnings", "ok"),
    [
        (
            "",
            [
                "tenants: none configured: no tenant can call",
                "models: none configured: nothing to serve",
            ],
            "ok (0 tenants, 0 models)",
        ),
        (
            f"tenants: [{{id: a, api_keys: ['{hash_key('k')}']}}]",
            ["models: none configured: nothing to serve"],
            "ok (1 tenants, 0 models)",
        ),
    ],
)
def test_check_config_warns_of_no_tenants_or_no_models(
    tmp_path: Path, text: str, warnings: list[str], ok: str
) -> None:
    """An empty file was "ok (0 tenants, 0 models)" without a word; a warning, not an
    error: it still exits 0."""
    path = tmp_path / "mandant.yaml"
    path.write_text(text)
    out = subprocess.run(
        [*MANDANT, "check-config", str(path)], capture_output=True, text=True, env=ENV
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [f"{path}: warning: {warning}" for warning in warnings]
    assert out.stdout == f"{path}: {ok}\n"


@pytest.mark.parametrize(
    ("text", "errors"),
    [
        (
            "tenants: [{id: a, api_keys: [plain-key]}]",
            ["tenants.0.api_keys: API keys are stored as"],
        ),
        (
            "models: [{name: m, path: m.pt, inputs: [{name: X, datatype: FLOAT32, shape: [-1]}], "
            "outputs: [{name: Y, datatype: FP32, shape: [0]}]}]",
            [
                "models.0.inputs.0.datatype: unknown datatype 'FLOAT32'",
                "models.0.outputs.0.shape: dimensions are positive",
            ],
        ),
        (
            "server: {grpc_port: 99999, colour: blue}",
            [
                "server.grpc_port: Input should be less than or equal to 65535",
                "server.colour: Extra inputs are not permitted",
            ],
        ),
        (
            "models: [{tenant: ghost, base: classifier}]",
            [
                "models.0.tenant: model 'classifier': unknown tenant 'ghost'",
                "models.0.base: model 'classifier' of tenant 'ghost': base 'classifier' is not",
            ],
        ),
        (
            "models: [{name: m, backend: torch}]",
            ["models.0: torch models declare their inputs and outputs"],
        ),
        ("server: [", ["(yaml)"]),
    ],
)
def test_check_config_reports_each_error_with_its_path(
    tmp_path: Path, text: str, errors: list[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = subprocess.run(
        [*MANDANT, "check-config", str(path)], capture_output=True, text=True, env=ENV
    )
    assert out.returncode == 1
    for error in errors:
        assert error in out.stderr


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("tenants: [{id: 'a b'}]", "tenants.0.id"),
        # found only as the models resolve: "cannot start: configuration: 1 error(s)"
        ("models: [{name: m, backend: torch, factory: 'mandant.demo.models:echo'}]", "models.0"),
    ],
)
def test_serve_refuses_a_bad_config(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = subprocess.run(
        [*MANDANT, "serve", "--config", str(path)], capture_output=True, text=True, env=ENV
    )
    assert out.returncode == 2
    assert "mandant: invalid configuration" in out.stderr and str(path) in out.stderr
    assert f"  {field}: " in out.stderr


def _served_file(
    tmp_path: Path, port: int, model: dict[str, Any], key: str = "secret-key", **server: Any
) -> tuple[Path, dict[str, Any]]:
    """A configuration file for ``mandant serve``: tenant ``t`` with ``key``, one model,
    gRPC on ``port``, ``server`` settings; its path and its data."""
    config: dict[str, Any] = {
        "server": {"grpc_port": port, "http_port": free_port(), "rest_port": free_port(), **server},
        "tenants": [{"id": "t", "api_keys": [hash_key(key)]}],
        "models": [model],
    }
    path = tmp_path / "mandant.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def _wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not so after {timeout_s}s"
        time.sleep(0.02)


def _in_flight(http_port: int, admin_key: str) -> float:
    """Tenant ``t``'s calls being served now (``mandant_inflight_requests``)."""
    status, body = http_get_port(http_port, "/metrics", admin_key)
    assert status == 200, body
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "mandant_inflight_requests" and sample.labels == {"tenant": "t"}:
                return float(sample.value)
    return 0.0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_finishes_in_flight_calls_then_exits_zero(tmp_path: Path, signum: int) -> None:
    port = free_port()
    slow = {
        "name": "slow",
        "factory": "tests.integration.slow_models:sleepy",
        "factory_args": {"seconds": 1.5},
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    }
    admin = "admin-key"
    path, config = _served_file(tmp_path, port, slow, grace_s=10, admin_keys=[hash_key(admin)])
    http_port = config["server"]["http_port"]
    with mandant_serve(path) as proc:
        results: dict[str, object] = {}
        x = np.ones((1, 3), np.float32)

        def call() -> None:
            with Client(f"127.0.0.1:{port}", api_key="secret-key") as client:
                results["out"] = client.infer("slow", {"INPUT0": x}, timeout_s=20)

        worker = threading.Thread(target=call)
        worker.start()
        _wait_until(lambda: _in_flight(http_port, admin) == 1)  # the call is in the model
        proc.send_signal(signum)
        _wait_until(lambda: http_get_port(http_port, "/readyz")[0] == 503)  # draining
        with (
            Client(f"127.0.0.1:{port}", api_key="secret-key") as client,
            pytest.raises(Unavailable),
        ):
            client.infer("slow", {"INPUT0": x}, timeout_s=5)
        worker.join(20)
        np.testing.assert_array_equal(results["out"]["OUTPUT0"], x * 2)  # type: ignore[index]
        assert proc.wait(20) == 0
        assert proc.stdout is not None
        log = proc.stdout.read()
        assert "secret-key" not in log


def test_a_model_call_that_never_returns_does_not_keep_a_stopped_server_running(
    tmp_path: Path,
) -> None:
    """The graceful stop waits ``grace_s`` for the call, then the registry its time for
    the model: the call's thread is left to end with the process, which exits (the
    interpreter joined a ThreadPoolExecutor's thread at exit: it never did)."""
    port = free_port()
    stuck = {**ECHO_MODEL, "name": "stuck", "factory": "tests.integration.slow_models:sleepy"}
    stuck["factory_args"] = {"seconds": 3600}
    path, _ = _served_file(tmp_path, port, stuck, grace_s=0.5)
    with mandant_serve(path) as proc:
        with (
            Client(f"127.0.0.1:{port}", api_key="secret-key") as client,
            pytest.raises(MandantClientError),
        ):
            client.infer("stuck", {"INPUT0": np.ones((1, 3), np.float32)}, timeout_s=0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_serve_without_a_configuration_says_what_to_give() -> None:
    out = subprocess.run([*MANDANT, "serve"], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 2 and "Mandant listening" not in out.stdout
    assert "--config" in out.stderr and "--demo" in out.stderr
    both = subprocess.run(
        [*MANDANT, "serve", "--demo", "--config", str(DEMO_CONFIG)],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_serve_demo_serves_the_demo_and_http_host_binds_the_http_port_apart() -> None:
    grpc_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [*MANDANT, "serve", "--demo", "--grpc-port", str(grpc_port), "--http-port",
         str(http_port), "--rest-port", "0", "--http-host", "127.0.0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )  # fmt: skip
    try:
        banner = wait_for(proc, "acme-demo-key")  # the demo's example call
        # The one with the client, flush left: it pastes into a shell as printed (its
        # here-document was indented: bash never found its end, and Python refused
        # the indented first line).
        assert f"\n{shlex.quote(sys.executable)} - <<'PY'\n" in banner
        example = DEMO_EXAMPLE.format(
            target=f"127.0.0.1:{grpc_port}", python=shlex.quote(sys.executable)
        )
        pasted = subprocess.run(
            ["bash"], input=example.split("\n\n", 1)[1], text=True, capture_output=True,
            env=ENV, timeout=60,
        )  # fmt: skip
        assert pasted.returncode == 0 and "[[" in pasted.stdout, pasted.stderr
        assert "heap settled" in banner  # start-up objects out of the collector's way
        assert f"Dashboard: http://127.0.0.2:{http_port}/" in banner
        assert f"metrics: http://127.0.0.2:{http_port}/metrics, an admin key" in banner
        with Client(f"127.0.0.1:{grpc_port}", api_key="acme-demo-key") as client:
            x = np.ones((1, 3), np.float32)
            np.testing.assert_array_equal(client.infer("echo", {"INPUT0": x})["OUTPUT0"], x)
        url = f"http://127.0.0.2:{http_port}/healthz"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
        with pytest.raises(urllib.error.URLError):  # not on server.host
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=10)
    finally:
        proc.kill()
        proc.wait()


#: A connection of its own per client (grpc shares one between channels to one target).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.mark.parametrize("workers", [1, 2])
async def test_calls_received_when_stopping_are_refused_not_cancelled(
    tmp_path: Path, workers: int
) -> None:
    """gRPC cancels the calls it has received but not yet handed to a handler when it
    stops (CANCELLED: a client does not retry it); the server hands them over first,
    so under load every call is answered, or refused UNAVAILABLE."""
    port = free_port()
    path, _ = _served_file(tmp_path, port, ECHO_MODEL, grace_s=5, workers=workers)
    x = np.ones((1, 4), np.float32)
    codes: list[str] = []
    with mandant_serve(path) as proc:
        threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()
        clients = [
            AsyncClient(f"127.0.0.1:{port}", "secret-key", timeout_s=10, options=OWN_CONNECTION)
            for _ in range(8)
        ]

        async def caller(client: AsyncClient) -> None:
            while True:
                try:
                    await client.infer("echo", {"INPUT0": x})
                except MandantClientError as exc:
                    codes.append(exc.code.name)
                    return  # refused: this client backs off
                codes.append("OK")

        callers = [asyncio.create_task(caller(clients[n % 8])) for n in range(32)]
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*callers)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        for client in clients:
            await client.close()
    refused = [code for code in codes if code != "OK"]
    assert len(refused) == 32 and set(refused) == {"UNAVAILABLE"}, refused


def _serving_while_loading(
    tmp_path: Path,
    port: int,
    seconds: float,
    key: str = "secret-key",
    workers: int = 1,
    env: dict[str, str] = ENV,
    **output: Any,
) -> tuple[subprocess.Popen[str], Path, dict[str, Any]]:
    """``mandant serve`` on ``port`` once it is loading its one model (which takes
    ``seconds``; with ``workers`` > 1, in its engine); ``output``: where its stdout and
    stderr go. Its file and its data."""
    started = tmp_path / "loading"
    slow_to_load = {
        **ECHO_MODEL,
        "factory": "tests.integration.slow_models:slow_to_load",
        "factory_args": {"seconds": seconds, "started": str(started)},
    }
    path, config = _served_file(tmp_path, port, slow_to_load, key=key, workers=workers)
    proc = subprocess.Popen(
        [*MANDANT, "serve", "--config", str(path)], text=True, env=env, **output
    )
    deadline = time.monotonic() + 60
    while not started.exists():
        if proc.poll() is not None or time.monotonic() >= deadline:
            proc.kill()
            proc.wait()
            raise AssertionError("the server did not start loading its model")
        time.sleep(0.05)
    return proc, path, config


def test_ctrl_c_while_the_models_load_ends_without_a_traceback(tmp_path: Path) -> None:
    """SIGINT while the models load printed Python's traceback of a
    KeyboardInterrupt: now one line, and the shell's 130."""
    proc, _, _ = _serving_while_loading(
        tmp_path, free_port(), 30.0, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "mandant: interrupted while starting" in err
    finally:
        proc.kill()
        proc.wait()


def _loading_in_scratch(
    tmp_path: Path, workers: int, stdout: int
) -> tuple[subprocess.Popen[str], Path]:
    """``mandant serve`` loading a model for 30 s, with a temporary folder of its own
    (``TMPDIR``, empty), its stderr piped; the process and that folder."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc, _, _ = _serving_while_loading(
        tmp_path,
        free_port(),
        30.0,
        workers=workers,
        env={**ENV, "TMPDIR": str(scratch)},
        stdout=stdout,
        stderr=subprocess.PIPE,
    )
    return proc, scratch


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_while_the_models_load_stops_at_once(tmp_path: Path, workers: int) -> None:
    """A SIGTERM while the models load (a rolling update that gives up on a pod)
    killed one process by the default action (exit 143), and with ``workers`` waited
    out the load, printed the banner, then stopped: now the start is cancelled, every
    child stopped, exit 0, nothing left in its temporary folder."""
    proc, scratch = _loading_in_scratch(tmp_path, workers, stdout=subprocess.PIPE)
    children = _children(proc.pid)
    assert len(children) == (1 if workers > 1 else 0)  # the engine, loading
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)  # the load has 30 s left
        assert proc.returncode == 0, err
        assert "mandant: stopped while starting (SIGTERM)" in err and "Traceback" not in err
        assert "listening" not in out
        for child in children:
            assert not Path(f"/proc/{child}").exists(), child  # stopped and reaped
        assert not list(scratch.iterdir())
    finally:
        proc.kill()
        proc.wait()


def test_a_second_sigterm_while_stopping_a_start_leaves_nothing_behind(tmp_path: Path) -> None:
    """``workers``: a second SIGTERM while the first one's stop runs (a double Ctrl-C's
    way) cut it short of removing the private folder (copies of the configuration).
    It may end the process (the children die with it), and leaves nothing behind."""
    proc, scratch = _loading_in_scratch(tmp_path, 2, stdout=subprocess.DEVNULL)
    children = _children(proc.pid)
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.01)  # as it stops what it started
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)  # the load has 30 s left
        _wait_until(lambda: not any(Path(f"/proc/{child}").exists() for child in children))
        assert not list(scratch.iterdir())
    finally:
        proc.kill()
        proc.wait()


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in found.stdout.split()]


def test_a_sighup_while_the_models_load_is_applied_once_serving(tmp_path: Path) -> None:
    """SIGHUP's default action ends a process: one that came while the server was
    loading its models once killed it (exit 129). The file, changed meanwhile, is
    read once the server serves."""
    port = free_port()
    proc, path, config = _serving_while_loading(
        tmp_path, port, 2.0, key="old-key", stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        config["tenants"] = [{"id": "t", "api_keys": [hash_key("new-key")]}]
        path.write_text(yaml.safe_dump(config))
        proc.send_signal(signal.SIGHUP)
        wait_for(proc, "configuration reloaded")
        x = np.ones((1, 3), np.float32)
        with Client(f"127.0.0.1:{port}", api_key="new-key") as client:
            np.testing.assert_array_equal(client.infer("echo", {"INPUT0": x})["OUTPUT0"], x * 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("flag", ["--host", "--http-host"])
def test_the_demo_does_not_listen_beyond_this_machine(flag: str) -> None:
    """Its keys are public: on 0.0.0.0 anyone who reads the README could call it."""
    out = subprocess.run(
        [*MANDANT, "serve", "--demo", flag, "0.0.0.0", "--grpc-port", "0", "--http-port", "0"],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "Mandant listening" not in out.stdout
    assert "public" in out.stderr and "0.0.0.0" in out.stderr
