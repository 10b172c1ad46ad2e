"""Fairness at the door: a weighted share of the front end's own work per tenant.

The batcher shares a model fairly, but every call also costs the front end work
before it reaches a queue (parse, admission, decode) and after (encode, send), and
all calls in progress share one event loop. Under a flood, a light tenant's call
would wait behind hundreds of the flooder's handlers. So inference calls pass a door
after authentication and before their message is parsed.

The door has ``slots`` places, shared by weight among the tenants with calls in
progress or waiting: a tenant's share is ``slots × weight / Σ weights`` of those
tenants. A call whose tenant is below its share walks in (a counter, nothing else) —
however busy the others are. A call whose tenant has used its share waits in its
tenant's queue, cheaply (nothing decoded yet), and walks in when one of its tenant's
calls leaves, or when shares grow because another tenant went quiet. So a flood is
held to its share while a light tenant's call goes straight through to the batcher.

Invariants: a tenant with calls waiting has at least its share in progress; calls of
one tenant enter in arrival order; every ``enter`` is matched by one ``leave``
(cancellation included), and a cancelled waiter leaves no trace.

Waiting calls hold their place under the server-wide :class:`CallCap`, so a flood
queued behind its own share could fill the cap and every other tenant's calls would be
refused. When the cap is full, a newcomer takes the place of the newest waiter of the
tenant with the most calls waiting, unless that is the newcomer's own tenant (the
newcomer counted among its waiters; on a tie too): then the newcomer is refused. (A
flood's newcomers once took every other tenant's waiting places in turn.) A waiter so
shed is answered
:class:`PlaceTaken` (RESOURCE_EXHAUSTED, with pushback; nothing of it was decoded
yet) and gives its place back as it unwinds, within the same event-loop turn; until
then the count is over the cap by the places being handed over.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from mandant.errors import ServerBusy
from mandant.events import Observer
from mandant.types import Tenant

#: Pushback when the server-wide call cap is full (it frees as any call ends).
BUSY_RETRY_S = 0.05


#: The rejection reason of a call refused for the server-wide cap (or whose place at
#: the door another tenant's call took), beside admission's (``concurrency``, …).
BUSY_REASON = "server_busy"


def count_if_busy(observer: Observer, tenant: str, refusal: BaseException) -> None:
    """Count a refusal for the server-wide cap as a rejection of ``tenant``'s call, as
    admission's refusals are (it was in ``mandant_requests_total`` only)."""
    if isinstance(refusal, ServerBusy):
        observer.rejected(tenant, BUSY_REASON)


class PlaceTaken(ServerBusy):
    """A call waiting at the door gave its place under the cap to another tenant's
    call (module doc)."""


@dataclass(slots=True)
class _Tenant:
    weight: float
    inside: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class FrontDoor:
    """At most ``slots`` inference calls in progress, shared by weight (module doc)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a front door needs at least one slot")
        self._slots = slots
        self._tenants: dict[str, _Tenant] = {}  # those with calls inside or waiting
        self._weights = 0.0  # Σ weight of self._tenants

    @property
    def busy(self) -> int:
        return sum(t.inside for t in self._tenants.values())

    @property
    def waiting(self) -> int:
        return sum(len(t.waiting) for t in self._tenants.values())

    async def enter(self, tenant: Tenant) -> None:
        """Wait for a place; the caller must :meth:`leave` once it is done."""
        state = self._tenants.get(tenant.id)
        if state is None:
            state = self._tenants[tenant.id] = _Tenant(tenant.weight)
            self._weights += tenant.weight
        elif state.weight != tenant.weight:  # a reload changed it: shares change now
            self._weights += tenant.weight - state.weight
            state.weight = tenant.weight
            self._admit_waiting()  # shares changed: waiters their shares now hold go in
        if not state.waiting and state.inside < self._share(state):
            state.inside += 1
            return
        future = asyncio.get_running_loop().create_future()
        state.waiting.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.cancelled():  # still waiting (or skipped by _admit): no trace
                if future in state.waiting:
                    state.waiting.remove(future)
                self._forget_if_idle(tenant.id, state)
            elif future.exception() is None:
                self.leave(tenant)  # let in just as it was cancelled: pass it on
            raise  # (or shed just as it was cancelled: it left the queue then)

    def leave(self, tenant: Tenant) -> None:
        """A call of ``tenant`` is done: its place goes to its own next call, or, if the
        tenant has gone quiet, the others' shares grow."""
        state = self._tenants[tenant.id]
        state.inside -= 1
        if state.waiting:
            self._admit(state)  # (its waiters may all have been cancelled meanwhile)
        self._forget_if_idle(tenant.id, state)

    def shed(self, newcomer: str, message: str) -> bool:
        """Answer the newest waiter of the tenant with the most calls waiting
        :class:`PlaceTaken`, for a call of tenant ``newcomer``: whether there was one
        with more waiting than ``newcomer`` would have (module doc)."""
        own = self._tenants.get(newcomer)
        would_wait = own is not None and (bool(own.waiting) or own.inside >= self._share(own))
        own_waiting = len(own.waiting) + 1 if own is not None and would_wait else 0
        others = [(i, t) for i, t in self._tenants.items() if i != newcomer and t.waiting]
        others.sort(key=lambda other: len(other[1].waiting), reverse=True)
        for tenant_id, state in others:
            if len(state.waiting) <= own_waiting:
                return False  # the newcomer's tenant waits most: the newcomer is refused
            while state.waiting:
                future = state.waiting.pop()
                if not future.done():  # else cancelled, and on its way out
                    future.set_exception(PlaceTaken(message, retry_after_s=BUSY_RETRY_S))
                    self._forget_if_idle(tenant_id, state)
                    return True
            self._forget_if_idle(tenant_id, state)
        return False

    def _share(self, state: _Tenant) -> float:
        return max(1.0, self._slots * state.weight / self._weights)

    def _admit(self, state: _Tenant) -> None:
        while state.waiting and state.inside < self._share(state):
            future = state.waiting.popleft()
            if not future.done():
                state.inside += 1
                future.set_result(None)

    def _forget_if_idle(self, tenant_id: str, state: _Tenant) -> None:
        # ``state`` may be forgotten already, and the tenant back with a new one (a
        # waiter cancelled after its tenant went idle): that one is not this one's to
        # forget (deleting it lost the calls inside it, KeyError at their leave()).
        if state.inside or state.waiting or self._tenants.get(tenant_id) is not state:
            return
        del self._tenants[tenant_id]
        self._weights -= state.weight
        if not self._tenants:
            self._weights = 0.0  # no drift from float sums
        self._admit_waiting()  # every other share grew

    def _admit_waiting(self) -> None:
        """Every tenant's waiting calls, as far as its share allows: a reload that
        changes a weight changes every share (calls waited, their share grown, until
        one of their own tenant's calls ended)."""
        for state in list(self._tenants.values()):
            if state.waiting:
                self._admit(state)


class CallCap:
    """The server-wide cap on calls (and stream messages) in progress, on every port
    together: one more is refused at once, before anything else is done for it."""

    __slots__ = ("_calls", "_max_calls")

    def __init__(self, max_calls: int) -> None:
        if max_calls < 1:
            raise ValueError("a call cap needs at least one call")
        self._max_calls = max_calls
        self._calls = 0

    @property
    def calls(self) -> int:
        return self._calls

    def enter(self, door: FrontDoor | None = None, tenant: str = "") -> None:
        """Take a place, or, when the cap is full, the place of a call waiting at
        ``door`` of another tenant than ``tenant`` (module doc)."""
        if self._calls >= self._max_calls:
            message = f"server busy: {self._max_calls} calls in progress"
            if door is None or not door.shed(tenant, message):
                raise ServerBusy(message, retry_after_s=BUSY_RETRY_S)
        self._calls += 1

    def leave(self) -> None:
        self._calls -= 1
