"""The dynamic batcher: the asyncio half of scheduling for one model version.

Each request waits in the policy's queues (``policy.py``) with an
:class:`asyncio.Future`. Whenever something changes — a request arrives, a batch
finishes, a timer fires — :meth:`DynamicBatcher._pump` fills every idle execution
slot (``backend.max_concurrency``) with a batch, so there is no dispatcher task to
wake. Two dispatch modes:

* ``eager`` (default): a batch leaves as soon as a slot is idle; while every slot is
  busy the next batch forms by itself. At low load nobody waits for company.
* ``delay``: as Triton's dynamic batcher — wait while the oldest request is younger
  than ``max_queue_delay_ms`` unless a preferred or the maximum size can be formed.

Inputs are concatenated along dimension 0 (by the backend's ``stack_inputs`` where it
has one, e.g. into pinned memory on CUDA), outputs sliced back per request. Deadlines
are clock timers: a request whose deadline passes while queued is answered
DeadlineExceeded and never runs. A cancelled caller leaves the queue at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from mandant.backends.base import Backend
from mandant.config import BatchingConfig
from mandant.errors import DeadlineExceeded, InvalidInput, MandantError, QueueFull, Unavailable
from mandant.events import NullObserver, Observer
from mandant.scheduling.clock import Clock, LoopClock, Timer
from mandant.scheduling.policy import BatchQueue, FairQueue, FifoQueue, priority_level
from mandant.types import InferRequest
from mandant.validation import check_batch_rows

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]


class BatchFailed(RuntimeError):
    """A batch's execution failed: every request in it gets one of these (chained to
    the backend's error). Not a MandantError, so clients see INTERNAL with a
    generic message and the request id is logged."""


@runtime_checkable
class InputStacker(Protocol):
    """Optional backend method: concatenate requests' inputs along dimension 0,
    e.g. into pinned host memory so the copy to a GPU is asynchronous."""

    def stack_inputs(self, parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]: ...


def concatenate(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


@dataclass(eq=False, slots=True)
class _Pending:
    """One waiting request, as the policy sees it, with the future its caller awaits."""

    request: InferRequest
    future: asyncio.Future[Outputs]
    tenant: str
    weight: float
    rows: int
    level: int
    group: Hashable
    arrival: float
    timer: Timer | None = None
    queued: bool = True


class DynamicBatcher:
    """Batches the requests of one model version across tenants (see module doc)."""

    def __init__(
        self,
        backend: Backend,
        config: BatchingConfig,
        model: str,
        observer: Observer | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._backend = backend
        self._config = config
        self._model = model
        self._observer: Observer = observer or NullObserver()
        self._clock: Clock = clock or LoopClock()
        self._queue: BatchQueue[_Pending] = FairQueue() if config.policy == "fair" else FifoQueue()
        self._max_rows = config.max_batch_size
        self._preferred = tuple(sorted(p for p in config.preferred_batch_sizes if p > 0))
        self._delay_s = config.max_queue_delay_ms / 1000.0
        self._eager = config.dispatch == "eager"
        self._stack = backend.stack_inputs if isinstance(backend, InputStacker) else concatenate
        self._slots = max(1, backend.max_concurrency)
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._delay_timer: Timer | None = None
        self._delay_due: float | None = None
        self._batch_s = 0.0  # moving average of a batch's compute time, for retry hints
        self._open = False

    async def start(self) -> None:
        self._open = True

    async def aclose(self) -> None:
        """Refuse new requests, answer queued ones Unavailable, let running batches end."""
        self._open = False
        self._cancel_delay_timer()
        while len(self._queue):
            for entry in self._queue.take(self._max_rows):
                self._finish(entry, exc=Unavailable(f"model '{self._model}' is shutting down"))
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def submit(self, request: InferRequest) -> Outputs:
        if not self._open:
            raise Unavailable(f"model '{self._model}' is not serving")
        group = self._check(request)
        now = self._clock.monotonic()
        if request.deadline is not None and request.deadline <= now:
            raise DeadlineExceeded("deadline exceeded before the request was queued")
        tenant = request.tenant.id
        cap = self._config.max_queue_rows
        if cap is not None and self._queue.rows_of(tenant) + request.rows > cap:
            self._observer.rejected(tenant, "queue_full")
            raise QueueFull(
                f"queue of model '{self._model}' is full for this tenant ({cap} rows)",
                retry_after_s=self._retry_after_s(self._queue.rows_of(tenant)),
            )
        entry = _Pending(
            request=request,
            future=asyncio.get_running_loop().create_future(),
            tenant=tenant,
            weight=request.tenant.weight,
            rows=request.rows,
            level=priority_level(request.priority),
            group=group,
            arrival=now,
        )
        self._queue.push(entry)
        if request.deadline is not None:
            entry.timer = self._clock.call_at(request.deadline, lambda: self._expire(entry))
        self._pump()
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._withdraw(entry)
            raise

    # -- queue --------------------------------------------------------------------

    def _check(self, request: InferRequest) -> Hashable:
        """Refuse what cannot be batched; return the request's shape group."""
        check_batch_rows(self._model, request.rows, self._max_rows)
        group = []
        for name in sorted(request.inputs):
            array = request.inputs[name]
            if array.ndim == 0 or array.shape[0] != request.rows:
                raise InvalidInput(
                    f"input '{name}': every input of model '{self._model}' has the batch "
                    f"({request.rows} rows) as its first dimension"
                )
            group.append((name, array.dtype.str, array.shape[1:]))
        return tuple(group)

    def _withdraw(self, entry: _Pending) -> None:
        """The caller went away: free its place in the queue now."""
        if entry.queued and self._queue.remove(entry):
            entry.queued = False
            if entry.timer is not None:
                entry.timer.cancel()

    def _expire(self, entry: _Pending) -> None:
        if entry.queued and self._queue.remove(entry):
            entry.queued = False
            self._finish(entry, exc=DeadlineExceeded("deadline exceeded while queued"))

    def _retry_after_s(self, queued_rows: int) -> float:
        batches = math.ceil((queued_rows + 1) / self._max_rows)
        return max(0.001, self._batch_s * batches / self._slots, self._delay_s)

    # -- dispatch -----------------------------------------------------------------

    def _pump(self) -> None:
        """Start batches while an execution slot is idle and one is due."""
        while self._running < self._slots and len(self._queue) and self._open:
            now = self._clock.monotonic()
            if not self._due(now):
                return
            batch = []
            for entry in self._queue.take(self._target_rows()):
                entry.queued = False
                if entry.timer is not None:
                    entry.timer.cancel()
                deadline = entry.request.deadline
                if deadline is not None and deadline <= now:
                    self._finish(entry, exc=DeadlineExceeded("deadline exceeded while queued"))
                elif not entry.future.done():
                    batch.append(entry)
            if batch:
                self._running += 1
                task = asyncio.create_task(self._execute(batch, now))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _due(self, now: float) -> bool:
        """Whether a batch should leave now; in delay mode, arm the timer if not."""
        rows = self._queue.rows
        if self._eager or rows >= self._max_rows:
            return True
        if self._preferred and rows >= self._preferred[0]:
            return True
        oldest = self._queue.oldest_arrival()
        if oldest is None:
            return False
        due = oldest + self._delay_s
        if now >= due:
            return True
        if self._delay_due != due:
            self._cancel_delay_timer()
            self._delay_due = due
            self._delay_timer = self._clock.call_at(due, self._on_delay_timer)
        return False

    def _on_delay_timer(self) -> None:
        self._delay_timer = self._delay_due = None
        self._pump()

    def _cancel_delay_timer(self) -> None:
        if self._delay_timer is not None:
            self._delay_timer.cancel()
        self._delay_timer = self._delay_due = None

    def _target_rows(self) -> int:
        """The largest preferred size that can be formed, else the maximum."""
        available = min(self._queue.rows, self._max_rows)
        fitting = [p for p in self._preferred if p <= available]
        return fitting[-1] if fitting else self._max_rows

    # -- execution ----------------------------------------------------------------

    async def _execute(self, batch: list[_Pending], dispatched: float) -> None:
        try:
            rows = sum(entry.rows for entry in batch)
            if len(batch) == 1:
                inputs = batch[0].request.inputs
            else:
                inputs = self._stack([entry.request.inputs for entry in batch])
            start = self._clock.monotonic()
            wanted = tuple(dict.fromkeys(n for e in batch for n in e.request.outputs))
            deadlines = [entry.request.deadline for entry in batch]
            latest = None if None in deadlines else max(d for d in deadlines if d is not None)
            outputs = await self._backend.infer(inputs, outputs=wanted, deadline=latest)
            compute_s = self._clock.monotonic() - start
            parts = _split(outputs, batch, rows)
        except MandantError as exc:
            for entry in batch:
                self._finish(entry, exc=exc)
        except Exception as exc:
            logger.error(
                "batch of %d request(s) on model %s failed; request ids: %s",
                len(batch),
                self._model,
                ", ".join(entry.request.request_id for entry in batch),
                exc_info=exc,
            )
            for entry in batch:
                failure = BatchFailed(f"batch execution failed on model '{self._model}'")
                failure.__cause__ = exc
                self._finish(entry, exc=failure)
        except BaseException:
            for entry in batch:
                self._finish(entry, exc=Unavailable(f"model '{self._model}' is shutting down"))
            raise
        else:
            self._batch_s = (
                compute_s if not self._batch_s else 0.8 * self._batch_s + 0.2 * compute_s
            )
            shares = Counter[str]()
            for entry, part in zip(batch, parts, strict=True):
                shares[entry.tenant] += entry.rows
                self._observer.request_timing(
                    entry.tenant, self._model, dispatched - entry.arrival, compute_s
                )
                self._finish(entry, result=part)
            self._observer.batch_executed(self._model, rows, compute_s, shares)
        finally:
            self._running -= 1
            self._pump()

    @staticmethod
    def _finish(
        entry: _Pending, result: Outputs | None = None, exc: BaseException | None = None
    ) -> None:
        if entry.future.done():  # its caller was cancelled
            return
        if exc is not None:
            entry.future.set_exception(exc)
        else:
            assert result is not None
            entry.future.set_result(result)


def _split(
    outputs: Mapping[str, np.ndarray], batch: Sequence[_Pending], rows: int
) -> list[Outputs]:
    """Each request's own rows of every output (views, no copies)."""
    if len(batch) == 1:
        return [dict(outputs)]
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise RuntimeError(
                f"output {name!r} has shape {list(array.shape)} for a batch of {rows} rows; "
                "a batched model must keep the batch as dimension 0"
            )
    parts: list[Outputs] = []
    offset = 0
    for entry in batch:
        end = offset + entry.rows
        parts.append({name: array[offset:end] for name, array in outputs.items()})
        offset = end
    return parts
