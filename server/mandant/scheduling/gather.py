"""Gathering at the front end: inference calls that come while the front end is busy
run their Python back to back.

grpc.aio hands Mandant its calls one by one, whatever its backlog (now and then two
finish reading their message in the same event-loop turn): under a flood of 64 calls in
flight, 99% of calls found no other call of Mandant's in progress (measured). So each
call's Python (parse, validate, admit, decode, the model call, encode) ran alone between
two stretches of gRPC's own work, with caches holding gRPC's data, not Mandant's: about
3 times slower than back to back (``benchmarks/call_cost.py --between-mb``). Holding a
call for a moment until a few others have come, then letting them all go at once, runs
their Python back to back, warm: 25–40% more calls per second of a core at 16 to 64
calls in flight (``benchmarks/frontend.py``).

A caller alone must not pay for that, nor a few callers wait for company that cannot
come. So:

* **Whether to hold at all** is :class:`~mandant.scheduling.adaptive.AdaptiveDispatch`'s
  decision, as for the batcher's batches: a hold window that grows only after calls
  were seen together (two or more in one loop turn, or a hold that gathered someone)
  and shrinks after a hold that gathered nobody, so a caller at concurrency 1 never
  waits; a group is started only while the arrival interval is no longer than the
  window (a call joins a group already started).
* **When a group is complete** is learnt: a group goes as soon as it has ``target``
  calls. A group that its timer ends (the window passed before it filled: the load
  could not fill it — a few closed-loop callers) lowers ``target`` by one. After
  :data:`PROBE_AFTER` groups in a row that filled, ``target`` tries one more; a try
  that filled is followed by the next after only :data:`CLIMB_AFTER` groups (so a load
  that grew is met within a few hundred groups), one that did not by the next after
  :data:`PROBE_AFTER` again (so a few callers wait the window in fewer than 1% of their
  calls). A handful of callers then wait for each other and nobody else.

Bounds (the invariants the tests check): a call is held at most ``max_delay_s`` (the
window never exceeds it; uvloop rounds timers to the millisecond), and never when its
deadline is nearer than the window; a group holds at most ``max_calls``; every held call
is let go exactly once, in arrival order (the call that fills a group goes on first,
without waiting), and a held call that is cancelled leaves its group at the end of the
loop turn (from then on it neither fills it nor counts in it). A busy front end holds
every tenant's calls alike, within that bound: one tenant's flood can make another's
call wait ``max_delay_s`` at most. Gathering changes when a call's Python runs, never
what it does: it happens after the call's key is checked, its place taken and the door
passed, before its message is parsed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mandant.scheduling.adaptive import DEADLINE_MARGIN_S, AdaptiveDispatch
from mandant.scheduling.clock import Clock, LoopClock, Timer

#: Groups in a row that filled before ``target`` tries one call more, after a try
#: that failed (or none yet) and after one that filled.
PROBE_AFTER = 256
CLIMB_AFTER = 8


class CallGather:
    """Holds inference calls of a busy front end so that they run together (module
    doc). One per event loop; ``max_delay_s`` 0 turns it off."""

    __slots__ = (
        "_adaptive",
        "_clock",
        "_filled",
        "_group",
        "_max_calls",
        "_probe_after",
        "_probing",
        "_report",
        "_target",
        "_timer",
        "_turn",
    )

    def __init__(
        self,
        max_delay_s: float,
        max_calls: int,
        clock: Clock | None = None,
        report: Callable[[int], None] | None = None,
    ) -> None:
        """``report``: hears the calls of each group let go (the observer's
        ``calls_gathered``: the metrics)."""
        if max_calls < 2:
            raise ValueError("a gather needs max_calls >= 2 (a group of one is no group)")
        self._max_calls = max_calls
        self._adaptive = AdaptiveDispatch(max_delay_s, max_calls)
        self._clock: Clock = clock or LoopClock()
        self._group: list[asyncio.Future[None]] = []
        self._timer: Timer | None = None
        self._turn = 0  # calls that went on at once in this loop turn
        self._target = max_calls
        self._filled = 0  # groups in a row that reached ``_target``
        self._probe_after = PROBE_AFTER  # ... before ``_target`` tries one more
        self._probing = False  # ``_target`` was just raised: not filled at it yet
        self._report = report

    @property
    def target(self) -> int:
        """The group size the load has lately filled (module doc)."""
        return self._target

    @property
    def held(self) -> int:
        """Calls held now."""
        return len(self._group)

    def wait(
        self, time_remaining: Callable[[], float | None] | None = None
    ) -> asyncio.Future[None] | None:
        """None: go on now. Else the call is held: await the future (it is let go with
        its group; cancelling it is safe). ``time_remaining``: the call's seconds left
        before its deadline (None: no deadline); a call with less left than the
        window is never held."""
        now = self._clock.monotonic()
        adaptive = self._adaptive
        adaptive.arrived(now)
        group = self._group
        if group:
            if len(group) + 1 >= self._target:
                self._let_go(filled=True)
                return None
            if not self._in_time(time_remaining):
                return None
            return self._hold(group)
        if adaptive.due(now, 1, now, None) <= now or not self._in_time(time_remaining):
            if not self._turn:
                asyncio.get_running_loop().call_soon(self._turn_ended)
            self._turn += 1
            return None
        future = self._hold(group)
        self._timer = self._clock.call_at(now + adaptive.window_s, self._timed_out)
        return future

    def _in_time(self, time_remaining: Callable[[], float | None] | None) -> bool:
        """Whether a call with ``time_remaining`` may be held for the window."""
        if time_remaining is None:
            return True
        left = time_remaining()
        return left is None or left > self._adaptive.window_s + DEADLINE_MARGIN_S

    def _hold(self, group: list[asyncio.Future[None]]) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(self._left)
        group.append(future)
        return future

    def _left(self, future: asyncio.Future[None]) -> None:
        """A held call was let go, or cancelled (this runs a loop turn later): a
        cancelled one leaves its group; a group of none ends with its timer."""
        if not future.cancelled():
            return
        group = self._group
        if future in group:
            group.remove(future)
            if not group and self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _turn_ended(self) -> None:
        """Calls that came in one loop turn were together: company, for the window."""
        calls, self._turn = self._turn, 0
        self._adaptive.dispatched(calls, held=False, gained=False)

    def _timed_out(self) -> None:
        self._timer = None
        self._let_go(filled=False)

    def _let_go(self, filled: bool) -> None:
        """Let the group go: ``filled``, it reached ``target`` with the calling one
        (which goes on without waiting); else its window passed."""
        group, self._group = self._group, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        calls = sum(not future.done() for future in group) + filled  # cancelled: not
        if filled:
            if self._probing:  # the load filled one more: try the next one soon
                self._probing, self._probe_after = False, CLIMB_AFTER
            self._filled += 1
            if self._filled >= self._probe_after and self._target < self._max_calls:
                self._filled, self._target, self._probing = 0, self._target + 1, True
        else:
            if self._probing:  # it could not: the next try only after many groups
                self._probing, self._probe_after = False, PROBE_AFTER
            self._filled = 0
            self._target = max(2, self._target - 1)
        self._adaptive.dispatched(calls, held=True, gained=calls > 1)
        for future in group:
            if not future.done():  # a call cancelled this turn has not left yet
                future.set_result(None)
        if self._report is not None and calls:  # every call of it cancelled: no group
            self._report(calls)
