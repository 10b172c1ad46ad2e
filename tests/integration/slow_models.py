"""Models for lifecycle tests, referenced from configs as ``module:factory``."""

from __future__ import annotations

import time

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
