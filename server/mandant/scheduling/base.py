"""The scheduling seam: what stands between the data plane and a backend."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mandant.types import InferRequest


class Scheduler(Protocol):
    """Runs requests for one model version on its backend, in whatever grouping
    and order it decides. ``submit`` returns that request's own outputs."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def submit(self, request: InferRequest) -> dict[str, np.ndarray]: ...
