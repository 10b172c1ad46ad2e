"""TLS for the gRPC, REST and HTTP ports from ``server.tls``: the server's
certificate, client certificates (mTLS) where ``client_ca`` is set, the identities a
verified client certificate carries, and reloading the files (SIGHUP) for new
connections without a restart.

A client certificate's identities, as ``tenants[].client_certs`` names them:
``CN=<subject common name>``, and each subject alternative name's value as it is
(``spiffe://…`` URIs, DNS names).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from mandant.config import TlsConfig


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """An SSL context serving ``tls.cert``; requiring a client certificate signed by
    ``tls.client_ca`` where it is set. Raises OSError or ssl.SSLError on bad files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    reload_ssl_context(context, tls)
    if tls.client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def reload_ssl_context(context: ssl.SSLContext, tls: TlsConfig) -> None:
    """Load the files again into a running context: connections made from now on get
    the new certificate (a CA added is trusted at once; one removed only after a
    restart)."""
    context.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca is not None:
        context.load_verify_locations(cafile=tls.client_ca)


def ssl_identities(peer_cert: Mapping[str, Any] | None) -> list[str]:
    """The identities of a verified peer certificate as :mod:`ssl` reports it
    (``SSLSocket.getpeercert()``); none without one."""
    if not peer_cert:
        return []
    identities = [
        f"CN={value}"
        for rdn in peer_cert.get("subject", ())
        for name, value in rdn
        if name == "commonName"
    ]
    identities.extend(
        value for kind, value in peer_cert.get("subjectAltName", ()) if kind in ("URI", "DNS")
    )
    return identities


def grpc_identities(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The identities of the verified client certificate of a gRPC call
    (``context.auth_context()``); none without one. As :func:`ssl_identities`: the
    subject CN and the URI and DNS SANs (gRPC's ``x509_subject_alternative_name``
    holds every SAN, e-mail and IP addresses too, which identify no tenant)."""
    identities = [
        f"CN={value.decode(errors='replace')}" for value in auth_context.get("x509_common_name", ())
    ]
    identities.extend(
        value.decode(errors="replace")
        for kind in ("peer_uri", "peer_dns")
        for value in auth_context.get(kind, ())
    )
    return identities


class GrpcCertificates:
    """gRPC server credentials whose certificates can be replaced while serving:
    gRPC asks :meth:`_fetch` at each new handshake, which hands over the files read
    by the last :meth:`reload` once (None: unchanged)."""

    def __init__(self, tls: TlsConfig) -> None:
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _configuration(tls),
            self._fetch,
            require_client_authentication=tls.client_ca is not None,
        )

    def reload(self, tls: TlsConfig) -> None:
        """Use the files at ``tls``'s paths for connections made from now on."""
        self._pending = _configuration(tls)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        pending, self._pending = self._pending, None
        return pending


def _configuration(tls: TlsConfig) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=tls.client_ca.read_bytes() if tls.client_ca is not None else None,
    )
