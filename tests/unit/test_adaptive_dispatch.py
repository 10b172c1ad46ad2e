"""The adaptive dispatch decision (``scheduling/adaptive.py``), pure: times are numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mandant.scheduling.adaptive import DEADLINE_MARGIN_S, AdaptiveDispatch


def warmed(max_delay_s: float = 0.008, max_rows: int = 16) -> AdaptiveDispatch:
    """A dispatcher that has seen a flood: arrivals 10 µs apart, batches with company."""
    dispatch = AdaptiveDispatch(max_delay_s, max_rows)
    for n in range(20):
        dispatch.arrived(n * 1e-5)
    for _ in range(8):
        dispatch.dispatched(requests=4, held=False, gained=False)
    return dispatch


def test_starts_eager_and_stays_eager_for_a_lone_caller() -> None:
    dispatch = AdaptiveDispatch(0.002, 16)
    now = 0.0
    for _ in range(50):  # concurrency 1: one request, one batch of one
        dispatch.arrived(now)
        assert dispatch.due(now, 1, now, None) == now
        dispatch.dispatched(requests=1, held=False, gained=False)
        now += 0.001
    assert dispatch.window_s == 0.0


def test_company_grows_the_window_up_to_the_delay() -> None:
    dispatch = warmed(max_delay_s=0.008)
    assert dispatch.window_s == pytest.approx(0.008)
    assert dispatch.due(1.0, 1, 1.0, None) == pytest.approx(1.008)


def test_fruitless_holds_shrink_the_window_to_zero() -> None:
    dispatch = warmed()
    windows = []
    for _ in range(20):
        dispatch.dispatched(requests=1, held=True, gained=False)
        windows.append(dispatch.window_s)
    assert windows == sorted(windows, reverse=True) and windows[0] < 0.008
    assert dispatch.window_s == 0.0
    assert dispatch.due(1.0, 1, 1.0, None) == 1.0


def test_no_hold_when_nobody_is_expected_within_the_window() -> None:
    dispatch = warmed(max_delay_s=0.008)
    for n in range(40):  # arrivals now 50 ms apart
        dispatch.arrived(1.0 + n * 0.05)
    assert dispatch.due(3.0, 1, 3.0, None) == 3.0


def test_a_full_batch_leaves_at_once() -> None:
    dispatch = warmed(max_rows=16)
    assert dispatch.due(1.0, 16, 1.0, None) == 1.0


def test_hold_ends_before_the_earliest_deadline_less_execution_time() -> None:
    dispatch = warmed(max_delay_s=0.008)
    dispatch.executed(0.001)
    assert dispatch.due(1.0, 1, 1.0, 1.004) == pytest.approx(1.003 - DEADLINE_MARGIN_S)
    assert dispatch.due(1.0, 1, 1.0, 1.0005) == 1.0  # no time to hold at all


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        AdaptiveDispatch(-1.0, 4)
    with pytest.raises(ValueError):
        AdaptiveDispatch(0.001, 0)


events = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.floats(0.0, 0.01) | st.floats(0.0, 1e-4)),
        st.tuples(st.just("executed"), st.floats(0.0, 0.01)),
        st.tuples(st.just("dispatched"), st.integers(1, 8), st.booleans(), st.booleans()),
    ),
    max_size=80,
)


@given(
    company=st.integers(0, 12),
    max_delay_s=st.floats(0.0, 0.01),
    max_rows=st.integers(1, 64),
    history=events,
    rows=st.integers(1, 64),
    age_s=st.floats(0.0, 0.02),
    deadline_in_s=st.none() | st.floats(0.0, 0.02),
)
def test_a_hold_never_passes_the_delay_or_a_deadline(
    company: int,
    max_delay_s: float,
    max_rows: int,
    history: list[tuple[object, ...]],
    rows: int,
    age_s: float,
    deadline_in_s: float | None,
) -> None:
    dispatch = AdaptiveDispatch(max_delay_s, max_rows)
    now = 0.0
    for _ in range(company):  # a flood first: close arrivals, batches with company
        now += 1e-5
        dispatch.arrived(now)
        dispatch.dispatched(requests=2, held=False, gained=False)
    for event in history:
        if event[0] == "arrive":
            now += float(event[1])  # type: ignore[arg-type]
            dispatch.arrived(now)
        elif event[0] == "executed":
            dispatch.executed(float(event[1]))  # type: ignore[arg-type]
        else:
            _, requests, held, gained = event
            dispatch.dispatched(int(requests), bool(held), bool(gained))  # type: ignore[call-overload]
        assert 0.0 <= dispatch.window_s <= max_delay_s
    oldest = now - age_s
    deadline = None if deadline_in_s is None else now + deadline_in_s
    due = dispatch.due(now, rows, oldest, deadline)
    assert due >= now
    if due > now:  # held: within every bound
        assert due <= oldest + max_delay_s + 1e-12
        assert rows < max_rows
        assert deadline is not None or dispatch.window_s > 0
        if deadline is not None:
            assert due < deadline
