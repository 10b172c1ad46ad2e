"""``mandant serve`` and ``check-config`` refusing what cannot serve before anything
starts: flags validated as the settings they override, log levels, ``--demo`` without
a source checkout, missing files and factories that do not import."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mandant import cli
from mandant.config import parse_config
from mandant.tenancy.keys import hash_key

ECHO = {
    "name": "echo",
    "factory": "mandant.demo.models:echo",
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
}


@pytest.fixture(autouse=True)
def _logging_kept() -> Iterator[None]:
    """``serve`` configures the root logger; put pytest's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def write(tmp_path: Path, **sections: Any) -> Path:
    data = {"tenants": [{"id": "t", "api_keys": [hash_key("k")]}], "models": [ECHO], **sections}
    path = tmp_path / "mandant.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


#: TLS files that are not there: a server given this file stops before it listens.
NO_TLS = {"tls": {"cert": "gone.crt", "key": "gone.key"}}


@pytest.mark.parametrize(
    ("flags", "lines"),
    [
        (
            ["--grpc-port", "99999"],
            ["--grpc-port 99999: Input should be less than or equal to 65535"],
        ),
        (
            ["--rest-port", "70000"],
            ["--rest-port 70000: Input should be less than or equal to 65535"],
        ),
        (["--http-port", "-1"], ["--http-port -1: Input should be greater than or equal to 0"]),
        (["--workers", "0"], ["--workers 0: 'auto', or a number of front-end processes from 1"]),
        (["--workers", "300"], ["--workers 300: 'auto', or a number of front-end processes"]),
        (
            ["--grpc-port", "-5", "--http-port", "65536"],
            ["--grpc-port -5: Input should be greater", "--http-port 65536: Input should be less"],
        ),
    ],
)
def test_serve_validates_flags_as_the_settings_they_override(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], lines: list[str]
) -> None:
    """They went around validation: --grpc-port 99999 listened on 34463, --workers 0
    ran one process."""
    path = write(tmp_path, server=NO_TLS)
    assert cli.main(["serve", "--config", str(path), *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(lines)
    for line, expected in zip(err, lines, strict=True):
        assert line.startswith(f"mandant serve: {expected}")


def test_a_flag_that_clashes_with_the_file_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, server={**NO_TLS, "internal_http": {"port": 9100}})
    assert cli.main(["serve", "--config", str(path), "--http-port", "9100"]) == 2
    assert "(with --http-port)" in capsys.readouterr().err


def test_log_levels_are_checked_by_the_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, server=NO_TLS)
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--config", str(path), "--log-level", "foo"])
    assert exited.value.code == 2
    assert "argument --log-level: invalid choice" in capsys.readouterr().err
    assert cli.main(["serve", "--config", str(path), "--log-level", "debug"]) == 1  # TLS files
    assert logging.getLogger().level == logging.DEBUG


def test_workers_takes_a_number_or_auto(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--demo", "--workers", "many"])
    assert "argument --workers: expected a number or 'auto', got 'many'" in capsys.readouterr().err


def test_demo_without_a_source_checkout_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed package has no examples/: --demo failed with a file error."""
    monkeypatch.setattr(cli, "DEMO_CONFIG", tmp_path / "examples" / "demo" / "mandant.yaml")
    assert cli.main(["serve", "--demo"]) == 2
    err = capsys.readouterr().err
    assert "--demo needs a source checkout" in err and "--config" in err


def test_serve_names_every_missing_tls_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, server=NO_TLS)
    assert cli.main(["serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"server.tls.cert: no such file: {tmp_path / 'gone.crt'}" in err
    assert f"server.tls.key: no such file: {tmp_path / 'gone.key'}" in err


#: Ports 0, so that only the listener a case breaks fails.
FREE_PORTS = {"grpc_port": 0, "rest_port": 0, "http_port": 0}


@pytest.mark.parametrize(
    ("server", "error"),
    [
        (
            {"http_host": "not an ip"},
            "cannot bind the HTTP port (server.http_host 'not an ip', port 0): ",
        ),
        (
            {"internal_http": {"host": "not an ip", "port": 0}},
            "cannot bind the internal HTTP port (server.internal_http.host 'not an ip', port 0): ",
        ),
        (
            {"rest_port": "held"},
            "cannot bind the REST port (server.host '127.0.0.1', port {held}): ",
        ),
        (
            {"http_port": "held"},
            "cannot bind the HTTP port (server.host '127.0.0.1', port {held}): ",
        ),
        (
            {"grpc_port": "held"},
            "cannot bind the gRPC port (server.host '127.0.0.1', port {held}): ",
        ),
        (
            {"host": "192.0.2.1"},  # TEST-NET-1: an address not on this machine
            "cannot bind the gRPC port (server.host '192.0.2.1', port 0): ",
        ),
    ],
)
def test_a_listener_that_cannot_bind_names_itself_its_setting_and_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: dict[str, Any], error: str
) -> None:
    """It said "cannot start: [Errno -2] Name or service not known", naming nothing.
    ``held``: a port another socket listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        server = {k: held if v == "held" else v for k, v in server.items()}
        data = {"tenants": [], "models": [], "server": {**FREE_PORTS, **server}}
        path = tmp_path / "mandant.yaml"
        path.write_text(yaml.safe_dump(data))
        assert cli.main(["serve", "--config", str(path)]) == 1
    # Its last line (the configuration's warnings come first: no tenants, no models).
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"mandant: cannot start: {error.format(held=held)}")


def _slow_to_load(started: Path) -> dict[str, Any]:
    """A model that takes 30 s to build, once it has created the file ``started``."""
    return {
        "name": "slow",
        "factory": "tests.integration.slow_models:slow_to_load",
        "factory_args": {"seconds": 30, "started": str(started)},
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    }


@pytest.mark.parametrize("held", ["grpc_port", "rest_port", "http_port"])
def test_a_port_in_use_stops_the_server_before_its_models_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], held: str
) -> None:
    """It loaded every model first (minutes, for large ones), then failed to bind."""
    started = tmp_path / "loading"
    model = _slow_to_load(started)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        data = {"tenants": [], "models": [model], "server": {**FREE_PORTS, held: port}}
        path = tmp_path / "mandant.yaml"
        path.write_text(yaml.safe_dump(data))
        assert cli.main(["serve", "--config", str(path)]) == 1
    name = {"grpc_port": "gRPC", "rest_port": "REST", "http_port": "HTTP"}[held]
    error = f"cannot bind the {name} port (server.host '127.0.0.1', port {port}): Address"
    assert f"{error} already in use" in capsys.readouterr().err
    assert not started.exists()  # the model never began to load


def test_two_listeners_on_one_address_under_two_spellings_stop_before_models_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``127.0.0.1`` and ``localhost`` with one port passed the configuration's check
    (it compares the spellings) and each listener's own check (each socket closed
    before the next was bound): the clash was found once every model had loaded."""
    started = tmp_path / "loading"
    model = _slow_to_load(started)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = {**FREE_PORTS, "grpc_port": port, "http_port": port, "http_host": "localhost"}
    path = tmp_path / "mandant.yaml"
    path.write_text(yaml.safe_dump({"tenants": [], "models": [model], "server": server}))
    assert cli.main(["serve", "--config", str(path)]) == 1
    error = f"cannot bind the HTTP port (server.http_host 'localhost', port {port}): Address"
    assert f"{error} already in use" in capsys.readouterr().err
    assert not started.exists()  # the model never began to load


def test_a_name_that_resolves_to_one_address_twice_passes_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/etc/hosts listing a name on two lines makes the resolver give its address twice:
    the second bind failed on the first's held socket, a free port "already in use"."""
    from mandant.transport.listeners import Listener, check_listeners

    resolve = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: resolve(*a, **k) * 2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_listeners([Listener("gRPC port", "server.host", "localhost", port)])


@pytest.mark.parametrize(
    ("server", "dashboard"),
    [
        (
            {},
            "(a tenant's key, for its own figures; no admin keys configured: "
            "http://127.0.0.1:8002/metrics answers 403, /usage a tenant's own only; "
            "see server.admin_keys)",
        ),
        (
            {"admin_keys": [hash_key("admin")]},
            "(an admin key, or a tenant's key for its own figures; "
            "metrics: http://127.0.0.1:8002/metrics, an admin key)",
        ),
        ({"metrics_auth": "none"}, "(metrics: http://127.0.0.1:8002/metrics; open)"),
    ],
)
def test_the_banner_says_who_may_read_the_metrics(
    capsys: pytest.CaptureFixture[str], server: dict[str, Any], dashboard: str
) -> None:
    """Without admin keys it promised /metrics to "an admin key"; it answers 403."""
    config = parse_config({"server": server})
    cli.banner(config, 8001, 8000, 8002, 0, demo=False)
    assert f"Dashboard: http://127.0.0.1:8002/  {dashboard}\n" in capsys.readouterr().out


def test_check_config_reports_what_would_not_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said 'ok' for a factory typo, a missing weights file and missing TLS files."""
    path = write(
        tmp_path,
        server=NO_TLS,
        models=[
            {**ECHO, "factory": "mandant.demo.models:ecko"},
            {**ECHO, "name": "other", "factory": "mandant.demo.modelz:echo"},
            {**ECHO, "name": "weights", "path": "weights.safetensors"},
            {
                **ECHO,
                "name": "built",
                "path": "built.safetensors",
                "weights_init": "mandant.demo.models:nope",
            },
        ],
    )
    assert cli.main(["check-config", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    paths = [line.split(": ", 1)[0].strip() for line in captured.err.splitlines()[1:]]
    assert paths == [
        "server.tls.cert",
        "server.tls.key",
        "models.0.factory",
        "models.1.factory",
        "models.2.path",
        "models.3.weights_init",
    ]
    assert "has no attribute 'ecko'" in captured.err
    assert "No module named 'mandant.demo.modelz'" in captured.err


def test_check_config_warns_of_a_tenant_that_cannot_authenticate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, tenants=[{"id": "t", "api_keys": [hash_key("k")]}, {"id": "mute"}])
    assert cli.main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "ok (2 tenants, 1 models)" in captured.out
    assert "warning: tenants.1: tenant 'mute' has no api_keys and no client_certs" in captured.err


@pytest.mark.parametrize("started_as", ["the mandant script", "python -m mandant"])
def test_children_import_from_the_folder_only_as_their_supervisor_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_as: str
) -> None:
    """A factory module in the folder ``serve`` ran from imported in the children of
    ``workers: N`` (started with ``python -m``), not in one process started by the
    ``mandant`` script: the same file served different models by ``--workers``."""
    (tmp_path / "folder_models.py").write_text("def echo():\n    return None\n")
    config = write(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["models"][0]["factory"] = "folder_models:echo"
    config.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    first = str(tmp_path) if started_as == "python -m mandant" else str(Path(sys.executable).parent)
    monkeypatch.setattr(sys, "path", [first, *sys.path[1:]])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    child = subprocess.run(
        [*cli.child_command(), "check-config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if started_as == "python -m mandant":
        assert child.returncode == 0, child.stderr
    else:
        assert child.returncode == 1
        assert "No module named 'folder_models'" in child.stdout + child.stderr


@pytest.mark.parametrize(
    ("placed", "shown"),
    [
        ({"device": "cuda"}, "placed on cuda:0"),
        ({"devices": ["cuda:0", "cuda:3"]}, "placed on cuda:0, cuda:3"),
    ],
)
def test_check_config_warns_of_gpus_this_host_does_not_see(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    placed: dict[str, Any],
    shown: str,
) -> None:
    """A model on a GPU this host lacks was "ok": ``serve`` then refused to load it. It
    is a warning (a file is often checked elsewhere than where it serves)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write(tmp_path, models=[{**ECHO, **placed}, {**ECHO, "name": "cpu_echo"}])
    assert cli.main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "ok (1 tenants, 2 models)" in captured.out
    warnings = [line for line in captured.err.splitlines() if "GPU" in line]
    assert len(warnings) == 1, captured.err
    assert f"warning: model 'echo' version 1: {shown}, but this host sees 0 GPU(s)" in warnings[0]
