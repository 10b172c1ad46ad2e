"""Where the processes of ``workers: N`` meet: two sockets in a private folder that
the supervisor makes (mode 0700, so only this user's processes reach them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class EngineSockets:
    """``requests``: the engine's Unix socket for the front ends' inference calls;
    ``control``: its private gRPC server for the RPCs front ends forward."""

    folder: Path

    @property
    def requests(self) -> Path:
        return self.folder / "engine.sock"

    @property
    def control(self) -> str:
        return f"unix:{self.folder / 'control.sock'}"
