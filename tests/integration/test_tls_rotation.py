"""Certificates on the REST and HTTP ports (``transport/tls.py``): a rotation to
another key type, an intermediate CA as ``client_ca``, an encrypted key, and a rotation
while a change of TLS's shape waits for a restart."""

from __future__ import annotations

import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mandant.app import as_reloaded
from mandant.config import parse_config
from mandant.config.server import TlsConfig, unserved_key_type
from mandant.transport.tls import server_ssl_context
from tests.integration.certs import Pair, issue, issue_raw, make_ca, server_cert
from tests.servers import ECHO_MODEL, ServerThread


def _config(tls: dict[str, Any], tenant: dict[str, Any] | None = None) -> Any:
    tenant = tenant or {"id": "t", "api_keys": []}
    return parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "tls": tls},
            "tenants": [tenant],
            "models": [ECHO_MODEL],
        }
    )


def _served(port: int, ca: Pair) -> bytes:
    """The DER certificate a default client (Python's ssl, as curl and tritonclient:
    ECDSA preferred) is served on ``port``."""
    context = ssl.create_default_context(cafile=ca.cert)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port))) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _rest_status(port: int, ca: Pair, client: Pair) -> int | str:
    """A REST metadata call's status over TLS with ``client``'s certificate (the server
    trusted by ``ca``), or the name of the error its handshake ended in."""
    context = ssl.create_default_context(cafile=ca.cert)
    context.check_hostname = False
    context.load_cert_chain(client.cert, client.key)
    url = f"https://127.0.0.1:{port}/v2/models/echo"
    try:
        with urllib.request.urlopen(url, context=context, timeout=10) as answer:
            return int(answer.status)
    except (OSError, ssl.SSLError) as exc:  # the handshake refused: reset or alert
        return type(exc).__name__


def _der(pair: Pair) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pair.cert.read_text())


@pytest.mark.parametrize("shape_change", [False, True], ids=["same shape", "shape waits"])
def test_a_rotation_to_another_key_type_reaches_the_rest_and_http_ports(
    tmp_path: Path, shape_change: bool
) -> None:
    """The files were loaded into the listener's own context, beside the old ones:
    OpenSSL keeps a certificate per key type, so after an EC-to-RSA rotation most
    clients still got the old (here: soon expired) EC certificate. And a file whose
    TLS shape changed (``tls.http`` toggled, applied at a restart) rotated nothing at
    all, on any port."""
    ca = make_ca(tmp_path)
    first = server_cert(ca, tmp_path, "first")
    second = server_cert(ca, tmp_path, "second", algorithm="RSA")
    tls = {"cert": "server.pem", "key": "server.key", "http": True}
    for suffix in ("pem", "key"):
        (tmp_path / f"server.{suffix}").write_bytes(Path(f"{tmp_path}/first.{suffix}").read_bytes())
    with ServerThread(_config(tls), tmp_path) as server:
        assert server.app is not None
        ports = (server.app.rest_port, server.app.http_port)
        assert [_served(port, ca) for port in ports] == [_der(first)] * 2
        for suffix in ("pem", "key"):
            (tmp_path / f"server.{suffix}").write_bytes(
                Path(f"{tmp_path}/second.{suffix}").read_bytes()
            )
        reloaded = _config({**tls, "http": not shape_change})
        server.call(_reload(server, reloaded))
        assert [_served(port, ca) for port in ports] == [_der(second)] * 2


async def _reload(server: ServerThread, config: Any) -> None:
    assert server.app is not None
    server.app.reload(config)


def test_an_intermediate_ca_as_client_ca_admits_its_certificates_on_rest(tmp_path: Path) -> None:
    """gRPC takes an intermediate CA as a trust anchor of its own; the REST and HTTP
    ports refused every certificate it issued (no partial chain)."""
    root = make_ca(tmp_path)
    intermediate = issue_raw(root, tmp_path, "intermediate", "/CN=issuing", "", is_ca=True)
    client = issue(intermediate, tmp_path, "client", "t-client", "URI:spiffe://test/t")
    server_cert(root, tmp_path)
    tls = {"cert": "server.pem", "key": "server.key", "client_ca": "intermediate.pem"}
    tenant = {"id": "t", "client_certs": ["spiffe://test/t"]}
    with ServerThread(_config(tls, tenant), tmp_path) as server:
        assert server.app is not None
        assert _rest_status(server.app.rest_port, root, client) == 200


def test_an_encrypted_key_is_named_not_asked_for(tmp_path: Path) -> None:
    """OpenSSL asked for its passphrase on the terminal (a server in one froze at a
    SIGHUP), and without one check-config and serve failed with a traceback."""
    ca = make_ca(tmp_path)
    plain = server_cert(ca, tmp_path)
    subprocess.run(
        ["openssl", "pkey", "-in", str(plain.key), "-aes256", "-passout", "pass:secret",
         "-out", str(tmp_path / "encrypted.key")],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    tls = TlsConfig(cert=Path("server.pem"), key=Path("encrypted.key"))
    assert tls.file_problems(tmp_path) == [
        ("server.tls.key", "an encrypted key (passphrase) is not supported")
    ]


def test_a_client_ca_replaced_by_a_reload_is_no_longer_trusted_on_rest(tmp_path: Path) -> None:
    """The REST and HTTP ports loaded a new client CA beside the old one, which stayed
    trusted until a restart; a reload's files now replace the old ones."""
    old_ca, new_ca = make_ca(tmp_path, "old-ca"), make_ca(tmp_path, "new-ca")
    server_cert(old_ca, tmp_path)
    clients = {
        ca: issue(ca, tmp_path, f"client-{ca.cert.stem}", "t", "URI:spiffe://test/t")
        for ca in (old_ca, new_ca)
    }
    tls = {"cert": "server.pem", "key": "server.key", "client_ca": "old-ca.pem"}
    tenant = {"id": "t", "client_certs": ["spiffe://test/t"]}
    with ServerThread(_config(tls, tenant), tmp_path) as server:
        assert server.app is not None
        port = server.app.rest_port
        assert _rest_status(port, old_ca, clients[old_ca]) == 200
        server.call(_reload(server, _config({**tls, "client_ca": "new-ca.pem"}, tenant)))
        assert _rest_status(port, old_ca, clients[new_ca]) == 200
        assert _rest_status(port, old_ca, clients[old_ca]) != 200


@pytest.mark.parametrize("algorithm", ["ED25519", "ED448"])
def test_a_certificate_of_a_key_type_grpc_does_not_serve_is_refused(
    tmp_path: Path, algorithm: str
) -> None:
    """check-config passed them: with Ed448 the gRPC port then failed to bind, its
    message blaming the address; with Ed25519 every gRPC handshake failed. A reload to
    one keeps the running certificates (REST and HTTP took it, gRPC did not)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", algorithm, "-nodes", "-days", "2",
         "-keyout", str(tmp_path / "server.key"), "-out", str(tmp_path / "server.pem"),
         "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = TlsConfig(cert=Path("server.pem"), key=Path("server.key"))
    [(field, reason)] = tls.file_problems(tmp_path)
    assert field == "server.tls.cert"
    assert reason.startswith(algorithm.title()) and "RSA or EC" in reason
    with pytest.raises(ssl.SSLError, match="RSA or EC"):
        server_ssl_context(tls.resolved(tmp_path))


def test_no_session_is_resumed_where_client_certificates_are_required(tmp_path: Path) -> None:
    """A resumed session skips verification, and its tickets and cache belong to the
    listener's first context: a client whose CA a reload removed got back in by
    resuming its session (TLS 1.2 and 1.3), for as long as it reconnected."""
    ca = make_ca(tmp_path)
    server_cert(ca, tmp_path)
    client = issue(ca, tmp_path, "client", "t", "URI:spiffe://test/t")
    tls = {"cert": "server.pem", "key": "server.key", "client_ca": "ca.pem"}
    tenant = {"id": "t", "client_certs": ["spiffe://test/t"]}
    with ServerThread(_config(tls, tenant), tmp_path) as server:
        assert server.app is not None
        context = ssl.create_default_context(cafile=ca.cert)
        context.check_hostname = False
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # its session is there at once
        context.load_cert_chain(client.cert, client.key)
        address = ("127.0.0.1", server.app.rest_port)
        with context.wrap_socket(socket.create_connection(address)) as first:
            session = first.session
        assert session is not None
        with context.wrap_socket(socket.create_connection(address), session=session) as second:
            assert not second.session_reused


def test_a_certificate_cryptography_cannot_parse_is_left_to_openssl(tmp_path: Path) -> None:
    """The key-type check crashed check-config and serve (and dropped the rest of a
    reload) on a certificate OpenSSL and gRPC serve but ``cryptography`` cannot parse
    (BER a legacy CA wrote)."""
    odd = tmp_path / "odd.pem"
    odd.write_text("-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n")
    assert unserved_key_type(odd) is None


def test_a_process_started_again_serves_the_rotated_certificate(tmp_path: Path) -> None:
    """``workers: N``: a child started again after a reload starts from ``as_reloaded``,
    which held the old files where the TLS shape changed, while its running siblings
    rotated: half the connections got the old certificate."""
    running = _config({"cert": "s1.pem", "key": "s1.key", "client_ca": "ca.pem"})
    new = _config({"cert": "s2.pem", "key": "s2.key"})  # client_ca removed: a restart's
    held, deferred = as_reloaded(running, new)
    assert held.server.tls is not None
    assert (held.server.tls.cert, held.server.tls.client_ca) == (Path("s2.pem"), Path("ca.pem"))
    assert any("tls" in line for line in deferred)
