"""Models for the model-control tests, loaded by the torch backend as
``tests.integration.control_models:<factory>``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from torch import nn

#: Set to let :class:`Gated` answer; its calls wait on it (at most a minute).
RELEASE = threading.Event()
#: Set to let :func:`slow_to_load` return: its load waits on it (at most a minute).
LOADED = threading.Event()


class Doubled(nn.Module):
    def forward(self, value: Any) -> Any:
        return value * 2


class Tripled(nn.Module):
    def forward(self, value: Any) -> Any:
        return value * 3


class Gated(nn.Module):
    """Echoes its input once :data:`RELEASE` is set: calls stay in flight until then."""

    def forward(self, value: Any) -> Any:
        RELEASE.wait(60)
        return value


class Failing(nn.Module):
    """Fails every call: a warm-up of it fails the load."""

    def forward(self, value: Any) -> Any:
        raise RuntimeError("this model fails every call")


def doubled() -> nn.Module:
    return Doubled()


def tripled() -> nn.Module:
    return Tripled()


def gated() -> nn.Module:
    return Gated()


def failing() -> nn.Module:
    return Failing()


def slow_to_load() -> nn.Module:
    """:class:`Doubled`, once :data:`LOADED` is set."""
    LOADED.wait(60)
    return Doubled()


def needs_file(path: str) -> nn.Module:
    """:class:`Doubled`, once the file ``path`` (its weights, say) is there."""
    if not Path(path).exists():
        raise RuntimeError("weights missing")
    return Doubled()


def broken() -> nn.Module:
    raise RuntimeError("weights missing")


def broken_at_a_socket() -> nn.Module:
    """Fails to load, its reason quoting a Unix socket's address."""
    raise RuntimeError("weights service at unix:/run/weights.sock refused")
