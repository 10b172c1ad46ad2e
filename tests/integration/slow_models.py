"""Models for lifecycle tests, referenced from configs as ``module:factory``."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn


class Sleepy(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x * 2


def sleepy(seconds: float = 1.0) -> nn.Module:
    return Sleepy(seconds)


def slow_to_load(seconds: float = 2.0, started: str = "") -> nn.Module:
    """Takes ``seconds`` to build, once it has created the file ``started`` (if named):
    a server that loads it is starting for that long."""
    if started:
        Path(started).touch()
    time.sleep(seconds)
    return Sleepy(0.0)


class Lookup(nn.Module):
    """An embedding of ``size`` ids (row r of the table holds r everywhere): an id out
    of range raises inside the forward pass, as a real embedding would."""

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        self.table = nn.Embedding(size, width)
        with torch.no_grad():
            self.table.weight.copy_(
                torch.arange(size, dtype=torch.float32)[:, None].expand(-1, width)
            )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids[:, 0])


def lookup(size: int = 100, width: int = 4, seconds: float = 0.0) -> nn.Module:
    """``seconds``: how long every forward pass takes before it looks up (or raises)."""
    return SlowLookup(size, width, seconds) if seconds else Lookup(size, width)


class SlowLookup(Lookup):
    def __init__(self, size: int, width: int, seconds: float) -> None:
        super().__init__(size, width)
        self.seconds = seconds

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return super().forward(ids)
