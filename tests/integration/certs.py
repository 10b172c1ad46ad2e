"""Certificates made in the test with the ``openssl`` command: a CA, server
certificates for 127.0.0.1/localhost, and client certificates (subject CN and a SAN
URI) signed by it."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _new_key(key: Path, algorithm: str = "EC") -> None:
    """A P-256 EC key, or (``"RSA"``) a 2048-bit RSA one."""
    option = "ec_paramgen_curve:P-256" if algorithm == "EC" else "rsa_keygen_bits:2048"
    _openssl("genpkey", "-algorithm", algorithm, "-pkeyopt", option, "-out", str(key))


def make_ca(folder: Path, name: str = "ca") -> Pair:
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    _new_key(pair.key)
    _openssl(
        "req", "-x509", "-new", "-key", str(pair.key), "-out", str(pair.cert),
        "-days", "2", "-subj", f"/CN=mandant test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def issue(
    ca: Pair, folder: Path, name: str, common_name: str, san: str, algorithm: str = "EC"
) -> Pair:
    """A certificate for ``common_name`` with ``san`` (``DNS:…,IP:…`` / ``URI:…``)."""
    return issue_raw(
        ca, folder, name, f"/CN={common_name}", f"subjectAltName={san}", algorithm=algorithm
    )


def issue_raw(
    ca: Pair,
    folder: Path,
    name: str,
    subject: str,
    extension: str,
    algorithm: str = "EC",
    is_ca: bool = False,
) -> Pair:
    """A certificate for ``subject`` (``/CN=a/CN=b``, UTF-8) with one ``extension`` line
    (``subjectAltName=…``, or :func:`der_san`'s); ``is_ca``: an intermediate CA."""
    pair = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    _new_key(pair.key, algorithm)
    request = folder / f"{name}.csr"
    _openssl(
        "req", "-new", "-utf8", "-key", str(pair.key), "-out", str(request), "-subj", subject
    )  # fmt: skip
    extensions = folder / f"{name}.ext"
    constraints = "critical,CA:TRUE\nkeyUsage=critical,keyCertSign" if is_ca else "CA:FALSE"
    extensions.write_text(f"basicConstraints={constraints}\n{extension}\n")
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(pair.cert), "-days", "2", "-extfile", str(extensions),
    )  # fmt: skip
    return pair


def der_san(tag: int, value: bytes) -> str:
    """A subjectAltName extension line with one name of any bytes (a NUL too), which
    ``openssl``'s ``URI:``/``DNS:`` syntax cannot write: ``tag`` 0x86 a URI, 0x82 a
    DNS name (short values only: one-byte DER lengths)."""
    name = bytes([tag, len(value)]) + value
    return "2.5.29.17=DER:" + (bytes([0x30, len(name)]) + name).hex()


def server_cert(ca: Pair, folder: Path, name: str = "server", algorithm: str = "EC") -> Pair:
    return issue(ca, folder, name, "localhost", "DNS:localhost,IP:127.0.0.1", algorithm)
