"""A model that runs only when the test lets it: ``GATE`` closed, every forward pass
waits (in the backend's thread), so calls pile up in the batcher's queue exactly as a
test arranges them. Referenced from configs as ``tests.integration.gated_models:gated``;
the server must run in the test's process (``tests.servers.ServerThread``)."""

from __future__ import annotations

import threading

import torch
from torch import nn

GATE = threading.Event()
GATE.set()
#: A forward pass never waits longer than this (a failed test must not hang the run).
MAX_WAIT_S = 30.0


class Gated(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        GATE.wait(MAX_WAIT_S)
        return x


def gated() -> nn.Module:
    return Gated()


#: What a pass over a negative value (poison) waits for, after setting ``POISONED``.
POISON_GATE = threading.Event()
POISON_GATE.set()
POISONED = threading.Event()


class Poisoned(nn.Module):
    """:class:`Gated`, except that a pass over a negative value says so (``POISONED``),
    waits at ``POISON_GATE`` instead, and raises."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            POISONED.set()
            POISON_GATE.wait(MAX_WAIT_S)
            raise ValueError("poisoned rows")
        GATE.wait(MAX_WAIT_S)
        return x


def poisoned() -> nn.Module:
    return Poisoned()
