"""Reloads and a model whose load never finishes (its factory hangs): the other model
changes go on, ``server.model_load_timeout_s`` turns it into a failed load, and the
process still stops when asked. In process (``App``), torch models."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from mandant.app import App
from mandant.config import parse_config
from mandant.errors import ModelNotFound
from mandant.types import Tenant
from tests.servers import ECHO_MODEL
from tests.servers import SUBPROCESS_ENV as ENV

ACME = Tenant("acme")
#: Lets :func:`hangs` return (at most a minute); set after each test.
LOADED = threading.Event()


def hangs() -> nn.Module:
    """A factory that does not return until :data:`LOADED` is set."""
    LOADED.wait(60)
    return nn.Identity()


def never_returns() -> nn.Module:
    time.sleep(3600)
    return nn.Identity()


STUCK = {**ECHO_MODEL, "name": "stuck", "factory": f"{__name__}:hangs"}
ADDED = {**ECHO_MODEL, "name": "added"}


def _config(models: list[dict[str, Any]], **server: Any) -> Any:
    return parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, **server},
            "tenants": [{"id": "acme", "api_keys": []}],
            "models": models,
        }
    )


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    LOADED.clear()
    try:
        async with App(_config([ECHO_MODEL]), tmp_path) as running:
            yield running
    finally:
        LOADED.set()


async def _until(condition: Any, deadline_s: float = 20.0) -> None:
    limit = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < limit, "not within the deadline"
        await asyncio.sleep(0.05)


def _serves(app: App, name: str) -> bool:
    try:
        return app.registry.resolve(ACME, name).ready
    except ModelNotFound:
        return False


async def test_a_reload_is_not_held_up_by_an_earlier_one_still_loading(app: App) -> None:
    """The operator fixes the file and reloads again: the fix's new model serves while
    the earlier reload's model still loads (it waited for the whole earlier reload)."""
    app.reload(_config([ECHO_MODEL, STUCK]))
    await asyncio.sleep(0.2)
    app.reload(_config([ECHO_MODEL, ADDED]))
    await _until(lambda: _serves(app, "added"))
    assert not _serves(app, "stuck")
    LOADED.set()  # the stuck load ends; the second reload's decision comes after it
    assert app.model_changes is not None
    assert await asyncio.wait_for(app.model_changes, 30) == [
        "model 'added' loaded",
        "model 'stuck' unloaded",
    ]
    assert not any(m.key.name == "stuck" for m in app.registry.all())


async def test_a_load_past_the_load_timeout_fails_and_gives_the_name_back(tmp_path: Path) -> None:
    LOADED.clear()
    try:
        config = _config([ECHO_MODEL], model_load_timeout_s=0.5)
        async with App(config, tmp_path) as app:
            app.reload(_config([ECHO_MODEL, STUCK], model_load_timeout_s=0.5))
            assert app.model_changes is not None
            (change,) = await asyncio.wait_for(app.model_changes, 30)
            assert change.startswith("model 'stuck' not loaded: model 'stuck' version 1")
            assert "still loading after 0.5 s (server.model_load_timeout_s)" in change
            stuck = app.registry.resolve(ACME, "stuck")
            assert stuck.state == "UNAVAILABLE"
            await asyncio.wait_for(app.plane.unload_model("stuck"), 30)
            assert _serves(app, "echo")
    finally:
        LOADED.set()


STOPS = textwrap.dedent(
    """
    import asyncio, tempfile
    from pathlib import Path
    from mandant.app import App
    from tests.integration.test_model_lifecycle_reloads import ECHO_MODEL, STUCK, _config

    async def main():
        app = App(_config([ECHO_MODEL]), Path(tempfile.mkdtemp()))
        await app.start()
        stuck = {**STUCK, "factory": STUCK["factory"].replace("hangs", "never_returns")}
        app.reload(_config([ECHO_MODEL, stuck]))
        await asyncio.sleep(1)
        await app.aclose(0)  # as SIGTERM does

    asyncio.run(main())
    print("stopped", flush=True)
    """
)


def test_the_process_stops_while_a_model_load_hangs() -> None:
    """SIGTERM after a reload whose model's factory hangs: the process exits (it waited
    forever for the loading thread)."""
    done = subprocess.run(
        [sys.executable, "-c", STOPS], capture_output=True, text=True, env=ENV, timeout=90
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["stopped"]
