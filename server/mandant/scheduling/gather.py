"""Gathering at the front end: inference calls that come while the front end is busy
run their Python back to back.

grpc.aio hands Mandant one call per event-loop turn, whatever its backlog: under a
flood of 64 calls in flight, 99% of calls found no other call of Mandant's in progress
(measured). So each call's Python (parse, validate, admit, decode, the model call,
encode) ran alone between two stretches of gRPC's own work, with caches holding gRPC's
data, not Mandant's: about 3 times slower than back to back (``benchmarks/call_cost.py
--between-mb``). Holding a call for a moment until a few others have come, then letting
them all go at once, runs their Python back to back, warm: 25–40% more calls per
second of a core at 16 to 64 calls in flight (``benchmarks/frontend.py``).

A lone caller must not pay for that, nor a few callers wait for company that cannot
come. So:

* **Whether to hold at all** is :class:`~mandant.scheduling.adaptive.AdaptiveDispatch`'s
  decision, as for the batcher's batches: a hold window that grows only after calls
  were seen together (two or more in one loop turn, or a hold that gathered someone)
  and shrinks after a hold that gathered nobody, so a caller at concurrency 1 never
  waits; a call is held only while the arrival interval is shorter than the window.
* **When a group is complete** is learnt: a group goes as soon as it has ``target``
  calls. A group that its timer ends (the window passed before it filled: the load
  could not fill it — a few closed-loop callers) lowers ``target`` to what came, by one
  at most per group; every :data:`PROBE_AFTER` groups that filled, ``target`` tries one
  more. A handful of callers then wait for each other and nobody else.

Bounds (the invariants the tests check): a call is held at most ``max_delay_s`` (the
window never exceeds it; uvloop rounds timers to the millisecond); a group holds at most
``max_calls``; every held call is let go exactly once, in arrival order, and a held
call that is cancelled leaves no trace. Gathering changes when a call's Python runs,
never what it does: it happens after the call's key is checked, its place taken and
the door passed, before its message is parsed.
"""

from __future__ import annotations

import asyncio

from mandant.scheduling.adaptive import AdaptiveDispatch
from mandant.scheduling.clock import Clock, LoopClock, Timer

#: Groups that filled before ``target`` tries one call more.
PROBE_AFTER = 64


class CallGather:
    """Holds inference calls of a busy front end so that they run together (module
    doc). One per event loop; ``max_delay_s`` 0 turns it off."""

    __slots__ = (
        "_adaptive",
        "_clock",
        "_filled",
        "_group",
        "_max_calls",
        "_target",
        "_timer",
        "_turn",
        "gathered",
        "groups",
    )

    def __init__(self, max_delay_s: float, max_calls: int, clock: Clock | None = None) -> None:
        if max_calls < 1:
            raise ValueError("a gather needs max_calls >= 1")
        self._max_calls = max_calls
        self._adaptive = AdaptiveDispatch(max_delay_s, max_calls)
        self._clock: Clock = clock or LoopClock()
        self._group: list[asyncio.Future[None]] = []
        self._timer: Timer | None = None
        self._turn = 0  # calls that went on at once in this loop turn
        self._target = max_calls
        self._filled = 0  # groups in a row that reached ``_target``
        #: Groups let go, and the calls they held (the dashboard's mean group).
        self.groups = 0
        self.gathered = 0

    @property
    def target(self) -> int:
        """The group size the load has lately filled (module doc)."""
        return self._target

    @property
    def held(self) -> int:
        """Calls held now."""
        return len(self._group)

    def wait(self) -> asyncio.Future[None] | None:
        """None: go on now. Else the call is held: await the future (it is let go with
        its group; cancelling it is safe)."""
        now = self._clock.monotonic()
        adaptive = self._adaptive
        adaptive.arrived(now)
        group = self._group
        if group:
            if len(group) + 1 >= self._target:
                self._let_go(filled=True)
                return None
            future = asyncio.get_running_loop().create_future()
            group.append(future)
            return future
        if self._target < 2 or adaptive.due(now, 1, now, None) <= now:
            if not self._turn:
                asyncio.get_running_loop().call_soon(self._turn_ended)
            self._turn += 1
            return None
        future = asyncio.get_running_loop().create_future()
        group.append(future)
        self._timer = self._clock.call_at(now + adaptive.window_s, self._timed_out)
        return future

    def _turn_ended(self) -> None:
        """Calls that came in one loop turn were together: company, for the window."""
        calls, self._turn = self._turn, 0
        self._adaptive.dispatched(calls, held=False, gained=False)
        if calls > 1 and self._target < 2:
            self._target = 2

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
        calls = len(group) + filled
        if filled:
            self._filled += 1
            if self._filled >= PROBE_AFTER:
                self._filled = 0
                self._target = min(self._max_calls, self._target + 1)
        else:
            self._filled = 0
            self._target = max(2, calls, self._target - 1)
        self._adaptive.dispatched(calls, held=True, gained=calls > 1)
        self.groups += 1
        self.gathered += calls
        for future in group:
            if not future.done():  # a cancelled call's is done already
                future.set_result(None)
