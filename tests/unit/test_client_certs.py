"""Client certificate identities: how a verified certificate names its holder, the
directory's lookup by identity, and the configuration rules for ``client_certs``."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mandant.config import TenantConfig, parse_config
from mandant.errors import ConfigError, Unauthenticated
from mandant.tenancy.directory import TenantDirectory
from mandant.transport.tls import _identities, grpc_identities, ssl_identities


def certificate(
    common_names: tuple[str, ...], names: list[x509.GeneralName] | None = None
) -> x509.Certificate:
    """A self-signed certificate with these subject CNs and subject alternative names."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COUNTRY_NAME, "DE")]
        + [x509.NameAttribute(NameOID.COMMON_NAME, name) for name in common_names]
    )
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256())


def on_both_ports(cert: x509.Certificate) -> list[str]:
    """Its identities as REST reads them (DER) and as gRPC does (the PEM in the call's
    auth context, beside the fields gRPC fills itself), which must agree."""
    rest = ssl_identities(cert.public_bytes(serialization.Encoding.DER))
    context = {  # gRPC's own fields cut at a NUL and hold one CN: they must be ignored
        "x509_common_name": [b"ignored"],
        "peer_uri": [b"spiffe://ignored"],
        "x509_pem_cert": [cert.public_bytes(serialization.Encoding.PEM)],
        "transport_security_type": [b"ssl"],
    }
    assert grpc_identities(context) == rest
    return rest


def test_identities_are_every_cn_and_each_uri_and_dns_name_tagged_with_its_type() -> None:
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier("spiffe://prod/acme"),
        x509.DNSName("acme.local"),
        x509.RFC822Name("ops@acme"),  # e-mail and IP addresses identify no tenant
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
    ]
    assert on_both_ports(certificate(("acme-client", "box"), names)) == [
        "CN=acme-client",
        "CN=box",
        "URI:spiffe://prod/acme",
        "DNS:acme.local",
    ]
    assert on_both_ports(certificate(())) == []
    assert ssl_identities(None) == [] and grpc_identities({}) == []
    assert ssl_identities(b"not a certificate") == []


def test_a_name_with_a_nul_or_control_character_names_nobody() -> None:
    """gRPC's auth context cut ``spiffe://test/acme\\x00.evil`` to acme's identity."""
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier("spiffe://test/acme\x00.evil"),
        x509.DNSName("globex.example.com\x00.evil.org"),
        x509.DNSName("box\x1b.acme"),
        x509.DNSName("ok.acme"),
    ]
    assert on_both_ports(certificate(("acme-client\x00x", "a\nb", "c\x7f"), names)) == [
        "DNS:ok.acme"
    ]


def test_the_directory_finds_the_one_tenant_a_certificate_names() -> None:
    directory = TenantDirectory(
        [
            TenantConfig(id="a", client_certs=("CN=a-client", "a.example")),
            TenantConfig(id="b", client_certs=("spiffe://prod/b", "CN=b-client")),
        ]
    )
    assert directory.authenticate_certificate(["CN=x", "CN=a-client"]).id == "a"
    assert directory.authenticate_certificate(["CN=b", "URI:spiffe://prod/b"]).id == "b"
    assert directory.authenticate_certificate(["DNS:a.example"]).id == "a"
    refusals = (
        [],
        ["CN=b"],
        ["CN=a-client", "URI:spiffe://prod/b"],  # two tenants
        ["CN=a-client", "CN=b-client"],  # two tenants by two CNs
        ["DNS:CN=b-client"],  # a DNS name spelled as a CN is no CN
        ["DNS:spiffe://prod/b", "URI:a.example"],  # nor a URI a DNS name, or back
        ["spiffe://prod/b", "a.example"],  # untagged: not a certificate's identity
    )
    for refused in refusals:
        with pytest.raises(Unauthenticated):
            directory.authenticate_certificate(refused)
    notes = directory.replace([TenantConfig(id="a", client_certs=("CN=a2",))], [])
    assert "API keys changed: a (client certificates 1 added, 2 revoked)" in notes
    assert directory.authenticate_certificate(["CN=a2"]).id == "a"
    with pytest.raises(Unauthenticated):
        directory.authenticate_certificate(["CN=a-client"])


def test_a_certificate_of_two_tenants_by_its_cns_is_unauthenticated() -> None:
    directory = TenantDirectory(
        [
            TenantConfig(id="a", client_certs=("CN=a-client",)),
            TenantConfig(id="b", client_certs=("CN=b-client",)),
        ]
    )
    both = on_both_ports(certificate(("a-client", "b-client")))
    with pytest.raises(Unauthenticated):
        directory.authenticate_certificate(both)
    spelled = on_both_ports(certificate(("x",), [x509.DNSName("CN=b-client")]))
    with pytest.raises(Unauthenticated):
        directory.authenticate_certificate(spelled)


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


def test_a_certificate_that_cannot_be_read_names_nobody_and_raises_nothing() -> None:
    """What cryptography refuses (bytes that are no certificate; a subject alternative
    name of a type it does not know, such as an x400Address) names no tenant: a key
    still works. It raised, failing the call INTERNAL (with workers: N, keyed calls
    too: a forwarded call reads its certificate's identities)."""
    assert ssl_identities(b"\x30\x03\x02\x01\x00") == []
    cert = certificate(("acme",), [x509.DNSName("xxxx.example")])
    der = cert.public_bytes(serialization.Encoding.DER)
    at = der.find(b"\x82\x0cxxxx.example")
    x400 = b"\xa3\x0c\x30\x0a\x06\x03\x55\x04\x03\x0c\x03abc"  # [3], 14 bytes like the DNS
    assert ssl_identities(der[:at] + x400 + der[at + 14 :]) == []


def test_a_certificate_is_read_once() -> None:
    """Parsing costs ~30 µs; a client presents the same certificate on every call."""
    der = certificate(("acme",)).public_bytes(serialization.Encoding.DER)
    assert ssl_identities(der) == ["CN=acme"]
    before = _identities.cache_info().hits
    assert ssl_identities(der) == ["CN=acme"]
    assert _identities.cache_info().hits == before + 1
