"""Every path in the configuration resolves against the configuration file's folder,
not the working directory of ``mandant serve``."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from mandant.tenancy.keys import hash_key
from mandant_client import Client, Unavailable
from tests.integration.certs import issue, make_ca, server_cert
from tests.servers import SUBPROCESS_ENV, free_port, mandant_serve, wait_for

ECHO = {
    "factory": "mandant.demo.models:echo",
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
}
#: One connection per channel: a new channel never reuses another's handshake.
FRESH = (("grpc.use_local_subchannel_pool", 1),)


def tls_config(port: int, cert: str, key: str) -> dict[str, object]:
    """One tenant (``secret-key``) and ``echo``, the gRPC port ``port`` on TLS."""
    return {
        "server": {
            "grpc_port": port,
            "http_port": free_port(),
            "rest_port": free_port(),
            "tls": {"cert": cert, "key": key},
        },
        "tenants": [{"id": "t", "api_keys": [hash_key("secret-key")]}],
        "models": [{"name": "echo", **ECHO}],
    }


def test_relative_tls_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    (folder / "certs").mkdir(parents=True)
    ca = make_ca(folder / "certs")
    server = server_cert(ca, folder / "certs")
    port = free_port()
    path = folder / "mandant.yaml"
    path.write_text(yaml.safe_dump(tls_config(port, "certs/server.pem", "certs/server.key")))
    assert not (Path.cwd() / "certs" / "server.pem").exists()  # served from elsewhere
    with mandant_serve(path):
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes())
        with Client(f"localhost:{port}", api_key="secret-key", tls=credentials) as client:
            out = client.infer("echo", {"INPUT0": np.ones((1, 2), np.float32)})
        assert out["OUTPUT0"].sum() == 2
    assert server.cert.exists()


def test_sighup_serves_rotated_certificates_to_new_connections(tmp_path: Path) -> None:
    """mTLS from relative paths; the server certificate is replaced in place and
    ``mandant serve`` gets SIGHUP: a new connection sees the new certificate."""
    ca = make_ca(tmp_path)
    server_cert(ca, tmp_path)
    client = issue(ca, tmp_path, "client", "t-client", "URI:spiffe://test/t")
    new_ca = make_ca(tmp_path, "new-ca")
    port = free_port()
    config = {
        "server": {
            "grpc_port": port,
            "http_port": free_port(),
            "rest_port": free_port(),
            "tls": {"cert": "server.pem", "key": "server.key", "client_ca": "ca.pem"},
        },
        "tenants": [{"id": "t", "client_certs": ["spiffe://test/t"]}],
        "models": [{"name": "echo", **ECHO}],
    }
    path = tmp_path / "mandant.yaml"
    path.write_text(yaml.safe_dump(config))
    x = {"INPUT0": np.ones((1, 2), np.float32)}

    def connect(roots: Path) -> Client:
        credentials = grpc.ssl_channel_credentials(
            roots.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
        )
        return Client(f"localhost:{port}", tls=credentials, timeout_s=10, options=FRESH)

    with mandant_serve(path) as proc:
        with connect(ca.cert) as c:
            assert c.infer("echo", x)["OUTPUT0"].sum() == 2  # no key: the certificate
        rotated = server_cert(new_ca, tmp_path, "rotated")
        rotated.cert.replace(tmp_path / "server.pem")
        rotated.key.replace(tmp_path / "server.key")
        with connect(new_ca.cert) as c, pytest.raises(Unavailable):
            c.infer("echo", x)
        proc.send_signal(signal.SIGHUP)
        wait_for(proc, "configuration reloaded")
        with connect(new_ca.cert) as c:
            assert c.infer("echo", x)["OUTPUT0"].sum() == 2


def workers_config(tmp_path: Path, port: int, mtls: bool) -> Path:
    """``workers: 2`` with TLS, client certificates where ``mtls``."""
    tls = {"cert": "server.pem", "key": "server.key"}
    tenant: dict[str, object] = {"id": "t", "api_keys": [hash_key("t-key")]}
    if mtls:
        tls["client_ca"] = "ca.pem"
        tenant["client_certs"] = ["CN=t-client"]
    config = {
        "server": {
            "grpc_port": port,
            "http_port": free_port(),
            "rest_port": free_port(),
            "workers": 2,
            "tls": tls,
        },
        "tenants": [tenant],
        "models": [{"name": "echo", **ECHO}],
    }
    path = tmp_path / "mandant.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sighup_front_ends(proc: subprocess.Popen[str], text: str) -> str:
    """SIGHUP ``mandant serve``; the output until each of the two front ends logged
    ``text`` (both, so that every new connection sees what they did)."""
    proc.send_signal(signal.SIGHUP)
    seen = wait_for(proc, text, timeout_s=20)
    return seen + wait_for(proc, text, timeout_s=20)


def test_workers_keep_client_certificates_when_a_reload_drops_client_ca(tmp_path: Path) -> None:
    """Turning ``client_ca`` off needs a restart, with ``workers: 2`` too: the front
    ends keep requiring certificates of the old CA (they required one of no CA at
    all, and every new connection failed its handshake)."""
    ca = make_ca(tmp_path)
    server_cert(ca, tmp_path)
    client = issue(ca, tmp_path, "client", "t-client", "URI:spiffe://test/t")
    port = free_port()
    path = workers_config(tmp_path, port, mtls=True)
    credentials = grpc.ssl_channel_credentials(
        ca.cert.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
    )
    x = {"INPUT0": np.ones((1, 2), np.float32)}
    with mandant_serve(path) as proc:
        workers_config(tmp_path, port, mtls=False)
        seen = sighup_front_ends(proc, "front end reloaded")
        for _ in range(4):  # new connections, to either front end
            with Client(
                f"localhost:{port}", api_key="t-key", tls=credentials, timeout_s=10, options=FRESH
            ) as c:  # the key: the reloaded tenant is bound to no certificate
                assert c.infer("echo", x)["OUTPUT0"].sum() == 2
        assert "(tls) changed: applied at the next restart" in seen


def test_workers_keep_their_certificates_when_a_reload_misses_a_file(tmp_path: Path) -> None:
    """A reload whose key file is missing: each front end warns and keeps serving the
    old certificate (it raised from the signal handler: a traceback, no warning)."""
    ca = make_ca(tmp_path)
    server_cert(ca, tmp_path)
    port = free_port()
    path = workers_config(tmp_path, port, mtls=False)
    credentials = grpc.ssl_channel_credentials(ca.cert.read_bytes())
    x = {"INPUT0": np.ones((1, 2), np.float32)}
    with mandant_serve(path) as proc:
        (tmp_path / "server.key").rename(tmp_path / "server.key.gone")
        seen = sighup_front_ends(proc, "front end reloaded")
        assert seen.count("certificates not reloaded, keeping the old ones") >= 2
        assert "Traceback" not in seen
        for _ in range(4):
            with Client(
                f"localhost:{port}", api_key="t-key", tls=credentials, timeout_s=10, options=FRESH
            ) as c:
                assert c.infer("echo", x)["OUTPUT0"].sum() == 2


def test_a_failed_tls_handshake_writes_nothing_to_the_log(tmp_path: Path) -> None:
    """gRPC's C core wrote a line to stderr for each (any client's plaintext to the TLS
    port, or unknown certificate), not as the server's JSON log and not throttled: 500
    connections wrote 106 kB. The server keeps the core's log to errors."""
    ca = make_ca(tmp_path)
    server_cert(ca, tmp_path)
    port = free_port()
    path = tmp_path / "mandant.yaml"
    path.write_text(yaml.safe_dump(tls_config(port, "server.pem", "server.key")))
    env = {name: value for name, value in SUBPROCESS_ENV.items() if name != "GRPC_VERBOSITY"}
    with mandant_serve(path, env) as proc:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
                plain.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                with contextlib.suppress(OSError):
                    plain.recv(100)
        proc.send_signal(signal.SIGTERM)
        said, _ = proc.communicate(timeout=30)
    assert "Handshake failed" not in said and "ssl_transport_security" not in said, said
