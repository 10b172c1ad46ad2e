"""Finding the requests a failed batch fails on, for the batcher (``batcher.py``),
which runs a batch and, should the model raise on it, hands it here once.

A batch the model raises on (anything but a MandantError) is split in halves, each
rerun in the same execution slot, level by level, until the request(s) it fails on
alone are found: those get ModelFailed, every other request its normal result. A
binary split of n requests runs at most 2n - 1 times however often the model fails; a
request whose caller left or whose deadline passed is not rerun. But when both halves
of a part fail alike and so does a request of each of its tenants alone, the model is
at fault, not the requests' data (a model that raises on everything, or whose answer
never matches its configuration): the others are answered Unavailable at once, after
3 + (tenants) runs instead of 2n - 1. One poisoned request never fails another (it
cannot make two disjoint halves fail), nor do one tenant's poisoned requests fail
another tenant's.

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
from mandant.types import InferRequest

logger = logging.getLogger(__name__)


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


def raised(exc: Exception | None) -> TypeGuard[Exception]:
    """Whether a run's outcome is the model raising (not success, not a verdict)."""
    return exc is not None and not isinstance(exc, MandantError)


class Isolation(Generic[E]):
    """The requests of one failed batch of ``model``, split until those it fails on
    are found (see module doc): ``attempt`` runs a part, ``finish`` answers a request."""

    def __init__(self, model: str, attempt: Attempt[E], finish: Finish[E]) -> None:
        self._model = model
        self._attempt = attempt
        self._finish = finish

    async def run(self, batch: list[E], failure: Exception) -> None:
        """``batch`` failed with ``failure``: rerun its halves apart, level by level,
        while a part of it fails (a half that succeeds is answered two runs after the
        batch failed). Each run is a node of a binary tree over the batch's requests:
        at most 2n - 1 runs, 3 + (tenants) when the model fails whatever the data
        (``_model_fails``)."""
        self._failed(batch, failure, True)
        failing = deque([batch] if len(batch) > 1 else [])
        while failing:
            part = failing.popleft()
            middle = len(part) // 2
            halves = [await self._attempt(half) for half in (part[:middle], part[middle:])]
            if await self._model_fails(halves):
                continue
            for half, exc in halves:
                if raised(exc):
                    self._failed(half, exc, False)
                    if len(half) > 1:
                        failing.append(half)

    async def _model_fails(self, halves: list[tuple[list[E], Exception | None]]) -> bool:
        """Whether the two halves of a failed part failed for the model's sake, not its
        requests'; if so, answer all their requests. One request's data cannot make two
        disjoint parts fail: when both halves raise alike (the same exception type),
        either the model fails whatever the data or several requests are at fault. A
        request of each tenant of the part, alone, tells them apart (a lone half is
        one): should each fail too (alike, or with the backend's verdict, e.g. a model
        whose answer never matches its configuration), the model is at fault, and every
        other request is answered Unavailable (the backend's verdict, when it gave one)
        rather than run alone in turn (2n - 1 runs). Should one succeed or fail
        otherwise, the split goes on: another tenant's bad rows never fail a tenant
        whose own request succeeds alone."""
        (first, first_exc), (second, second_exc) = halves
        if not (raised(first_exc) and raised(second_exc)):
            return False
        if type(first_exc) is not type(second_exc):
            return False
        verdicts: dict[str, Exception] = {}
        for half, exc in halves:
            if len(half) == 1 and raised(exc):
                self._failed(half, exc, False)  # it failed alone
                verdicts[half[0].tenant] = exc
        for entry in first + second:
            if entry.tenant in verdicts:
                continue
            probe, verdict = await self._attempt([entry])
            if verdict is None:
                return False
            if raised(verdict):
                self._failed(probe, verdict, False)  # it failed alone
                if type(verdict) is not type(first_exc):
                    return False  # its own failure, not the halves'
            verdicts[entry.tenant] = verdict
        rest = [entry for entry in first + second if not entry.future.done()]
        if not rest:
            return True
        verdict = next((v for v in verdicts.values() if isinstance(v, MandantError)), first_exc)
        logger.error(
            "model %s failed on a batch, on both its halves and on a request of each "
            "of its %d tenant(s) alone: answering the other %d request(s) without "
            "running them apart: %r",
            self._model,
            len(verdicts),
            len(rest),
            verdict,
        )
        if isinstance(verdict, MandantError):
            answer: MandantError = verdict
        else:
            answer = Unavailable(f"model '{self._model}' fails whatever its inputs")
            answer.__cause__ = verdict
        for entry in rest:
            self._finish(entry, exc=answer)
        return True

    def _failed(self, part: list[E], exc: Exception, first: bool) -> None:
        """Log a failed run; answer its request ModelFailed if it ran alone."""
        if len(part) > 1:
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "batch of %d request(s) on model %s failed; rerunning them apart: %r",
                len(part),
                self._model,
                exc,
            )
            return
        entry = part[0]
        request_id = entry.request.request_id
        logger.error(
            "model %s failed on request %s of tenant %s alone",
            self._model,
            request_id,
            entry.tenant,
            exc_info=exc,
        )
        failure = ModelFailed(self._model, request_id)
        failure.__cause__ = exc
        self._finish(entry, exc=failure)
