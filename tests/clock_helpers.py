"""Tests of today's counts (``rows_today``, a quota's day, Redis's day keys) against
the real clock: a run that crosses midnight UTC reads the new day's counts, which
started again. Such a run is skipped, not failed (a CI run that began at 23:59:59.2
read ``rows_today: 0``, not 2)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest


def utc_day() -> str:
    """Today in UTC, as the day keys name it (``2031-05-18``)."""
    return time.strftime("%Y-%m-%d", time.gmtime())


@contextlib.contextmanager
def same_utc_day(since: str | None = None) -> Iterator[None]:
    """Run the block; where it raises and the UTC day is no longer ``since`` (the day
    the counts began; default: the day the block began), skip the test instead. A
    block that passes passes, whatever the day."""
    day = utc_day() if since is None else since
    try:
        yield
    except Exception:
        if utc_day() != day:
            pytest.skip(f"the UTC day changed since {day}: today's counts started again")
        raise
