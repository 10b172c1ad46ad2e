"""The one tenant directory: tenants, API key hashes, limits, weights and priorities,
SLOs and admin keys in one immutable :class:`TenantSnapshot`, swapped atomically by
:meth:`TenantDirectory.replace` on a configuration reload.

Every component reads ``directory.current`` (or asks the directory) when it needs a
tenant fact; none keeps a copy made at start-up. A call in flight keeps the
:class:`~mandant.types.Tenant` it was authenticated as; the next call sees the new
snapshot. The swap is one attribute assignment on the event loop thread, so no reader
ever sees half of a configuration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mandant.config import MandantConfig, SloConfig, TenantConfig
from mandant.errors import InvalidInput, Unauthenticated, shown
from mandant.tenancy.keys import AdminKeys, KeyStore
from mandant.types import Tenant


@dataclass(frozen=True, slots=True)
class TenantSnapshot:
    """Everything about tenants at one moment. Build with :meth:`build`."""

    configs: tuple[TenantConfig, ...]
    by_id: Mapping[str, TenantConfig]
    tenants: Mapping[str, Tenant]
    ids: frozenset[str]
    keys: KeyStore
    #: client certificate identity (``tenants[].client_certs``, tagged with its type by
    #: :func:`client_cert_identity`) -> its tenant
    certificates: Mapping[str, Tenant]
    admins: AdminKeys
    admin_key_hashes: frozenset[str]
    slos: Mapping[str, SloConfig]
    slo_thresholds_s: Mapping[str, float]

    @classmethod
    def build(
        cls, tenants: Iterable[TenantConfig], admin_keys: Iterable[str] = ()
    ) -> TenantSnapshot:
        configs = tuple(tenants)
        by_id = {t.id: t for t in configs}
        identities = {t.id: Tenant(t.id, weight=t.weight, priority=t.priority) for t in configs}
        slos = {t.id: t.slo for t in configs if t.slo is not None}
        admin_hashes = tuple(admin_keys)
        return cls(
            configs=configs,
            by_id=MappingProxyType(by_id),
            tenants=MappingProxyType(identities),
            ids=frozenset(by_id),
            keys=KeyStore((identities[t.id], t.api_keys) for t in configs),
            certificates=MappingProxyType(
                {
                    client_cert_identity(name): identities[t.id]
                    for t in configs
                    for name in t.client_certs
                }
            ),
            admins=AdminKeys(admin_hashes),
            admin_key_hashes=frozenset(admin_hashes),
            slos=MappingProxyType(slos),
            slo_thresholds_s=MappingProxyType(
                {tenant: slo.latency_ms / 1000.0 for tenant, slo in slos.items()}
            ),
        )


def client_cert_identity(entry: str) -> str:
    """The certificate identity a ``tenants[].client_certs`` entry names, tagged with its
    type as ``transport/tls.py`` tags a certificate's: ``CN=<name>`` a subject common
    name; a value with a ``:`` (a URI always has one, a DNS name never) a URI subject
    alternative name (``URI:<value>``); any other a DNS one (``DNS:<value>``). So a
    DNS name spelled ``CN=…`` never passes for a common name, nor a URI for a DNS name."""
    if entry.startswith("CN="):
        return entry
    return f"URI:{entry}" if ":" in entry else f"DNS:{entry}"


class TenantDirectory:
    """The current :class:`TenantSnapshot`, and the lookups every front end makes."""

    def __init__(
        self, tenants: Iterable[TenantConfig] = (), admin_keys: Iterable[str] = ()
    ) -> None:
        self._current = TenantSnapshot.build(tenants, admin_keys)
        #: Every tenant id configured since start: a call of a tenant a reload removed
        #: while it ran is still counted under its id (label values stay those of the
        #: configuration, bounded by it).
        self.ever: set[str] = set(self._current.ids)

    @classmethod
    def from_config(cls, config: MandantConfig) -> TenantDirectory:
        return cls(config.tenants, config.server.admin_keys)

    @property
    def current(self) -> TenantSnapshot:
        return self._current

    def replace(self, tenants: Iterable[TenantConfig], admin_keys: Iterable[str]) -> list[str]:
        """Swap in a new snapshot; returns what changed, in words (never key material)."""
        new = TenantSnapshot.build(tenants, admin_keys)
        old, self._current = self._current, new
        self.ever |= new.ids
        return describe_changes(old, new)

    # -- lookups ------------------------------------------------------------------------

    def configured(self, tenant_id: str) -> bool:
        """Whether ``tenant_id`` is a tenant now (not one a reload removed)."""
        return tenant_id in self._current.ids

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant an ``authorization: Bearer <key>`` value belongs to, or
        :class:`~mandant.errors.Unauthenticated`."""
        return self._current.keys.authenticate(authorization)

    def authenticate_certificate(self, identities: Iterable[str]) -> Tenant:
        """The tenant a verified client certificate with these identities (tagged:
        ``CN=…``, ``URI:…``, ``DNS:…``) is, or :class:`~mandant.errors.Unauthenticated`
        (none bound, or two tenants')."""
        certificates = self._current.certificates
        found = {certificates[name] for name in identities if name in certificates}
        if len(found) != 1:
            raise Unauthenticated()
        return found.pop()

    def named(self, tenant_id: str) -> Tenant:
        """The configured tenant ``tenant_id``, for an admin who names one (GetUsage,
        ModelStatistics' ``mandant-tenant``), or :class:`~mandant.errors.InvalidInput`."""
        tenant = self._current.tenants.get(tenant_id)
        if tenant is None:
            raise InvalidInput(f"no tenant '{shown(tenant_id)}' is configured")
        return tenant

    def is_admin(self, authorization: str | None) -> bool:
        return self._current.admins.is_admin(authorization)

    def authenticate_admin(self, authorization: str | None) -> None:
        self._current.admins.authenticate(authorization)


def describe_changes(old: TenantSnapshot, new: TenantSnapshot) -> list[str]:
    """What a reload changed, one phrase per kind: tenants added, removed, changed
    (by setting name), API keys added/revoked per tenant, admin keys (counts only)."""
    notes: list[str] = []
    added = sorted(new.ids - old.ids)
    removed = sorted(old.ids - new.ids)
    if added:
        notes.append(f"tenants added: {', '.join(added)}")
    if removed:
        notes.append(f"tenants removed: {', '.join(removed)}")
    changed: list[str] = []
    rotated: list[str] = []
    for tenant in sorted(old.ids & new.ids):
        before, after = old.by_id[tenant], new.by_id[tenant]
        fields = [
            name
            for name in type(after).model_fields
            if name not in ("id", "api_keys", "client_certs")
            and getattr(before, name) != getattr(after, name)
        ]
        if fields:
            changed.append(f"{tenant} ({', '.join(fields)})")
        keys = _counted(set(before.api_keys), set(after.api_keys))
        if keys:
            rotated.append(f"{tenant} ({keys})")
        certificates = _counted(set(before.client_certs), set(after.client_certs))
        if certificates:
            rotated.append(f"{tenant} (client certificates {certificates})")
    if changed:
        notes.append(f"tenants changed: {'; '.join(changed)}")
    if rotated:
        notes.append(f"API keys changed: {'; '.join(rotated)}")
    admin = _counted(set(old.admin_key_hashes), set(new.admin_key_hashes))
    if admin:
        notes.append(f"admin keys changed ({admin})")
    return notes


def _counted(before: set[str], after: set[str]) -> str:
    parts = []
    if after - before:
        parts.append(f"{len(after - before)} added")
    if before - after:
        parts.append(f"{len(before - after)} revoked")
    return ", ".join(parts)
