"""The demo's models, referenced from ``examples/demo/mandant.yaml`` as ``module:callable``.

Weights come from a local :class:`torch.Generator` seeded with ``seed``: the same seed
gives the same weights on every run and machine, and the global RNG is left untouched.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn


def classifier(seed: int = 0, hidden: int = 512) -> nn.Module:
    """MLP 256 → hidden → ReLU → hidden → ReLU → 16, FP32; ``[N, 256]`` in, ``[N, 16]``
    out. The demo uses ``hidden=512``; benchmarks widen it to make compute dominate."""
    return _mlp((256, hidden, hidden, 16), seed)


def build_classifier_weights(path: Path, seed: int = 0, hidden: int = 512) -> None:
    """Save ``classifier(seed, hidden)``'s state dict as safetensors at ``path``."""
    save_file(classifier(seed, hidden).state_dict(), str(path))


def fraud(seed: int = 2) -> nn.Module:
    """MLP 32 → 64 → ReLU → 1 → sigmoid; ``[N, 32]`` in, a score ``[N, 1]`` out."""
    return nn.Sequential(*_mlp((32, 64, 1), seed), nn.Sigmoid()).eval()


def build_fraud_torchscript(path: Path, seed: int = 2) -> None:
    """Save ``fraud(seed)`` as TorchScript at ``path``."""
    torch.jit.save(torch.jit.script(fraud(seed)), str(path))


class Echo(nn.Module):
    """Returns its one input unchanged: any shape, any dtype, numpy BYTES arrays too."""

    def forward(self, value: Any) -> Any:
        return value


class EchoAll(nn.Module):
    """Returns all its positional inputs unchanged, as a tuple."""

    def forward(self, *values: Any) -> tuple[Any, ...]:
        return values


def echo() -> nn.Module:
    return Echo()


def echo_all() -> nn.Module:
    return EchoAll()


def _mlp(sizes: tuple[int, ...], seed: int) -> nn.Sequential:
    """Linear layers with ReLU between them, initialised like ``nn.Linear`` does
    (uniform in ±1/√fan_in) but from a local generator."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if index:
            layers.append(nn.ReLU())
        linear = nn.Linear(fan_in, fan_out, device="meta").to_empty(device="cpu")
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.uniform_(-bound, bound, generator=generator)
        layers.append(linear)
    return nn.Sequential(*layers).eval()
