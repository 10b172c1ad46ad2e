"""A ``workers: N`` child's own stop (``workers/process.py``): it stops when its
supervisor is gone, and a stop that hangs past its grace exits anyway."""

from __future__ import annotations

import asyncio
import os

import pytest

from mandant.workers import process


async def test_a_child_stops_without_its_supervisor_and_a_hung_stop_exits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A front end outlived its supervisor (killed outright) by an hour: the SIGTERM
    of PR_SET_PDEATHSIG began its stop, which never ended, and nobody was left to kill
    it. Now a child also looks for its supervisor every second, and exits once its
    stop has run past its grace and the slack."""
    parents = iter([os.getppid(), os.getppid(), 1])  # at start, a check, then gone
    monkeypatch.setattr(process.os, "getppid", lambda: next(parents, 1))
    monkeypatch.setattr(process, "PARENT_CHECK_S", 0.01)
    monkeypatch.setattr(process, "STOP_SLACK_S", 0.05)
    exits: list[int] = []
    monkeypatch.setattr(process.os, "_exit", exits.append)
    served: list[bool] = []
    stopped = process.until_stopped(lambda: None, lambda: served.append(True), grace_s=0.0)
    await asyncio.wait_for(stopped, 5)
    assert served == [True] and exits == []
    await asyncio.sleep(0.2)  # the stop hangs: nothing ends the process but the timer
    assert exits == [1]
