"""Models the benchmarks serve that the demo does not ship (importable by a server
started from the repository root, as ``benchmarks._models:<factory>``)."""

from __future__ import annotations

import time

import torch
from torch import nn


class PacedEcho(nn.Module):
    """The identity, taking ``seconds`` per forward pass whatever the batch: a model
    whose cost is per execution (a GPU kernel's launch, a remote call), so that the
    size of the batches it is given decides how much it serves."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def paced_echo(seconds: float = 0.01) -> nn.Module:
    return PacedEcho(seconds)


class Widen(nn.Module):
    """Each one-value row answered as ``width`` copies of it: answers far larger than
    their requests."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(x.shape[0], self.width).contiguous()


def widen(width: int = 1 << 20) -> nn.Module:
    return Widen(width)
