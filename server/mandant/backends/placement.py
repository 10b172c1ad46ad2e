"""Where a model's instances run: a pure plan from its configured ``devices`` and
``instances`` and the number of GPUs this process sees (no torch here).

Triton's ``instance_group`` semantics: ``instances`` copies on *each* device.
``auto`` is every visible GPU, or the CPU where there is none; ``cuda`` is every
visible GPU; ``cuda:N`` or a list of them is those GPUs. Instances are ordered
round-robin over the devices (``cuda:0``'s first, ``cuda:1``'s first, ``cuda:0``'s
second …), so a pool that hands out the longest-idle instance first spreads load
over the devices. The plan does not check that its GPUs exist: :meth:`Placement.missing`
says which do not, for the backend to refuse at start with a clear message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mandant.config import gpu_index


@dataclass(frozen=True, slots=True)
class InstancePlace:
    """One instance: its device (``cpu`` or ``cuda:N``) and its number on that device."""

    device: str
    ordinal: int


@dataclass(frozen=True, slots=True)
class Placement:
    devices: tuple[str, ...]
    per_device: int

    @property
    def on_cuda(self) -> bool:
        return self.devices[0] != "cpu"

    @property
    def instances(self) -> tuple[InstancePlace, ...]:
        return tuple(
            InstancePlace(device, ordinal)
            for ordinal in range(self.per_device)
            for device in self.devices
        )

    @property
    def size(self) -> int:
        """How many instances in all (how many batches may run at once)."""
        return len(self.devices) * self.per_device

    def missing(self, visible_gpus: int) -> tuple[str, ...]:
        """The planned devices this process cannot see."""
        indices = [(device, gpu_index(device)) for device in self.devices]
        return tuple(device for device, n in indices if n is not None and n >= visible_gpus)


def place(requested: Sequence[str], per_device: int, visible_gpus: int) -> Placement:
    """The plan for ``requested`` (a model spec's ``devices``, already validated by
    :func:`mandant.config.check_devices`) with ``per_device`` instances on each."""
    if per_device < 1:
        raise ValueError("instances must be at least 1")
    every_gpu = tuple(f"cuda:{index}" for index in range(visible_gpus))
    match tuple(requested):
        case ("auto",):
            devices = every_gpu or ("cpu",)
        case ("cpu",):
            devices = ("cpu",)
        case ("cuda",):
            devices = every_gpu or ("cuda:0",)  # missing(): refused at start
        case ():
            raise ValueError("no device requested")
        case named:
            devices = named
    return Placement(devices, per_device)
