"""The ModelStatistics store, fed by Observer events: each tenant's numbers hold its
own calls, per model version; every event still reaches the next observer."""

from __future__ import annotations

from mandant.observability.stats import InferenceStats, ModelStats
from mandant.transport.grpc.statistics import statistics_message
from mandant.types import ModelKey, ServedModels
from tests.fakes import RecordingObserver


def _stats() -> tuple[InferenceStats, RecordingObserver]:
    return InferenceStats(wall_clock_s=lambda: 1_700_000_000.5), RecordingObserver()


def test_front_end_events_count_success_and_failure_per_tenant_and_version() -> None:
    stats, forward = _stats()
    front = stats.observe(forward)
    front.request_finished("acme", "m", "OK", 0.002, "1")
    front.request_finished("acme", "m", "OK", 0.003, "2")
    front.request_finished("acme", "m", "RESOURCE_EXHAUSTED", 0.001, "1")
    front.request_finished("globex", "m", "OK", 0.5, "1")
    front.request_finished("acme", "", "NOT_FOUND", 0.001)  # no model: not an inference
    front.request_finished("", "", "UNAUTHENTICATED", 0.001)
    v1 = stats.get("acme", "", "m", "1")
    assert (v1.success.count, v1.success.ns) == (1, 2_000_000)
    assert (v1.fail.count, v1.fail.ns) == (1, 1_000_000)
    assert v1.last_inference_ms == 1_700_000_000_500
    assert stats.get("acme", "", "m", "2").success.count == 1
    assert stats.get("globex", "", "m", "1").success.ns == 500_000_000
    assert sorted(stats.keys()) == [
        ("acme", "", "m", "1"),
        ("acme", "", "m", "2"),
        ("globex", "", "m", "1"),
    ]
    assert len(forward.finished) == 6  # every event reached the next observer


def test_scheduler_events_count_queue_compute_and_batches_per_tenant() -> None:
    stats, forward = _stats()
    scheduler = stats.observe(forward, version="3")
    scheduler.request_timing("acme", "m", 0.001, 0.010)
    scheduler.request_timing("globex", "m", 0.002, 0.010)
    scheduler.batch_executed("m", 5, 0.010, {"acme": 2, "globex": 3})
    scheduler.request_timing("acme", "m", 0.0, 0.004)
    scheduler.batch_executed("m", 1, 0.004, {"acme": 1})
    acme = stats.get("acme", "", "m", "3")
    assert (acme.queue.count, acme.queue.ns) == (2, 1_000_000)
    assert (acme.compute_infer.count, acme.compute_infer.ns) == (2, 14_000_000)
    assert (acme.inference_count, acme.execution_count) == (3, 2)
    assert {size: (d.count, d.ns) for size, d in acme.batches.items()} == {
        5: (1, 10_000_000),
        1: (1, 4_000_000),
    }
    globex = stats.get("globex", "", "m", "3")
    assert (globex.inference_count, globex.execution_count) == (3, 1)
    assert list(globex.batches) == [5]
    assert len(forward.timings) == 3 and len(forward.batches) == 2
    # Each tenant's rows' share of its batches' compute: 2/5 and 3/5 of the first.
    assert (acme.compute_share_ns, globex.compute_share_ns) == (8_000_000, 6_000_000)


def test_a_tenant_s_view_gives_its_share_of_the_compute_and_no_batches() -> None:
    """Triton gives each request its batch's whole compute time; shown to a tenant beside
    ``/usage``'s share by rows, the ratio was the batch's rows: how many others sent."""
    stats, forward = _stats()
    scheduler = stats.observe(forward, version="1")
    scheduler.request_timing("acme", "m", 0.0, 0.012)
    scheduler.request_timing("globex", "m", 0.0, 0.012)
    scheduler.batch_executed("m", 12, 0.012, {"acme": 1, "globex": 11})
    acme = stats.get("acme", "", "m", "1")
    mine = statistics_message("m", "1", acme, tenant_view=True)
    assert (mine.inference_stats.compute_infer.count, mine.inference_stats.compute_infer.ns) == (
        1,
        1_000_000,
    )
    assert not mine.batch_stats
    admins = statistics_message("m", "1", acme)  # an admin's total keeps Triton's whole time
    assert admins.inference_stats.compute_infer.ns == 12_000_000
    assert [b.batch_size for b in admins.batch_stats] == [12]


def test_front_end_observer_records_no_scheduler_events_without_a_version() -> None:
    stats, forward = _stats()
    front = stats.observe(forward)
    front.request_timing("acme", "m", 0.001, 0.01)
    front.batch_executed("m", 1, 0.01, {"acme": 1})
    assert stats.keys() == [] and len(forward.timings) == 1 and len(forward.batches) == 1


def test_totals_sum_tenants_and_get_returns_a_copy() -> None:
    stats, forward = _stats()
    front, scheduler = stats.observe(forward), stats.observe(forward, version="1")
    for tenant in ("acme", "globex"):
        front.request_finished(tenant, "m", "OK", 0.001, "1")
        scheduler.batch_executed("m", 2, 0.001, {tenant: 2})
    front.request_finished("acme", "other", "OK", 0.001, "1")
    totals = stats.totals()
    assert set(totals) == {("", "m", "1"), ("", "other", "1")}
    assert set(stats.totals({("", "other", "1"), ("", "gone", "1")})) == {("", "other", "1")}
    total = totals["", "m", "1"]
    assert (total.success.count, total.inference_count, total.execution_count) == (2, 4, 2)
    assert total.batches[2].count == 2
    copy = stats.get("acme", "", "m", "1")
    copy.merge(copy)
    assert stats.get("acme", "", "m", "1").success.count == 1
    assert stats.get("nobody", "", "m", "1") == ModelStats()


def test_a_model_s_executions_count_a_shared_batch_once() -> None:
    """A batch of three tenants' rows is one execution of its size; the tenants' own
    entries each hold it (their calls ran in it), so summing them counted it thrice in
    an admin's totals."""
    stats, forward = _stats()
    scheduler = stats.observe(forward, version="1", owner="")
    scheduler.batch_executed("m", 6, 0.003, {"a": 1, "b": 2, "c": 3})
    scheduler.batch_executed("m", 2, 0.001, {"a": 2})
    runs = stats.executions("", "m", "1")
    assert runs.execution_count == 2
    assert {size: d.count for size, d in runs.batches.items()} == {6: 1, 2: 1}
    assert stats.totals()["", "m", "1"].execution_count == 4  # what the admin view showed
    owned = stats.observe(forward, version="1", owner="acme")
    owned.batch_executed("m", 1, 0.001, {"acme": 1})
    assert stats.executions("acme", "m", "1").execution_count == 1
    assert stats.executions("", "m", "1").execution_count == 2


def test_batch_sizes_past_1024_are_kept_by_power_of_two() -> None:
    """A model without batching runs each call alone: its batch is the call's rows,
    which the client chooses; one entry per count grew without bound (320,000 entries,
    an admin's ModelStatistics of 7 MB)."""
    stats, forward = _stats()
    scheduler = stats.observe(forward, version="1")
    for rows in range(1, 20_001):
        scheduler.batch_executed("m", rows, 0.0, {"acme": rows})
    sizes = stats.executions("", "m", "1").batches
    assert len(sizes) <= 1024 + 15
    assert sizes[1024].count == 1 and sizes[2048].count == 1024 and sizes[32768].count == 3616
    assert list(stats.get("acme", "", "m", "1").batches) == list(sizes)


def test_a_tenant_s_calls_of_a_shared_model_stay_the_shared_model_s() -> None:
    """A reload that gives tenant b its own tuned variant of ``m`` changes what b
    reaches under that name, not what b's earlier calls ran on: keyed without the
    owner, b's calls of the shared ``m`` moved to the variant (the shared model's
    counts went backwards, the variant showed calls it never had)."""
    stats, forward = _stats()
    front = stats.observe(forward)
    front.request_finished("b", "m", "OK", 0.002, "1")  # the shared m
    front.request_finished("b", "m", "OK", 0.002, "1", owner="b")  # b's variant, later
    assert stats.get("b", "", "m", "1").success.count == 1
    assert stats.get("b", "b", "m", "1").success.count == 1


def test_a_version_no_longer_served_is_forgotten_and_late_events_bring_nothing_back() -> None:
    names = {"m", "other"}
    stats = InferenceStats(models=names)
    front, v1 = stats.observe(RecordingObserver()), stats.observe(RecordingObserver(), "1")
    for model in ("m", "other"):
        front.request_finished("acme", model, "OK", 0.002, "1")
        v1.batch_executed(model, 2, 0.001, {"acme": 2})
    front.request_finished("acme", "m", "OK", 0.002, "2")
    stats.forget(ServedModels([ModelKey("m", "2"), ModelKey("other", "1")]))
    assert sorted(stats.keys()) == [("acme", "", "m", "2"), ("acme", "", "other", "1")]
    assert stats.executions("", "m", "1").execution_count == 0
    assert stats.executions("", "other", "1").execution_count == 1

    names.discard("other")  # forgotten whole: a call that outlived it counts nowhere
    stats.forget(ServedModels([ModelKey("m", "2")]))
    front.request_finished("acme", "other", "OK", 0.002, "1")
    v1.request_timing("acme", "other", 0.001, 0.001)
    v1.batch_executed("other", 2, 0.001, {"acme": 2})
    assert stats.keys() == [("acme", "", "m", "2")]
    assert stats.executions("", "other", "1").execution_count == 0
