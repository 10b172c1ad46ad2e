"""Rolling SLO attainment with a fake clock: windows, burn rate, roll-off."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mandant.config import SloConfig
from mandant.observability.slo import SLO_CODES, Attainment, SloTracker, is_good


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tracker(clock: FakeClock) -> SloTracker:
    return SloTracker(
        {"acme": SloConfig(latency_ms=50, objective=0.99)}, clock=clock, resolution_s=5.0
    )


def test_attainment_counts_good_and_total_in_both_windows() -> None:
    clock = FakeClock()
    slo = tracker(clock)
    for _ in range(98):
        slo.record("acme", good=True)
    for _ in range(2):
        slo.record("acme", good=False)
    five = slo.attainment("acme", 300)
    hour = slo.attainment("acme", 3600)
    assert (five.good, five.total) == (98, 100) == (hour.good, hour.total)
    assert five.ratio == pytest.approx(0.98)
    assert five.burn_rate == pytest.approx(2.0)  # 2 % bad against a 1 % budget
    assert five.budget_left == pytest.approx(-1.0)


def test_old_requests_leave_the_5_minute_window_then_the_hour() -> None:
    clock = FakeClock()
    slo = tracker(clock)
    slo.record("acme", good=False)
    clock.now += 301
    slo.record("acme", good=True)
    assert (slo.attainment("acme", 300).good, slo.attainment("acme", 300).total) == (1, 1)
    assert slo.attainment("acme", 3600).total == 2
    clock.now += 3600
    assert slo.attainment("acme", 3600).total == 0
    assert slo.attainment("acme", 3600).ratio is None
    assert slo.attainment("acme", 3600).burn_rate is None  # nothing to judge, no sentinel
    assert slo.attainment("acme", 3600).budget_left is None


def test_ring_slots_are_reused_after_the_horizon() -> None:
    clock = FakeClock()
    slo = tracker(clock)
    for step in range(2000):  # 10000 s: far beyond the one-hour ring
        clock.now += 5
        slo.record("acme", good=step % 10 != 0)
    hour = slo.attainment("acme", 3600)
    assert hour.total == 720
    assert hour.good == 648


def test_unknown_tenant_is_ignored_and_report_has_both_windows() -> None:
    clock = FakeClock()
    slo = tracker(clock)
    slo.record("invented", good=True)
    assert slo.tenants == ["acme"]
    report = slo.report("acme")
    assert set(report) == {"5m", "1h"}
    assert report["5m"] == {
        "good": 0, "total": 0, "attainment": None, "burn_rate": None, "budget_left": None,
    }  # fmt: skip


def test_good_means_ok_and_fast_enough() -> None:
    assert is_good("OK", 0.050, 0.050)
    assert not is_good("OK", 0.0501, 0.050)
    assert not is_good("UNAVAILABLE", 0.001, 0.050)
    assert "OK" in SLO_CODES and "INTERNAL" in SLO_CODES
    client_side = {"INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}
    assert not client_side & SLO_CODES


def test_attainment_as_dict() -> None:
    a = Attainment(300, good=999, total=1000, objective=0.999)
    assert a.as_dict()["burn_rate"] == pytest.approx(1.0)
    assert a.as_dict()["budget_left"] == pytest.approx(0.0, abs=1e-9)


ADVANCES_S = [0.0, 0.4, 3.0, 5.0, 31.0, 110.0, 290.0, 700.0, 3500.0, 3610.0, 3700.0]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["record", "query"]), st.booleans(), st.sampled_from(ADVANCES_S)),
        max_size=80,
    )
)
def test_windows_equal_a_recount_whatever_the_order_of_calls(
    steps: list[tuple[str, bool, float]],
) -> None:
    """The windows are kept slot by slot (folded in and out); they must always equal
    a plain recount of the requests whose slot is inside the window."""
    clock = FakeClock()
    slo = tracker(clock)
    log: list[tuple[int, bool]] = []
    for action, good, advance_s in steps:
        clock.now += advance_s
        now_slot = int(clock.now // 5.0)
        if action == "record":
            slo.record("acme", good)
            log.append((now_slot, good))
            continue
        for window_s in (300.0, 3600.0):
            first = now_slot - round(window_s / 5.0) + 1
            inside = [g for slot, g in log if slot >= first]
            got = slo.attainment("acme", window_s)
            assert (got.good, got.total) == (sum(inside), len(inside))
