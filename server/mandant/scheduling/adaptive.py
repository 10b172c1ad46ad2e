"""When the next batch leaves, in ``adaptive`` dispatch: a pure decision, no asyncio, no
clock of its own (every method takes ``now``), no tensors — the batcher (``batcher.py``)
owns time and execution and asks :meth:`AdaptiveDispatch.due` whenever an execution
slot is idle and requests wait.

The problem it solves: with ``eager`` dispatch a batch leaves whenever a slot is idle,
and on a busy core the slot is idle whenever the worker is — so under a flood batches
stay at about one row and every request pays a whole execution. Waiting always (the
``delay`` mode) costs a lone caller the full delay. Adaptive dispatch waits only when
waiting has been seen to pay:

* The batcher never decides on the spot: it dispatches from a callback scheduled for
  the end of the current event-loop turn, so every request woken in the same turn has
  queued first (free: no timer, no measurable delay for a lone caller).
* It then holds a batch for a *window* while company is expected: the arrival interval
  (a moving average) is shorter than the window. The window is adapted like Clipper's
  AIMD: it grows by ``step`` (``max_delay_s / steps``) after a dispatch that found
  company (a batch of several requests) and shrinks by a quarter after a hold that
  gathered nobody, to zero below a quarter step (halving, tried first, held too little
  under a flood: mean batch 4.8 rows against 5.7 at concurrency 64 on one core). A lone
  caller at concurrency 1 never finds company, so the window stays 0: it never waits.

Bounds (the invariants the tests check): a held batch leaves no later than its oldest
request's arrival plus ``max_delay_s``, and before the earliest queued deadline less
the measured execution time; a full batch (``max_rows``) leaves at once.
"""

from __future__ import annotations

#: Weight of the newest sample in the moving averages.
SMOOTHING = 0.2
#: How the window shrinks after a hold that gathered nobody.
SHRINK = 0.75
#: A held batch leaves this long (plus its expected execution time) before the
#: earliest deadline it holds, so that the request can still run in time.
DEADLINE_MARGIN_S = 100e-6


class AdaptiveDispatch:
    """The hold decision and its feedback (see module doc). Times in seconds on the
    caller's monotonic scale."""

    __slots__ = (
        "_exec_s",
        "_interval_s",
        "_last_arrival",
        "_max_delay_s",
        "_max_rows",
        "_step_s",
        "_window_s",
    )

    def __init__(self, max_delay_s: float, max_rows: int, steps: int = 8) -> None:
        if max_delay_s < 0 or max_rows < 1 or steps < 1:
            raise ValueError("max_delay_s >= 0, max_rows >= 1 and steps >= 1 are required")
        self._max_delay_s = max_delay_s
        self._max_rows = max_rows
        self._step_s = max_delay_s / steps
        self._window_s = 0.0
        self._interval_s: float | None = None
        self._last_arrival: float | None = None
        self._exec_s = 0.0

    @property
    def window_s(self) -> float:
        """How long a batch may be held now (0: dispatch at once)."""
        return self._window_s

    @property
    def interval_s(self) -> float | None:
        """Moving average of the time between arrivals; None before the second."""
        return self._interval_s

    def arrived(self, now: float) -> None:
        if self._last_arrival is not None:
            gap = max(0.0, now - self._last_arrival)
            self._interval_s = gap if self._interval_s is None else _mix(self._interval_s, gap)
        self._last_arrival = now

    def executed(self, compute_s: float) -> None:
        self._exec_s = compute_s if not self._exec_s else _mix(self._exec_s, compute_s)

    def due(
        self, now: float, rows: int, oldest_arrival: float, earliest_deadline: float | None
    ) -> float:
        """When the queued requests should leave: ``now`` or earlier means at once.
        ``rows``: queued rows; ``oldest_arrival``: when the oldest queued request came;
        ``earliest_deadline``: the soonest deadline among them, if any."""
        if rows >= self._max_rows or self._window_s <= 0.0:
            return now
        if self._interval_s is None or self._interval_s > self._window_s:
            return now  # nobody is expected within the window
        until = oldest_arrival + min(self._window_s, self._max_delay_s)
        if earliest_deadline is not None:
            until = min(until, earliest_deadline - self._exec_s - DEADLINE_MARGIN_S)
        return until if until > now else now

    def dispatched(self, requests: int, held: bool, gained: bool) -> None:
        """Feedback after a batch left with ``requests`` requests. ``held``: it was
        held by a window; ``gained``: requests arrived while it was held."""
        if held and not gained:
            self._window_s *= SHRINK
            if self._window_s < self._step_s / 4:
                self._window_s = 0.0
        elif requests > 1 or gained:
            self._window_s = min(self._max_delay_s, self._window_s + self._step_s)


def _mix(average: float, sample: float) -> float:
    return (1 - SMOOTHING) * average + SMOOTHING * sample
