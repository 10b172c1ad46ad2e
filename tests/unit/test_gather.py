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

from mandant.scheduling.gather import CLIMB_AFTER, PROBE_AFTER, CallGather
from tests.fakes import FakeClock, settle

MAX_DELAY_S = 0.002
#: Time passes in ticks (a held call is seen let go at the end of its tick).
TICK_S = 20e-6
#: Calls of one loop turn come this far apart; timers fire between turns only.
IN_TURN_S = 20e-6


async def elapse(clock: FakeClock, seconds: float) -> None:
    """Let ``seconds`` pass tick by tick, the loop running after each."""
    while seconds > 1e-12:
        tick = min(TICK_S, seconds)
        clock.advance(tick)
        seconds -= tick
        await settle(3)


class Caller:
    """Calls into a gather of at most ``max_calls`` on ``clock``, recording when each
    went on, and the calls of each group it reported. A held call goes on when its
    future is let go (its done callback, as a handler awaiting it would resume);
    cancelling the future is what cancelling that handler does to it."""

    def __init__(self, max_calls: int, clock: FakeClock) -> None:
        self.groups: list[int] = []
        self.gather = CallGather(MAX_DELAY_S, max_calls, clock, report=self.groups.append)
        self.clock = clock
        self.came: dict[int, float] = {}
        self.went: dict[int, float] = {}
        self.order: list[int] = []
        self.held: dict[int, asyncio.Future[None]] = {}
        self._next = 0

    def call(self, time_remaining: float | None = None) -> int:
        """One call arrives now (``time_remaining`` before its deadline); its number."""
        number, self._next = self._next, self._next + 1
        self.came[number] = self.clock.now
        held = self.gather.wait(lambda: time_remaining)
        if held is None:
            self._went(number)
        else:
            self.held[number] = held

            def went(future: asyncio.Future[None]) -> None:
                if not future.cancelled():
                    self._went(number)

            held.add_done_callback(went)
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
    filled (calls 2 µs apart); the window has grown to its bound."""
    caller.call()
    caller.clock.advance(10e-6)
    caller.call()
    await settle()
    for _ in range(groups):
        for _ in range(caller.gather.target):
            caller.call()
            caller.clock.advance(2e-6)
        await settle()
    assert caller.waiting == set()


async def warmed(max_calls: int) -> Caller:
    """The caller of a gather of at most ``max_calls`` on a fake clock, after
    :func:`warm`."""
    clock = FakeClock()
    caller = Caller(max_calls, clock)
    await warm(caller)
    return caller


async def test_a_lone_caller_never_waits() -> None:
    clock = FakeClock()
    caller = Caller(16, clock)
    for _ in range(200):  # concurrency 1: one call per loop turn, 600 µs apart
        caller.call()
        await settle()
        clock.advance(600e-6)
    assert caller.held == {} and len(caller.went) == 200


async def test_calls_together_are_held_until_the_group_fills() -> None:
    caller = await warmed(8)
    clock = caller.clock
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
    caller = await warmed(16)
    clock, gather = caller.clock, caller.gather
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


async def _closed_loop(caller: Caller, callers: int, groups: int) -> None:
    """``callers`` callers, each calling again 300 µs after its call went on (its
    answer's way there and back), until ``groups`` more groups were let go."""
    clock = caller.clock
    due = [clock.now + n * 50e-6 for n in range(callers)]  # each caller's next call
    calls: dict[int, int] = {}  # call → its caller
    until = len(caller.groups) + groups
    while len(caller.groups) < until:
        # to the next call, or a tick on while every caller is held
        await elapse(clock, min(max(0.0, min(due) - clock.now), 10 * TICK_S))
        for who, when in enumerate(due):
            if when <= clock.now + 1e-9:
                calls[caller.call()] = who
                due[who] = float("inf")
        await settle()
        for number in list(calls):
            if number in caller.went:
                due[calls.pop(number)] = caller.went[number] + 300e-6


async def test_a_few_closed_loop_callers_wait_for_each_other_only() -> None:
    """Four callers: the group size comes down to four, after which a group goes as
    soon as the four have come (no window waited), but for a try of five once in
    PROBE_AFTER groups."""
    caller = await warmed(16)
    gather = caller.gather
    await _closed_loop(caller, 4, 40)
    assert gather.target in (4, 5)
    waited = sum(went - caller.came[n] for n, went in caller.went.items())
    came = len(caller.went)
    await _closed_loop(caller, 4, 2 * PROBE_AFTER)
    assert gather.target in (4, 5)
    # held about 300 µs a call on average (the others' way back), not the window
    waited = sum(went - caller.came[n] for n, went in caller.went.items()) - waited
    assert waited / (len(caller.went) - came) < MAX_DELAY_S / 4


async def test_a_load_that_grows_is_met() -> None:
    """Four callers, then sixteen: once a try of five filled, the next ones come every
    CLIMB_AFTER groups, up to sixteen."""
    caller = await warmed(32)
    gather = caller.gather
    await _closed_loop(caller, 4, 60)
    assert gather.target in (4, 5)
    # a try after PROBE_AFTER groups, then eleven more, each CLIMB_AFTER groups on
    assert 11 * (CLIMB_AFTER + 1) < 150
    await _closed_loop(caller, 16, PROBE_AFTER + 150)
    assert gather.target >= 15


async def test_a_cancelled_call_leaves_its_group() -> None:
    """It neither fills the group nor counts in it; a group of none ends its timer."""
    caller = await warmed(4)
    clock, gather = caller.clock, caller.gather
    first = caller.call()
    second = caller.call()
    caller.held[first].cancel()
    await settle()
    assert gather.held == 1
    third, fourth = caller.call(), caller.call()
    await settle()
    assert caller.waiting == {second, third, fourth}  # three live calls of four
    groups = len(caller.groups)
    fifth = caller.call()  # fills it
    await settle()
    assert caller.waiting == set() and first not in caller.went
    assert caller.order[-4:] == [fifth, second, third, fourth]
    assert caller.groups[groups:] == [4]
    alone = caller.call()
    caller.held[alone].cancel()
    await settle()
    assert gather.held == 0 and clock.armed == 0


async def test_a_call_near_its_deadline_is_not_held() -> None:
    caller = await warmed(16)
    gather = caller.gather
    hurried = caller.call(time_remaining=MAX_DELAY_S / 2)
    assert hurried in caller.went and gather.held == 0
    patient = caller.call(time_remaining=1.0)
    assert caller.waiting == {patient}
    joining = caller.call(time_remaining=MAX_DELAY_S / 2)  # would not join either
    assert joining in caller.went and caller.waiting == {patient}


@pytest.mark.parametrize("max_calls", [0, 1])
def test_a_group_needs_two_calls(max_calls: int) -> None:
    with pytest.raises(ValueError, match="max_calls"):
        CallGather(MAX_DELAY_S, max_calls)


_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.integers(1, 6)),  # calls in one loop turn
        st.tuples(st.just("advance"), st.floats(0, 3 * MAX_DELAY_S)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
    ),
    max_size=80,
)


#: How late a held call may be seen let go: its timer fires at the end of the tick or
#: the loop turn (at most six calls) it fell due in.
LATE_S = max(TICK_S, 6 * IN_TURN_S)


@settings(max_examples=150, deadline=None)
@given(steps=_STEPS, max_calls=st.integers(2, 8))
def test_every_held_call_goes_once_in_time_and_in_order(
    steps: list[tuple[str, float]], max_calls: int
) -> None:
    asyncio.run(_interleaving(steps, max_calls))


async def _interleaving(steps: list[tuple[str, float]], max_calls: int) -> None:
    clock = FakeClock()
    caller = Caller(max_calls, clock)
    gather = caller.gather
    cancelled: set[int] = set()
    for kind, value in steps:
        if kind == "call":
            for _ in range(int(value)):
                caller.call()
                assert gather.held < max_calls  # with the next, a group of max_calls
                clock.now += IN_TURN_S  # a loop turn: no timer fires within it
        elif kind == "advance":
            await elapse(clock, value)
        elif caller.waiting:
            victim = sorted(caller.waiting)[int(value) % len(caller.waiting)]
            caller.held[victim].cancel()
            cancelled.add(victim)
        clock.advance(0.0)  # the turn ends: timers that fell due in it fire
        await settle()
        for number in caller.waiting:  # nobody held past its bound
            assert clock.now - caller.came[number] <= MAX_DELAY_S + LATE_S
    await elapse(clock, MAX_DELAY_S + TICK_S)
    assert caller.waiting == set()
    assert set(caller.went) == set(caller.came) - cancelled
    for number, went in caller.went.items():
        assert went - caller.came[number] <= MAX_DELAY_S + LATE_S
    held = [n for n in caller.order if n in caller.held]
    assert held == sorted(held)  # held calls go in arrival order
    # Each group reported counts its held calls that went, and the one that filled it
    # (which went on unheld), if one did; a cancelled call is in none.
    assert all(1 <= calls <= max_calls for calls in caller.groups)
    assert len(held) <= sum(caller.groups) <= len(held) + len(caller.groups)
