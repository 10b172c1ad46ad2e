"""Failure logs that one client cannot flood.

A model that raises on some inputs fails every request that carries them: logged one
by one with a traceback each (about 2.7 KB, the client's request id in it), one
client's 300 bad calls wrote 300 ERROR records, at about 250 KB/s. A
:class:`FailureLog` logs the first failure of a kind (a model and an exception type,
say) in full, counts the next ones of that kind for ``window_s``, and logs their count
once when that window ends, one line without a traceback, naming the metric that
counts every failure one by one; the count of a kind that goes on failing is logged
once per window. A kind that stays quiet for a whole window is logged in full again
at its next failure.

Kinds are built from configuration and code (model names, tenant ids, exception
types, status codes), never from what a client sends: each kind seen holds a few bytes
for as long as its :class:`FailureLog` lives. A kind names the tenant where it is
known, so that one tenant's stream of failures never hides another's first one (the
review found a victim's failure, whose answer quoted its request id, nowhere in the
log); every failure counted is logged at DEBUG, id and all.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass

from mandant.scheduling.clock import Clock, LoopClock, Timer

#: How long the failures of a kind after the one logged in full are counted before
#: their count is logged.
WINDOW_S = 60.0


@dataclass(slots=True)
class _Window:
    ends: float  # on the clock's monotonic scale
    level: int
    count: int = 0  # failures not logged one by one
    timer: Timer | None = None  # armed at ``ends`` once ``count`` > 0


class FailureLog:
    """Logs failures to ``logger``: the first of each kind in full, the next ones of
    that kind within ``window_s`` as one count per window (see module doc), which
    says that each is counted in ``counted_in`` (a metric's name)."""

    def __init__(
        self,
        logger: logging.Logger,
        counted_in: str,
        *,
        window_s: float = WINDOW_S,
        clock: Clock | None = None,
    ) -> None:
        self._logger = logger
        self._counted_in = counted_in
        self._window_s = window_s
        self._clock: Clock = clock or LoopClock()
        self._windows: dict[str, _Window] = {}

    def failed(
        self,
        kind: str,
        msg: str,
        *args: object,
        exc: BaseException | None = None,
        level: int = logging.ERROR,
    ) -> None:
        """One failure of ``kind``: logged as ``msg % args`` at ``level`` with ``exc``'s
        traceback when it is the first of its window, else counted (the count is logged
        at the level of the kind's first failure, without a traceback)."""
        now = self._clock.monotonic()
        window = self._windows.get(kind)
        if window is None or (now >= window.ends and window.timer is None):
            if self._logger.isEnabledFor(level):
                self._logger.log(level, msg, *args, exc_info=exc)
            self._windows[kind] = _Window(now + self._window_s, level)
            return
        window.count += 1
        if self._logger.isEnabledFor(logging.DEBUG):  # each one, for whoever looks
            self._logger.debug(msg, *args)
        if window.timer is None:
            window.timer = self._clock.call_at(window.ends, lambda: self._summarise(kind))

    def flush(self) -> None:
        """Log the counts of the windows still open now (their owner closes)."""
        for kind, window in list(self._windows.items()):
            if window.timer is not None:
                window.timer.cancel()
                self._summarise(kind)

    def _summarise(self, kind: str) -> None:
        """Log the count of ``kind``'s window in a context of its own, not the one of
        the call that armed its timer (whose tenant and request id a log line would
        show); the next failures of the kind are counted in a new window from now
        (logged in full once one stays quiet)."""
        contextvars.Context().run(self._log_count, kind)

    def _log_count(self, kind: str) -> None:
        window = self._windows[kind]
        self._logger.log(
            window.level,
            "%s: %d more failure(s) like the one logged in full, within %.0f s; "
            "not logged one by one (each is counted in %s)",
            kind,
            window.count,
            self._window_s,
            self._counted_in,
        )
        self._windows[kind] = _Window(self._clock.monotonic() + self._window_s, window.level)
