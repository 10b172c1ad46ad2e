"""Finding the requests a failed batch fails on, for the batcher (``batcher.py``).
While the model works, the batcher queues a failed batch's parts again, to run at
their tenants' turns, and asks here only to answer a request that failed alone
(:meth:`Isolation.failed`); once the model may be at fault itself (it has not
answered lately), it hands the failed batch here, whole, to be split in its slot:

A batch the model raises on (anything but a MandantError) is split, each part rerun in
the same execution slot, level by level, until the request(s) it fails on alone are
found: those get ModelFailed, every other request its normal result. A batch of several
tenants is split by tenant, the tenant with the fewest requests first (split in
halves, a light tenant's call batched with another's poisoned ones ran as many times
as the batch had levels: about six runs beside a flood); one tenant's part is split in
halves. Such a split of n requests runs at most 2n - 1 times however often the model
fails; a request whose caller left or whose deadline passed is not rerun. But when
every part of a part fails alike and so do the first and the last request of each of
its tenants alone, the model is at fault, not the requests' data (a model that raises
on everything, or whose answer never matches its configuration): the others are
answered Unavailable at once, after at most 1 + 3 x (tenants) runs (5 for one tenant)
instead of 2n - 1 (those probes answer their own requests, so a batch never runs more
than 3n - 1 times in all). One poisoned request never fails another (it cannot make
two disjoint parts fail), nor do one tenant's poisoned requests fail another tenant's;
no answer carries another request's verdict. A model that answered a run in this
batch, or that the batcher has seen working (``SUSPECT_AFTER`` in ``batcher.py``: it
answered a run less than three failed batches ago, and no batch of several tenants
failed since with nothing answered while it was split), is never judged at fault: it
works, so the data is (the requests of a part may all be poisoned: one tenant's bad
calls, batched apart from the good ones). A model that breaks after working thus pays
a full split (2n - 1 runs) for one batch of several tenants, or for two batches of one
tenant, before the shortcut applies; a fresh model that has never answered cannot be
told from its data.

Running a part and answering the requests it succeeded for is the batcher's
(``attempt``); :class:`Isolation` decides what to run next and answers the failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeGuard, TypeVar

from mandant.errors import MandantError, ModelFailed, Unavailable
from mandant.observability.log_limits import FailureLog
from mandant.scheduling.clock import Clock
from mandant.types import InferRequest

logger = logging.getLogger(__name__)
#: Where every failure is counted, which the log's counts of them name.
FAILURES_COUNTED_IN = (
    'mandant_requests_total{code="INVALID_ARGUMENT"}, its batch in mandant_failed_batches_total'
)


class Entry(Protocol):
    """A request of a batch, as isolation sees it (the batcher's queue entry)."""

    @property
    def request(self) -> InferRequest: ...

    @property
    def tenant(self) -> str: ...

    @property
    def future(self) -> asyncio.Future[Any]: ...


E = TypeVar("E", bound=Entry)
E_contra = TypeVar("E_contra", bound=Entry, contravariant=True)

#: Runs the live requests of a part (returned) and answers them, unless the model
#: raised: then returns what it raised (a MandantError too, answered already).
Attempt = Callable[[list[E]], Awaitable[tuple[list[E], Exception | None]]]


class Finish(Protocol[E_contra]):
    """Answers a request with ``exc``, unless it was answered (its caller left)."""

    def __call__(self, entry: E_contra, *, exc: BaseException) -> None: ...


def failure_log(clock: Clock | None = None) -> FailureLog:
    """The log of a model's failed batches and requests, for its batcher to keep across
    its batches: a client's calls the model fails on cannot flood it."""
    return FailureLog(logger, FAILURES_COUNTED_IN, clock=clock)


def raised(exc: Exception | None) -> TypeGuard[Exception]:
    """Whether a run's outcome is the model raising (not success, not a verdict)."""
    return exc is not None and not isinstance(exc, MandantError)


class Isolation(Generic[E]):
    """The requests of one failed batch of ``model``, split until those it fails on
    are found (see module doc): ``attempt`` runs a part, ``finish`` answers a request."""

    def __init__(
        self,
        model: str,
        attempt: Attempt[E],
        finish: Finish[E],
        *,
        model_works: bool,
        failures: FailureLog,
    ) -> None:
        """``failures``: the model's failure log (the batcher's, across its batches)."""
        self._model = model
        self._failures = failures
        self._attempt = attempt
        self._finish = finish
        #: the model works (the batcher has seen it answer), or answered in this batch
        self._works = model_works

    async def run(self, batch: list[E], failure: Exception) -> None:
        """``batch`` failed with ``failure``: rerun its parts apart (:func:`parts_of`),
        level by level, while a part of it fails (a part that succeeds is answered as
        soon as it ran). Each run is a node of a tree over the batch's requests: at
        most 2n - 1 runs, at most 1 + 3 x (tenants) when the model fails whatever the
        data (``_model_fails``), and its probes, one run per request they answer."""
        self.failed(batch, failure, True)
        failing = deque([batch] if len(batch) > 1 else [])
        while failing:
            ran = [await self._attempt(part) for part in parts_of(failing.popleft())]
            self._works = self._works or any(live and exc is None for live, exc in ran)
            # Judged on the parts that ran: a tenant whose callers all left says
            # nothing (it kept the others' parts from being judged, each split again).
            tried = [outcome for outcome in ran if outcome[0]]
            if not self._works and len(tried) > 1 and await self._model_fails(tried):
                continue
            for part, exc in ran:
                if raised(exc):
                    self.failed(part, exc, False)
                    if len(part) > 1:
                        failing.append(part)

    async def _model_fails(self, parts: list[tuple[list[E], Exception | None]]) -> bool:
        """Whether the parts of a failed part failed for the model's sake, not their
        requests'; if so, answer all their requests. One request's data cannot make two
        disjoint parts fail: when every part raises alike (the same exception type),
        either the model fails whatever the data or several requests are at fault. The
        first and the last request of each tenant of the part, alone (a lone part ran
        alone already), tell them apart: should each fail too (alike, or with the
        backend's Unavailable, e.g. a model whose answer never matches its
        configuration), the model is at fault: those that ran alone are answered as
        they failed, every other request Unavailable, not run apart in turn. Should one
        succeed or fail otherwise (its own data: the backend's InvalidInput, say), the
        split goes on: one tenant's bad rows never fail a tenant whose own request
        succeeds alone, and a tenant's good request next to two of its own poisoned
        ones fails only if it is neither its first nor its last in the part; a probe
        whose caller left judges nothing (the split goes on). No answer ever carries
        another request's verdict (a Triton message quotes its inputs)."""
        first_exc = parts[0][1]
        if not all(raised(exc) and type(exc) is type(first_exc) for _, exc in parts):
            return False
        part = [entry for ran, _ in parts for entry in ran]
        alone: dict[int, Exception] = {id(p[0]): e for p, e in parts if len(p) == 1 and e}
        failed: list[tuple[E, Exception]] = []  # ran alone and raised: not answered yet
        for entry in _ends_by_tenant(part):
            verdict = alone.get(id(entry))
            if verdict is None:
                probe, verdict = await self._attempt([entry])
                if not probe:  # its caller left: its tenant's other end alone would judge
                    self._answer_alone(failed)  # the model (its good calls Unavailable)
                    return False
            if verdict is None:
                self._works = True
                self._answer_alone(failed)
                return False  # it succeeded alone (answered): the data, not the model
            if raised(verdict):
                if type(verdict) is not type(first_exc):
                    self._answer_alone([*failed, (entry, verdict)])
                    return False  # its own failure, not the parts'
                failed.append((entry, verdict))
            elif not isinstance(verdict, Unavailable):  # the backend blames its data
                self._answer_alone(failed)
                return False
        self._answer_alone(failed)
        rest = [entry for entry in part if not entry.future.done()]
        if rest:
            logger.error(
                "model %s failed on a batch, on each of its parts and on the first and the "
                "last request of each of its tenants alone: answering the other %d "
                "request(s) Unavailable without running them apart: %r",
                self._model,
                len(rest),
                first_exc,
            )
            answer = Unavailable(f"model '{self._model}' fails whatever its inputs")
            answer.__cause__ = first_exc
            for entry in rest:
                self._finish(entry, exc=answer)
        return True

    def _answer_alone(self, failed: list[tuple[E, Exception]]) -> None:
        """Answer the requests that raised alone (ModelFailed), once."""
        for entry, exc in failed:
            if not entry.future.done():
                self.failed([entry], exc, False)

    def failed(self, part: list[E], exc: Exception, first: bool) -> None:
        """Log a failed run; answer its request ModelFailed if it ran alone (once)."""
        if len(part) > 1:
            message = "batch of %d request(s) on model %s failed; rerunning them apart: %r"
            if first:  # once per failed batch: counted after the first of a kind
                kind = f"model {self._model} failed on a batch ({type(exc).__name__})"
                self._failures.failed(
                    kind, message, len(part), self._model, exc, level=logging.WARNING
                )
            else:
                logger.debug(message, len(part), self._model, exc)
            return
        entry = part[0]
        if entry.future.done():
            return  # answered already (its caller left, or it was a probe)
        request_id = entry.request.logged_id()
        self._failures.failed(
            f"model {self._model} failed on a request of tenant {entry.tenant} "
            f"({type(exc).__name__})",
            "model %s failed on request %s of tenant %s alone",
            self._model,
            request_id,
            entry.tenant,
            exc=exc,
        )
        failure = ModelFailed(self._model, request_id)
        failure.__cause__ = exc
        self._finish(entry, exc=failure)


def parts_of(part: list[E]) -> list[list[E]]:
    """A failed part's parts, to run apart (here, or queued again by the batcher): each
    tenant's requests, the tenant with the fewest first (so a light tenant's call is
    answered after one run of its own), or the halves of one tenant's part."""
    by_tenant: dict[str, list[E]] = {}
    for entry in part:
        by_tenant.setdefault(entry.tenant, []).append(entry)
    if len(by_tenant) > 1:
        return sorted(by_tenant.values(), key=len)
    middle = len(part) // 2
    return [part[:middle], part[middle:]]


def _ends_by_tenant(part: list[E]) -> list[E]:
    """The first and the last request of each tenant of ``part`` (one if it has one)."""
    ends: dict[str, list[E]] = {}
    for entry in part:
        found = ends.setdefault(entry.tenant, [entry])
        if entry is not found[0]:
            found[1:] = [entry]
    return [entry for found in ends.values() for entry in found]
