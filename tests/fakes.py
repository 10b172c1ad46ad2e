"""Shared fakes for unit tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mandant.config import ModelSpec


class FakeBackend:
    """Doubles every input into the first declared output; counts calls."""

    platform = "fake"

    def __init__(
        self, spec: ModelSpec | None = None, ready: bool = True, concurrency: int = 1
    ) -> None:
        self.spec = spec
        self._ready = ready
        self.max_concurrency = concurrency
        self.calls: list[dict[str, np.ndarray]] = []

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self._ready = False

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        self.calls.append(dict(inputs))
        name = self.spec.outputs[0].name if self.spec else "OUTPUT0"
        return {name: next(iter(inputs.values())) * 2}
