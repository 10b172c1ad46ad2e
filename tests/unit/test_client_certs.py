"""Client certificate identities: how a verified certificate names its holder, the
directory's lookup by identity, and the configuration rules for ``client_certs``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mandant.config import TenantConfig, parse_config
from mandant.errors import ConfigError, Unauthenticated
from mandant.tenancy.directory import TenantDirectory
from mandant.transport.tls import grpc_identities, ssl_identities


def test_identities_from_an_ssl_peer_certificate() -> None:
    names = (("URI", "spiffe://prod/acme"), ("DNS", "acme.local"), ("IP Address", "10.0.0.1"))
    peer = {
        "subject": ((("countryName", "DE"),), (("commonName", "acme-client"),)),
        "subjectAltName": names,
    }
    assert ssl_identities(peer) == ["CN=acme-client", "spiffe://prod/acme", "acme.local"]
    assert ssl_identities(None) == []


def test_identities_from_a_grpc_auth_context() -> None:
    context = {  # as gRPC reports a certificate with a URI, a DNS and an e-mail SAN
        "x509_common_name": [b"acme-client"],
        "x509_subject_alternative_name": [b"spiffe://prod/acme", b"box.acme", b"ops@acme"],
        "peer_uri": [b"spiffe://prod/acme"],
        "peer_dns": [b"box.acme"],
        "peer_email": [b"ops@acme"],
        "transport_security_type": [b"ssl"],
    }
    assert grpc_identities(context) == ["CN=acme-client", "spiffe://prod/acme", "box.acme"]
    assert grpc_identities({}) == []


def test_the_directory_finds_the_one_tenant_a_certificate_names() -> None:
    directory = TenantDirectory(
        [
            TenantConfig(id="a", client_certs=("CN=a-client",)),
            TenantConfig(id="b", client_certs=("spiffe://prod/b",)),
        ]
    )
    assert directory.authenticate_certificate(["CN=x", "CN=a-client"]).id == "a"
    assert directory.authenticate_certificate(["CN=b", "spiffe://prod/b"]).id == "b"
    for refused in ([], ["CN=b"], ["CN=a-client", "spiffe://prod/b"]):  # none, or two
        with pytest.raises(Unauthenticated):
            directory.authenticate_certificate(refused)
    notes = directory.replace([TenantConfig(id="a", client_certs=("CN=a2",))], [])
    assert "API keys changed: a (client certificates 1 added, 1 revoked)" in notes
    assert directory.authenticate_certificate(["CN=a2"]).id == "a"
    with pytest.raises(Unauthenticated):
        directory.authenticate_certificate(["CN=a-client"])


def config(tls: dict[str, Any] | None, *tenants: dict[str, Any]) -> dict[str, Any]:
    return {"server": {"tls": tls} if tls else {}, "tenants": list(tenants)}


TLS = {"cert": "s.pem", "key": "s.key", "client_ca": "ca.pem"}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (config({**TLS, "client_ca": None}, {"id": "a", "client_certs": ["CN=a"]}), "client_ca"),
        (config(None, {"id": "a", "client_certs": ["CN=a"]}), "client_ca"),
        (
            config(
                TLS, {"id": "a", "client_certs": ["CN=a"]}, {"id": "b", "client_certs": ["CN=a"]}
            ),
            "appears twice",
        ),
        (config(TLS, {"id": "a", "client_certs": [""]}), "tenants.0.client_certs.0"),
    ],
)
def test_client_certs_rules(data: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(data)


def test_tls_paths_resolve_against_the_base_folder() -> None:
    parsed = parse_config(config({**TLS, "key": "/abs/s.key"})).resolved(Path("/etc/mandant"))
    tls = parsed.server.tls
    assert tls is not None
    assert (tls.cert, tls.key, tls.client_ca) == (
        Path("/etc/mandant/s.pem"),
        Path("/abs/s.key"),
        Path("/etc/mandant/ca.pem"),
    )
