"""Gathering at the front end (``scheduling/gather.py``): a lone caller never waits; once
calls have come together, a call is held until its group fills or its window passes;
a few closed-loop callers wait for each other and nobody else. Property: for any
interleaving of arrivals, loop turns, clock steps and cancellations, every held call is
let go exactly once, in arrival order, no later than ``max_delay_s`` after it came, in
a group of at most ``max_calls``."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mandant.scheduling.gather import PROBE_AFTER, CallGather
from tests.fakes import FakeClock, settle

MAX_DELAY_S = 0.002
#: Time passes in ticks (a held call is seen let go at the end of its tick).
TICK_S = 20e-6


async def elapse(clock: FakeClock, seconds: float) -> None:
    """Let ``seconds`` pass tick by tick, the loop running after each."""
    while seconds > 1e-12:
        tick = min(TICK_S, seconds)
        clock.advance(tick)
        seconds -= tick
        await settle(3)


class Caller:
    """Calls into a gather, recording when each went on. A held call goes on when its
    future is let go (its done callback, as a handler awaiting it would resume);
    cancelling the future is what cancelling that handler does to it."""

    def __init__(self, gather: CallGather, clock: FakeClock) -> None:
        self.gather = gather
        self.clock = clock
        self.came: dict[int, float] = {}
        self.went: dict[int, float] = {}
        self.order: list[int] = []
        self.held: dict[int, asyncio.Future[None]] = {}
        self._next = 0

    def call(self) -> int:
        """One call arrives now; its number."""
        number, self._next = self._next, self._next + 1
        self.came[number] = self.clock.now
        held = self.gather.wait()
        if held is None:
            self._went(number)
        else:
            self.held[number] = held
            held.add_done_callback(lambda future: future.cancelled() or self._went(number))
        return number

    def _went(self, number: int) -> None:
        assert number not in self.went, f"call {number} let go twice"
        self.went[number] = self.clock.now
        self.order.append(number)

    @property
    def waiting(self) -> set[int]:
        return {n for n in self.held if n not in self.went and not self.held[n].cancelled()}


async def warm(caller: Caller, groups: int = 8) -> None:
    """Calls have come together: two in one loop turn, then ``groups`` groups that
    filled (ten calls 10 µs apart each); the window has grown to its bound."""
    caller.call()
    caller.clock.advance(10e-6)
    caller.call()
    await settle()
    for _ in range(groups):
        for _ in range(caller.gather.target):
            caller.call()
            caller.clock.advance(10e-6)
        await settle()
    assert caller.waiting == set()


async def test_a_lone_caller_never_waits() -> None:
    clock = FakeClock()
    caller = Caller(CallGather(MAX_DELAY_S, 16, clock), clock)
    for _ in range(200):  # concurrency 1: one call per loop turn, 600 µs apart
        caller.call()
        await settle()
        clock.advance(600e-6)
    assert caller.held == {} and len(caller.went) == 200


async def test_calls_together_are_held_until_the_group_fills() -> None:
    clock = FakeClock()
    gather = CallGather(MAX_DELAY_S, 8, clock)
    caller = Caller(gather, clock)
    await warm(caller)
    first = caller.call()
    assert caller.waiting == {first}
    for _ in range(6):
        clock.advance(100e-6)
        caller.call()
        await settle()
    assert len(caller.waiting) == 7  # all held: the group has 7 of its 8
    last = caller.call()  # the eighth goes on at once and lets the others go
    assert last in caller.went
    await settle()
    assert caller.waiting == set()
    assert caller.order[-8:] == [last, *range(first, first + 7)]
    assert clock.armed == 0  # the group's timer is cancelled


async def test_a_group_that_does_not_fill_goes_when_its_window_passes() -> None:
    clock = FakeClock()
    gather = CallGather(MAX_DELAY_S, 16, clock)
    caller = Caller(gather, clock)
    await warm(caller)
    target = gather.target
    first = caller.call()
    clock.advance(100e-6)
    second = caller.call()
    await elapse(clock, MAX_DELAY_S - 100e-6 - TICK_S)
    assert caller.waiting == {first, second}
    await elapse(clock, 2 * TICK_S)
    assert caller.waiting == set()
    assert caller.went[first] - caller.came[first] <= MAX_DELAY_S + TICK_S
    assert gather.target == max(2, target - 1)  # lowered by one at most


async def test_a_few_closed_loop_callers_wait_for_each_other_only() -> None:
    """Four callers, each calling again as soon as it is let go: the group size comes
    down to four, after which a group goes as soon as the four have come (no window
    waited), but for a probe of five now and then."""
    clock = FakeClock()
    gather = CallGather(MAX_DELAY_S, 16, clock)
    caller = Caller(gather, clock)
    await warm(caller)
    timed_out = 0
    for _ in range(200):
        before = set(caller.went)
        for _ in range(4):
            caller.call()
            clock.advance(100e-6)
        await settle()
        if caller.waiting:  # the group did not fill: its window passes
            clock.advance(MAX_DELAY_S)
            await settle()
            timed_out += 1
        assert caller.waiting == set() and len(set(caller.went) - before) == 4
    assert gather.target in (4, 5)
    # 12 groups to come down from 16, then one probe every PROBE_AFTER groups
    assert timed_out <= 13 + 200 // PROBE_AFTER


async def test_a_cancelled_call_leaves_no_trace() -> None:
    clock = FakeClock()
    gather = CallGather(MAX_DELAY_S, 4, clock)
    caller = Caller(gather, clock)
    await warm(caller)
    first = caller.call()
    second = caller.call()
    caller.held[first].cancel()
    await settle()
    caller.call()
    caller.call()  # the fourth fills the group
    await settle()
    assert caller.waiting == set() and first not in caller.went and second in caller.went


def test_a_gather_needs_a_call() -> None:
    with pytest.raises(ValueError, match="max_calls"):
        CallGather(MAX_DELAY_S, 0)


_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.integers(1, 6)),  # calls in one loop turn
        st.tuples(st.just("advance"), st.floats(0, 3 * MAX_DELAY_S)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(steps=_STEPS, max_calls=st.integers(1, 8))
def test_every_held_call_goes_once_in_time_and_in_order(
    steps: list[tuple[str, float]], max_calls: int
) -> None:
    asyncio.run(_interleaving(steps, max_calls))


async def _interleaving(steps: list[tuple[str, float]], max_calls: int) -> None:
    clock = FakeClock()
    gather = CallGather(MAX_DELAY_S, max_calls, clock)
    caller = Caller(gather, clock)
    cancelled: set[int] = set()
    for kind, value in steps:
        if kind == "call":
            for _ in range(int(value)):
                caller.call()
                assert gather.held < max_calls  # with the next, a group of max_calls
                clock.advance(20e-6)
        elif kind == "advance":
            await elapse(clock, value)
        elif caller.waiting:
            victim = sorted(caller.waiting)[int(value) % len(caller.waiting)]
            caller.held[victim].cancel()
            cancelled.add(victim)
        await settle()
        for number in caller.waiting:  # nobody held past its bound
            assert clock.now - caller.came[number] <= MAX_DELAY_S + TICK_S
    await elapse(clock, MAX_DELAY_S + TICK_S)
    assert caller.waiting == set()
    assert set(caller.went) == set(caller.came) - cancelled
    for number, went in caller.went.items():
        assert went - caller.came[number] <= MAX_DELAY_S + TICK_S
    held = [n for n in caller.order if n in caller.held]
    assert held == sorted(held)  # held calls go in arrival order
