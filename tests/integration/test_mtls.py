"""mTLS: ``server.tls.client_ca`` requires client certificates on the gRPC, REST and
(with ``tls.http``) HTTP ports; a tenant bound to certificate identities
(``tenants[].client_certs``) is that tenant without a key; certificates reload on
App.reload (SIGHUP). Certificates are made in the test with ``openssl``."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from mandant.config import MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from mandant_client import Client, ModelNotFound, Unauthenticated, Unavailable
from tests.integration.certs import Pair, der_san, issue, issue_raw, make_ca, server_cert
from tests.servers import SERVER_KINDS, Server, ServerThread, serving

ECHO = {
    "factory": "mandant.demo.models:echo",
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
}
X = np.ones((1, 2), np.float32)
#: One connection per channel: a new channel never reuses another's handshake.
FRESH = (("grpc.use_local_subchannel_pool", 1),)


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Pair
    server: Pair
    acme: Pair  # CN=acme-client
    globex: Pair  # SAN URI spiffe://test/globex
    stranger: Pair  # signed by the CA, bound to no tenant
    mailer: Pair  # SAN e-mail ops@example.com only: no identity, though "bound" to globex
    #: Names gRPC's auth context misread: each must be bound to no tenant.
    nul_uri: Pair  # SAN URI "spiffe://test/globex\0.evil": globex's, then a NUL
    nul_dns: Pair  # SAN DNS "acme.example\0.evil.org": acme's, then a NUL
    two_cns: Pair  # subject CN=acme-client and CN=globex-client: two tenants
    dns_cn: Pair  # SAN DNS "CN=acme-client": a DNS name, not acme's CN
    #: CN=acme-client and 100 more CNs of 33 characters, most of them "é" (8 KiB of
    #: certificate, 19 KiB of identities as the front end forwards them).
    many_names: Pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder)
    return Pki(
        folder,
        ca,
        server_cert(ca, folder),
        issue(ca, folder, "acme", "acme-client", "URI:spiffe://test/acme-other"),
        issue(ca, folder, "globex", "globex-box", "URI:spiffe://test/globex"),
        issue(ca, folder, "stranger", "stranger", "URI:spiffe://test/stranger"),
        issue(ca, folder, "mailer", "mailer", "email:ops@example.com"),
        issue_raw(ca, folder, "nul_uri", "/CN=x", der_san(0x86, b"spiffe://test/globex\0.evil")),
        issue_raw(ca, folder, "nul_dns", "/CN=x", der_san(0x82, b"acme.example\0.evil.org")),
        issue_raw(
            ca, folder, "two_cns", "/CN=acme-client/CN=globex-client", "subjectAltName=URI:x:y"
        ),
        issue_raw(ca, folder, "dns_cn", "/CN=x", "subjectAltName=DNS:CN=acme-client"),
        issue_raw(
            ca,
            folder,
            "many_names",
            "/CN=acme-client" + "".join(f"/CN={'é' * 30}{i:03d}" for i in range(100)),
            "subjectAltName=URI:x:many",
        ),
    )


def mtls_config(pki: Pki, **tls: Any) -> MandantConfig:
    return parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "rest_port": 0,
                "tls": {
                    "cert": pki.server.cert.name,  # relative: to the base folder
                    "key": pki.server.key.name,
                    "client_ca": pki.ca.cert.name,
                    **tls,
                },
            },
            "tenants": [
                {
                    "id": "acme",
                    "api_keys": [hash_key("acme-key")],
                    "client_certs": ["CN=acme-client", "acme.example"],
                },
                {
                    "id": "globex",
                    "client_certs": ["spiffe://test/globex", "ops@example.com", "CN=globex-client"],
                },
            ],
            "models": [
                {"name": "echo", **ECHO},
                {"name": "acme-only", "tenant": "acme", **ECHO},
                {"name": "globex-only", "tenant": "globex", **ECHO},
            ],
        }
    )


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(request: pytest.FixtureRequest, pki: Pki) -> Iterator[Server]:
    """Against ``workers: 2`` the front ends hold the TLS port and name a forwarded
    call's verified certificate to the engine."""
    with serving(request.param, mtls_config(pki, http=True), pki.folder) as running:
        yield running


def credentials(pki: Pki, client: Pair | None, ca: Pair | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca).cert.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


def client(server: Server, creds: grpc.ChannelCredentials, key: str | None = None) -> Client:
    return Client(server.target, api_key=key, tls=creds, timeout_s=10, options=FRESH)


def test_a_client_certificate_is_required(pki: Pki, server: Server) -> None:
    with client(server, credentials(pki, None), "acme-key") as c, pytest.raises(Unavailable):
        c.infer("echo", {"INPUT0": X})


def test_a_bound_certificate_calls_as_its_tenant_without_a_key(pki: Pki, server: Server) -> None:
    with client(server, credentials(pki, pki.acme)) as acme:
        assert acme.infer("acme-only", {"INPUT0": X})["OUTPUT0"].sum() == 2
        assert acme.model_ready("acme-only")  # a model RPC too (workers: forwarded)
        with pytest.raises(ModelNotFound):
            acme.infer("globex-only", {"INPUT0": X})
    with client(server, credentials(pki, pki.globex)) as globex:  # bound by SAN URI
        assert globex.infer("globex-only", {"INPUT0": X})["OUTPUT0"].sum() == 2
        assert globex.model_metadata("globex-only").name == "globex-only"
        with pytest.raises(ModelNotFound):
            globex.infer("acme-only", {"INPUT0": X})
        with pytest.raises(ModelNotFound):
            globex.model_metadata("acme-only")


def test_a_certificate_with_many_names_calls_every_rpc(pki: Pki, server: Server) -> None:
    """With ``workers: 2`` a forwarded call carries the certificate's names to the
    engine: names long once written as JSON failed those calls RESOURCE_EXHAUSTED
    (gRPC's metadata bound on the engine's socket) where one process served them."""
    with client(server, credentials(pki, pki.many_names)) as acme:
        assert acme.infer("acme-only", {"INPUT0": X})["OUTPUT0"].sum() == 2
        for _ in range(5):  # past gRPC's soft bound a call failed at random
            assert acme.model_ready("acme-only")
            assert acme.model_metadata("acme-only").name == "acme-only"
        with pytest.raises(ModelNotFound):
            acme.model_metadata("globex-only")


def test_an_unbound_certificate_without_a_key_is_unauthenticated(pki: Pki, server: Server) -> None:
    with client(server, credentials(pki, pki.stranger)) as c, pytest.raises(Unauthenticated):
        c.infer("echo", {"INPUT0": X})


def test_only_the_cn_and_uri_or_dns_names_identify_a_certificate(pki: Pki, server: Server) -> None:
    """An e-mail SAN names no tenant, on gRPC as on REST (gRPC reports every SAN)."""
    with client(server, credentials(pki, pki.mailer)) as c, pytest.raises(Unauthenticated):
        c.infer("echo", {"INPUT0": X})
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(f"https://127.0.0.1:{server.rest_port}/v2/models/echo/ready", https(pki, pki.mailer))
    assert refused.value.code == 401


@pytest.mark.parametrize("name", ["nul_uri", "nul_dns", "two_cns", "dns_cn"])
def test_a_certificate_is_read_alike_on_grpc_and_rest(pki: Pki, server: Server, name: str) -> None:
    """Names with a NUL after a tenant's identity, the CNs of two tenants, a DNS name
    spelled as a CN: no tenant, on both ports (gRPC's auth context cut the NUL off and
    kept the first CN only, so gRPC called these acme or globex)."""
    pair = getattr(pki, name)
    with client(server, credentials(pki, pair)) as c:
        for model in ("acme-only", "globex-only", "echo"):
            with pytest.raises(Unauthenticated):
                c.model_metadata(model) if model != "echo" else c.infer(model, {"INPUT0": X})
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(f"https://127.0.0.1:{server.rest_port}/v2/models/echo/ready", https(pki, pair))
    assert refused.value.code == 401


def test_a_key_still_authenticates_over_mtls(pki: Pki, server: Server) -> None:
    # the stranger's certificate opens the connection; the key says who calls
    with client(server, credentials(pki, pki.stranger), "acme-key") as c:
        assert c.infer("acme-only", {"INPUT0": X})["OUTPUT0"].sum() == 2
    # a wrong key is not saved by a bound certificate
    with (
        client(server, credentials(pki, pki.globex), "wrong-key") as c,
        pytest.raises(Unauthenticated),
    ):
        c.infer("echo", {"INPUT0": X})


def test_reload_serves_new_certificates_to_new_connections(pki: Pki, tmp_path: Path) -> None:
    """The server certificate and the client CA are replaced in place, then App.reload
    (what SIGHUP runs): new connections get the new ones, on gRPC and REST. (One
    process: it calls App.reload in the server's process.)"""
    for name in ("ca.pem", "server.pem", "server.key"):
        (tmp_path / name).write_bytes((pki.folder / name).read_bytes())
    config = mtls_config(pki)
    keys = tmp_path / "new"
    keys.mkdir()
    new_ca = make_ca(keys, "new-ca")
    new_acme = issue(new_ca, keys, "new-acme", "acme-client", "URI:spiffe://test/acme-2")
    with ServerThread(config, tmp_path) as server:
        with client(server, credentials(pki, new_acme, ca=new_ca)) as c, pytest.raises(Unavailable):
            c.infer("echo", {"INPUT0": X})  # still the old certificates
        rotated = server_cert(new_ca, keys, name="rotated")
        rotated.cert.replace(tmp_path / "server.pem")
        rotated.key.replace(tmp_path / "server.key")
        (tmp_path / "ca.pem").write_bytes(new_ca.cert.read_bytes())

        async def reload() -> None:
            assert server.app is not None
            result = server.app.reload(config)
            assert not any("certificates" in note for note in result.deferred), result

        server.call(reload())
        with client(server, credentials(pki, new_acme, ca=new_ca)) as c:
            assert c.infer("acme-only", {"INPUT0": X})["OUTPUT0"].sum() == 2
        with client(server, credentials(pki, pki.acme, ca=new_ca)) as c, pytest.raises(Unavailable):
            c.infer("echo", {"INPUT0": X})  # signed by the CA no longer configured
        assert server.app is not None
        rest = ssl.create_default_context(cafile=new_ca.cert)
        rest.load_cert_chain(new_acme.cert, new_acme.key)
        url = f"https://127.0.0.1:{server.app.rest_port}/v2/models/acme-only/ready"
        assert get(url, rest)[1] == 200


def https(pki: Pki, client_pair: Pair | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca.cert)
    if client_pair is not None:
        context.load_cert_chain(client_pair.cert, client_pair.key)
    return context


def get(url: str, context: ssl.SSLContext, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return json.loads(response.read() or b"null"), response.status


def test_rest_over_mtls(pki: Pki, server: Server) -> None:
    base = f"https://127.0.0.1:{server.rest_port}/v2/models"
    _, status = get(f"{base}/acme-only/ready", https(pki, pki.acme))
    assert status == 200  # the certificate is acme: no key needed
    with pytest.raises(urllib.error.HTTPError) as not_found:
        get(f"{base}/acme-only/ready", https(pki, pki.globex))
    assert not_found.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(f"{base}/echo/ready", https(pki, pki.stranger))
    assert refused.value.code == 401
    _, status = get(
        f"{base}/acme-only/ready", https(pki, pki.stranger), {"Authorization": "Bearer acme-key"}
    )
    assert status == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        get(f"{base}/echo/ready", https(pki, None), {"Authorization": "Bearer acme-key"})


def test_the_http_port_serves_tls(pki: Pki, server: Server) -> None:
    body, status = get(f"https://127.0.0.1:{server.http_port}/healthz", https(pki, pki.acme))
    assert status == 200 and body is not None
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(f"http://127.0.0.1:{server.http_port}/healthz", https(pki, pki.acme))


def test_a_certificate_reads_its_tenant_s_figures_on_the_http_port(
    pki: Pki, server: Server
) -> None:
    """As on gRPC and REST, a verified certificate without a key is its tenant on the
    HTTP port too: its own usage and dashboard row (the port read keys only, so a
    tenant with a certificate alone could never read its figures); an unbound
    certificate reads nothing, and a key still says who asks."""
    base = f"https://127.0.0.1:{server.http_port}"
    usage, status = get(f"{base}/usage", https(pki, pki.globex))
    assert status == 200 and list(usage["tenants"]) == ["globex"]
    board, status = get(f"{base}/api/dashboard", https(pki, pki.globex))
    assert status == 200 and [row["id"] for row in board["tenants"]] == ["globex"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(f"{base}/usage", https(pki, pki.stranger))
    assert refused.value.code == 401  # no tenant's (this server has no admin keys either)
    usage, _ = get(f"{base}/usage", https(pki, pki.stranger), {"Authorization": "Bearer acme-key"})
    assert list(usage["tenants"]) == ["acme"]
