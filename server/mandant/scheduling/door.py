"""Fairness at the door: a weighted share of the front end's own work per tenant.

The batcher shares a model fairly, but every call also costs the front end work
before it reaches a queue (parse, admission, decode) and after (encode, send), and
all calls in progress share one event loop. Under a flood, a light tenant's call
would wait behind hundreds of the flooder's handlers. So inference calls pass a door
after authentication and before their message is parsed: while fewer than ``slots``
calls are in progress, a call walks in (a counter, nothing else); beyond that it waits
in its tenant's queue — cheaply, nothing decoded yet — and every slot that frees goes
to the next tenant by weighted deficit round robin (:class:`~.policy.FairQueue`), so a
light tenant's call is served ahead of a flood's backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from dataclasses import dataclass

from mandant.scheduling.policy import FairQueue, priority_level
from mandant.types import Tenant


@dataclass(eq=False, slots=True)
class _Waiter:
    tenant: str
    weight: float
    future: asyncio.Future[None]
    level: int = priority_level(0)
    rows: int = 1
    group: Hashable = None
    arrival: float = 0.0


class FrontDoor:
    """At most ``slots`` inference calls in progress; the rest take turns (see module doc)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a front door needs at least one slot")
        self._slots = slots
        self._busy = 0
        self._waiting: FairQueue[_Waiter] = FairQueue()

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def enter(self, tenant: Tenant) -> None:
        """Wait for a slot; the caller must :meth:`leave` once it is done."""
        if self._busy < self._slots and not len(self._waiting):
            self._busy += 1
            return
        waiter = _Waiter(tenant.id, tenant.weight, asyncio.get_running_loop().create_future())
        self._waiting.push(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.cancelled():
                self._waiting.remove(waiter)  # still queued, or skipped by leave()
            else:
                self.leave()  # handed a slot just as it was cancelled: pass it on
            raise

    def leave(self) -> None:
        """A call is done: hand its slot to the next waiting tenant, if any."""
        while len(self._waiting):
            (waiter,) = self._waiting.take(1)
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot changes hands; busy stays
                return
        self._busy -= 1
