"""API keys: generation, hashing, and lookup of the tenant a key belongs to.

Keys are stored only as ``sha256:<hex>`` hashes. The plain key exists in the client's
hands and in memory here: while a call reads it, and, once it has authenticated, in
the :class:`KeyStore` of the current configuration, which remembers the values that
authenticated so that a tenant's next calls skip the hash (as gRPC's own HTTP/2
header table keeps the value for the connection). It is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping

from mandant.errors import Unauthenticated
from mandant.types import Tenant

_BEARER = "bearer "


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of the key's UTF-8 bytes; a header's bytes that are not UTF-8
    (aiohttp hands them over as surrogate escapes) hash as the bytes they were."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def generate_key() -> tuple[str, str]:
    """A new random key (256 bits) and the hash to put in the configuration."""
    key = "mdt_" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def _bearer_hash(authorization: str | None) -> str | None:
    """The hash of the key in an ``authorization: Bearer <key>`` value, if it is one."""
    if not authorization or authorization[: len(_BEARER)].lower() != _BEARER:
        return None
    return hash_key(authorization[len(_BEARER) :].strip())


#: ``authorization`` values a :class:`KeyStore` remembers, and the longest it does.
REMEMBERED_VALUES = 1024
REMEMBERED_LENGTH = 256


class KeyStore:
    """Maps key hashes to tenants. One message for every failure, so that a caller
    cannot tell a missing key from a wrong or revoked one.

    The sha256 of a key costs more than the rest of authentication, so each
    ``authorization`` value that authenticated is remembered with its tenant (at most
    :data:`REMEMBERED_VALUES` of at most :data:`REMEMBERED_LENGTH` characters; when
    full, it starts again). Refused values are never remembered, so a caller without a
    key cannot fill it. A reload builds a new store: a revoked key stops at once."""

    def __init__(self, tenants: Iterable[tuple[Tenant, Iterable[str]]]) -> None:
        self._by_hash: Mapping[str, Tenant] = {
            key_hash: tenant for tenant, hashes in tenants for key_hash in hashes
        }
        self._known: dict[str, Tenant] = {}

    def authenticate(self, authorization: str | None) -> Tenant:
        if authorization is None:
            raise Unauthenticated()
        tenant = self._known.get(authorization)
        if tenant is not None:
            return tenant
        presented = _bearer_hash(authorization)
        tenant = self._by_hash.get(presented) if presented else None
        if tenant is None:
            raise Unauthenticated()
        if len(authorization) <= REMEMBERED_LENGTH:
            if len(self._known) >= REMEMBERED_VALUES:
                self._known.clear()
            self._known[authorization] = tenant
        return tenant


class AdminKeys:
    """The operators' keys (``server.admin_keys``): usage reports and administration.
    No tenant key is an admin key; with none configured, every call is refused."""

    def __init__(self, hashes: Iterable[str]) -> None:
        self._hashes = tuple(hashes)

    @property
    def configured(self) -> bool:
        return bool(self._hashes)

    def is_admin(self, authorization: str | None) -> bool:
        presented = _bearer_hash(authorization)
        if presented is None:
            return False
        return any([hmac.compare_digest(presented, known) for known in self._hashes])

    def authenticate(self, authorization: str | None) -> None:
        if not self.is_admin(authorization):
            raise Unauthenticated("missing or invalid admin key")
