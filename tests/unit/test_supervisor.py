"""The supervisor of ``workers: N`` without processes: what a SIGHUP applies, and the
gRPC port it reserves."""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
from pathlib import Path

import pytest

from mandant.workers.supervisor import Supervisor, reserve_port


def test_a_refused_reload_names_the_operators_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The supervisor checks a copy of the file; its refusal named the copy (a file in
    a temporary folder the operator never wrote), not the file to mend."""
    config = tmp_path / "mandant.yaml"
    config.write_text("tenants: [{id: acme, api_keys: [not-a-hash]}]\n")
    supervisor = Supervisor(2, 0, "127.0.0.1", 0.0, [], [], config)
    try:
        with caplog.at_level(logging.ERROR):
            supervisor.reload()  # no child started: nothing else to signal
        refusal = caplog.messages[-1]
        assert "configuration reload refused" in refusal
        assert str(config) in refusal and ".checking" not in refusal
        assert not supervisor.applied.exists()
    finally:
        shutil.rmtree(supervisor.applied.parent, ignore_errors=True)


def test_a_file_the_children_would_refuse_with_their_flags_is_not_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file valid alone that clashes with the command line (its REST port the
    ``--http-port`` flag's) or with the gRPC port every child is given: the children
    refuse it, so the supervisor must too. Checked alone, it became the applied copy:
    an engine restarted later served it (a rotated key took effect in one process),
    and a front end restarted later could never start."""
    from mandant.cli import _with_overrides
    from mandant.config import load_config

    config = tmp_path / "mandant.yaml"
    flags = argparse.Namespace(http_port=19163)
    load = lambda file: _with_overrides(load_config(file), flags)  # noqa: E731
    supervisor = Supervisor(2, 19161, "127.0.0.1", 0.0, [], [], config, load=load)
    try:
        config.write_text("server: {grpc_port: 19161, http_port: 19162, rest_port: 19164}\n")
        supervisor.reload()
        assert supervisor.applied.exists()
        # The flag's HTTP port; the gRPC port taken (the file's 0: any free one).
        for clash in ("grpc_port: 19161, rest_port: 19163", "grpc_port: 0, rest_port: 19161"):
            config.write_text(f"server: {{http_port: 19162, {clash}}}\n")
            load_config(config)  # valid alone
            before = supervisor.applied.read_text()
            with caplog.at_level(logging.ERROR):
                supervisor.reload()
            assert "configuration reload refused" in caplog.messages[-1]
            assert supervisor.applied.read_text() == before
    finally:
        shutil.rmtree(supervisor.applied.parent, ignore_errors=True)


def test_the_grpc_port_is_reserved_past_a_connection_in_time_wait() -> None:
    """A connection of a server stopped a moment ago, closed from its side, stays in
    TIME_WAIT on the port for a minute: one process binds past it (gRPC sets
    SO_REUSEADDR), but ``workers: N`` refused to start, "Address already in use"."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server's side closes first: its end waits in TIME_WAIT
        client.recv(1)
        client.close()
    reserved = reserve_port("127.0.0.1", port)
    try:  # and nobody else's: a second server is refused while this one starts
        with pytest.raises(OSError):
            reserve_port("127.0.0.1", port).close()
    finally:
        reserved.close()
