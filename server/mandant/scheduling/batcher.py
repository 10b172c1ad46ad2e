"""The dynamic batcher: the asyncio half of scheduling for one model version.

Each request waits in the policy's queues (``policy.py``) with an
:class:`asyncio.Future`. Whenever something changes — a request arrives, a batch
finishes, a timer fires — :meth:`DynamicBatcher._pump` fills every idle execution
slot (``backend.max_concurrency``) with a batch, so there is no dispatcher task to
wake. Three dispatch modes:

* ``adaptive`` (default): the pump runs at the end of the current event-loop turn, so
  requests woken together leave together, and a batch is held while company is
  expected, within ``max_queue_delay_ms`` (``adaptive.py``). A lone caller never waits.
* ``eager``: a batch leaves as soon as a slot is idle; while every slot is busy the
  next batch forms by itself.
* ``delay``: as Triton's dynamic batcher — wait while the oldest request is younger
  than ``max_queue_delay_ms`` unless a preferred or the maximum size can be formed.

Inputs are concatenated along dimension 0 (by the backend's ``infer_batch`` where it
has one, e.g. into its instance's pinned buffers on CUDA, off the event loop), outputs
sliced back per request. A request whose deadline passes while queued is answered
DeadlineExceeded and never runs: one clock timer, armed at the earliest deadline that
may still be queued, finds the requests it is due for (not a timer per request: under
load nearly every request leaves in a batch long before its deadline, and arming and
cancelling a timer for each cost more than the rest of its queueing). A cancelled
caller leaves the queue at once.

A tenant's queue holds at most ``max_queue_rows`` rows. Rows the idle execution slots
are about to take do not wait, so a request may be admitted over its tenant's cap on
them; but after the pump the rows a tenant has waiting are within its cap again, the
requests admitted over it that did not leave (another tenant's rows may have filled
the batch) refused QueueFull, newest first. A per-tenant check at admission alone let
every tenant of one event-loop turn count the same leaving rows. The parts of a failed
batch queued again count among their tenant's rows (its next calls may be refused
QueueFull meanwhile), but are never refused themselves: they were admitted.

A batch the model raises on (anything but a MandantError) is counted
(``Observer.batch_failed``) and split until the request(s) it fails on alone are found:
those get ModelFailed, every other request its normal result. While the model works,
the parts (by tenant, then halves) wait again in their tenants' queues, ahead of each
tenant's other calls and batched with nothing else, and run at their tenant's turns
(:meth:`DynamicBatcher._split_queued`): the split costs the failing tenant's share of
the model. Once the model may be at fault itself, the split runs in the slot, where
``isolation.py`` tells the model's failure from the data's. Should taking a batch
from the queue or running it raise anything else (a bug), every request it took is
answered all the same (an internal error, logged once), never left waiting.
Batches run in a fresh ``contextvars.Context``, so nothing they log carries the tenant
or request id of whichever request happened to wake the batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import itertools
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mandant.backends.base import Backend
from mandant.config import BatchingConfig
from mandant.errors import (
    DeadlineExceeded,
    DeadlinePassedWhileRunning,
    InvalidInput,
    MandantError,
    ModelFailed,
    QueueFull,
    Unavailable,
)
from mandant.events import NullObserver, Observer
from mandant.scheduling.adaptive import AdaptiveDispatch
from mandant.scheduling.clock import Clock, LoopClock, Timer
from mandant.scheduling.isolation import Isolation, failure_log, parts_of, raised
from mandant.scheduling.policy import (
    BatchQueue,
    FairQueue,
    FifoQueue,
    TakeFailed,
    priority_level,
)
from mandant.types import InferRequest
from mandant.validation import check_batch_rows

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]


@runtime_checkable
class BatchInfer(Protocol):
    """Optional backend method: ``infer`` on several requests' inputs, which it
    concatenates along dimension 0 itself (e.g. into the pinned buffers of the instance
    that runs them, so the copy to a GPU is asynchronous)."""

    async def infer_batch(
        self,
        parts: Sequence[Mapping[str, np.ndarray]],
        *,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]: ...


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
    queued: bool = True
    #: its item in the batcher's deadline heap while it waits (``_watch_deadline``)
    watch: list[Any] | None = None
    #: the failed batch it is a part of, queued again to be run apart
    #: (``_split_queued``); None: it has not failed
    split: _Split | None = None


@dataclass(eq=False, slots=True)
class _Split:
    """A failed batch whose parts are queued again (``DynamicBatcher._split_queued``),
    judged once all its requests are answered (``_judge``). ``successes``: the
    batcher's count of answered runs when it failed."""

    entries: list[_Pending]
    successes: int
    tenants: int
    judged: bool = False


#: The queue level of the parts of a failed batch queued again: before the tenant's
#: every other request (v2 priorities are 1 and up), so that they are answered first.
ISOLATING_LEVEL = 0

#: Failed batches in a row, with no run of the model answered since, after which the
#: model itself may be at fault (``Isolation``): one tenant's bad calls fail its
#: batches too, so a few say nothing of the model; a failed batch of several tenants
#: with nothing answered while it was split says it at once. A batch split by queueing
#: its parts counts once they have all been answered (``_judge``).
SUSPECT_AFTER = 3


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
        self._mode = config.dispatch
        self._adaptive = AdaptiveDispatch(self._delay_s, self._max_rows)
        self._batch_infer = backend if isinstance(backend, BatchInfer) else None
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._delay_timer: Timer | None = None
        self._delay_due: float | None = None
        self._wake_pending = False  # adaptive: a pump is scheduled for this loop turn
        self._held: int | None = None  # adaptive: requests queued when a hold began
        #: <= every queued request's deadline; the expiry timer is armed at it
        self._deadline_floor: float | None = None
        self._expiry_timer: Timer | None = None
        #: a heap of [deadline, seq, entry] of the queued requests that have one; an
        #: entry that leaves the queue leaves None in its item (``_left_queue``), popped
        #: when it comes to the top or dropped by a rebuild
        self._deadlines: list[list[Any]] = []
        self._watch_seq = itertools.count()
        #: requests admitted over their tenant's cap, on the rows the idle slots are
        #: about to take (``_leaving``); the next pump refuses those still over it
        self._leaning: list[_Pending] = []
        self._batch_s = 0.0  # moving average of a batch's compute time, for retry hints
        #: batches failed in a row with no run answered since (a fresh model's count
        #: starts at SUSPECT_AFTER: it has not been seen working; ``Isolation``)
        self._unanswered = SUSPECT_AFTER
        self._successes = 0  # runs of the model answered, ever
        self._parts_queued = 0  # requests of failed batches queued again, now
        #: a failure of each kind logged in full, the next ones counted (``Isolation``)
        self._failures = failure_log(self._clock)
        self._open = False

    @property
    def queued_rows(self) -> int:
        """Rows waiting in the queue, all tenants together (not those running)."""
        return self._queue.rows

    def queued_rows_of(self, tenant: str) -> int:
        return self._queue.rows_of(tenant)

    async def start(self) -> None:
        self._open = True

    async def aclose(self) -> None:
        """Refuse new requests, answer queued ones Unavailable, let running batches end."""
        self._open = False
        self._leaning.clear()
        self._cancel_delay_timer()
        self._disarm_expiry()
        closing = Unavailable(f"model '{self._model}' is shutting down")
        while len(self._queue):
            try:
                taken = self._queue.take(self._max_rows)
            except TakeFailed as exc:
                self._broken(exc.taken, exc)
                rest = list(self._queue)  # answered too, not left to their deadlines
                for entry in rest:
                    with contextlib.suppress(Exception):
                        self._queue.remove(entry)
                    self._left_queue(entry)
                    self._finish(entry, exc=closing)
                break
            for entry in taken:
                self._left_queue(entry)
                self._finish(entry, exc=closing)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._failures.flush()  # the counts of its last minute, before the loop ends

    async def submit(self, request: InferRequest) -> Outputs:
        if not self._open:
            raise Unavailable(f"model '{self._model}' is not serving")
        group = self._check(request)
        now = self._clock.monotonic()
        if request.deadline is not None and request.deadline <= now:
            raise DeadlineExceeded("deadline exceeded before the request was queued")
        tenant = request.tenant.id
        cap = self._config.max_queue_rows
        waiting = self._queue.rows_of(tenant) + request.rows
        if cap is not None and waiting > cap + self._leaving():
            raise self._queue_full(tenant, cap)
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
        if cap is not None and waiting > cap:  # admitted on the rows about to leave
            self._leaning.append(entry)
        self._watch_deadline(entry, now)
        if self._mode == "adaptive":
            self._adaptive.arrived(now)
            self._wake()
        else:
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
        cap = self._config.max_queue_rows
        if cap is not None and request.rows > cap:  # could never fit: no pushback
            raise InvalidInput(
                f"request of {request.rows} rows exceeds the queue of model "
                f"'{self._model}' ({cap} rows per tenant)"
            )
        group = []
        for name in sorted(request.inputs):
            array = request.inputs[name]
            if array.ndim == 0 or array.shape[0] != request.rows:
                raise InvalidInput(
                    f"input '{name}': every input of model '{self._model}' has the batch "
                    f"({request.rows} rows) as its first dimension"
                )
            group.append((name, array.dtype, array.shape[1:]))
        return tuple(group)

    def _withdraw(self, entry: _Pending) -> None:
        """The caller went away: free its place in the queue now."""
        if entry.queued and self._queue.remove(entry):
            self._left_queue(entry)

    def _left_queue(self, entry: _Pending) -> None:
        if entry.queued and entry.split is not None:
            self._parts_queued -= 1
        entry.queued = False
        if entry.watch is not None:  # its deadline item stays in the heap, empty
            entry.watch[2] = None
            entry.watch = None

    # -- deadlines ----------------------------------------------------------------

    def _watch_deadline(self, entry: _Pending, now: float) -> None:
        """Queued ``entry``'s deadline, if any, into the heap, and the timer armed at it
        when it is the earliest."""
        deadline = entry.request.deadline
        if deadline is None:
            return
        if len(self._deadlines) > 2 * len(self._queue) + 64:
            self._rebuild_deadlines()  # items of requests that left pile up
        entry.watch = [deadline, next(self._watch_seq), entry]
        heapq.heappush(self._deadlines, entry.watch)
        if self._deadline_floor is None or deadline < self._deadline_floor:
            self._arm_expiry(max(deadline, now))

    def _rebuild_deadlines(self) -> None:
        self._deadlines = [item for item in self._deadlines if item[2] is not None]
        heapq.heapify(self._deadlines)

    def _arm_expiry(self, when: float) -> None:
        """Fire at ``when``, the new earliest deadline that may be queued."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._deadline_floor = when
        self._expiry_timer = self._clock.call_at(when, self._on_expiry)

    def _disarm_expiry(self) -> None:
        """Nothing queued: no deadline to watch."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._expiry_timer = self._deadline_floor = None
        self._deadlines.clear()

    def _on_expiry(self) -> None:
        """Answer the queued requests whose deadline has passed, from the top of the
        heap; watch the earliest of the others. (It walked the whole queue at each
        expiry: 20,000 queued calls whose deadlines passed one by one took 8 s of the
        event loop.)"""
        self._expiry_timer = self._deadline_floor = None
        now = self._clock.monotonic()
        heap = self._deadlines
        expired: list[_Pending] = []
        while heap and (heap[0][2] is None or heap[0][0] <= now):
            entry = heapq.heappop(heap)[2]
            if entry is not None:
                expired.append(entry)
        for entry in expired:
            self._queue.remove(entry)
            self._left_queue(entry)
            self._finish(entry, exc=DeadlineExceeded("deadline exceeded while queued"))
        if heap:
            self._arm_expiry(heap[0][0])

    @property
    def _slots(self) -> int:
        """Batches that may run at once: the backend's ``max_concurrency`` (a Triton
        model's follows Triton's model config)."""
        return max(1, self._backend.max_concurrency)

    def _leaving(self) -> int:
        """Rows the idle execution slots may be about to take from the queue: they do
        not wait, so the queue cap does not count them (with adaptive dispatch, requests
        of one event-loop turn all queue before the batch leaves at its end). An upper
        bound, offered to every tenant: a request admitted on it is refused by the next
        pump should its tenant still have more than its cap waiting after the batches
        left (``_refuse_leftovers``)."""
        return max(0, self._slots - self._running) * self._max_rows

    def _queue_full(self, tenant: str, cap: int) -> QueueFull:
        self._observer.rejected(tenant, "queue_full", self._model)
        return QueueFull(
            f"queue of model '{self._model}' is full for this tenant ({cap} rows)",
            retry_after_s=self._retry_after_s(self._queue.rows_of(tenant)),
        )

    def _refuse_leftovers(self, cap: int) -> None:
        """After the idle slots took their batches: refuse the requests admitted on rows
        about to leave (over their tenant's cap), newest first, while their tenant still
        has more than ``cap`` rows waiting. Which rows leave is the policy's choice (by
        weight, across tenants): the allowance a tenant keeps is its own rows that left,
        never another tenant's."""
        leaning, self._leaning = self._leaning, []
        for entry in reversed(leaning):
            if entry.queued and self._queue.rows_of(entry.tenant) > cap:
                self._queue.remove(entry)
                self._left_queue(entry)
                self._finish(entry, exc=self._queue_full(entry.tenant, cap))
        if not len(self._queue):
            self._disarm_expiry()

    def _retry_after_s(self, queued_rows: int) -> float:
        batches = math.ceil((queued_rows + 1) / self._max_rows)
        return max(0.001, self._batch_s * batches / self._slots, self._delay_s)

    # -- dispatch -----------------------------------------------------------------

    def _wake(self) -> None:
        """Adaptive: pump once at the end of this loop turn, so that every request
        woken in the same turn has queued first."""
        if not self._wake_pending:
            self._wake_pending = True
            asyncio.get_running_loop().call_soon(self._on_wake, context=contextvars.Context())

    def _on_wake(self) -> None:
        self._wake_pending = False
        self._pump()

    def _pump(self) -> None:
        """Start batches while an execution slot is idle and one is due; then refuse
        what was admitted on rows about to leave and is still over its tenant's cap."""
        self._start_batches()
        if self._leaning and self._config.max_queue_rows is not None:
            self._refuse_leftovers(self._config.max_queue_rows)

    def _start_batches(self) -> None:
        while self._running < self._slots and len(self._queue) and self._open:
            now = self._clock.monotonic()
            if not self._due(now):
                return
            queued = len(self._queue)
            try:
                taken = self._queue.take(self._target_rows())
            except TakeFailed as exc:
                self._broken(exc.taken, exc)
                return
            batch = []
            for entry in taken:
                self._left_queue(entry)
                deadline = entry.request.deadline
                if deadline is not None and deadline <= now:
                    self._finish(entry, exc=DeadlineExceeded("deadline exceeded while queued"))
                elif not entry.future.done():
                    batch.append(entry)
            if not len(self._queue):
                self._disarm_expiry()
            if self._mode == "adaptive":
                held = self._held is not None
                if taken[0].split is None:  # a part gathers no company: not the window's
                    company = held and queued > (self._held or 0)
                    self._adaptive.dispatched(len(batch), held, company)
                self._held = None
                self._cancel_delay_timer()
            if batch:
                self._running += 1
                # A fresh context: the batch belongs to no single request's tenant.
                task = asyncio.create_task(self._execute(batch, now), context=contextvars.Context())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _due(self, now: float) -> bool:
        """Whether a batch should leave now; if not, arm the timer for when it should."""
        rows = self._queue.rows
        if self._mode == "eager" or rows >= self._max_rows or self._parts_queued:
            return True  # (a failed batch's part waits for no company: it takes none)
        if self._preferred and rows >= self._preferred[0]:
            return True
        if self._mode == "adaptive" and not self._adaptive.window_s:
            return True  # no hold has paid lately: skip the search for the oldest
        oldest = self._queue.oldest_arrival()
        if oldest is None:
            return False
        if self._mode == "adaptive":
            due = self._adaptive.due(now, rows, oldest, self._deadline_floor)
            if due > now and self._held is None:
                self._held = len(self._queue)
        else:
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
        """Run one dispatched batch in its slot; isolate the culprits if it fails."""
        try:
            await self._isolate(batch, dispatched)
        except Exception as exc:  # a bug of ours: answer what is left all the same
            self._broken(batch, exc)
        except BaseException:
            for entry in batch:
                self._finish(entry, exc=Unavailable(f"model '{self._model}' is shutting down"))
            raise
        finally:
            self._running -= 1
            if self._mode == "adaptive":
                self._wake()
            else:
                self._pump()

    async def _isolate(self, batch: list[_Pending], dispatched: float) -> None:
        """Run ``batch``; should the model raise on it, count it and find the requests
        it fails on: while the model works (and the batcher is open), by queueing its
        parts again (:meth:`_split_queued`); once it may be at fault, in this slot
        (:class:`Isolation`, which tells the model's failure from the data's)."""
        batch, failure = await self._attempt(batch, dispatched)
        split = batch[0].split if batch else None
        if not raised(failure):
            if split is not None:
                self._judge(split)
            return
        tenants = len({entry.tenant for entry in batch})
        if split is None:  # a fresh batch, not a part of a failed one
            owner = batch[0].request.model.owner or ""  # one model: one owner
            self._observer.batch_failed(self._model, sum(e.rows for e in batch), owner)
        model_works = split is not None or self._unanswered < SUSPECT_AFTER
        isolation = Isolation(
            self._model,
            lambda part: self._attempt(part, dispatched),
            self._finish,
            model_works=model_works,
            failures=self._failures,
        )
        if model_works and self._open:
            if split is None:
                split = _Split(list(batch), self._successes, tenants)
            self._split_queued(batch, failure, isolation, split)
            self._judge(split)
            return
        # Closing (nothing would take the parts from the queue), or the model may be
        # at fault: split in this slot.
        self._unanswered += 1
        await isolation.run(batch, failure)
        if self._unanswered and tenants > 1:
            # Several tenants' calls failed and nothing ran since: the model may be at
            # fault at once (one tenant's failures may all be its own data's).
            self._unanswered = SUSPECT_AFTER

    def _split_queued(
        self,
        batch: list[_Pending],
        failure: Exception,
        isolation: Isolation[_Pending],
        split: _Split,
    ) -> None:
        """The model raised on ``batch`` and works (it answered lately, or this is a
        part of a batch it failed on): a request alone is answered ModelFailed; a batch
        of several tenants is queued again by tenant, a tenant's part by halves, each
        part a group of its own (never batched with other requests) at the head of its
        tenant's queue (:data:`ISOLATING_LEVEL`), due at once. So each tenant's part
        runs at that tenant's turn, by weight: finding the requests a batch fails on
        costs their tenant's share of the model, not the slot's. Split in the slot, one
        tenant's poisoned calls, each batch 2n - 1 runs, held every other tenant's
        calls (a light tenant's p50 went from 12 ms to 1.3 s beside 64 poisoned
        callers)."""
        isolation.failed(batch, failure, first=batch[0].split is None)
        if len(batch) == 1:
            return
        now = self._clock.monotonic()
        for part in parts_of(batch):
            group = object()  # its own: batched with none but its part
            for entry in part:
                if entry.future.done():
                    continue
                entry.group, entry.level, entry.split = group, ISOLATING_LEVEL, split
                entry.queued = True
                self._parts_queued += 1
                self._queue.push(entry)
                self._watch_deadline(entry, now)

    def _judge(self, split: _Split) -> None:
        """Once every request of a failed batch is answered: had the model answered no
        run since it failed, count the failure (:data:`SUSPECT_AFTER`; a batch of
        several tenants makes the model suspect at once). Counted when it failed, a
        working model was judged at fault while the parts that would show it works
        still waited for their turns (other tenants' failed batches counted meanwhile,
        and their valid requests were answered Unavailable)."""
        if split.judged or not all(entry.future.done() for entry in split.entries):
            return
        split.judged = True
        if self._successes == split.successes:
            self._unanswered = SUSPECT_AFTER if split.tenants > 1 else self._unanswered + 1

    async def _attempt(
        self, part: list[_Pending], dispatched: float
    ) -> tuple[list[_Pending], Exception | None]:
        """Run the live requests of ``part`` (returned) and answer them, unless the model
        raised: then return what it raised. A MandantError, the backend's verdict, is
        answered to every one of them and returned too."""
        part = self._live(part)
        if not part:
            return part, None
        start = self._clock.monotonic()
        try:
            outputs, compute_s = await self._run(part)
            results = _split(outputs, part, sum(entry.rows for entry in part))
        except MandantError as exc:  # the backend's verdict, for every request
            if isinstance(exc, DeadlinePassedWhileRunning):  # it ran: charged, so counted
                self._count(part, self._clock.monotonic() - start, dispatched)
            elif not isinstance(exc, ModelFailed):  # it did not run: refunded (service.py)
                _not_run(part)
            for entry in part:
                self._finish(entry, exc=exc)
            return part, exc
        except Exception as exc:  # the model raised: whose data was it?
            _not_run(part)  # not answered: a caller who leaves before its part runs
            return part, exc  # again is refunded (``_run`` marks it again)
        finally:
            _settle(part)
        self._unanswered = 0
        self._successes += 1
        self._succeeded(part, results, compute_s, dispatched)
        return part, None

    def _live(self, part: list[_Pending]) -> list[_Pending]:
        """The requests of ``part`` still worth running: not answered (a caller that
        left), not past their deadline (answered DeadlineExceeded here)."""
        now = self._clock.monotonic()
        live = []
        for entry in part:
            deadline = entry.request.deadline
            if entry.future.done():
                continue
            if deadline is not None and deadline <= now:
                self._finish(entry, exc=DeadlineExceeded("deadline exceeded before the model ran"))
            else:
                live.append(entry)
        return live

    async def _run(self, part: list[_Pending]) -> tuple[Mapping[str, np.ndarray], float]:
        wanted = tuple(dict.fromkeys(n for e in part for n in e.request.outputs))
        deadlines = [entry.request.deadline for entry in part]
        latest = None if None in deadlines else max(d for d in deadlines if d is not None)
        for entry in part:
            entry.request.ran = entry.request.running = True
        start = self._clock.monotonic()
        if len(part) == 1:
            outputs = await self._backend.infer(
                part[0].request.inputs, outputs=wanted, deadline=latest
            )
        elif self._batch_infer is not None:
            parts = [entry.request.inputs for entry in part]
            outputs = await self._batch_infer.infer_batch(parts, outputs=wanted, deadline=latest)
        else:
            inputs = concatenate([entry.request.inputs for entry in part])
            outputs = await self._backend.infer(inputs, outputs=wanted, deadline=latest)
        return outputs, self._clock.monotonic() - start

    def _succeeded(
        self,
        part: list[_Pending],
        results: list[Outputs],
        compute_s: float,
        dispatched: float,
    ) -> None:
        """Answer ``part``'s requests. Callers resume in the order their futures are
        answered, and each then encodes and sends its answer on the event loop; so in
        a batch shared by tenants, the one with the fewest rows in it is answered first
        (a light tenant's answer does not wait behind a flood's on the way out)."""
        self._batch_s = compute_s if not self._batch_s else 0.8 * self._batch_s + 0.2 * compute_s
        self._adaptive.executed(compute_s)
        shares = self._count(part, compute_s, dispatched)
        answered = list(zip(part, results, strict=True))
        if len(shares) > 1:
            answered.sort(key=lambda pair: shares[pair[0].tenant])  # stable: FIFO within
        for entry, result in answered:
            self._finish(entry, result=result)

    def _count(self, part: list[_Pending], compute_s: float, dispatched: float) -> dict[str, int]:
        """Report that the backend ran ``part`` (each request's times, the batch and each
        tenant's rows in it: requests whose callers left count too); the rows by tenant."""
        shares: dict[str, int] = {}
        for entry in part:
            shares[entry.tenant] = shares.get(entry.tenant, 0) + entry.rows
            self._observer.request_timing(
                entry.tenant, self._model, dispatched - entry.arrival, compute_s
            )
        owner = part[0].request.model.owner or ""  # one model: one owner
        self._observer.batch_executed(self._model, sum(shares.values()), compute_s, shares, owner)
        return shares

    def _broken(self, entries: Sequence[_Pending], exc: Exception) -> None:
        """Taking or running a batch raised unexpectedly: answer each of ``entries`` not
        answered yet with an internal error (no detail for the client), logged once."""
        logger.error(
            "batcher of model %s failed on a batch of %d request(s); answering them "
            "with an internal error",
            self._model,
            len(entries),
            exc_info=exc,
        )
        for entry in entries:
            self._left_queue(entry)
            self._finish(entry, exc=RuntimeError(f"batcher of model '{self._model}' failed"))

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


def _not_run(part: Sequence[_Pending]) -> None:
    """The model did not run on ``part``'s rows: whoever settles them refunds them."""
    for entry in part:
        entry.request.ran = False


def _settle(part: Sequence[_Pending]) -> None:
    """``part``'s run has ended: settle the charge of each caller that left during it
    (``InferRequest.settle``), refunded unless the model ran on its rows."""
    for entry in part:
        request = entry.request
        request.running = False
        if request.settle is not None:
            settle, request.settle = request.settle, None
            settle(not request.ran)


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
