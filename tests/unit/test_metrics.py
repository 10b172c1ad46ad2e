"""The Prometheus observer on an injected registry: exact series, bounded labels,
the SLO counters, cost split by rows; the in-process dashboard stats; /usage data."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from mandant.config import MandantConfig, QuotaConfig, SloConfig, TenantConfig
from mandant.observability.live import LATENCY_BOUNDS_S, LiveStats, quantile
from mandant.observability.metrics import InflightRequests, PrometheusObserver
from mandant.observability.series import CounterSeries, Registry
from mandant.observability.slo import SloTracker
from mandant.observability.usage import usage_report
from mandant.tenancy.admission import TenantAdmission
from mandant.tenancy.directory import TenantDirectory
from mandant.types import ModelKey, ServedModels, Tenant

TENANTS = (
    TenantConfig(id="acme", slo=SloConfig(latency_ms=50, objective=0.99),
                 quota=QuotaConfig(rows_per_day=1000)),
    TenantConfig(id="globex", slo=SloConfig(latency_ms=20, objective=0.999)),
    TenantConfig(id="nosla"),
)  # fmt: skip
MODELS = ("classifier", "echo")
#: The dashboard's models: (name, owner), shared.
LIVE_MODELS = [(name, "") for name in MODELS]
#: The models the ``parts`` fixture's dashboard lists as served (a registry's): a
#: test that unloads one takes it out.
SERVED: list[tuple[str, str]] = []


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


Parts = tuple[CollectorRegistry, PrometheusObserver, SloTracker, LiveStats]


@pytest.fixture
def parts(clock: FakeClock) -> Parts:
    registry = CollectorRegistry()
    slo = SloTracker({t.id: t.slo for t in TENANTS if t.slo}, clock=clock)
    SERVED[:] = LIVE_MODELS
    live = LiveStats([t.id for t in TENANTS], lambda: SERVED, clock=clock, wall=lambda: 86400.0 * 3)
    return registry, PrometheusObserver(registry, TENANTS, MODELS, slo, live), slo, live


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def names(registry: CollectorRegistry) -> set[str]:
    return {s.name for family in registry.collect() for s in family.samples}


def test_request_finished_counts_every_code_and_times_successes(parts: Parts) -> None:
    registry, observer, slo, _ = parts
    observer.request_finished("acme", "classifier", "OK", 0.004)
    observer.request_finished("acme", "classifier", "OK", 0.080)  # too slow: bad
    observer.request_finished("acme", "classifier", "INVALID_ARGUMENT", 0.001)
    observer.request_finished("acme", "classifier", "UNAVAILABLE", 0.002)  # bad
    observer.request_finished("acme", "", "NOT_FOUND", 0.001)
    observer.request_finished("", "", "UNAUTHENTICATED", 0.001)
    r = registry
    assert value(r, "mandant_requests_total", tenant="acme", model="classifier", code="OK") == 2
    assert value(r, "mandant_requests_total", tenant="acme", model="classifier",
                 code="INVALID_ARGUMENT") == 1  # fmt: skip
    assert value(r, "mandant_requests_total", tenant="acme", model="", code="NOT_FOUND") == 1
    assert value(r, "mandant_requests_total", tenant="", model="", code="UNAUTHENTICATED") == 1
    count = value(r, "mandant_request_duration_seconds_count", tenant="acme", model="classifier")
    assert count == 2
    assert value(r, "mandant_request_duration_seconds_bucket", tenant="acme", model="classifier",
                 le="0.005") == 1  # fmt: skip
    assert value(r, "mandant_request_duration_seconds_bucket", tenant="acme", model="classifier",
                 le="0.05") == 1  # the SLO threshold is a bucket bound  # fmt: skip
    assert value(r, "mandant_slo_requests_total", tenant="acme") == 3
    assert value(r, "mandant_slo_good_requests_total", tenant="acme") == 1
    assert value(r, "mandant_slo_objective", tenant="acme") == 0.99
    assert value(r, "mandant_slo_latency_seconds", tenant="globex") == 0.02
    assert value(r, "mandant_slo_requests_total", tenant="globex") == 0  # pre-created
    five = slo.attainment("acme", 300)
    assert (five.good, five.total) == (1, 3)


def test_invented_labels_collapse_to_empty(parts: Parts) -> None:
    registry, observer, _, _ = parts
    observer.request_finished("mallory", "secret-model", "OK", 0.001)
    observer.rejected("mallory", "requests_per_s")
    observer.batch_executed("secret-model", 3, 0.01, {"mallory": 3})
    labels = {
        value
        for family in registry.collect()
        for sample in family.samples
        for key, value in sample.labels.items()
        if key in ("tenant", "model")
    }
    assert "mallory" not in labels and "secret-model" not in labels
    assert value(registry, "mandant_requests_total", tenant="", model="", code="OK") == 1
    assert value(registry, "mandant_rejections_total", tenant="", reason="requests_per_s",
                 model="") == 1  # fmt: skip


def test_batches_split_compute_by_rows_and_timings(parts: Parts) -> None:
    registry, observer, _, live = parts
    observer.batch_executed("classifier", 8, 0.040, {"acme": 6, "globex": 2})
    observer.batch_executed("classifier", 1, 0.010, {"acme": 1})
    observer.request_timing("acme", "classifier", queue_s=0.002, compute_s=0.040)
    r = registry
    assert value(r, "mandant_rows_total", tenant="acme", model="classifier") == 7
    assert value(r, "mandant_rows_total", tenant="globex", model="classifier") == 2
    assert value(r, "mandant_compute_seconds_total", tenant="acme", model="classifier") == (
        pytest.approx(0.040)
    )
    assert value(r, "mandant_compute_seconds_total", tenant="globex", model="classifier") == (
        pytest.approx(0.010)
    )
    assert value(r, "mandant_batch_size_count", model="classifier", tenant="") == 2
    assert value(r, "mandant_batch_size_bucket", model="classifier", tenant="", le="1.0") == 1
    assert value(r, "mandant_batch_size_bucket", model="classifier", tenant="", le="8.0") == 2
    assert value(r, "mandant_queue_duration_seconds_count", tenant="acme", model="classifier") == 1
    assert value(r, "mandant_compute_duration_seconds_sum", tenant="acme", model="classifier") == (
        pytest.approx(0.040)
    )
    snap = live.snapshot(SloTracker({}))
    batches = {(m["name"], m["owner"]): m["batch_sizes"] for m in snap["models"]}
    assert batches == {("classifier", ""): {"1": 1, "8": 1}, ("echo", ""): {}}


async def test_inflight_is_the_admissions_count_read_when_shown(clock: FakeClock) -> None:
    """The gauge and the dashboard read the count the concurrency cap keeps."""
    admission = TenantAdmission(MandantConfig(tenants=list(TENANTS)))
    registry = CollectorRegistry()
    registry.register(InflightRequests(TenantDirectory(TENANTS), admission.inflight_counts))
    live = LiveStats(
        [t.id for t in TENANTS], lambda: LIVE_MODELS, clock=clock, inflight=admission.inflight
    )

    def shown() -> tuple[float | None, int]:
        row = next(t for t in live.snapshot(SloTracker({}))["tenants"] if t["id"] == "acme")
        return value(registry, "mandant_inflight_requests", tenant="acme"), row["inflight"]

    assert shown() == (0, 0)
    acme, echo = Tenant("acme"), ModelKey("echo", "1")
    first = await admission.admit(acme, echo, 1)
    second = await admission.admit(acme, echo, 1)
    assert shown() == (2, 2)
    first.release()
    assert shown() == (1, 1)
    second.release()
    assert shown() == (0, 0)
    assert value(registry, "mandant_inflight_requests", tenant="globex") == 0


def test_admission_rejections_and_store_errors(parts: Parts) -> None:
    registry, observer, _, live = parts
    observer.admitted("acme", "classifier", 5)
    observer.rejected("acme", "quota")
    observer.rejected("acme", "requests_per_s", "classifier")  # a per-model limit
    observer.rejected("acme", "requests_per_s", "secret-model")  # not configured: ""
    observer.store_error("redis")
    assert value(registry, "mandant_admitted_rows_total", tenant="acme", model="classifier") == 5
    assert value(registry, "mandant_rejections_total", tenant="acme", reason="quota",
                 model="") == 1  # fmt: skip
    assert value(registry, "mandant_rejections_total", tenant="acme", reason="requests_per_s",
                 model="classifier") == 1  # fmt: skip
    assert value(registry, "mandant_rejections_total", tenant="acme", reason="requests_per_s",
                 model="") == 1  # fmt: skip
    assert value(registry, "mandant_store_errors_total", store="redis") == 1
    assert live.quota_used("acme") == {"rows_today": 5, "rows_this_month": 5}
    tenant = next(t for t in live.snapshot(SloTracker({}))["tenants"] if t["id"] == "acme")
    assert tenant["rejections"] == [
        {"reason": "quota", "model": "", "count": 1},
        {"reason": "requests_per_s", "model": "", "count": 1},
        {"reason": "requests_per_s", "model": "classifier", "count": 1},
    ]


def test_gathered_groups_and_calls_are_counted_from_zero(parts: Parts) -> None:
    registry, observer, _, _ = parts
    assert value(registry, "mandant_front_gather_groups_total") == 0
    assert value(registry, "mandant_front_gathered_calls_total") == 0
    observer.calls_gathered(5)
    observer.calls_gathered(3)
    assert value(registry, "mandant_front_gather_groups_total") == 2
    assert value(registry, "mandant_front_gathered_calls_total") == 8


def test_usage_report_reads_the_counters(parts: Parts) -> None:
    _, observer, _, live = parts
    observer.request_finished("acme", "classifier", "OK", 0.004)
    observer.request_finished("acme", "classifier", "RESOURCE_EXHAUSTED", 0.001)
    observer.batch_executed("classifier", 4, 0.02, {"acme": 4})
    observer.admitted("acme", "classifier", 4)
    observer.rejected("acme", "requests_per_s")
    used = {t.id: live.quota_used(t.id) for t in TENANTS}
    report = usage_report(observer, TENANTS, used)["tenants"]
    assert set(report) == {"acme", "globex", "nosla"}
    acme = report["acme"]
    assert acme["requests"] == {"OK": 1, "RESOURCE_EXHAUSTED": 1}
    assert acme["requests_total"] == 2
    assert acme["rows"] == {"classifier": 4} and acme["rows_total"] == 4
    assert acme["compute_seconds_total"] == pytest.approx(0.02)
    assert acme["rejections"] == {"requests_per_s": 1}
    assert acme["admitted_rows"] == 4
    assert acme["quota"] == {"limits": {"rows_per_day": 1000},
                             "used": {"rows_today": 4, "rows_this_month": 4},
                             "scope": "replica"}  # fmt: skip
    assert report["globex"]["requests_total"] == 0


def test_live_history_quantiles_and_rollover(parts: Parts, clock: FakeClock) -> None:
    _, observer, slo, live = parts
    for ms in range(1, 101):  # 1..100 ms
        observer.request_finished("acme", "classifier", "OK", ms / 1000)
    observer.request_finished("acme", "classifier", "INTERNAL", 0.001)
    clock.now += 2.5
    snap = live.snapshot(slo)
    acme = next(t for t in snap["tenants"] if t["id"] == "acme")
    assert acme["requests"] == 100 and acme["errors"] == 1
    assert acme["p50_ms"] == pytest.approx(50, rel=0.16)
    assert acme["p99_ms"] == pytest.approx(99, rel=0.16)
    assert "history" not in acme  # the overview row: the charts' history is per tenant
    detail = live.detail(slo, "acme")
    assert detail is not None and live.detail(slo, "mallory") is None
    history = detail["tenant"]["history"]
    assert history[-1]["p99_ms"] == acme["p99_ms"]
    assert len(history) == 60
    assert {k: v for k, v in detail["tenant"].items() if k != "history"} == acme
    assert acme["windows"]["5m"]["total"] == 101
    assert acme["windows"]["5m"]["good"] == 50
    clock.now += 400
    acme = next(t for t in live.snapshot(slo)["tenants"] if t["id"] == "acme")
    assert acme["requests"] == 0 and acme["p99_ms"] is None
    nosla = next(t for t in live.snapshot(slo)["tenants"] if t["id"] == "nosla")
    assert nosla["slo"] is None and nosla["windows"] is None


def test_overview_is_worst_burn_first_and_idle_tenants_have_no_figures(
    parts: Parts, clock: FakeClock
) -> None:
    _, observer, slo, live = parts
    for _ in range(10):
        observer.request_finished("acme", "classifier", "OK", 0.001)  # all good: burns 0
        observer.request_finished("globex", "classifier", "OK", 0.001)
    observer.request_finished("globex", "classifier", "OK", 0.5)  # 1 of 11 too slow
    clock.now += 1
    rows = live.snapshot(slo)["tenants"]
    assert [t["id"] for t in rows] == ["globex", "acme", "nosla"]
    assert rows[0]["windows"]["5m"]["burn_rate"] == pytest.approx((1 / 11) / 0.001, rel=1e-5)
    assert rows[0]["windows"]["1h"]["budget_left"] < -1  # overspent, not clamped
    assert rows[1]["windows"]["5m"]["burn_rate"] == 0.0
    clock.now += 4000  # an hour without calls: nothing to judge, no made-up figure
    rows = live.snapshot(slo)["tenants"]
    assert [t["id"] for t in rows] == ["acme", "globex", "nosla"]  # then by id
    for window in ("5m", "1h"):
        assert rows[0]["windows"][window] == {"good": 0, "total": 0, "attainment": None,
                                              "burn_rate": None, "budget_left": None}  # fmt: skip


def test_quantile_interpolates_within_log_buckets() -> None:
    counts = [0] * (len(LATENCY_BOUNDS_S) + 1)
    assert quantile(counts, 0.5) is None
    counts[10] = 4
    value = quantile(counts, 0.5)
    assert value is not None
    assert LATENCY_BOUNDS_S[9] < value < LATENCY_BOUNDS_S[10]
    counts[-1] = 1000  # beyond the last bound
    assert quantile(counts, 0.99) == LATENCY_BOUNDS_S[-1]


def test_every_documented_family_is_exposed(parts: Parts) -> None:
    """The observer's families (the inflight gauge is the app's: test_k8s)."""
    registry, _, _, _ = parts
    exposed = {family.name for family in registry.collect()}
    assert {
        "mandant_requests", "mandant_request_duration_seconds", "mandant_queue_duration_seconds",
        "mandant_compute_duration_seconds", "mandant_batch_size",
        "mandant_rejections", "mandant_rows", "mandant_compute_seconds", "mandant_slo_objective",
        "mandant_slo_requests", "mandant_slo_good_requests", "mandant_slo_latency_seconds",
    } <= exposed  # fmt: skip
    assert "mandant_slo_objective" in names(registry)


def test_exposition_matches_prometheus_client_metrics(parts: Parts) -> None:
    """The plain-number series read at scrape time expose what prometheus_client's
    own Counter and Histogram would: ``_total`` and ``_created``, cumulative buckets
    up to ``+Inf`` equal to ``_count``, and ``_sum``."""
    registry, observer, _, _ = parts
    for duration_s in (0.0004, 0.004, 0.004, 30.0):
        observer.request_finished("acme", "classifier", "OK", duration_s)
    text = generate_latest(registry).decode()
    assert "# TYPE mandant_requests_total counter" in text
    assert "# TYPE mandant_request_duration_seconds histogram" in text
    assert 'mandant_requests_created{code="OK",model="classifier",tenant="acme"}' in text
    labels = {"tenant": "acme", "model": "classifier"}
    hist = "mandant_request_duration_seconds"
    assert value(registry, f"{hist}_bucket", **labels, le="0.0005") == 1
    assert value(registry, f"{hist}_bucket", **labels, le="0.005") == 3
    assert value(registry, f"{hist}_bucket", **labels, le="10.0") == 3
    assert value(registry, f"{hist}_bucket", **labels, le="+Inf") == 4
    assert value(registry, f"{hist}_count", **labels) == 4
    assert value(registry, f"{hist}_sum", **labels) == pytest.approx(30.0084)
    assert (value(registry, f"{hist}_created", **labels) or 0) > 0


def test_a_scrape_written_a_family_at_a_time_is_the_whole_exposition(clock: FakeClock) -> None:
    """``Scrape.text`` writes each family on its own (the lines of all of them were
    joined, encoded and freed in single calls that hold the GIL, and so the event
    loop: 178 ms at a million lines); the text is what ``generate_latest`` writes of
    the whole registry, byte for byte."""
    registry = Registry()
    slo = SloTracker({t.id: t.slo for t in TENANTS if t.slo}, clock=clock)
    observer = PrometheusObserver(registry, TENANTS, MODELS, slo)
    for tenant in ("acme", "globex"):
        for duration_s in (0.0004, 0.004, 3.0):
            observer.request_finished(tenant, "classifier", "OK", duration_s)
        observer.request_finished(tenant, "classifier", "UNAVAILABLE", 0.01)
        observer.rejected(tenant, "rate_limit", "classifier")
    text = registry.scrape().text()
    assert text == generate_latest(registry)
    assert text.count(b"# TYPE ") > 10


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["ok", "error", "query"]), st.integers(0, 40),
                  st.sampled_from([0.0, 1.0, 5.0, 30.0, 200.0, 290.0, 300.0, 900.0])),
        max_size=60,
    )
)  # fmt: skip
def test_live_figures_equal_a_recount_whatever_the_order_of_calls(
    steps: list[tuple[str, int, float]],
) -> None:
    """The span's sums are kept slot by slot (folded in and out, a reused slot taken
    out); they must always equal a plain recount of the calls inside the span."""
    clock = FakeClock()
    live = LiveStats(["acme"], lambda: LIVE_MODELS, clock=clock)
    slo = SloTracker({}, clock=clock)
    log: list[tuple[int, str, int]] = []
    for action, bucket, advance_s in steps:
        clock.now += advance_s
        now_slot = int(clock.now // 5.0)
        if action != "query":
            live.record_request("acme", action.upper(), LATENCY_BOUNDS_S[bucket])
            log.append((now_slot, action, bucket))
            continue
        inside = [(kind, b) for slot, kind, b in log if slot > now_slot - 60]
        counts = [0] * (len(LATENCY_BOUNDS_S) + 1)
        for kind, b in inside:
            if kind == "ok":
                counts[b] += 1
        row = live.snapshot(slo)["tenants"][0]
        assert row["requests"] == sum(kind == "ok" for kind, _ in inside)
        assert row["errors"] == sum(kind == "error" for kind, _ in inside)
        expected = quantile(counts, 0.5)
        assert row["p50_ms"] == (None if expected is None else round(expected * 1000, 3))


def test_a_tenant_model_named_like_a_shared_one_has_its_own_batch_series(parts: Parts) -> None:
    """A private model or tuned variant named like a shared model: its batches are
    labelled with its owner (``tenant``, as ``mandant_model_ready``), the shared
    model's with ``""``; they were one series by name, one tenant's private batch
    figures mixed with (and shown as) the shared model's. An owner not configured
    collapses to ``""`` like any label."""
    registry, observer, _, live = parts
    observer.batch_executed("classifier", 8, 0.04, {"acme": 6, "globex": 2})
    observer.batch_executed("classifier", 3, 0.01, {"globex": 3}, owner="globex")
    observer.batch_executed("classifier", 1, 0.01, {"globex": 1}, owner="globex")
    observer.batch_failed("classifier", 5, owner="globex")
    observer.batch_failed("classifier", 2)
    observer.batch_executed("classifier", 2, 0.01, {"acme": 2}, owner="mallory")
    r = registry
    assert value(r, "mandant_batch_size_count", model="classifier", tenant="globex") == 2
    assert value(r, "mandant_batch_size_sum", model="classifier", tenant="globex") == 4
    assert value(r, "mandant_batch_size_count", model="classifier", tenant="") == 2
    assert value(r, "mandant_batch_size_sum", model="classifier", tenant="") == 10
    assert value(r, "mandant_failed_batches_total", model="classifier", tenant="globex") == 1
    assert value(r, "mandant_failed_batches_total", model="classifier", tenant="") == 1
    assert value(r, "mandant_batch_size_count", model="classifier", tenant="mallory") is None
    # The dashboard's batch sizes: apart too.
    snap = live.snapshot(SloTracker({}))
    batches = {(m["name"], m["owner"]): m["batch_sizes"] for m in snap["models"]}
    assert batches[("classifier", "globex")] == {"1": 1, "3": 1}
    assert batches[("classifier", "")] == {"2": 1, "8": 1}


def test_admitted_rows_leave_the_day_and_month_they_were_counted_in() -> None:
    """40 rows admitted at Dec 31 23:59:59, 25 at Jan 1 00:00:01, then the first call
    refunded: it took its 40 off the new day and month (0 shown, not 25); and a wall
    clock stepped back across midnight emptied the later day's count."""
    new_year = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    wall = [new_year - 1.0]
    live = LiveStats(["acme"], lambda: LIVE_MODELS, wall=lambda: wall[0])
    live.record_admitted("acme", 40)
    wall[0] = new_year + 1.0
    live.record_admitted("acme", 25)
    live.record_refunded("acme", 40, admitted_at=new_year - 1.0)
    assert live.quota_used("acme") == {"rows_today": 25, "rows_this_month": 25}
    live.record_refunded("acme", 5, admitted_at=new_year + 1.0)
    assert live.quota_used("acme") == {"rows_today": 20, "rows_this_month": 20}
    wall[0] = new_year - 2.0  # NTP steps the clock back across midnight
    live.record_admitted("acme", 1)
    assert live.quota_used("acme") == {"rows_today": 21, "rows_this_month": 21}


def test_a_model_no_longer_served_leaves_the_series_and_the_dashboard_not_usage(
    parts: Parts,
) -> None:
    """Its series go (an owner's apart: globex's variant of echo gone, the shared echo
    serving on), and its rows in the dashboard; a usage report counts what they held."""
    registry, observer, _, live = parts
    for model in ("classifier", "echo"):
        observer.request_finished("acme", model, "OK", 0.004)
        observer.request_timing("acme", model, 0.001, 0.002)
        observer.batch_executed(model, 4, 0.02, {"acme": 4})
        observer.admitted("acme", model, 4)
        observer.refunded("acme", model, 1)
        observer.rejected("acme", "quota", model)
    observer.batch_executed("echo", 2, 0.01, {"globex": 2}, owner="globex")
    observer.batch_failed("echo", 2, owner="globex")
    observer.rejected("acme", "requests_per_s")  # the tenant's own limit: no model
    before = usage_report(observer, TENANTS)["tenants"]

    served = ServedModels([ModelKey("echo", "1")])
    SERVED[:] = [("echo", "")]
    observer.forget(served)
    live.forget(served)
    models = {s.labels.get("model") for f in registry.collect() for s in f.samples}
    assert models == {None, "", "echo"}  # classifier's series are gone
    assert value(registry, "mandant_batch_size_count", model="echo", tenant="") == 1
    assert value(registry, "mandant_batch_size_count", model="echo", tenant="globex") is None
    assert value(registry, "mandant_failed_batches_total", model="echo", tenant="globex") is None
    assert value(registry, "mandant_rows_total", tenant="globex", model="echo") == 2
    assert usage_report(observer, TENANTS)["tenants"] == before  # billing figures stay
    snap = live.snapshot(SloTracker({}))
    assert [(m["name"], m["owner"]) for m in snap["models"]] == [("echo", "")]
    (acme,) = [row for row in snap["tenants"] if row["id"] == "acme"]
    assert {(r["reason"], r["model"]) for r in acme["rejections"]} == {
        ("quota", "echo"),
        ("requests_per_s", ""),
    }

    observer.batch_executed("classifier", 4, 0.02, {"acme": 4})  # loaded again
    assert value(registry, "mandant_rows_total", tenant="acme", model="classifier") == 4
    assert usage_report(observer, TENANTS)["tenants"]["acme"]["rows"]["classifier"] == 8
    # One tenant's report reads its own counts only, the forgotten models' too, and
    # gives what the whole report gives for it.
    assert {labels["tenant"] for _, labels, _ in observer.usage_counts("globex")} == {"globex"}
    (tenant,) = [t for t in TENANTS if t.id == "acme"]
    alone = usage_report(observer, [tenant], only="acme")["tenants"]
    assert alone == {"acme": usage_report(observer, TENANTS)["tenants"]["acme"]}


def test_one_tenants_counts_are_read_without_the_others() -> None:
    """A tenant's usage report reads its own series from an index (it scanned every
    tenant's: 22 ms of event loop a report with 3,000 tenants), kept as series come
    and go."""
    series = CounterSeries("calls", "Calls.", ["model", "tenant"])
    for tenant in ("a", "b", "c"):
        for model in ("m", "n"):
            series.inc((model, tenant), 2.0 if tenant == "b" else 1.0)
    series.touch(("m", "d"))
    assert sorted((n["model"], v) for n, v in series.values(("tenant", "b"))) == [
        ("m", 2.0),
        ("n", 2.0),
    ]
    assert [v for _, v in series.values(("tenant", "d"))] == [0.0]
    assert sorted(n["tenant"] for n, _ in series.values(("model", "n"))) == ["a", "b", "c"]
    gone = series.drop(lambda labels: labels[1] == "b")
    assert sorted(gone) == [(("m", "b"), 2.0), (("n", "b"), 2.0)]
    assert list(series.values(("tenant", "b"))) == []
    series.inc(("m", "b"))
    assert [v for _, v in series.values(("tenant", "b"))] == [1.0]
    assert len(list(series.values())) == 6
