"""Shared fakes for tests: a backend that doubles its input, a hand-driven clock, a
backend whose batches finish when the test says so, and an observer that records what
it is told."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from mandant.config import ModelSpec
from mandant.types import InferRequest, ModelKey, Tenant

_T = TypeVar("_T")


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
        hold_on_cancel: bool = False,
    ) -> dict[str, np.ndarray]:
        self.calls.append(dict(inputs))
        name = self.spec.outputs[0].name if self.spec else "OUTPUT0"
        return {name: next(iter(inputs.values())) * 2}


# -- scheduling ---------------------------------------------------------------------

MODEL = ModelKey("m", "1")


class FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time stands still until :meth:`advance`; timers fire in order as it passes."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._timers: list[tuple[float, int, FakeTimer, Callable[[], object]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> FakeTimer:
        timer = FakeTimer()
        heapq.heappush(self._timers, (when, next(self._seq), timer, callback))
        return timer

    @property
    def armed(self) -> int:
        """Timers neither fired nor cancelled."""
        return sum(1 for _, _, timer, _ in self._timers if not timer.cancelled)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while self._timers and self._timers[0][0] <= self.now:
            _, _, timer, callback = heapq.heappop(self._timers)
            if not timer.cancelled:
                callback()


def double(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OUT0 = 2·x, OUT1 = the row sums of x (two outputs, to check splitting)."""
    x = inputs["x"]
    return {"OUT0": x * 2, "OUT1": x.sum(axis=1, keepdims=True)}


#: A value the model "cannot handle": :func:`double_unless_poisoned` raises on it.
POISON = -1.0


class PoisonError(ValueError):
    """What :func:`double_unless_poisoned` raises: a model failing on bad data."""


def double_unless_poisoned(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`double`, except that it raises (as a model given an out-of-range id
    would) when any value of the batch is :data:`POISON`."""
    if (inputs["x"] == POISON).any():
        raise PoisonError("index out of range in self")
    return double(inputs)


@dataclass(eq=False)
class Call:
    inputs: dict[str, np.ndarray]
    gate: asyncio.Future[None]
    error: BaseException | None = None
    outputs: tuple[str, ...] | None = None
    deadline: float | None = None

    @property
    def rows(self) -> int:
        return int(self.inputs["x"].shape[0])


@dataclass(eq=False)
class GatedBackend:
    """Each ``infer`` call waits until the test releases it (``auto``: it does not)."""

    max_concurrency: int = 1
    auto: bool = False
    compute: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] = double
    calls: list[Call] = field(default_factory=list)
    running: list[Call] = field(default_factory=list)
    clock: FakeClock | None = None
    compute_s: float = 0.0

    ready = True
    platform = "fake"

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
        hold_on_cancel: bool = False,
    ) -> dict[str, np.ndarray]:
        call = Call(
            dict(inputs),
            asyncio.get_running_loop().create_future(),
            outputs=None if outputs is None else tuple(outputs),
            deadline=deadline,
        )
        self.calls.append(call)
        if not self.auto:
            self.running.append(call)
            await call.gate
        if self.clock is not None:
            self.clock.advance(self.compute_s)
        if call.error is not None:
            raise call.error
        return self.compute(inputs)

    def release(self, count: int = 1, error: BaseException | None = None) -> None:
        """Let the oldest ``count`` running calls finish (raising ``error``)."""
        for _ in range(min(count, len(self.running))):
            call = self.running.pop(0)
            call.error = error
            call.gate.set_result(None)


@dataclass
class RecordingObserver:
    timings: list[tuple[str, str, float, float]] = field(default_factory=list)
    batches: list[tuple[str, int, float, dict[str, int]]] = field(default_factory=list)
    rejections: list[tuple[str, str, str]] = field(default_factory=list)  # tenant, reason, model
    failed_batches: list[tuple[str, int]] = field(default_factory=list)
    #: The ``owner`` of each batch and failed batch, in the same order.
    batch_owners: list[str] = field(default_factory=list)
    failed_batch_owners: list[str] = field(default_factory=list)
    refunds: list[tuple[str, str, int]] = field(default_factory=list)
    finished: list[tuple[str, str, str, str]] = field(default_factory=list)

    def request_finished(
        self,
        tenant: str,
        model: str,
        code: str,
        duration_s: float,
        version: str = "",
        inference: bool = False,
        owner: str = "",
        busy: bool = False,
    ) -> None:
        self.finished.append((tenant, model, version, code))

    def request_timing(self, tenant: str, model: str, queue_s: float, compute_s: float) -> None:
        self.timings.append((tenant, model, queue_s, compute_s))

    def batch_executed(
        self,
        model: str,
        size: int,
        compute_s: float,
        rows_by_tenant: Mapping[str, int],
        owner: str = "",
    ) -> None:
        self.batches.append((model, size, compute_s, dict(rows_by_tenant)))
        self.batch_owners.append(owner)

    def batch_failed(self, model: str, size: int, owner: str = "") -> None:
        self.failed_batches.append((model, size))
        self.failed_batch_owners.append(owner)

    def admitted(self, tenant: str, model: str, rows: int) -> None:
        return None

    def refunded(self, tenant: str, model: str, rows: int, admitted_at: float = 0.0) -> None:
        self.refunds.append((tenant, model, rows))

    def rejected(self, tenant: str, reason: str, model: str = "") -> None:
        self.rejections.append((tenant, reason, model))

    def store_error(self, store: str) -> None:
        return None

    def calls_gathered(self, calls: int) -> None:
        return None


_ids = itertools.count()


def request(
    tenant: str | Tenant = "a",
    rows: int = 1,
    width: int = 4,
    value: float | None = None,
    deadline: float | None = None,
    priority: int = 0,
    x: np.ndarray | None = None,
) -> InferRequest:
    """A request whose rows are recognisable: row r holds ``value + r`` everywhere."""
    number = next(_ids)
    if x is None:
        base = float(number if value is None else value)
        x = (base + np.arange(rows, dtype=np.float32))[:, None] * np.ones(width, np.float32)
    return InferRequest(
        tenant=tenant if isinstance(tenant, Tenant) else Tenant(tenant),
        model=MODEL,
        inputs={"x": x},
        outputs=("OUT0", "OUT1"),
        request_id=f"req-{number}",
        deadline=deadline,
        priority=priority,
        rows=int(x.shape[0]) if x.ndim else 1,
    )


async def settle(rounds: int = 10) -> None:
    """Let every ready callback and task run (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def with_loop_turns(work: Awaitable[_T]) -> tuple[_T, int]:
    """``work``'s result, and how many turns the event loop took meanwhile."""
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counting = asyncio.create_task(count_turns())
    try:
        return await work, turns
    finally:
        counting.cancel()
