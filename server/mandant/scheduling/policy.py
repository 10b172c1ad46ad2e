"""Which queued requests form the next batch. Pure and synchronous: no asyncio, no
clock, no tensors — the batcher (``batcher.py``) owns time and execution.

Two queues with the same interface:

* :class:`FairQueue` — one queue per tenant, batches filled by weighted deficit round
  robin counting rows: on each visit a tenant earns ``quantum_rows × weight`` rows of
  credit and sends requests while its credit covers the next one. Under saturation
  each tenant gets rows in proportion to its weight, whatever the others send.
* :class:`FifoQueue` — one queue for everybody, in arrival order (for comparison,
  and for the noisy-neighbour benchmark).

Within a tenant's queue (and within the FIFO queue) priority levels are strict: v2
``priority`` 1 is served before 2, and so on; 0 (unset) after every explicit level.
Levels never cross tenants' shares in :class:`FairQueue`.

A batch holds only requests of one ``group`` (the shapes of their non-batch
dimensions): the first request taken decides it. When the request next in line
cannot join for its size (more rows than the room left), the batch closes there and
that request leads the next one — so no request is passed over forever. In
:class:`FairQueue` a tenant whose next request is of another group is passed over
for this batch, and the batch goes on filling from the other tenants; it keeps the
credit of its turns meanwhile (a round is a round for everyone), and the next batch
starts at the tenant passed over that is owed most, so shares stay by weight across
groups and nobody is passed over for ever (one tenant's request of another shape,
always queued, used to close every batch after one request: another tenant's 64
one-row calls went out one per batch).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Collection, Hashable, Iterator
from typing import Any, Generic, Protocol, TypeVar

#: The lowest explicit v2 ``priority`` (the service refuses larger ones).
MAX_PRIORITY = 2**31 - 1
#: Where a request without a priority (v2 ``priority`` 0) ranks: after every level.
UNSET_PRIORITY_LEVEL = MAX_PRIORITY + 1


def priority_level(priority: int) -> int:
    """The queue level of a v2 priority: 1 is the highest; 0 (unset) is the lowest,
    after every explicit one (one beyond :data:`MAX_PRIORITY` ranks at it)."""
    if priority <= 0:
        return UNSET_PRIORITY_LEVEL
    return priority if priority <= MAX_PRIORITY else MAX_PRIORITY


class Queued(Protocol):
    """What the policy reads of a waiting request."""

    @property
    def tenant(self) -> str: ...

    @property
    def weight(self) -> float: ...

    @property
    def rows(self) -> int: ...

    @property
    def level(self) -> int: ...

    @property
    def group(self) -> Hashable: ...

    @property
    def arrival(self) -> float: ...


Q = TypeVar("Q", bound=Queued)


class BatchQueue(Protocol[Q]):
    """The interface both policies offer the batcher."""

    @property
    def rows(self) -> int:
        """Rows waiting, all tenants together."""
        ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Q]:
        """Every waiting request, in no particular order (not while it changes)."""
        ...

    def rows_of(self, tenant: str) -> int: ...

    def oldest_arrival(self) -> float | None: ...

    def push(self, item: Q) -> None: ...

    def remove(self, item: Q) -> bool:
        """Take ``item`` out wherever it waits; False if it is not queued."""
        ...

    def take(self, room: int) -> list[Q]:
        """Remove and return the next batch, of one group: at least one request
        (whatever its rows) when any waits, else at most ``room`` rows. Raises
        :class:`TakeFailed`, holding what it removed, if anything goes wrong."""
        ...


class TakeFailed(Exception):
    """A ``take`` broke off (a bug): ``taken`` holds the requests it had removed from
    the queue already, so that the batcher can answer them (the cause is chained)."""

    def __init__(self, taken: list[Any]) -> None:
        super().__init__(f"taking a batch failed after {len(taken)} request(s)")
        self.taken = taken


class LevelQueue(Generic[Q]):
    """Strict priority levels, FIFO within a level. The levels' keys are kept in a heap
    (a key whose level emptied leaves it when it comes to the top): finding the first
    level took a ``min`` over every level for each request taken, quadratic for a
    tenant sending thousands of distinct priorities (74 ms a batch at 20,000). A level
    is an ordered dict keyed by the item's ``id`` (items in a queue are alive, so ids
    are unique): a request leaving from the middle (its caller gave up, its deadline
    passed) costs O(1), where a deque's ``remove`` scanned it (20,000 callers of one
    tenant giving up took 1.9 s of the event loop).
    """

    __slots__ = ("_heaped", "_keys", "_levels", "count", "rows")

    def __init__(self) -> None:
        self._levels: dict[int, OrderedDict[int, Q]] = {}
        self._keys: list[int] = []  # a heap of level keys, some of them stale
        self._heaped: set[int] = set()  # the keys in ``_keys``
        self.rows = 0
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Q]:
        for level in self._levels.values():
            yield from level.values()

    def push(self, item: Q) -> None:
        key = item.level
        level = self._levels.get(key)
        if level is None:
            level = self._levels[key] = OrderedDict()
            if key not in self._heaped:
                heapq.heappush(self._keys, key)
                self._heaped.add(key)
        level[id(item)] = item
        self.rows += item.rows
        self.count += 1

    def _first(self) -> int:
        """The first level's key (there is one), dropping stale keys on the way."""
        keys, levels = self._keys, self._levels
        while keys[0] not in levels:
            self._heaped.discard(heapq.heappop(keys))
        return keys[0]

    def head(self) -> Q:
        return next(iter(self._levels[self._first()].values()))

    def pop(self) -> Q:
        key = self._first()
        level = self._levels[key]
        item = level.popitem(last=False)[1]
        if not level:  # its key is the heap's top: gone with it (else one per level, for ever)
            del self._levels[key]
            self._heaped.discard(heapq.heappop(self._keys))
        self.rows -= item.rows
        self.count -= 1
        return item

    def take(self, room: int, batch: list[Q]) -> list[Q]:
        """Pop the next batch in order onto ``batch``: the head whatever its rows, then
        heads while they fit in ``room`` and share the first one's group."""
        while self.count:
            head = self.head()
            if batch and (head.rows > room or head.group != batch[0].group):
                break
            batch.append(self.pop())
            room -= head.rows
        return batch

    def remove(self, item: Q) -> bool:
        level = self._levels.get(item.level)
        if level is None:
            return False
        if level.pop(id(item), None) is None:
            return False
        if not level:
            del self._levels[item.level]
            if len(self._keys) > 2 * len(self._levels) + 64:
                self._rebuild()  # keys of levels emptied below the first pile up
        self.rows -= item.rows
        self.count -= 1
        return True

    def _rebuild(self) -> None:
        """The heap of the live levels' keys only (amortised: at most every other
        removal that empties a level, once stale keys outnumber live ones)."""
        self._keys = list(self._levels)
        heapq.heapify(self._keys)
        self._heaped = set(self._keys)

    def oldest_arrival(self) -> float | None:
        return min(
            (next(iter(level.values())).arrival for level in self._levels.values()),
            default=None,
        )


class FairQueue(Generic[Q]):
    """Weighted deficit round robin over per-tenant queues, counting rows.

    The round-robin position and the current tenant's unspent credit carry over from
    one batch to the next, so shares hold across batch boundaries. A tenant whose
    queue empties leaves the round and forfeits its credit (as in DRR: credit is only
    kept while backlogged). Rounds in which nobody could send are skipped in one
    step, so a small quantum costs nothing with large requests.
    """

    def __init__(self, quantum_rows: float = 1.0) -> None:
        if quantum_rows <= 0:
            raise ValueError("quantum_rows must be positive")
        self._quantum = quantum_rows
        self._queues: dict[str, LevelQueue[Q]] = {}
        self._weights: dict[str, float] = {}
        self._deficit: dict[str, float] = {}
        self._ring: deque[str] = deque()  # backlogged tenants; [0] has the turn
        self._granted = False  # whether ring[0] earned its quantum this turn
        #: The largest batch asked for, and the lightest weight backlogged at this
        #: take: what bounds a tenant's credit (:meth:`_credit`).
        self._room = 0
        self._lightest = 1.0
        self._rows = 0
        self._count = 0

    @property
    def rows(self) -> int:
        return self._rows

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Q]:
        for queue in self._queues.values():
            yield from queue

    def rows_of(self, tenant: str) -> int:
        queue = self._queues.get(tenant)
        return queue.rows if queue is not None else 0

    def oldest_arrival(self) -> float | None:
        return min(
            (a for q in self._queues.values() if (a := q.oldest_arrival()) is not None),
            default=None,
        )

    def push(self, item: Q) -> None:
        queue = self._queues.get(item.tenant)
        if queue is None:
            queue = self._queues[item.tenant] = LevelQueue()
            self._deficit[item.tenant] = 0.0
            self._ring.append(item.tenant)
        self._weights[item.tenant] = item.weight
        queue.push(item)
        self._rows += item.rows
        self._count += 1

    def remove(self, item: Q) -> bool:
        queue = self._queues.get(item.tenant)
        if queue is None or not queue.remove(item):
            return False
        self._rows -= item.rows
        self._count -= 1
        if not queue:
            self._leave(item.tenant)
        return True

    def take(self, room: int) -> list[Q]:
        batch: list[Q] = []
        self._room = max(self._room, room)
        self._lightest = min(self._weights.values(), default=1.0)
        try:
            if len(self._ring) == 1:
                self._take_alone(room, batch)
            else:
                self._take_round(room, batch)
        except Exception as exc:
            raise TakeFailed(batch) from exc
        return batch

    def _take_round(self, room: int, batch: list[Q]) -> None:
        group: Hashable = _ANY
        idle = 0  # turns since something was taken
        passed: set[str] = set()  # tenants passed over for another group this batch
        ring = self._ring
        while room > 0 and ring:
            if idle >= len(ring):
                if len(passed) >= len(ring):
                    break  # whoever is left has another group
                self._skip_idle_rounds(passed)
                idle = 0
            tenant = ring[0]
            queue = self._queues[tenant]
            head = queue.head()
            if not self._granted:
                self._credit(tenant, self._quantum * self._weights[tenant])
                self._granted = True
            if head.rows > self._deficit[tenant]:
                self._end_turn()
                idle += 1
                continue
            if batch and head.group != group:
                passed.add(tenant)  # entitled, but of another group: it keeps its turn's
                self._end_turn()  # credit (and each later one's) while the others
                idle += 1  # go on filling this batch
                continue
            if batch and head.rows > room:
                break  # entitled but cannot join: it leads the next batch
            queue.pop()
            batch.append(head)
            group = head.group
            room -= head.rows
            self._deficit[tenant] -= head.rows
            self._rows -= head.rows
            self._count -= 1
            idle = 0
            if not queue:
                self._leave(tenant)
        if passed:
            self._lead(passed)

    def _take_alone(self, room: int, batch: list[Q]) -> None:
        """One tenant backlogged: nobody to share with, so no credit to count (a visit per
        row, otherwise). It takes what fits, as round robin would, and its turn ends as
        if its credit were spent exactly."""
        tenant = self._ring[0]
        queue = self._queues[tenant]
        queue.take(room, batch)
        self._rows -= sum(item.rows for item in batch)
        self._count -= len(batch)
        if queue:
            self._deficit[tenant] = 0.0
            self._granted = False
        else:
            self._leave(tenant)

    def _end_turn(self) -> None:
        self._ring.rotate(-1)
        self._granted = False

    def _lead(self, passed: Collection[str]) -> None:
        """The next batch starts at the tenant owed most (credit per weight) of those
        ``passed`` over for their group, its turn's credit granted already; the ring
        keeps its order (a tenant moved to the front would leave a third one behind
        two that pass the lead to each other)."""
        deficit, weights = self._deficit, self._weights
        owed = max((t for t in self._ring if t in passed), key=lambda t: deficit[t] / weights[t])
        self._ring.rotate(-self._ring.index(owed))
        self._granted = True

    def _leave(self, tenant: str) -> None:
        if self._ring[0] == tenant:
            self._ring.popleft()
            self._granted = False
        else:
            self._ring.remove(tenant)
        del self._queues[tenant]
        del self._deficit[tenant]
        del self._weights[tenant]

    def _skip_idle_rounds(self, passed: Collection[str] = ()) -> None:
        """A whole round passed with nobody able to send: credit every tenant with
        the rounds it takes until the first one can, less the one about to run. The
        tenants ``passed`` over for their group do not decide it (they could send, but
        not into this batch); they are credited all the same."""
        rounds = min(
            math.ceil(
                (self._queues[t].head().rows - self._deficit[t])
                / (self._quantum * self._weights[t])
            )
            for t in self._ring
            if t not in passed
        )
        if rounds > 1:
            for t in self._ring:
                self._credit(t, (rounds - 1) * self._quantum * self._weights[t])

    def _credit(self, tenant: str, amount: float) -> None:
        """Add ``amount`` to ``tenant``'s credit, within a turn's grant beyond the rows
        of its next request or of what its weight is owed while passed over for its
        group: two batches (of ``room`` rows) for each time the lightest backlogged
        tenant's weight goes into its own (what the others take in batches it cannot
        join comes back to it in batches it leads; one batch cut a tenant sending runs
        of two shapes to 0.19 of rows where its share is 0.33). Kept without a bound,
        credit grew for ever for a tenant mixing shapes (its lead batches one short run
        each), which then, sending one shape, took every row of hundreds of batches
        from a tenant of its weight."""
        weight = self._weights[tenant]
        grant = self._quantum * weight
        owed = 2 * self._room * weight / self._lightest
        cap = grant + max(owed, self._queues[tenant].head().rows)
        self._deficit[tenant] = min(self._deficit[tenant] + amount, cap)


class FifoQueue(Generic[Q]):
    """Everybody in one queue, in arrival order (strict priority levels across
    tenants, as Triton's priority queue): the baseline fair scheduling is measured
    against. A batch closes at the first request that cannot join.

    A tenant's entry counts its requests as well as its rows: it goes when its last
    request does (empty, 0-row requests included; counting rows alone, a tenant's
    second empty request found its entry gone)."""

    def __init__(self) -> None:
        self._queue: LevelQueue[Q] = LevelQueue()
        self._by_tenant: dict[str, list[int]] = {}  # tenant -> [rows, requests]

    @property
    def rows(self) -> int:
        return self._queue.rows

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Q]:
        return iter(self._queue)

    def rows_of(self, tenant: str) -> int:
        queued = self._by_tenant.get(tenant)
        return queued[0] if queued is not None else 0

    def oldest_arrival(self) -> float | None:
        return self._queue.oldest_arrival()

    def push(self, item: Q) -> None:
        self._queue.push(item)
        queued = self._by_tenant.get(item.tenant)
        if queued is None:
            self._by_tenant[item.tenant] = [item.rows, 1]
        else:
            queued[0] += item.rows
            queued[1] += 1

    def remove(self, item: Q) -> bool:
        if not self._queue.remove(item):
            return False
        self._forget(item)
        return True

    def take(self, room: int) -> list[Q]:
        batch: list[Q] = []
        try:
            self._queue.take(room, batch)
            for item in batch:
                self._forget(item)
        except Exception as exc:
            raise TakeFailed(batch) from exc
        return batch

    def _forget(self, item: Q) -> None:
        queued = self._by_tenant[item.tenant]
        if queued[1] > 1:
            queued[0] -= item.rows
            queued[1] -= 1
        else:
            del self._by_tenant[item.tenant]


class _Any:
    """A group no request has (the batch has not chosen its group yet)."""


_ANY = _Any()
