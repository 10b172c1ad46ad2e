"""Token-bucket and calendar-quota math on fake clocks, with property tests."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mandant.tenancy.limits import MAX_PEAKS, Rate, TokenBucket
from mandant.tenancy.quota import PeriodTracker, Quota, QuotaCounter, period_at


def _ts(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc]


# -- token bucket ------------------------------------------------------------------


def test_bucket_starts_full_and_refuses_without_taking() -> None:
    bucket = TokenBucket(Rate("requests_per_s", 10, 3), now=100.0)
    assert [bucket.try_take(1, 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.try_take(1, 100.0)
    assert wait == pytest.approx(0.1)
    assert bucket.tokens(100.0) == pytest.approx(0.0)  # the refusal took nothing
    assert bucket.try_take(1, 100.1 + 1e-9) == 0.0


def test_bucket_refills_only_up_to_the_burst() -> None:
    bucket = TokenBucket(Rate("rows_per_s", 100, 50), now=0.0)
    bucket.take(50, 0.0)
    assert bucket.tokens(0.2) == pytest.approx(20)
    assert bucket.tokens(10.0) == 50


def test_given_back_tokens_never_exceed_the_burst() -> None:
    bucket = TokenBucket(Rate("rows_per_s", 10, 20), now=0.0)
    bucket.give(15, bucket.take(15, 0.0), 0.0)
    assert bucket.tokens(0.0) == 20
    bucket.give(15, bucket.take(15, 0.0), 1.0)  # 10 refilled meanwhile: only 5 more fit
    assert bucket.tokens(1.0) == 20


def test_a_refund_gives_back_nothing_once_the_bucket_has_been_full_since() -> None:
    """A call charged, the bucket full again while it waited, other calls taking the
    tokens: had the call never been charged, the bucket would be where it is."""
    bucket = TokenBucket(Rate("requests_per_s", 10, 10), now=0.0)
    marks = [bucket.take(1, 0.0) for _ in range(10)]
    for _ in range(10):
        bucket.take(1, 1.0)  # full at 1.0, emptied again
    for mark in marks:
        bucket.give(1, mark, 1.0)
    assert bucket.tokens(1.0) == 0.0


def test_a_refund_gives_back_what_was_not_lost_at_the_burst() -> None:
    bucket = TokenBucket(Rate("rows_per_s", 10, 20), now=0.0)
    waiting = bucket.take(8, 0.0)  # 12 left
    bucket.take(10, 0.5)  # found 17; without the 8: 20, 5 of the refill lost at the burst
    bucket.give(8, waiting, 0.5)
    assert bucket.tokens(0.5) == pytest.approx(7 + 3)


def test_refunds_in_any_order_land_where_neither_take_would_have() -> None:
    bucket = TokenBucket(Rate("rows_per_s", 1, 2), now=0.0)
    first = bucket.take(1, 0.0)
    second = bucket.take(1, 0.0)
    bucket.take(0.5, 0.5)  # found 0.5 (2 without either take, 1.5 after it)
    bucket.give(1, second, 0.5)
    bucket.give(1, first, 0.5)
    assert bucket.tokens(0.5) == pytest.approx(1.5)


def test_a_take_older_than_the_levels_kept_gets_nothing_back() -> None:
    """One level more than MAX_PEAKS: the older half goes; a refund that needs one of
    them gets nothing, one that does not is exact."""
    bucket = TokenBucket(Rate("requests_per_s", 1e-9, 100), now=0.0)
    marks = [bucket.take(1, 0.0) for _ in range(MAX_PEAKS + 1)]  # each found one less
    cut = MAX_PEAKS + 1 - MAX_PEAKS // 2
    bucket.give(1, marks[cut - 2], 0.0)  # the next take's level is gone
    bucket.give(1, marks[cut - 1], 0.0)
    bucket.give(1, marks[-1], 0.0)
    assert bucket.tokens(0.0) == pytest.approx(100 - MAX_PEAKS - 1 + 2)


def test_takes_before_a_reconfiguration_get_nothing_back() -> None:
    bucket = TokenBucket(Rate("requests_per_s", 10, 10), now=0.0)
    mark = bucket.take(5, 0.0)
    bucket.reconfigure(Rate("requests_per_s", 10, 20), now=0.0)
    bucket.give(5, mark, 0.0)
    assert bucket.tokens(0.0) == 5


def test_wait_for_a_larger_cost_is_exact() -> None:
    bucket = TokenBucket(Rate("rows_per_s", 250, 1000), now=0.0)
    bucket.take(1000, 0.0)
    assert bucket.wait_s(500, 0.0) == pytest.approx(2.0)
    assert bucket.wait_s(500, 1.5) == pytest.approx(0.5)


def test_reconfigure_keeps_what_is_saved_up() -> None:
    bucket = TokenBucket(Rate("requests_per_s", 10, 10), now=0.0)
    bucket.take(4, 0.0)
    bucket.reconfigure(Rate("requests_per_s", 100, 100), now=0.0)
    assert bucket.tokens(0.0) == pytest.approx(6)  # not refilled by the change
    bucket.reconfigure(Rate("requests_per_s", 1, 2), now=0.0)
    assert bucket.tokens(0.0) == pytest.approx(2)  # clamped to the new burst


def test_a_clock_that_stands_still_or_jumps_back_adds_nothing() -> None:
    bucket = TokenBucket(Rate("requests_per_s", 1, 1), now=10.0)
    bucket.take(1, 10.0)
    assert bucket.tokens(9.0) == 0.0
    assert bucket.tokens(10.0) == 0.0


rates = st.floats(min_value=0.5, max_value=1000)
bursts = st.floats(min_value=1, max_value=100)


@settings(max_examples=200, deadline=None)
@given(
    per_s=rates,
    burst=bursts,
    gaps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=150),
    costs=st.lists(st.integers(min_value=1, max_value=5), min_size=150, max_size=150),
)
def test_admitted_in_any_window_is_at_most_burst_plus_rate_times_length(
    per_s: float, burst: float, gaps: list[float], costs: list[int]
) -> None:
    bucket = TokenBucket(Rate("rows_per_s", per_s, burst), now=0.0)
    now, admitted = 0.0, []
    for gap, cost in zip(gaps, costs, strict=False):
        now += gap
        if bucket.try_take(cost, now) == 0.0:
            admitted.append((now, cost))
    for i, (start, _) in enumerate(admitted):
        total = 0
        for when, cost in admitted[i:]:
            total += cost
            assert total <= burst + per_s * (when - start) + 1e-6


@settings(max_examples=200, deadline=None)
@given(per_s=rates, burst=bursts, duration_s=st.floats(min_value=0.1, max_value=20))
def test_a_client_retrying_when_told_gets_rate_times_length_minus_one(
    per_s: float, burst: float, duration_s: float
) -> None:
    """Constant over-demand: every refusal is retried exactly at its pushback."""
    bucket = TokenBucket(Rate("requests_per_s", per_s, burst), now=0.0)
    now, admitted = 0.0, 0
    while now <= duration_s:
        wait = bucket.try_take(1, now)
        admitted += wait == 0.0
        now = max(now + wait, math.nextafter(now, math.inf)) if wait else now
    assert admitted >= per_s * duration_s - 1
    assert admitted <= burst + per_s * duration_s + 1e-6


@settings(max_examples=200, deadline=None)
@given(
    per_s=rates,
    burst=bursts,
    duration_s=st.floats(min_value=0.1, max_value=20),
    overdemand=st.floats(min_value=1.01, max_value=10),
)
def test_under_periodic_overdemand_admitted_is_at_least_rate_times_length_minus_one(
    per_s: float, burst: float, duration_s: float, overdemand: float
) -> None:
    """Calls every ``step`` seconds, faster than the rate. With discrete arrivals the
    bound needs room for one step's refill in the bucket (burst ≥ 1 + rate·step), or
    refill is lost while the bucket is full between arrivals."""
    step = 1.0 / (per_s * overdemand)
    burst = max(burst, 1 + per_s * step)
    bucket = TokenBucket(Rate("requests_per_s", per_s, burst), now=0.0)
    admitted, calls = 0, int(duration_s / step)
    for k in range(calls + 1):
        admitted += bucket.try_take(1, k * step) == 0.0
    assert admitted >= per_s * duration_s - 1
    assert admitted <= burst + per_s * duration_s + 1e-6


@settings(max_examples=200, deadline=None)
@given(
    per_s=rates,
    burst=bursts,
    spent=st.floats(min_value=0, max_value=1),
    cost=st.floats(min_value=1, max_value=100),
)
def test_retry_pushback_is_exact_within_a_millisecond(
    per_s: float, burst: float, spent: float, cost: float
) -> None:
    cost = min(cost, burst)
    bucket = TokenBucket(Rate("rows_per_s", per_s, burst), now=0.0)
    bucket.take(burst * spent, 0.0)
    wait = bucket.wait_s(cost, 5.0)
    if wait == 0.0:
        return
    if wait > 0.001:
        assert bucket.wait_s(cost, 5.0 + wait - 0.001) > 0.0
    assert bucket.try_take(cost, 5.0 + wait + 1e-9 * max(1.0, wait)) == 0.0


@settings(max_examples=300, deadline=None)
@given(
    per_s=rates,
    burst=bursts,
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=0.5), st.floats(min_value=0.1, max_value=5)),
        max_size=2 * MAX_PEAKS,
    ),
    data=st.data(),
)
def test_refunds_leave_the_bucket_where_it_would_be_without_the_refunded_takes(
    per_s: float, burst: float, steps: list[tuple[float, float]], data: st.DataObject
) -> None:
    """Takes and refunds of any of them, in any order, at any time: the bucket ends
    where a bucket that only ever saw the takes not refunded would be; never above it
    (a tenant never gets past its rate), equal while it kept every take's level."""
    bucket = TokenBucket(Rate("rows_per_s", per_s, burst), now=0.0)
    taken: list[tuple[float, float, int]] = []  # (when, cost, mark)
    refunded: set[int] = set()
    now = 0.0
    for gap, size in steps:
        now += gap
        waiting = [k for k in range(len(taken)) if k not in refunded]
        if waiting and data.draw(st.booleans()):
            k = data.draw(st.sampled_from(waiting))
            _, cost, mark = taken[k]
            bucket.give(cost, mark, now)
            refunded.add(k)
        elif bucket.wait_s(min(size, burst), now) == 0.0:
            taken.append((now, min(size, burst), bucket.take(min(size, burst), now)))
    kept = TokenBucket(Rate("rows_per_s", per_s, burst), now=0.0)
    for k, (when, cost, _) in enumerate(taken):
        if k not in refunded:
            kept.take(cost, when)
    assert bucket.tokens(now) <= kept.tokens(now) + 1e-9 * burst
    if len(taken) <= MAX_PEAKS:
        assert bucket.tokens(now) == pytest.approx(kept.tokens(now), abs=1e-9 * burst)


# -- calendar quotas ---------------------------------------------------------------


def test_day_periods_follow_utc_midnight() -> None:
    period = period_at("day", _ts(2024, 5, 17, 23, 59, 59))
    assert period.key == "2024-05-17"
    assert period.reset_at == _ts(2024, 5, 18)


@pytest.mark.parametrize(
    ("moment", "key", "reset"),
    [
        ((2024, 1, 31, 12), "2024-01", (2024, 2, 1)),
        ((2024, 2, 29, 23, 59), "2024-02", (2024, 3, 1)),
        ((2024, 12, 31, 23, 59, 59), "2024-12", (2025, 1, 1)),
        ((2025, 1, 1), "2025-01", (2025, 2, 1)),
    ],
)
def test_month_periods_follow_the_utc_calendar(
    moment: tuple[int, ...], key: str, reset: tuple[int, ...]
) -> None:
    period = period_at("month", _ts(*moment))
    assert (period.key, period.reset_at) == (key, _ts(*reset))


def test_period_tracker_moves_on_when_the_period_ends() -> None:
    tracker = PeriodTracker("day", _ts(2024, 5, 17, 10))
    first = tracker.at(_ts(2024, 5, 17, 23))
    assert tracker.at(_ts(2024, 5, 17, 23, 59)) is first
    assert tracker.at(_ts(2024, 5, 18)).key == "2024-05-18"


def test_period_tracker_gives_an_earlier_moment_its_own_period() -> None:
    """A call charged before midnight and refunded after it: its period is the day
    before, and the tracker stays on the new day."""
    tracker = PeriodTracker("day", _ts(2024, 5, 18, 0, 0, 1))
    assert tracker.at(_ts(2024, 5, 17, 23, 59, 59)).key == "2024-05-17"
    assert tracker.at(_ts(2024, 5, 18, 0, 0, 2)).key == "2024-05-18"
    month = PeriodTracker("month", _ts(2024, 6, 1, 0, 0, 1))
    earlier = month.at(_ts(2024, 5, 31, 23, 59, 59))
    assert (earlier.key, earlier.start, earlier.reset_at) == (
        "2024-05",
        _ts(2024, 5, 1),
        _ts(2024, 6, 1),
    )


def test_quota_counts_rows_and_resets_at_midnight_utc() -> None:
    counter = QuotaCounter(Quota("rows_per_day", 100, "day"), _ts(2024, 5, 17, 8))
    counter.take(60, _ts(2024, 5, 17, 9))
    assert counter.wait_s(40, _ts(2024, 5, 17, 10)) == 0.0
    assert counter.wait_s(41, _ts(2024, 5, 17, 22)) == pytest.approx(2 * 3600)
    assert counter.used(_ts(2024, 5, 17, 23)) == 60  # the refusal took nothing
    assert counter.used(_ts(2024, 5, 18, 0, 0, 1)) == 0
    assert counter.wait_s(100, _ts(2024, 5, 18, 1)) == 0.0


def test_quota_rows_given_back_only_within_the_period_they_were_counted_in() -> None:
    evening, midnight = _ts(2024, 5, 17, 23, 59), _ts(2024, 5, 18)
    counter = QuotaCounter(Quota("rows_per_day", 100, "day"), evening)
    counter.take(30, evening)
    counter.take(5, evening)
    counter.give(30, evening, evening + 1)
    assert counter.used(evening + 1) == 5
    counter.give(30, evening, evening + 1)  # never below zero
    assert counter.used(evening + 1) == 0
    counter.take(40, evening)
    counter.take(7, midnight)  # the new day: 7
    counter.give(40, evening, midnight + 1)  # yesterday's rows: nothing to give back today
    assert counter.used(midnight + 1) == 7


def test_quota_pushback_from_a_wall_behind_the_period_is_at_most_the_period() -> None:
    """The wall stepped back before the counter's day: the count stays on its day
    (no earlier reset), and the wait is counted from the day's start."""
    counter = QuotaCounter(Quota("rows_per_day", 100, "day"), _ts(2024, 1, 2, 0, 0, 1))
    counter.take(60, _ts(2024, 1, 2, 0, 0, 1))
    back = _ts(2024, 1, 1, 23, 59, 58)
    assert counter.wait_s(41, back) == 86400.0
    counter.give(60, _ts(2024, 1, 2, 0, 0, 1), back)
    assert counter.used(back) == 0


def test_quota_reconfigure_keeps_rows_used() -> None:
    wall = _ts(2024, 5, 17, 8)
    counter = QuotaCounter(Quota("rows_per_day", 100, "day"), wall)
    counter.take(90, wall)
    counter.reconfigure(Quota("rows_per_day", 95, "day"))
    assert counter.used(wall) == 90
    assert counter.wait_s(6, wall) > 0


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=0, max_value=4e9), st.sampled_from(["day", "month"]))
def test_every_moment_lies_in_its_period(wall: float, kind: str) -> None:
    period = period_at(kind, wall)  # type: ignore[arg-type]
    assert wall < period.reset_at
    assert period_at(kind, period.reset_at).key != period.key  # type: ignore[arg-type]
    assert 0 < period.reset_at - wall <= 31 * 86400
