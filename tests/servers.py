"""Real Mandant servers for tests: an :class:`App` on port 0, in a thread of its own
with its own event loop, so that sync clients (tritonclient.grpc, mandant_client) and
async ones (in the test's loop) both call it over real loopback gRPC."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mandant.app import App
from mandant.config import MandantConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "examples" / "demo" / "mandant.yaml"
DEMO_KEYS = {"acme": "acme-demo-key", "globex": "globex-demo-key", "initech": "initech-demo-key"}

T = TypeVar("T")


def demo_config(batching: dict[str, Any] | None = None, **server: Any) -> MandantConfig:
    """The demo configuration, with ports 0 and any ``server`` overrides; ``batching``
    replaces the shared classifier's batching section."""
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, **server}
    if batching is not None:
        data["models"][0]["batching"] = batching
    return parse_config(data, str(DEMO_CONFIG))


def auth(tenant_or_key: str) -> dict[str, str]:
    key = DEMO_KEYS.get(tenant_or_key, tenant_or_key)
    return {"authorization": f"Bearer {key}"}


class ServerThread:
    def __init__(self, config: MandantConfig, base_dir: Path) -> None:
        self._config = config
        self._base_dir = base_dir
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.app: App | None = None

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout_s)

    def start(self) -> ServerThread:
        self._thread.start()

        async def start() -> App:
            app = App(self._config, self._base_dir)
            await app.start()
            return app

        self.app = self.call(start())
        return self

    @property
    def target(self) -> str:
        assert self.app is not None
        return f"127.0.0.1:{self.app.grpc_port}"

    def stop(self, grace_s: float = 0) -> None:
        if self.app is not None:
            self.call(self.app.aclose(grace_s))
            self.app = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
