"""Which limits one call meets: the configuration resolved per (tenant, model).

A tenant's ``rate_limit`` and ``quota`` apply to all its calls; a section set under
``models: {<name>: …}`` replaces the tenant's section of the same name for calls to
that model, with buckets and counts of its own (scope ``(tenant, model)``).
``max_concurrency`` counts a tenant's calls in flight on this replica, across models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from mandant.config import QuotaConfig, RateLimitConfig, TenantConfig
from mandant.errors import Unauthenticated
from mandant.tenancy.limits import Rate
from mandant.tenancy.quota import PeriodKind, Quota
from mandant.types import ServedModels

#: Whose bucket or count: (tenant id, None) tenant-wide, (tenant id, model) per model.
Scope = tuple[str, str | None]

REQUESTS = "requests_per_s"
ROWS = "rows_per_s"


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything admission checks for one (tenant, model). ``buckets`` take 1 token
    per request (``requests_per_s``) or one per row (``rows_per_s``)."""

    tenant: str
    model: str
    buckets: tuple[tuple[Scope, Rate], ...] = ()
    quotas: tuple[tuple[Scope, Quota], ...] = ()
    max_concurrency: int | None = None
    max_rows: float | None = None  # the rows bucket's burst: a larger call never fits
    max_rows_scope: Scope | None = None  # whose rows bucket that is (a model's own?)
    quota_rows: int | None = None  # the smallest whole quota: a larger call never fits

    @property
    def stored(self) -> bool:
        """Whether a store is involved at all (buckets or quotas)."""
        return bool(self.buckets or self.quotas)


@dataclass(frozen=True, slots=True)
class Denial:
    """The limit a call did not fit with the longest wait, and how long until the call
    would fit every limit."""

    limit: Rate | Quota
    scope: Scope
    retry_after_s: float


#: What an admitted call's charge left to refund it by: each bucket's take mark, in
#: ``Plan.buckets`` order (a store's own numbers; see :mod:`mandant.tenancy.limits`).
Marks = tuple[int, ...]


def cost(rate: Rate, rows: int) -> int:
    return 1 if rate.name == REQUESTS else rows


class SharedStore(Protocol):
    """Buckets and counts kept outside this process (Redis), shared by replicas.
    ``acquire`` takes from every limit of the plan (returning the buckets' take
    marks) or from none, atomically, and raises :class:`StoreUnavailable` when the
    store cannot be reached. ``wall`` is the wall time whose UTC day and month the
    call's quota rows count in."""

    name: str

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def acquire(self, plan: Plan, rows: int, wall: float) -> Denial | Marks: ...

    def refund(self, plan: Plan, rows: int, wall: float, marks: Marks) -> None:
        """Give back what ``acquire(plan, rows, wall)`` took (the call did not run; it
        returned ``marks``): request and row tokens as far as each bucket would hold
        them had they never been taken, quota rows in the period of ``wall`` if it
        still lasts. Does not wait; a refund that never reached
        the store is kept and sent again, not raised."""
        ...

    async def used(self, scope: Scope, quota_name: str, period: PeriodKind) -> int:
        """Rows counted against one quota in its current period, by every replica."""
        ...


class StoreUnavailable(Exception):
    """The shared store failed one operation; admission falls back or refuses."""


class StoreRefused(StoreUnavailable):
    """The shared store answered one operation with an error about that operation's own
    keys (a key another program made of another type): that call alone falls back or
    is refused, and the store is not taken for out (it answers)."""


def _rates(config: RateLimitConfig | None) -> list[Rate]:
    if config is None:
        return []
    rates = []
    if config.requests_per_s is not None:
        burst = config.burst or max(1.0, config.requests_per_s)
        rates.append(Rate(REQUESTS, config.requests_per_s, burst))
    if config.rows_per_s is not None:
        rates.append(
            Rate(ROWS, config.rows_per_s, config.rows_burst or max(1.0, config.rows_per_s))
        )
    return rates


def _quotas(config: QuotaConfig | None) -> list[Quota]:
    if config is None:
        return []
    quotas = []
    if config.rows_per_day is not None:
        quotas.append(Quota("rows_per_day", config.rows_per_day, "day"))
    if config.rows_per_month is not None:
        quotas.append(Quota("rows_per_month", config.rows_per_month, "month"))
    return quotas


class Policy:
    """Plans by (tenant id, model name), built once per pair and cached; model names
    come from the registry (configuration), and those no longer served are dropped
    (:meth:`forget`), so the cache is bounded."""

    def __init__(self, tenants: Iterable[TenantConfig]) -> None:
        self._tenants: Mapping[str, TenantConfig] = {t.id: t for t in tenants}
        self._plans: dict[tuple[str, str], Plan] = {}

    def plan(self, tenant: str, model: str) -> Plan:
        plan = self._plans.get((tenant, model))
        if plan is None:
            plan = self._plans[(tenant, model)] = self._build(tenant, model)
        return plan

    def forget(self, served: ServedModels) -> None:
        """Drop the plans of models ``served`` does not list (an admin may load any
        name); a plan holds no count: the limits and quotas it names keep theirs."""
        for key in [key for key in self._plans if not served.serves(key[1])]:
            del self._plans[key]

    def rates(self) -> dict[tuple[Scope, str], Rate]:
        """Every token bucket the configuration names, by scope and rate name, and its
        rate (a reload switches the buckets kept to them at once)."""
        rates: dict[tuple[Scope, str], Rate] = {}
        for tenant in self._tenants.values():
            for rate in _rates(tenant.rate_limit):
                rates[((tenant.id, None), rate.name)] = rate
            for model, override in tenant.models.items():
                for rate in _rates(override.rate_limit):
                    rates[((tenant.id, model), rate.name)] = rate
        return rates

    def scopes(self) -> set[Scope]:
        """Every scope the configuration names (for pruning state of removed ones)."""
        scopes: set[Scope] = set()
        for tenant in self._tenants.values():
            scopes.add((tenant.id, None))
            scopes.update((tenant.id, name) for name in tenant.models)
        return scopes

    def _build(self, tenant_id: str, model: str) -> Plan:
        tenant = self._tenants.get(tenant_id)
        if tenant is None:  # removed by a reload after its key was checked: no limits
            raise Unauthenticated()  # to apply (an empty plan served it unlimited)
        override = tenant.models.get(model)
        rate_config, quota_config = tenant.rate_limit, tenant.quota
        rate_scope: Scope = (tenant_id, None)
        quota_scope: Scope = (tenant_id, None)
        if override is not None and override.rate_limit is not None:
            rate_config, rate_scope = override.rate_limit, (tenant_id, model)
        if override is not None and override.quota is not None:
            quota_config, quota_scope = override.quota, (tenant_id, model)
        rates = _rates(rate_config)
        quotas = tuple((quota_scope, quota) for quota in _quotas(quota_config))
        return Plan(
            tenant=tenant_id,
            model=model,
            buckets=tuple((rate_scope, rate) for rate in rates),
            quotas=quotas,
            max_concurrency=tenant.max_concurrency,
            max_rows=next((rate.burst for rate in rates if rate.name == ROWS), None),
            max_rows_scope=rate_scope,
            quota_rows=min((quota.limit for _, quota in quotas), default=None),
        )
