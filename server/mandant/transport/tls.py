"""TLS for the gRPC, REST and HTTP ports from ``server.tls``: the server's
certificate, client certificates (mTLS) where ``client_ca`` is set, the identities a
verified client certificate carries, and reloading the files (SIGHUP) for new
connections without a restart.

A client certificate's identities are read from the certificate itself (its DER or
PEM bytes), by one parser for every port: each subject common name as ``CN=<name>``,
each URI subject alternative name as ``URI:<value>`` and each DNS one as
``DNS:<value>`` (tagged with their type, as :func:`~mandant.tenancy.directory.client_cert_identity`
tags a ``tenants[].client_certs`` entry, so a DNS name spelled ``CN=…`` is no common
name). A value holding a NUL or another control character names nobody: it is left
out (gRPC's own ``auth_context()`` cut such a value at its NUL and kept only the first
common name, so the gRPC and REST ports disagreed).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import unicodedata
from collections.abc import Iterable, Mapping

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from mandant.config import TlsConfig
from mandant.config.server import NOT_SERVED, no_passphrase, unserved_key_type

logger = logging.getLogger(__name__)


#: What a reload logs where the new TLS files cannot be read (or the key does not
#: match its certificate): connections keep getting the old ones.
CERTIFICATES_KEPT = "certificates not reloaded, keeping the old ones"


def same_tls_shape(new: TlsConfig | None, old: TlsConfig | None) -> bool:
    """Whether a reload can switch from ``old`` to ``new`` TLS settings in place: new
    paths only (TLS on or off, client CA or not, HTTPS on the HTTP port or not need a
    restart: a server's credentials fix them when it starts)."""
    if new is None or old is None:
        return new is old
    return (new.client_ca is None) == (old.client_ca is None) and new.http == old.http


def rotated(running: TlsConfig | None, new: TlsConfig | None) -> TlsConfig | None:
    """The TLS settings a reload applies: ``new``'s files in ``running``'s shape (a
    change of shape waits for a restart, :func:`same_tls_shape`; the files are read
    again all the same: a pending change of shape kept every later rotation from
    happening); None where either has no TLS."""
    if running is None or new is None or same_tls_shape(new, running):
        return new if running is not None else None
    # client_ca kept where it was on (the file's, or the running one), off where off
    client_ca = running.client_ca and (new.client_ca or running.client_ca)
    return running.model_copy(update={"cert": new.cert, "key": new.key, "client_ca": client_ca})


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """An SSL context serving ``tls.cert``; requiring a client certificate signed by
    ``tls.client_ca`` where it is set (an intermediate CA is a trust anchor of its own,
    as gRPC takes it: without ``VERIFY_X509_PARTIAL_CHAIN`` the REST and HTTP ports
    refused every certificate it issued). Raises OSError or ssl.SSLError on bad
    files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key, password=no_passphrase)
    if (kind := unserved_key_type(tls.cert)) is not None:  # a reload keeps the old files
        raise ssl.SSLError(f"{tls.cert}: {kind} {NOT_SERVED}")
    if tls.client_ca is not None:
        context.load_verify_locations(cafile=tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


class ServerTls:
    """The SSL context an HTTP listener (REST, the HTTP port) serves with, and the
    files a reload replaces: the listener keeps its context, whose SNI callback (run
    at every ClientHello, with or without a server name) hands the handshake to a
    context of the files read last. Loaded into the listener's own context, new files
    went beside the old ones: OpenSSL keeps a certificate per key type, so a rotation
    from EC to RSA kept serving the old (expired) EC certificate to most clients."""

    def __init__(self, tls: TlsConfig) -> None:
        self.context = server_ssl_context(tls)
        self._current = self.context
        self.context.sni_callback = self._handshake
        if tls.client_ca is not None:
            # No session resumption: its tickets and cache are this first context's,
            # and a resumed session skips verification: a client whose CA a reload
            # removed got in by resuming, for as long as it reconnected.
            self.context.options |= ssl.OP_NO_TICKET
            self.context.num_tickets = 0

    def reload(self, tls: TlsConfig) -> None:
        """Connections from now on get ``tls``'s files (OSError or ssl.SSLError, and
        nothing changes, where they cannot be used)."""
        self._current = server_ssl_context(tls)

    def _handshake(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
    ) -> None:
        if self._current is not context:
            connection.context = self._current


def ssl_identities(der: bytes | None) -> list[str]:
    """The identities of a verified peer certificate in DER, as :mod:`ssl` gives it
    (``SSLObject.getpeercert(binary_form=True)``); none without one."""
    return list(_identities(der, pem=False)) if der else []


def transport_identities(transport: asyncio.BaseTransport | None) -> list[str]:
    """The identities of the verified client certificate of an HTTP connection (REST,
    the HTTP port) by its transport; none without TLS or a certificate."""
    tls = transport.get_extra_info("ssl_object") if transport is not None else None
    return ssl_identities(tls.getpeercert(binary_form=True) if tls is not None else None)


def grpc_identities(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The identities of the verified client certificate of a gRPC call, read from
    the PEM certificate in its ``context.auth_context()`` (``x509_pem_cert``); none
    without one. Not from the context's ``x509_common_name`` / ``peer_uri`` /
    ``peer_dns``: those stop at a NUL byte and hold the first common name only."""
    pem = b"".join(auth_context.get("x509_pem_cert", ()))
    return list(_identities(pem, pem=True)) if pem else []


@functools.lru_cache(maxsize=4096)
def _identities(encoded: bytes, pem: bool) -> tuple[str, ...]:
    """:func:`certificate_identities` of a certificate's bytes, once per certificate
    (parsing costs ~30 µs a call; a client presents the same one on every call). One
    that cannot be parsed names nobody: a key still works (logged once, while it is
    remembered)."""
    try:
        load = x509.load_pem_x509_certificate if pem else x509.load_der_x509_certificate
        return tuple(certificate_identities(load(encoded)))
    except Exception as exc:  # what cryptography refuses (e.g. '_' in a PrintableString)
        logger.warning(
            "a verified client certificate could not be read (%s): it names no tenant",
            type(exc).__name__,
        )
        return ()


def certificate_identities(certificate: x509.Certificate) -> list[str]:
    """Every subject common name (``CN=``), URI (``URI:``) and DNS (``DNS:``) subject
    alternative name of ``certificate``, leaving out each value with a control
    character (NUL included). Raises where cryptography cannot parse its names (it
    parses them lazily): :func:`_identities` then takes it for no identity."""
    names = [
        f"CN={value}"
        for value in (
            attribute.value
            for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        )
        if isinstance(value, str) and _printable(value)
    ]
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return names
    for kind, tag in ((x509.UniformResourceIdentifier, "URI"), (x509.DNSName, "DNS")):
        names.extend(
            f"{tag}:{value}" for value in san.value.get_values_for_type(kind) if _printable(value)
        )
    return names


def _printable(value: str) -> bool:
    return bool(value) and not any(unicodedata.category(char) == "Cc" for char in value)


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
