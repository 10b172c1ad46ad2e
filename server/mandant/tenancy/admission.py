"""The admission seam: may this tenant run this many rows on this model now?

:class:`TenantAdmission` is the real one: per tenant (and per tenant and model) token
buckets and calendar quotas in a store (this process, or Redis shared by replicas),
and a cap on each tenant's calls in flight on this replica. It runs after
authentication and model resolution and before any tensor byte is decoded; a refused
call takes nothing from any limit, and an admitted call that the model then does not
run (refused later, expired, cancelled) is given back what it took when its permit is
released with ``refund=True``. A call that can never fit (more rows than the rows burst
or a whole quota period) is refused without a retry hint. While the shared store is
unreachable it follows ``on_store_error``: ``allow`` uses this process's own
buckets, ``deny`` refuses with UNAVAILABLE; it probes the store again every
``retry_interval_s`` and logs once per outage. Everything it decides goes to the
:class:`~mandant.events.Observer`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from mandant.errors import FailedPrecondition, InvalidInput, QuotaExceeded, RateLimited, Unavailable
from mandant.events import NullObserver, Observer
from mandant.observability.log_limits import FailureLog
from mandant.tenancy.limits import MONOTONIC, Clock, Rate
from mandant.tenancy.local_store import LocalStore
from mandant.tenancy.policy import (
    Denial,
    Marks,
    Plan,
    Policy,
    Scope,
    SharedStore,
    StoreRefused,
    StoreUnavailable,
)
from mandant.tenancy.quota import WALL, PeriodKind
from mandant.types import ModelKey, ServedModels, Tenant
from mandant_client.errors import QUOTA_REFUSAL

if TYPE_CHECKING:
    from mandant.config import LimitsConfig, MandantConfig

logger = logging.getLogger(__name__)

#: Pushback for a full concurrency cap: no exact wait exists (it ends when some call
#: of the tenant finishes), so a short one.
CONCURRENCY_RETRY_S = 0.05


class Permit(Protocol):
    def release(self, refund: bool = False) -> None:
        """Called when the admitted call has finished; frees its concurrency slot.
        ``refund=False``: the model ran on it, it stays charged. ``refund=True``: it
        did not (refused after admission, expired, cancelled, the backend down), so
        its tokens and quota rows are given back. Only the first call counts."""
        ...


class Admission(Protocol):
    async def admit(self, tenant: Tenant, model: ModelKey, rows: int) -> Permit:
        """Return a permit, or raise a ResourceExhausted subclass (nothing consumed);
        InvalidInput for more rows than the rows burst and FailedPrecondition for
        more than a whole quota (calls that can never fit), Unavailable when the
        limits store is down and the policy is to deny."""
        ...

    def refuse_early(self, tenant: Tenant, model: ModelKey) -> None:
        """Raise now what :meth:`admit` would raise for any call of ``tenant`` on
        ``model`` whatever its rows, known without waiting (before a costly request
        is parsed); take nothing. A call it lets through goes to ``admit`` as ever."""
        ...


class _NoPermit:
    def release(self, refund: bool = False) -> None:
        return None


#: A permit with nothing to release: an unlimited call's, or one handed on to be
#: released by another (``InferRequest.settle``).
NO_PERMIT: Permit = _NoPermit()


class Unlimited:
    """Admits everything: the data plane's default when no limits are configured."""

    _permit = NO_PERMIT

    async def admit(self, tenant: Tenant, model: ModelKey, rows: int) -> Permit:
        return self._permit

    def refuse_early(self, tenant: Tenant, model: ModelKey) -> None:
        return None


class _Refunds(Protocol):
    """The store that charged a call (local or shared) gives back what it took."""

    def refund(self, plan: Plan, rows: int, wall: float, marks: Marks) -> None: ...


class _InflightPermit:
    """One admitted call: its concurrency slot, and what ``store`` took for it (the
    rows of ``plan``'s limits, at the buckets' take ``marks``; quota rows in the
    period of ``wall``, when it was admitted)."""

    __slots__ = ("_admission", "_marks", "_model", "_plan", "_rows", "_store", "_tenant", "_wall")

    def __init__(
        self,
        admission: TenantAdmission,
        tenant: str,
        model: str,
        store: _Refunds | None,
        plan: Plan,
        rows: int,
        wall: float,
        marks: Marks,
    ) -> None:
        self._admission: TenantAdmission | None = admission
        self._tenant = tenant
        self._model = model
        self._store = store
        self._plan = plan
        self._rows = rows
        self._wall = wall
        self._marks = marks

    def release(self, refund: bool = False) -> None:
        admission, self._admission = self._admission, None
        if admission is None:
            return
        admission.finished(self._tenant)
        if refund:
            if self._store is not None:
                self._store.refund(self._plan, self._rows, self._wall, self._marks)
            admission.refunded(self._tenant, self._model, self._rows, self._wall)


def _number(value: float) -> str:
    return f"{value:g}"


def _where(scope: Scope) -> str:
    tenant, model = scope
    return f"tenant {tenant}" + (f" on model {model}" if model is not None else "")


def _never_fits(plan: Plan, rows: int) -> FailedPrecondition:
    scope, quota = next((s, q) for s, q in plan.quotas if q.limit < rows)
    return FailedPrecondition(
        f"a call of {rows} rows exceeds the whole quota {quota.name}={quota.limit} "
        f"for {_where(scope)}; send fewer rows per call"
    )


def _error(denial: Denial) -> RateLimited | QuotaExceeded:
    where = _where(denial.scope)
    limit = denial.limit
    if isinstance(limit, Rate):
        return RateLimited(
            f"rate limit {limit.name}={_number(limit.per_s)} exceeded for {where}",
            denial.retry_after_s,
        )
    return QuotaExceeded(  # the client tells a quota from the start of the message
        f"{QUOTA_REFUSAL}{limit.name}={limit.limit} exceeded for {where}", denial.retry_after_s
    )


class TenantAdmission:
    """Rate limits, concurrency caps and quotas per tenant; see the module docstring.
    ``shared`` is the Redis store (None: everything stays in this process)."""

    def __init__(
        self,
        config: MandantConfig,
        shared: SharedStore | None = None,
        observer: Observer | None = None,
        clock: Clock = MONOTONIC,
        wall: Clock = WALL,
    ) -> None:
        self._limits: LimitsConfig = config.limits
        self._policy = Policy(config.tenants)
        self._local = LocalStore(clock, wall)
        self._shared = shared
        self._observer: Observer = observer or NullObserver()
        self._clock = clock
        self._wall = wall
        self._inflight: dict[str, int] = {}
        self._inflight_view = MappingProxyType(self._inflight)
        self._retry_at = 0.0  # monotonic: no call to the shared store before this
        self._outage_failures = 0
        self._outage_since = 0.0
        self._quota_scope = "fleet" if shared is not None else "replica"
        #: One warning per tenant and reason a minute: a tenant's bad key is met by
        #: each of its calls.
        self._refusals = FailureLog(logger, "mandant_store_errors_total")

    async def start(self) -> None:
        if self._shared is not None:
            await self._shared.start()

    async def aclose(self) -> None:
        if self._shared is not None:
            await self._shared.aclose()

    def update(self, config: MandantConfig) -> None:
        """Apply a new configuration's limits. Counts are kept: locally, every scope
        still configured keeps its buckets and quota counts (a changed limit keeps
        what was saved up or used); in Redis nothing is lost. Changing
        ``limits`` (the store) takes a restart."""
        if config.limits != self._limits:
            logger.warning("limits store settings change at restart; kept the running ones")
        self._policy = Policy(config.tenants)
        self._local.retain(self._policy.scopes(), self._policy.rates())

    def forget_models(self, served: ServedModels) -> None:
        """Forget what is kept per model of the models ``served`` does not list (cached
        plans); the counts of limits and quotas stay, kept per configured scope."""
        self._policy.forget(served)

    async def quota_used(self, tenant: str) -> dict[str, int]:
        """:meth:`quotas_used` of one tenant."""
        return (await self.quotas_used([tenant]))[tenant]

    async def quotas_used(self, tenants: Sequence[str]) -> dict[str, dict[str, int]]:
        """Rows counted against each tenant's own quotas (not per-model overrides) in
        the current UTC day and month: every replica's, from Redis when that is the
        store and it answers (one batch for all tenants: one round trip, one timeout
        at most); else this process's counts, at once while an outage is known."""
        quotas: dict[str, tuple[str, PeriodKind]] = {
            "rows_today": ("rows_per_day", "day"),
            "rows_this_month": ("rows_per_month", "month"),
        }
        shared = self._shared
        if shared is not None and (not self._outage_failures or self._clock() >= self._retry_at):
            reads = [
                shared.used((tenant, None), name, period)
                for tenant in tenants
                for name, period in quotas.values()
            ]
            results = await asyncio.gather(*reads, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            for failure in failures:
                if not isinstance(failure, StoreUnavailable):
                    raise failure
            outage = next((f for f in failures if not isinstance(f, StoreRefused)), None)
            if outage is None:  # a tenant whose key the store refused falls back alone
                self._quota_scope = "fleet"
                return self._counted(shared.name, tenants, list(quotas), results)
            self._store_failed(shared.name, str(outage))
        if shared is not None:
            self._quota_scope = "replica"
        return {
            tenant: {
                label: self._local.used((tenant, None), name) for label, (name, _) in quotas.items()
            }
            for tenant in tenants
        }

    def _counted(
        self,
        store: str,
        tenants: Sequence[str],
        labels: list[str],
        results: Sequence[int | BaseException],
    ) -> dict[str, dict[str, int]]:
        """Each tenant's counts of ``results`` (a row of ``labels`` each, in order);
        one the store refused to read (its own key) is left out: its report falls back
        to this process's counts, the others' are the fleet's."""
        counted: dict[str, dict[str, int]] = {}
        for index, tenant in enumerate(tenants):
            row = results[index * len(labels) : (index + 1) * len(labels)]
            refused = next((r for r in row if isinstance(r, BaseException)), None)
            if refused is not None:
                self._store_refused(store, tenant, str(refused))
                continue
            counted[tenant] = {
                label: r for label, r in zip(labels, row, strict=True) if isinstance(r, int)
            }
        return counted

    @property
    def quota_scope(self) -> str:
        """Whose rows the last ``quota_used`` counted: ``fleet`` (Redis) or ``replica``."""
        return self._quota_scope

    def inflight(self, tenant: str) -> int:
        """The tenant's admitted calls not yet finished: the one count of them (the
        cap reads it, and so do the inflight gauge and the dashboard)."""
        return self._inflight.get(tenant, 0)

    def inflight_counts(self) -> Mapping[str, int]:
        """:meth:`inflight` of every tenant that has had a call (a read-only view)."""
        return self._inflight_view

    async def admit(self, tenant: Tenant, model: ModelKey, rows: int) -> Permit:
        plan = self._policy.plan(tenant.id, model.name)
        if plan.max_rows is not None and rows > plan.max_rows:
            raise InvalidInput(
                f"a call of {rows} rows exceeds rows_burst={_number(plan.max_rows)} "
                f"for {_where(plan.max_rows_scope or (tenant.id, None))}; send fewer rows "
                "per call"
            )
        if plan.quota_rows is not None and rows > plan.quota_rows:
            raise _never_fits(plan, rows)
        inflight = self._inflight.get(tenant.id, 0)
        if plan.max_concurrency is not None and inflight >= plan.max_concurrency:
            raise self._full(plan)
        # Hold the slot while the store decides (the shared store awaits Redis).
        self._inflight[tenant.id] = inflight + 1
        store: _Refunds | None = None
        marks: Marks = ()
        # When the rows are admitted: quotas count them in its day and month, and a
        # refund gives them back there (also the dashboard's and reports' counts).
        wall = self._wall()
        if plan.stored:
            try:
                if self._shared is None:
                    store, charge = self._local, self._local.acquire(plan, rows, wall)
                else:
                    store, charge = await self._acquire_shared(self._shared, plan, rows, wall)
            except BaseException:
                self._inflight[tenant.id] -= 1
                raise
            if isinstance(charge, Denial):
                self._inflight[tenant.id] -= 1
                raise self._denied(plan, charge)
            marks = charge
            if store is self._local:  # it just charged: keep the time its rows count at
                wall = self._local.quota_wall(wall)
        permit = _InflightPermit(self, tenant.id, model.name, store, plan, rows, wall, marks)
        try:
            self._observer.admitted(tenant.id, model.name, rows)
        except BaseException:  # the slot and the rows go back, whatever failed
            permit.release(refund=True)
            raise
        return permit

    def refuse_early(self, tenant: Tenant, model: ModelKey) -> None:
        """A full concurrency cap, or a ``requests_per_s`` bucket of this process with
        no token (every call takes one, whatever its rows). Buckets kept in Redis are
        not read: that would take a round trip."""
        plan = self._policy.plan(tenant.id, model.name)
        inflight = self._inflight.get(tenant.id, 0)
        if plan.max_concurrency is not None and inflight >= plan.max_concurrency:
            raise self._full(plan)
        if self._shared is None and plan.buckets:
            denial = self._local.request_denial(plan)
            if denial is not None:
                raise self._denied(plan, denial)

    def _full(self, plan: Plan) -> RateLimited:
        self._observer.rejected(plan.tenant, "concurrency")
        return RateLimited(
            f"concurrency limit max_concurrency={plan.max_concurrency} exceeded "
            f"for tenant {plan.tenant}",
            CONCURRENCY_RETRY_S,
        )

    def _denied(self, plan: Plan, denial: Denial) -> RateLimited | QuotaExceeded:
        self._observer.rejected(
            plan.tenant,
            denial.limit.name if isinstance(denial.limit, Rate) else "quota",
            denial.scope[1] or "",  # the model of a per-model limit
        )
        return _error(denial)

    def finished(self, tenant: str) -> None:
        """A permit was released (called by the permit, once)."""
        self._inflight[tenant] -= 1

    def refunded(self, tenant: str, model: str, rows: int, admitted_at: float) -> None:
        """A released permit gave its rows back (the model did not run for it)."""
        self._observer.refunded(tenant, model, rows, admitted_at)

    async def _acquire_shared(
        self, shared: SharedStore, plan: Plan, rows: int, wall: float
    ) -> tuple[_Refunds, Denial | Marks]:
        """The store that decided (this process's while the shared one is out), and
        its denial or the marks of what it took."""
        now = self._clock()
        if now >= self._retry_at:
            if self._outage_failures:
                self._retry_at = now + self._limits.retry_interval_s  # one probe at a time
            try:
                charge = await shared.acquire(plan, rows, wall)
            except StoreRefused as exc:
                self._store_refused(shared.name, plan.tenant, str(exc))
            except StoreUnavailable as exc:
                self._store_failed(shared.name, str(exc))
            else:
                if self._outage_failures:
                    self._store_recovered(shared.name)
                return shared, charge
        if self._limits.on_store_error == "deny":
            self._observer.rejected(plan.tenant, "store_unavailable")
            raise Unavailable("rate limit store unavailable; retry later")
        return self._local, self._local.acquire(plan, rows, wall)

    def _store_failed(self, store: str, reason: str) -> None:
        now = self._clock()
        self._observer.store_error(store)
        if not self._outage_failures:
            self._outage_since = now
            logger.warning(
                "limits store %s unreachable (%s): %s until it returns",
                store,
                reason,
                "local buckets" if self._limits.on_store_error == "allow" else "refusing calls",
            )
        self._outage_failures += 1
        self._retry_at = now + self._limits.retry_interval_s

    def _store_refused(self, store: str, tenant: str, reason: str) -> None:
        """The store answered one operation with an error about its own keys: that
        call alone falls back; the store answers, so an outage is over."""
        self._observer.store_error(store)
        self._refusals.failed(
            f"{store} {tenant} {reason}",
            "limits store %s refused an operation of tenant %s (%s): that call follows "
            "on_store_error; check the tenant's keys in the store",
            store,
            tenant or "(a usage report)",
            reason,
            level=logging.WARNING,
        )
        if self._outage_failures:
            self._store_recovered(store)

    def _store_recovered(self, store: str) -> None:
        logger.warning(
            "limits store %s reachable again after %.1fs (%d failed operations)",
            store,
            self._clock() - self._outage_since,
            self._outage_failures,
        )
        self._outage_failures = 0
        self._retry_at = 0.0


def shared_store_for(limits: LimitsConfig) -> SharedStore | None:
    """The shared store ``limits`` names, or None for ``store: local``."""
    if limits.store == "local":
        return None
    from mandant.tenancy.redis_store import RedisStore

    return RedisStore(limits)
