"""The tenant directory: one snapshot swapped whole; what a swap changed, in words
without key material; components built on it see the new snapshot at once."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from mandant.config import QuotaConfig, SloConfig, TenantConfig
from mandant.errors import Unauthenticated
from mandant.observability.live import LiveStats
from mandant.observability.metrics import InflightRequests, PrometheusObserver
from mandant.observability.slo import SloTracker
from mandant.tenancy.directory import TenantDirectory
from mandant.tenancy.keys import hash_key


def bearer(key: str) -> str:
    return f"Bearer {key}"


def test_replace_swaps_keys_admins_and_tenants_together() -> None:
    directory = TenantDirectory(
        [TenantConfig(id="a", api_keys=(hash_key("ka"),), weight=1)], [hash_key("admin-1")]
    )
    before = directory.current
    assert directory.authenticate(bearer("ka")).weight == 1
    notes = directory.replace(
        [
            TenantConfig(id="a", api_keys=(hash_key("ka2"),), weight=3),
            TenantConfig(id="b", api_keys=(hash_key("kb"),)),
        ],
        [hash_key("admin-2")],
    )
    assert notes == [
        "tenants added: b",
        "tenants changed: a (weight)",
        "API keys changed: a (1 added, 1 revoked)",
        "admin keys changed (1 added, 1 revoked)",
    ]
    assert before.ids == {"a"}  # the old snapshot is untouched
    assert directory.authenticate(bearer("ka2")).weight == 3
    assert directory.authenticate(bearer("kb")).id == "b"
    with pytest.raises(Unauthenticated):
        directory.authenticate(bearer("ka"))
    assert not directory.is_admin(bearer("admin-1"))
    assert directory.is_admin(bearer("admin-2"))
    assert directory.replace([], []) == ["tenants removed: a, b", "admin keys changed (1 revoked)"]


def test_observer_slo_and_live_follow_the_directory() -> None:
    directory = TenantDirectory([TenantConfig(id="a", slo=SloConfig(latency_ms=50))])
    registry = CollectorRegistry()
    slo = SloTracker(directory, clock=lambda: 100.0)
    live = LiveStats(directory, lambda: [("m", "")], clock=lambda: 100.0)
    observer = PrometheusObserver(registry, directory, ["m"], slo=slo, live=live)
    observer.request_finished("b", "m", "OK", 0.01)  # not configured yet: tenant=""
    directory.replace(
        [
            TenantConfig(id="a", slo=SloConfig(latency_ms=5)),
            TenantConfig(id="b", quota=QuotaConfig(rows_per_day=3), slo=SloConfig(latency_ms=50)),
        ],
        [],
    )
    observer.request_finished("b", "m", "OK", 0.01)
    observer.request_finished("a", "m", "OK", 0.01)  # 10 ms: bad against the new 5 ms
    sample = registry.get_sample_value
    assert sample("mandant_requests_total", {"tenant": "", "model": "m", "code": "OK"}) == 1
    assert sample("mandant_requests_total", {"tenant": "b", "model": "m", "code": "OK"}) == 1
    assert sample("mandant_slo_latency_seconds", {"tenant": "a"}) == 0.005
    assert sample("mandant_slo_good_requests_total", {"tenant": "a"}) == 0
    assert sample("mandant_slo_good_requests_total", {"tenant": "b"}) == 1
    assert slo.attainment("b", 300).good == 1
    tenants = {t["id"]: t for t in live.snapshot(slo)["tenants"]}
    assert tenants["b"]["requests"] == 1 and tenants["a"]["slo"]["latency_ms"] == 5
    # A call of b that ends after a reload removed b counts in b's usage report (it
    # was tenant=""), not in series of its own: they went with the reload, and the
    # call brought them back, for a tenant added back under its id to read.
    directory.replace([TenantConfig(id="a")], [])
    observer.retire_tenants({"b"})
    observer.request_finished("b", "m", "OK", 0.01)
    observer.batch_executed("m", 2, 0.5, {"b": 2})
    assert sample("mandant_requests_total", {"tenant": "b", "model": "m", "code": "OK"}) is None
    assert sample("mandant_rows_total", {"tenant": "b", "model": "m"}) is None
    assert sample("mandant_requests_total", {"tenant": "", "model": "m", "code": "OK"}) == 1
    usage = {(name, labels.get("code", "")): value
             for name, labels, value in observer.usage_counts("b")}  # fmt: skip
    assert usage["mandant_requests_total", "OK"] == 2
    assert usage["mandant_rows_total", ""] == 2


def test_a_removed_tenant_s_model_counts_no_late_batch_as_the_shared_model_s() -> None:
    """b's tuned variant of the shared m runs a batch after a reload removed b: it is
    not the shared model's ("" owner), in ``/metrics`` nor on the dashboard's card of m
    (the first form of late-call handling labelled it so), and brings no series of b's
    back."""
    directory = TenantDirectory([TenantConfig(id="a"), TenantConfig(id="b")])
    registry = CollectorRegistry()
    live = LiveStats(directory, lambda: [("m", "")])
    observer = PrometheusObserver(registry, directory, ["m"], slo=SloTracker(directory), live=live)
    directory.replace([TenantConfig(id="a")], [])
    observer.retire_tenants({"b"})
    observer.batch_executed("m", 8, 0.1, {"b": 8}, owner="b")
    observer.batch_failed("m", 8, owner="b")
    sample = registry.get_sample_value
    for owner in ("", "b"):
        assert sample("mandant_batch_size_count", {"model": "m", "tenant": owner}) is None
        assert sample("mandant_failed_batches_total", {"model": "m", "tenant": owner}) is None
    (card,) = live.snapshot(SloTracker(directory))["models"]
    assert (card["name"], card["owner"], card["batch_sizes"]) == ("m", "", {})


def test_an_slo_a_reload_takes_away_takes_its_counters_and_one_it_gives_shows_them() -> None:
    """The alerts divide good calls by all: a tenant given an SLO by a reload has both
    at 0 before its first call (its good calls were absent: the ratio gave nothing, so
    it was never alerted on); one whose SLO went loses them (they stayed, frozen)."""
    directory = TenantDirectory([TenantConfig(id="a", slo=SloConfig(latency_ms=50))])
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry, directory, ["m"], slo=SloTracker(directory))
    observer.request_finished("a", "m", "OK", 0.01)
    directory.replace(
        [TenantConfig(id="a"), TenantConfig(id="b", slo=SloConfig(latency_ms=50))], []
    )
    observer.slos_changed()
    sample = registry.get_sample_value
    assert sample("mandant_slo_requests_total", {"tenant": "a"}) is None
    assert sample("mandant_slo_good_requests_total", {"tenant": "a"}) is None
    assert sample("mandant_slo_requests_total", {"tenant": "b"}) == 0
    assert sample("mandant_slo_good_requests_total", {"tenant": "b"}) == 0


def test_calls_in_flight_across_a_reload_that_removes_their_tenant_stay_under_its_id() -> None:
    directory = TenantDirectory([TenantConfig(id="gone"), TenantConfig(id="kept")])
    registry = CollectorRegistry()
    inflight = {"gone": 1}  # the admission's counts
    registry.register(InflightRequests(directory, lambda: inflight))

    def sample(tenant: str) -> float | None:
        return registry.get_sample_value("mandant_inflight_requests", {"tenant": tenant})

    assert (sample("gone"), sample("kept")) == (1, 0)
    directory.replace([TenantConfig(id="kept")], [])
    assert (sample("gone"), sample("kept")) == (1, 0)
    inflight["gone"] = 0  # its last call ended: the series goes
    assert (sample("gone"), sample("kept"), sample("")) == (None, 0, None)
