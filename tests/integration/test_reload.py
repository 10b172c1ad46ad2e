"""Configuration reload: ``App.reload`` in process, and SIGHUP on ``mandant serve``.
Tenants, keys and limits change live; a broken file is refused and the server keeps
what it runs; model changes wait for a restart."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mandant.app import App
from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant_client import AsyncClient, Client, RateLimited, Unauthenticated
from tests.servers import ECHO_MODEL, free_port, mandant_serve, wait_for

X = {"INPUT0": np.ones((1, 2), np.float32)}


def _config(port: int = 0, **tenants: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"grpc_port": port, "http_port": 0, "rest_port": 0},
        "tenants": [{"id": tenant, **settings} for tenant, settings in tenants.items()],
        "models": [ECHO_MODEL],
    }


async def test_reload_applies_keys_and_limits_and_defers_models(tmp_path: Path) -> None:
    first = _config(a={"api_keys": [hash_key("key-a")]})
    async with App(parse_config(first), tmp_path) as app:
        target = f"127.0.0.1:{app.grpc_port}"
        async with AsyncClient(target, api_key="key-b") as b:
            with pytest.raises(Unauthenticated):
                await b.infer("echo", X)
            second = _config(
                a={"api_keys": [hash_key("key-a2")]},
                b={
                    "api_keys": [hash_key("key-b")],
                    "rate_limit": {"requests_per_s": 1, "burst": 1},
                },
            )
            second["models"] = [ECHO_MODEL, {**ECHO_MODEL, "name": "echo2"}]
            notes = app.reload(parse_config(second))
            assert any("'models' changed" in note for note in notes)
            assert any("new tenant(s) b" in note for note in notes)
            await b.infer("echo", X)  # b exists now ...
            with pytest.raises(RateLimited):  # ... with its limit
                await b.infer("echo", X)
            assert [m.name for m in await b.models()] == ["echo"]  # echo2: at restart
        async with (
            AsyncClient(target, api_key="key-a") as old,
            AsyncClient(target, api_key="key-a2") as new,
        ):
            with pytest.raises(Unauthenticated):  # the rotated-out key is revoked
                await old.infer("echo", X)
            await new.infer("echo", X)


def test_sighup_reloads_and_refuses_a_broken_file(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "mandant.yaml"
    path.write_text(yaml.safe_dump(_config(port, a={"api_keys": [hash_key("key-a")]})))
    with mandant_serve(path) as proc:
        path.write_text("tenants: [{id: a, api_keys: [not-a-hash]}]")
        proc.send_signal(signal.SIGHUP)
        wait_for(proc, "configuration reload refused")
        with Client(f"127.0.0.1:{port}", api_key="key-a") as client:
            client.infer("echo", X)  # still the old configuration
        path.write_text(yaml.safe_dump(_config(port, a={"api_keys": [hash_key("key-new")]})))
        proc.send_signal(signal.SIGHUP)
        wait_for(proc, "configuration reloaded")
        with Client(f"127.0.0.1:{port}", api_key="key-new") as client:
            client.infer("echo", X)
        with Client(f"127.0.0.1:{port}", api_key="key-a") as client, pytest.raises(Unauthenticated):
            client.infer("echo", X)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
