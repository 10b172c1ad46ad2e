"""TenantAdmission on fake clocks: messages and pushback, all-or-nothing taking,
concurrency caps, per-model overrides, quotas, live updates, store outages."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from mandant.config import MandantConfig, parse_config
from mandant.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidInput,
    QuotaExceeded,
    RateLimited,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from mandant.events import NullObserver
from mandant.tenancy.admission import Permit, TenantAdmission
from mandant.tenancy.policy import Denial, Marks, Plan, Scope, StoreUnavailable
from mandant.tenancy.quota import PeriodKind
from mandant.types import ModelKey, ServedModels, Tenant

ACME, GLOBEX = Tenant("acme"), Tenant("globex")
ECHO, CLASSIFIER = ModelKey("echo", "1"), ModelKey("classifier", "1")
MODEL = {
    "factory": "mandant.demo.models:echo",
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
}


def config(*tenants: dict[str, Any], **limits: Any) -> MandantConfig:
    return parse_config(
        {
            "limits": limits,
            "tenants": list(tenants),
            "models": [{"name": "echo", **MODEL}, {"name": "classifier", **MODEL}],
        }
    )


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingObserver(NullObserver):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def admitted(self, tenant: str, model: str, rows: int) -> None:
        self.events.append(("admitted", tenant, model, rows))

    def refunded(self, tenant: str, model: str, rows: int, admitted_at: float = 0.0) -> None:
        self.events.append(("refunded", tenant, model, rows))

    def rejected(self, tenant: str, reason: str, model: str = "") -> None:
        self.events.append(("rejected", tenant, reason, model))

    def store_error(self, store: str) -> None:
        self.events.append(("store_error", store))


class FlakyStore:
    """A shared store that admits everything, or fails while ``down``."""

    name = "fake"

    def __init__(self) -> None:
        self.down = False
        self.calls = 0
        self.refunds: list[tuple[str, int, float]] = []
        self.reads = 0

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def acquire(self, plan: Plan, rows: int, wall: float) -> Denial | Marks:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("fake: down")
        return ()

    def refund(self, plan: Plan, rows: int, wall: float, marks: Marks) -> None:
        self.refunds.append((plan.tenant, rows, wall))

    async def used(self, scope: Scope, quota_name: str, period: PeriodKind) -> int:
        self.reads += 1
        if self.down:
            raise StoreUnavailable("fake: down")
        return 1000


WALL = datetime(2024, 5, 17, 22, tzinfo=UTC).timestamp()


def admission(cfg: MandantConfig, **kwargs: Any) -> tuple[TenantAdmission, FakeClock, FakeClock]:
    clock, wall = FakeClock(), FakeClock(WALL)
    return TenantAdmission(cfg, clock=clock, wall=wall, **kwargs), clock, wall


async def test_request_rate_refusal_names_the_limit_and_the_exact_wait() -> None:
    adm, clock, _ = admission(
        config({"id": "acme", "rate_limit": {"requests_per_s": 200, "burst": 2}})
    )
    for _ in range(2):
        (await adm.admit(ACME, ECHO, 1)).release()
    with pytest.raises(RateLimited) as caught:
        await adm.admit(ACME, ECHO, 1)
    assert str(caught.value) == "rate limit requests_per_s=200 exceeded for tenant acme"
    assert caught.value.retry_after_s == pytest.approx(0.005, abs=1e-9)
    clock.now += 0.005 + 1e-9
    (await adm.admit(ACME, ECHO, 1)).release()


async def test_a_refusal_by_one_bucket_takes_from_none() -> None:
    cfg = config({"id": "acme", "rate_limit": {"requests_per_s": 1, "burst": 2, "rows_per_s": 10}})
    adm, _, _ = admission(cfg)
    (await adm.admit(ACME, ECHO, 8)).release()
    with pytest.raises(RateLimited, match="rows_per_s=10") as caught:
        await adm.admit(ACME, ECHO, 5)  # rows refuse: the request token must stay
    assert caught.value.retry_after_s == pytest.approx(0.3)
    (await adm.admit(ACME, ECHO, 2)).release()  # the second request token is still there
    with pytest.raises(RateLimited, match="requests_per_s=1 "):
        await adm.admit(ACME, ECHO, 1)


async def test_pushback_is_the_wait_until_every_limit_fits() -> None:
    """Several limits short at once: the refusal names the one with the longest
    wait, so that a client retrying after the pushback is admitted."""
    cfg = config(
        {
            "id": "acme",
            "rate_limit": {"requests_per_s": 100, "burst": 1, "rows_per_s": 10, "rows_burst": 10},
            "quota": {"rows_per_day": 15},
        }
    )
    adm, clock, _ = admission(cfg)
    (await adm.admit(ACME, ECHO, 10)).release()  # both buckets are empty
    with pytest.raises(RateLimited, match="rows_per_s=10 exceeded") as refused:
        await adm.admit(ACME, ECHO, 5)  # requests: 10 ms; rows: 500 ms
    assert refused.value.retry_after_s == pytest.approx(0.5)
    clock.now += refused.value.retry_after_s
    (await adm.admit(ACME, ECHO, 5)).release()
    clock.now += 1.0
    with pytest.raises(QuotaExceeded) as refused_quota:  # buckets: 10 ms; quota: 2 h
        await adm.admit(ACME, ECHO, 1)
    assert refused_quota.value.retry_after_s == pytest.approx(7200)


async def test_a_call_larger_than_the_rows_burst_is_invalid() -> None:
    adm, _, _ = admission(
        config({"id": "acme", "rate_limit": {"rows_per_s": 10, "rows_burst": 20}})
    )
    with pytest.raises(InvalidInput, match="21 rows exceeds rows_burst=20"):
        await adm.admit(ACME, ECHO, 21)
    (await adm.admit(ACME, ECHO, 20)).release()


async def test_a_refunded_call_gives_back_its_request_and_row_tokens_and_quota_rows() -> None:
    cfg = config(
        {
            "id": "acme",
            "rate_limit": {"requests_per_s": 1, "burst": 2, "rows_per_s": 1, "rows_burst": 20},
            "quota": {"rows_per_day": 60, "rows_per_month": 100},
        }
    )
    adm, _, _ = admission(cfg)
    for _ in range(5):  # far more than the buckets hold, were any of it kept
        (await adm.admit(ACME, ECHO, 12)).release(refund=True)
    assert await adm.quota_used("acme") == {"rows_today": 0, "rows_this_month": 0}
    (await adm.admit(ACME, ECHO, 12)).release()  # the model ran: charged
    (await adm.admit(ACME, ECHO, 8)).release()  # both request tokens, all 20 row tokens
    with pytest.raises(RateLimited):
        await adm.admit(ACME, ECHO, 1)
    assert await adm.quota_used("acme") == {"rows_today": 20, "rows_this_month": 20}


async def test_a_permit_is_released_and_refunded_at_most_once() -> None:
    cfg = config({"id": "acme", "max_concurrency": 1, "quota": {"rows_per_day": 60}})
    adm, _, _ = admission(cfg)
    charged = await adm.admit(ACME, ECHO, 10)
    charged.release()
    charged.release(refund=True)  # too late: it was released as run
    refunded = await adm.admit(ACME, ECHO, 7)
    refunded.release(refund=True)
    refunded.release(refund=True)
    refunded.release()
    assert await adm.quota_used("acme") == {"rows_today": 10, "rows_this_month": 0}
    assert adm.inflight("acme") == 0
    (await adm.admit(ACME, ECHO, 50)).release()  # the slot and 50 rows are there
    with pytest.raises(QuotaExceeded):
        await adm.admit(ACME, ECHO, 1)


async def test_refunded_rows_are_reported_once() -> None:
    observer = RecordingObserver()
    adm, _, _ = admission(config({"id": "acme", "quota": {"rows_per_day": 60}}), observer=observer)
    (await adm.admit(ACME, ECHO, 10)).release()
    refunded = await adm.admit(ACME, ECHO, 7)
    refunded.release(refund=True)
    refunded.release(refund=True)
    assert [e for e in observer.events if e[0] == "refunded"] == [
        ("refunded", "acme", ECHO.name, 7)
    ]


async def test_tokens_given_back_after_a_refill_stop_at_the_burst() -> None:
    adm, clock, _ = admission(
        config({"id": "acme", "rate_limit": {"requests_per_s": 1, "burst": 2}})
    )
    permit = await adm.admit(ACME, ECHO, 1)
    clock.now += 10  # the bucket is full again while the call waits
    permit.release(refund=True)
    for _ in range(2):
        (await adm.admit(ACME, ECHO, 1)).release()
    with pytest.raises(RateLimited):
        await adm.admit(ACME, ECHO, 1)


async def test_quota_rows_go_back_to_the_day_they_were_counted_in() -> None:
    adm, _, wall = admission(config({"id": "acme", "quota": {"rows_per_day": 60}}))
    wall.now = datetime(2024, 5, 17, 23, 59, 59, tzinfo=UTC).timestamp()
    yesterday = await adm.admit(ACME, ECHO, 40)
    wall.now += 2  # 00:00:01 on the 18th
    (await adm.admit(ACME, ECHO, 25)).release()
    yesterday.release(refund=True)  # nothing of today's count goes away
    assert (await adm.quota_used("acme"))["rows_today"] == 25
    with pytest.raises(QuotaExceeded):
        await adm.admit(ACME, ECHO, 36)


async def test_a_wall_stepped_back_over_midnight_counts_and_refunds_on_the_new_day() -> None:
    """NTP steps the wall back from 00:00:01 to 23:59:58 the day before: the local
    count stays on the new day, a call charged to it then is given back to it, and
    a refusal's pushback is at most a day."""
    adm, _, wall = admission(config({"id": "acme", "quota": {"rows_per_day": 100}}))
    wall.now = datetime(2024, 1, 2, 0, 0, 1, tzinfo=UTC).timestamp()
    (await adm.admit(ACME, ECHO, 50)).release()
    wall.now -= 3
    permit = await adm.admit(ACME, ECHO, 40)  # counted on Jan 2, whatever the wall says
    assert (await adm.quota_used("acme"))["rows_today"] == 90
    permit.release(refund=True)
    assert (await adm.quota_used("acme"))["rows_today"] == 50
    with pytest.raises(QuotaExceeded) as refused:
        await adm.admit(ACME, ECHO, 51)
    assert refused.value.retry_after_s == pytest.approx(86399)  # from 00:00:01, not 23:59:58
    wall.now += 2  # the wall's own midnight: still Jan 2 for the count
    assert (await adm.quota_used("acme"))["rows_today"] == 50


async def test_a_refund_goes_to_the_store_that_charged_the_call() -> None:
    store = FlakyStore()
    cfg = config({"id": "acme", "rate_limit": {"requests_per_s": 1, "burst": 1}})
    adm, _, _ = admission(cfg, shared=store)
    (await adm.admit(ACME, ECHO, 3)).release(refund=True)
    assert store.refunds == [("acme", 3, WALL)]  # when it was admitted
    store.down = True
    local = await adm.admit(ACME, ECHO, 1)  # the local fallback's one token
    local.release(refund=True)
    assert len(store.refunds) == 1  # not Redis: it never took it
    (await adm.admit(ACME, ECHO, 1)).release()  # the local token came back
    with pytest.raises(RateLimited):
        await adm.admit(ACME, ECHO, 1)


async def test_more_rows_than_a_whole_quota_is_a_failed_precondition_without_pushback() -> None:
    cfg = config(
        {
            "id": "acme",
            "quota": {"rows_per_day": 60},
            "models": {"classifier": {"quota": {"rows_per_month": 30}}},
        }
    )
    observer = RecordingObserver()
    adm, _, _ = admission(cfg, observer=observer)
    with pytest.raises(FailedPrecondition) as caught:
        await adm.admit(ACME, ECHO, 61)
    assert str(caught.value) == (
        "a call of 61 rows exceeds the whole quota rows_per_day=60 for tenant acme; "
        "send fewer rows per call"
    )
    assert not isinstance(caught.value, ResourceExhausted)
    with pytest.raises(FailedPrecondition, match="rows_per_month=30 for tenant acme on model"):
        await adm.admit(ACME, CLASSIFIER, 31)
    assert adm.inflight("acme") == 0 and observer.events == []
    (await adm.admit(ACME, ECHO, 60)).release()  # a whole quota fits, nothing was taken
    with pytest.raises(QuotaExceeded):  # but the day's quota is now used: come back later
        await adm.admit(ACME, ECHO, 1)


async def test_concurrency_cap_counts_calls_in_flight_across_models() -> None:
    observer = RecordingObserver()
    adm, _, _ = admission(
        config({"id": "acme", "max_concurrency": 2}, {"id": "globex"}), observer=observer
    )
    first = await adm.admit(ACME, ECHO, 1)
    second = await adm.admit(ACME, CLASSIFIER, 1)
    with pytest.raises(RateLimited, match="max_concurrency=2 exceeded for tenant acme") as caught:
        await adm.admit(ACME, ECHO, 1)
    assert caught.value.retry_after_s > 0
    (await adm.admit(GLOBEX, ECHO, 1)).release()  # another tenant is not capped
    first.release()
    first.release()  # a second release is ignored
    assert adm.inflight("acme") == 1
    third = await adm.admit(ACME, ECHO, 1)
    second.release()
    third.release()
    assert adm.inflight("acme") == 0
    assert ("rejected", "acme", "concurrency", "") in observer.events
    assert dict(adm.inflight_counts()) == {"acme": 0, "globex": 0}


async def test_a_call_refused_whatever_its_rows_is_refused_early_taking_nothing() -> None:
    """``refuse_early`` (before REST parses a JSON body): a requests_per_s bucket with no
    token or a full concurrency cap refuse as ``admit`` would, counted once; an empty
    rows bucket does not (a smaller call may fit), and nothing is taken."""
    observer = RecordingObserver()
    cfg = config(
        {
            "id": "acme",
            "max_concurrency": 2,
            "rate_limit": {"requests_per_s": 10, "burst": 2, "rows_per_s": 10, "rows_burst": 10},
        }
    )
    adm, clock, _ = admission(cfg, observer=observer)
    adm.refuse_early(ACME, ECHO)  # fits: takes nothing
    held = await adm.admit(ACME, ECHO, 10)  # the rows bucket is empty now
    adm.refuse_early(ACME, ECHO)
    second = await adm.admit(ACME, CLASSIFIER, 0)
    with pytest.raises(RateLimited, match="max_concurrency=2 exceeded for tenant acme"):
        adm.refuse_early(ACME, ECHO)
    held.release()
    second.release()
    with pytest.raises(RateLimited, match="requests_per_s=10 exceeded") as caught:
        adm.refuse_early(ACME, ECHO)
    assert caught.value.retry_after_s == pytest.approx(0.1)
    assert adm.inflight("acme") == 0
    rejections = [e for e in observer.events if e[0] == "rejected"]
    assert rejections == [
        ("rejected", "acme", "concurrency", ""),
        ("rejected", "acme", "requests_per_s", ""),
    ]
    clock.now += 0.1
    adm.refuse_early(ACME, ECHO)
    (await adm.admit(ACME, ECHO, 1)).release()  # the token refuse_early saw, still there


async def test_refuse_early_leaves_buckets_kept_in_the_shared_store_to_admit() -> None:
    store = FlakyStore()
    cfg = config({"id": "acme", "max_concurrency": 1, "rate_limit": {"requests_per_s": 0.01}})
    adm, _, _ = admission(cfg, shared=store)
    adm.refuse_early(ACME, ECHO)
    held = await adm.admit(ACME, ECHO, 1)
    with pytest.raises(RateLimited, match="max_concurrency=1"):
        adm.refuse_early(ACME, ECHO)
    held.release()
    adm.refuse_early(ACME, ECHO)  # the local bucket is not the shared store's
    assert store.calls == 1


class FailingObserver(RecordingObserver):
    """Fails to count an admission (a metric that cannot hold the rows, say)."""

    def admitted(self, tenant: str, model: str, rows: int) -> None:
        raise OverflowError("int too large to convert to float")


async def test_a_failure_after_the_slot_is_taken_gives_the_slot_and_rows_back() -> None:
    """Whatever fails once the tenant's concurrency place is taken gives it back, and
    the rows it charged: an OverflowError in the metrics kept the place for ever, and
    two such calls refused every later call of a tenant capped at 2."""
    observer = FailingObserver()
    adm, _, _ = admission(
        config({"id": "acme", "max_concurrency": 2, "quota": {"rows_per_day": 10}}),
        observer=observer,
    )
    for _ in range(3):
        with pytest.raises(OverflowError):
            await adm.admit(ACME, ECHO, 4)
    assert adm.inflight("acme") == 0
    assert ("refunded", "acme", "echo", 4) in observer.events
    observer.admitted = RecordingObserver.admitted.__get__(observer)  # type: ignore[method-assign]
    permit = await adm.admit(ACME, ECHO, 10)  # the whole day's quota is still there
    permit.release()


async def test_a_model_override_has_buckets_of_its_own() -> None:
    cfg = config(
        {
            "id": "acme",
            "rate_limit": {"requests_per_s": 1, "burst": 1},
            "models": {"classifier": {"rate_limit": {"requests_per_s": 5, "burst": 3}}},
        }
    )
    observer = RecordingObserver()
    adm, _, _ = admission(cfg, observer=observer)
    for _ in range(3):
        (await adm.admit(ACME, CLASSIFIER, 1)).release()
    with pytest.raises(RateLimited) as caught:
        await adm.admit(ACME, CLASSIFIER, 1)
    assert str(caught.value) == (
        "rate limit requests_per_s=5 exceeded for tenant acme on model classifier"
    )
    (await adm.admit(ACME, ECHO, 1)).release()  # the tenant bucket was untouched
    with pytest.raises(RateLimited, match=r"requests_per_s=1 exceeded for tenant acme$"):
        await adm.admit(ACME, ECHO, 1)
    # The rejection names the model whose own limit fired, and none for the tenant's.
    assert [e for e in observer.events if e[0] == "rejected"] == [
        ("rejected", "acme", "requests_per_s", "classifier"),
        ("rejected", "acme", "requests_per_s", ""),
    ]


async def test_quota_refuses_until_midnight_utc_and_counts_only_admitted_rows() -> None:
    observer = RecordingObserver()
    adm, _, wall = admission(
        config({"id": "acme", "quota": {"rows_per_day": 100}}), observer=observer
    )
    (await adm.admit(ACME, ECHO, 90)).release()
    with pytest.raises(QuotaExceeded) as caught:
        await adm.admit(ACME, ECHO, 11)
    assert str(caught.value) == "quota rows_per_day=100 exceeded for tenant acme"
    assert caught.value.retry_after_s == pytest.approx(2 * 3600)  # 22:00 → 00:00 UTC
    (await adm.admit(ACME, ECHO, 10)).release()
    wall.now += 2 * 3600
    (await adm.admit(ACME, ECHO, 100)).release()
    assert ("rejected", "acme", "quota", "") in observer.events
    assert [e for e in observer.events if e[0] == "admitted"] == [
        ("admitted", "acme", "echo", 90),
        ("admitted", "acme", "echo", 10),
        ("admitted", "acme", "echo", 100),
    ]


async def test_monthly_quota_and_a_rate_refusal_leave_the_quota_untouched() -> None:
    cfg = config(
        {
            "id": "acme",
            "rate_limit": {"requests_per_s": 1, "burst": 1},
            "quota": {"rows_per_month": 5},
        }
    )
    adm, clock, _ = admission(cfg)
    (await adm.admit(ACME, ECHO, 3)).release()
    with pytest.raises(RateLimited):
        await adm.admit(ACME, ECHO, 2)
    clock.now += 1
    (await adm.admit(ACME, ECHO, 2)).release()  # the refused call took no quota
    clock.now += 1
    with pytest.raises(QuotaExceeded, match="rows_per_month=5") as caught:
        await adm.admit(ACME, ECHO, 1)
    june = datetime(2024, 6, 1, tzinfo=UTC).timestamp()
    assert caught.value.retry_after_s == pytest.approx(june - WALL)


async def test_tenants_without_limits_are_admitted() -> None:
    adm, _, _ = admission(config({"id": "acme"}))
    permits: list[Permit] = [await adm.admit(ACME, ECHO, 10_000) for _ in range(1000)]
    for permit in permits:
        permit.release()


@pytest.mark.parametrize(("after", "admitted"), [(0.1, 0), (100.0, 10)])
async def test_a_changed_rate_counts_from_the_reload(after: float, admitted: int) -> None:
    """A bucket was switched to its new rate at its next take, refilling at the old
    one until then: cut from 100/s to 0.1/s, a drained tenant had its burst of 10
    back a second after the reload; raised from 0.01/s to 100/s, it had nothing."""
    before = 100.0 if after < 1 else 0.01
    acme = {"id": "acme", "rate_limit": {"requests_per_s": before, "burst": 10}}
    adm, clock, _ = admission(config(acme))
    for _ in range(10):
        (await adm.admit(ACME, ECHO, 1)).release(refund=False)
    adm.update(config({**acme, "rate_limit": {"requests_per_s": after, "burst": 10}}))
    clock.now += 1.0
    taken = 0
    for _ in range(12):
        try:
            (await adm.admit(ACME, ECHO, 1)).release(refund=False)
            taken += 1
        except RateLimited:
            break
    assert taken == admitted


async def test_update_keeps_counts_of_unchanged_tenants_and_applies_new_limits() -> None:
    acme = {
        "id": "acme",
        "rate_limit": {"requests_per_s": 1, "burst": 2},
        "quota": {"rows_per_day": 10},
    }
    globex = {"id": "globex", "rate_limit": {"requests_per_s": 1, "burst": 1}}
    adm, clock, _ = admission(config(acme, globex))
    for _ in range(2):
        (await adm.admit(ACME, ECHO, 4)).release()
    (await adm.admit(GLOBEX, ECHO, 1)).release()
    adm.update(config(acme, {**globex, "rate_limit": {"requests_per_s": 10, "burst": 3}}))
    with pytest.raises(RateLimited):  # acme's bucket was kept, still empty
        await adm.admit(ACME, ECHO, 1)
    with pytest.raises(RateLimited, match="requests_per_s=10 "):  # a change does not refill
        await adm.admit(GLOBEX, ECHO, 1)
    clock.now += 0.1
    (await adm.admit(GLOBEX, ECHO, 1)).release()  # but the new rate refills
    adm.update(config({**acme, "rate_limit": {"requests_per_s": 1000}}, globex))
    clock.now += 1
    with pytest.raises(QuotaExceeded):  # the 8 rows used today survive the change
        await adm.admit(ACME, ECHO, 3)
    (await adm.admit(ACME, ECHO, 2)).release()


async def test_a_model_s_own_rows_burst_is_named_as_the_model_s() -> None:
    """A per-model rows_burst refusal said "for tenant acme", as if the tenant's own
    burst (1000 here) were 5."""
    cfg = config(
        {
            "id": "acme",
            "rate_limit": {"rows_per_s": 1000, "rows_burst": 1000},
            "models": {"classifier": {"rate_limit": {"rows_per_s": 5, "rows_burst": 5}}},
        }
    )
    adm, _, _ = admission(cfg)
    with pytest.raises(InvalidInput) as caught:
        await adm.admit(ACME, CLASSIFIER, 6)
    assert str(caught.value) == (
        "a call of 6 rows exceeds rows_burst=5 for tenant acme on model classifier; "
        "send fewer rows per call"
    )
    (await adm.admit(ACME, ECHO, 6)).release()


async def test_a_tenant_removed_since_its_key_was_checked_is_not_admitted() -> None:
    """A call authenticated before a reload removed its tenant (waiting at the front
    door, or for its message) reaches admission with the old tenant: it was served
    with no limits at all (an empty plan), past its burst and its quota."""
    acme = {"id": "acme", "rate_limit": {"requests_per_s": 0.01, "burst": 1}}
    adm, _, _ = admission(config(acme, {"id": "globex"}))
    (await adm.admit(ACME, ECHO, 1)).release()
    adm.update(config({"id": "globex"}))
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await adm.admit(ACME, ECHO, 1)
    with pytest.raises(Unauthenticated):
        await adm.admit(Tenant("never-configured"), ECHO, 1)
    assert adm.inflight(ACME.id) == 0


async def test_update_forgets_removed_tenants() -> None:
    acme = {"id": "acme", "quota": {"rows_per_day": 10}}
    adm, _, _ = admission(config(acme))
    (await adm.admit(ACME, ECHO, 10)).release()
    adm.update(config())
    adm.update(config(acme))
    (await adm.admit(ACME, ECHO, 10)).release()  # a re-added tenant starts afresh


async def test_store_outage_with_allow_falls_back_to_local_buckets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, observer = FlakyStore(), RecordingObserver()
    cfg = config(
        {"id": "acme", "rate_limit": {"requests_per_s": 1, "burst": 1}}, retry_interval_s=1
    )
    adm, clock, _ = admission(cfg, shared=store, observer=observer)
    (await adm.admit(ACME, ECHO, 1)).release()
    store.down = True
    with caplog.at_level(logging.WARNING, logger="mandant.tenancy.admission"):
        (await adm.admit(ACME, ECHO, 1)).release()  # local fallback bucket: full
        with pytest.raises(RateLimited):
            await adm.admit(ACME, ECHO, 1)
        assert store.calls == 2  # no new try before retry_interval_s
        clock.now += 1.0
        (await adm.admit(ACME, ECHO, 1)).release()  # probe fails; local bucket refilled
        assert store.calls == 3
        store.down = False
        clock.now += 1.0
        (await adm.admit(ACME, ECHO, 1)).release()
        (await adm.admit(ACME, ECHO, 1)).release()  # the store decides again
    assert store.calls == 5
    outage_logs = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_logs) == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    assert observer.events.count(("store_error", "fake")) == 2


async def test_quota_use_during_a_known_outage_is_read_locally_at_once() -> None:
    """While admission knows the shared store is down, a usage report's quota read
    does not ask it (each question would wait a timeout): this process's counts."""
    store = FlakyStore()
    cfg = config(
        {"id": "acme", "quota": {"rows_per_day": 100}},
        {"id": "globex", "quota": {"rows_per_day": 100}},
        retry_interval_s=1,
    )
    adm, clock, _ = admission(cfg, shared=store)
    assert await adm.quota_used("acme") == {"rows_today": 1000, "rows_this_month": 1000}
    assert adm.quota_scope == "fleet" and store.reads == 2
    store.down = True
    (await adm.admit(ACME, ECHO, 3)).release()  # fails over: the outage is known
    assert await adm.quota_used("acme") == {"rows_today": 3, "rows_this_month": 0}
    assert adm.quota_scope == "replica" and store.reads == 2
    clock.now += 1.0  # retry_interval_s: the store is asked again
    store.down = False
    assert await adm.quotas_used(["acme", "globex"]) == {
        "acme": {"rows_today": 1000, "rows_this_month": 1000},
        "globex": {"rows_today": 1000, "rows_this_month": 1000},
    }
    assert adm.quota_scope == "fleet" and store.reads == 6


async def test_store_outage_with_deny_refuses_as_unavailable() -> None:
    store, observer = FlakyStore(), RecordingObserver()
    cfg = config(
        {"id": "acme", "rate_limit": {"requests_per_s": 100}},
        on_store_error="deny",
        retry_interval_s=0.5,
    )
    adm, clock, _ = admission(cfg, shared=store, observer=observer)
    store.down = True
    with pytest.raises(Unavailable, match="rate limit store unavailable"):
        await adm.admit(ACME, ECHO, 1)
    assert adm.inflight("acme") == 0
    store.down = False
    with pytest.raises(Unavailable):
        await adm.admit(ACME, ECHO, 1)  # still within retry_interval_s
    clock.now += 0.5
    (await adm.admit(ACME, ECHO, 1)).release()
    assert ("rejected", "acme", "store_unavailable", "") in observer.events


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tenants": [{"id": "a", "rate_limit": {"burst": 5}}]}, "'burst' needs 'requests_per_s'"),
        ({"tenants": [{"id": "a", "rate_limit": {"rows_burst": 5}}]}, "'rows_burst' needs"),
        ({"limits": {"store": "redis"}}, "store 'redis' needs a 'url'"),
        ({"limits": {"store": "redis", "url": "http://x"}}, "starts with redis://"),
        ({"limits": {"on_store_error": "maybe"}}, "limits.on_store_error"),
        ({"tenants": [{"id": "a", "models": {"nope": {}}}]}, "limits for unknown model 'nope'"),
        ({"tenants": [{"id": "a", "quota": {"rows_per_day": 0}}]}, "tenants.0.quota.rows_per_day"),
        (
            {"tenants": [{"id": "a", "rate_limit": {"requests_per_s": 5, "burst": 0.5}}]},
            r"tenants.0.rate_limit.burst: must be at least 1: a call takes",
        ),
        (
            {"tenants": [{"id": "a", "rate_limit": {"rows_per_s": 5, "rows_burst": 0.9}}]},
            r"tenants.0.rate_limit.rows_burst: must be at least 1",
        ),
        (
            {
                "tenants": [
                    {
                        "id": "a",
                        "models": {"echo": {"rate_limit": {"requests_per_s": 0.1, "burst": 0.1}}},
                    }
                ]
            },
            r"tenants.0.models.echo.rate_limit.burst: must be at least 1",
        ),
    ],
)
def test_bad_limits_are_refused_with_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


async def test_a_model_forgotten_keeps_its_quota_counts() -> None:
    """Only what is cached per model goes (an admin may load any name): a model's own
    quota is configured per tenant and keeps its count (a billing figure)."""
    cfg = config({"id": "acme", "models": {"classifier": {"quota": {"rows_per_day": 10}}}})
    adm, _, _ = admission(cfg)
    for _ in range(3):
        (await adm.admit(ACME, CLASSIFIER, 3)).release()
    adm.forget_models(ServedModels([ECHO]))  # classifier unloaded, and loaded again
    with pytest.raises(QuotaExceeded):
        await adm.admit(ACME, CLASSIFIER, 2)
    (await adm.admit(ACME, CLASSIFIER, 1)).release()
