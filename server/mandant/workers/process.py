"""The life of one child process of ``workers: N`` (``mandant worker``), started by
the supervisor: build the engine or a front end, say on stdout when it serves (one
``MANDANT-WORKER`` line the supervisor reads), then reload on SIGHUP and drain on
SIGTERM. A child dies with its supervisor (``PR_SET_PDEATHSIG``), so a supervisor
killed outright leaves no process behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from mandant.config import MandantConfig, reloaded
from mandant.heap import settle
from mandant.workers.sockets import EngineSockets

logger = logging.getLogger(__name__)

#: The start of the line a child prints once it serves, then a word and JSON.
ANNOUNCE = "MANDANT-WORKER"
_PR_SET_PDEATHSIG = 1


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


async def _until_stopped(reload: Callable[[], None], serving: Callable[[], None]) -> None:
    """Take the signals, then say that this child serves (``serving``) and wait for
    SIGTERM: a SIGHUP the supervisor forwards once it heard that reloads, never kills."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches the supervisor only (a session of its own); it stops us in order.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(signal.SIGHUP, reload)
    serving()
    await stop.wait()


async def serve_engine(
    config: MandantConfig, path: Path, sockets: EngineSockets, load: Callable[[], MandantConfig]
) -> None:
    """The engine: the models, admission, the fair batcher, metrics, REST and HTTP."""
    from mandant.app import App

    app = App(
        config, path.parent, config_path=path, engine_sockets=sockets, on_models_retired=settle
    )
    await app.start()
    settle()
    facts: dict[str, object] = {
        "http_port": app.http_port,
        "rest_port": app.rest_port,
        "internal_http_port": app.internal_http_port,
    }

    def reload() -> None:
        new = reloaded(load, path.parent)
        if new is None:
            return
        result = app.reload(new)
        for note in result.deferred:
            logger.warning("configuration reload: %s", note)
        logger.info("engine reloaded %s: %s", path, "; ".join(result.applied) or "no changes")

    await _until_stopped(reload, lambda: announce("engine", facts))
    logger.info("engine stopping (grace %.1fs)", app.config.server.grace_s)
    await app.aclose()


async def serve_front_end(
    config: MandantConfig, path: Path, sockets: EngineSockets, load: Callable[[], MandantConfig]
) -> None:
    """A front end: authenticate, parse, hand on to the engine."""
    from mandant.workers.frontend import FrontEnd

    front = FrontEnd(config, path.parent, sockets)
    await front.start()
    settle()

    def reload() -> None:
        new = reloaded(load, path.parent)
        if new is not None:
            changes = front.reload(new)
            logger.info("front end reloaded %s: %s", path, "; ".join(changes) or "no changes")

    await _until_stopped(reload, lambda: announce("front-end", {"grpc_port": front.grpc_port}))
    await front.aclose()
