"""The life of one child process of ``workers: N`` (``mandant worker``), started by
the supervisor: build the engine or a front end, say on stdout when it serves (one
``MANDANT-WORKER`` line the supervisor reads), then reload on SIGHUP and drain on
SIGTERM. A child dies with its supervisor (``PR_SET_PDEATHSIG``, and a look every
second whether it is still there), so a supervisor killed outright leaves no process
behind; a stop that outlasts its grace by :data:`STOP_SLACK_S` exits anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from mandant.config import MandantConfig, config_folder, reloaded
from mandant.heap import SettleSoon, settle
from mandant.workers.sockets import EngineSockets

logger = logging.getLogger(__name__)

#: The start of the line a child prints once it serves, then a word and JSON.
ANNOUNCE = "MANDANT-WORKER"
_PR_SET_PDEATHSIG = 1
#: How often a child looks whether its supervisor is still there (besides
#: ``PR_SET_PDEATHSIG``, which a front end once outlived by an hour, its supervisor
#: killed outright), in seconds.
PARENT_CHECK_S = 1.0
#: Beyond its grace, how long a child's stop may take before it exits anyway: the
#: supervisor kills a child that takes longer, but a supervisor that is gone cannot.
STOP_SLACK_S = 10.0


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when its parent exits; exit at once if the
    parent is already gone. Nothing where prctl is not available."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        raise SystemExit(0)


def announce(word: str, facts: dict[str, object]) -> None:
    print(f"{ANNOUNCE} {word} {json.dumps(facts)}", flush=True)


async def until_stopped(
    reload: Callable[[], None], serving: Callable[[], None], grace_s: float
) -> None:
    """Take the signals, then say that this child serves (``serving``) and wait for
    SIGTERM, or for the supervisor to be gone: a SIGHUP the supervisor forwards once it
    heard that reloads, never kills. From then on the stop has ``grace_s`` +
    :data:`STOP_SLACK_S` before the process exits anyway."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the supervisor only (a session of its own); it stops us in order.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(signal.SIGHUP, reload)
    parent = os.getppid()
    serving()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PARENT_CHECK_S)
        if os.getppid() != parent:
            logger.error("the supervisor (pid %d) is gone: stopping", parent)
            stop.set()
    loop.call_later(grace_s + STOP_SLACK_S, _stop_overdue, grace_s)


def _stop_overdue(grace_s: float) -> None:
    logger.error(
        "stopping took longer than its grace (%.1fs) and %.0fs more: exiting",
        grace_s,
        STOP_SLACK_S,
    )
    os._exit(1)


async def serve_engine(
    config: MandantConfig, path: Path, sockets: EngineSockets, load: Callable[[], MandantConfig]
) -> None:
    """The engine: the models, admission, the fair batcher, metrics, REST and HTTP."""
    from mandant.app import App

    app = App(
        config,
        config_folder(path),
        config_path=path,
        engine_sockets=sockets,
        on_models_retired=SettleSoon(),
    )
    await app.start()
    settle()
    facts: dict[str, object] = {
        "http_port": app.http_port,
        "rest_port": app.rest_port,
        "internal_http_port": app.internal_http_port,
    }

    def reload() -> None:
        new = reloaded(load, config_folder(path))
        if new is None:
            return
        result = app.reload(new)
        for note in result.deferred:
            logger.warning("configuration reload: %s", note)
        logger.info("engine reloaded %s: %s", path, "; ".join(result.applied) or "no changes")

    await until_stopped(reload, lambda: announce("engine", facts), config.server.grace_s)
    logger.info("engine stopping (grace %.1fs)", app.config.server.grace_s)
    await app.aclose()


async def serve_front_end(
    config: MandantConfig, path: Path, sockets: EngineSockets, load: Callable[[], MandantConfig]
) -> None:
    """A front end: authenticate, parse, hand on to the engine."""
    from mandant.workers.frontend import FrontEnd

    front = FrontEnd(config, sockets, config_path=path)
    await front.start()
    settle()

    def reload() -> None:
        new = reloaded(load, config_folder(path))
        if new is not None:
            changes = front.reload(new)
            logger.info("front end reloaded %s: %s", path, "; ".join(changes) or "no changes")

    await until_stopped(
        reload,
        lambda: announce("front-end", {"grpc_port": front.grpc_port}),
        config.server.grace_s,
    )
    await front.aclose()
