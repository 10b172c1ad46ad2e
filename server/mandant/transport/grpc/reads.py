"""Calls reading their request message: how long each may take, and how many at once.

Once a handler asks for a call's message, gRPC opens the call's HTTP/2 window for all
of it (up to ``max_message_bytes``) and holds what has come until the rest does. A
client that sent part of a message and then nothing held that part for as long as its
connection lived: four health checks without a key, 30 of a declared 40 MiB sent
each, held 125 MB; 24 inference calls of one tenant, 40 of 60 MiB each, held 1 GB.
So every read of a message a caller sends (the gate's unary calls, the front ends'
forwarded calls, health checks and reflection) goes through :class:`MessageReads`:

- it ends after its timeout, DEADLINE_EXCEEDED (:class:`MessageTimedOut`), and gRPC
  frees what came: ``server.message_read_timeout_s`` for a key's calls,
  :data:`OPEN_READ_TIMEOUT_S` for calls without one (their messages are a few bytes).
  One timer serves every read, not one per call;
- it is counted in its :class:`Pool` (or pools), and refused RESOURCE_EXHAUSTED
  beyond one's bound before its message is asked for (its window stays HTTP/2's
  initial one): a tenant's calls other than inference, :data:`TENANT_READS_MAX` at
  once; calls without a key, by service (health checks apart from reflection, whose
  streams wait for their next message as long as their clients like), at most
  :data:`PEER_OPEN_READS_MAX` from one address and :data:`OPEN_READS_MAX` in all.
  Counted server-wide alone (32), one client without a key holding 32 header-only
  health checks made every probe fail RESOURCE_EXHAUSTED (a pod's liveness probe
  with them), and so did 32 reflection clients keeping their streams open. A
  tenant's inference calls read theirs once they hold their place (its
  ``max_concurrency``, the front door), so they are not counted again here; an
  admin's calls neither.

A key's calls hold at most these counts (and its inference calls' places) times
``max_message_bytes``, each for at most its timeout. A ModelStreamInfer stream is not
timed: between its messages it waits for the next one for as long as its client
likes, and gRPC does not say whether one has begun to come. So a tenant's open streams
are counted instead (:meth:`MessageReads.open_stream`), at most
``server.max_tenant_streams`` at once, each holding at most one message in part: 30
streams of one tenant, each sent 40 of a declared 60 MiB, held 1.2 GB, and nothing
bounded how many it opened (1,024 on each connection).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, NamedTuple

import grpc

from mandant.config.server import DEFAULT_MAX_TENANT_STREAMS
from mandant.errors import DeadlineExceeded, ResourceExhausted

#: How long a call without a key (a health check, reflection) may take to send its
#: message once it is asked for.
OPEN_READ_TIMEOUT_S = 5.0
#: Messages of calls without a key to one service (health, reflection) read at once,
#: server-wide, and from one client address (a kubelet's probes: a few at once).
OPEN_READS_MAX = 128
PEER_OPEN_READS_MAX = 8
#: Messages of one tenant's calls other than inference (metadata, statistics, model
#: control) read at once.
TENANT_READS_MAX = 64
#: The pushback of a read refused for the count.
READS_RETRY_S = 1.0


class ReadsFull(ResourceExhausted):
    """A call refused for its tenant's messages on their way, or its streams open:
    ``reason`` is its ``mandant_rejections_total`` reason (it was counted in
    ``mandant_requests_total`` only, and an operator watching rejections missed it)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, READS_RETRY_S)
        self.reason = reason


#: The rejection reasons of :class:`ReadsFull`.
MESSAGES_REASON = "request_messages"
STREAMS_REASON = "streams"
#: How often the timer looks for late reads, as a share of the shortest timeout: a
#: read ends between its timeout and this much later.
SWEEP_SHARE = 0.25


class Pool(NamedTuple):
    """Reads counted together: at most ``limit`` at once. ``who`` names them in the
    refusal ("calls of this tenant"). ``shared``: full, a read of it takes the place of
    the oldest read of the client holding the most of it (each read's first pool is its
    client's), where that client holds more than the newcomer's."""

    key: str
    limit: int
    who: str
    shared: bool = False


def tenant_pool(tenant: str) -> Pool:
    return Pool(f"tenant {tenant}", TENANT_READS_MAX, "calls of this tenant")


def peer_address(peer: str) -> str:
    """The client address of gRPC's ``context.peer()`` (``ipv4:10.0.0.5:41234``), its
    port left out."""
    return peer.rpartition(":")[0] or peer


def keyless_pools(service: str, peer: str) -> tuple[Pool, Pool]:
    """The pools of a call without a key to ``service`` from ``peer`` (gRPC's
    ``context.peer()``)."""
    address = peer_address(peer)
    return (
        Pool(f"{service} {address}", PEER_OPEN_READS_MAX, f"{service} calls from this address"),
        Pool(service, OPEN_READS_MAX, f"{service} calls without a key", shared=True),
    )


class MessageTimedOut(DeadlineExceeded):
    """The call's message did not come within its read timeout."""


class Reading:
    """One read in progress: :meth:`MessageReads.begin`'s ticket."""

    __slots__ = ("ended", "ends_at", "pools", "task", "timeout_s")

    def __init__(self, task: asyncio.Task[Any], timeout_s: float, pools: tuple[Pool, ...]) -> None:
        self.task = task
        self.timeout_s = timeout_s
        self.ends_at = time.monotonic() + timeout_s
        self.pools = pools  # the counts it takes part in
        #: Why the server cancelled its task (too slow; its place given to another
        #: client's read), which the call is answered.
        self.ended: MessageTimedOut | ResourceExhausted | None = None


class MessageReads:
    """Every read of a caller's message in progress (module doc)."""

    def __init__(
        self,
        timeout_s: float,
        open_timeout_s: float = OPEN_READ_TIMEOUT_S,
        max_tenant_streams: int = DEFAULT_MAX_TENANT_STREAMS,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_tenant_streams = max_tenant_streams
        self.open_timeout_s = open_timeout_s
        self._sweep_s = SWEEP_SHARE * min(timeout_s, open_timeout_s)
        self._reading: dict[asyncio.Task[Any], Reading] = {}
        self._counts: dict[str, int] = {}  # pool key → reads counted in it
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, timeout_s: float, pools: tuple[Pool, ...] = ()) -> Reading:
        """The current task reads its call's message now, for at most ``timeout_s``,
        counted in each of ``pools`` (ResourceExhausted where one is full, nothing
        taken). :meth:`end` it once the read returns or fails, before any other
        await."""
        for pool in pools:
            held = self._counts.get(pool.key, 0)
            if held >= pool.limit and not (pool.shared and self._make_room(pool, pools[0])):
                raise ReadsFull(
                    f"{held} {pool.who} are sending their messages (at most {pool.limit}): "
                    "retry once they have",
                    MESSAGES_REASON,
                )
        self._take(pools)
        task = asyncio.current_task()
        assert task is not None  # gRPC runs each handler in a task of its own
        reading = Reading(task, timeout_s, pools)
        self._reading[task] = reading
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._sweep_s, self._sweep)
        return reading

    def _make_room(self, pool: Pool, own: Pool) -> bool:
        """Full ``pool`` (shared): end the oldest read of the client that holds the most
        of it, if that client holds more than ``own`` (the newcomer's); whether a place
        is free now. Counted as one client at 8 reads each, 16 addresses held all 128
        keyless health reads and a kubelet's probe was refused."""
        held: dict[str, list[Reading]] = {}
        for reading in self._reading.values():  # oldest first
            if reading.ended is None and pool in reading.pools:
                held.setdefault(reading.pools[0].key, []).append(reading)
        most = max(held.values(), key=len, default=[])
        if len(most) <= self._counts.get(own.key, 0):
            return False
        shed = most[0]
        shed.ended = ResourceExhausted(
            f"this call's place went to another client's: at most {pool.limit} {pool.who} "
            f"send their messages at once, and this address held {len(most)}",
            READS_RETRY_S,
        )
        self._give_back(shed.pools)
        shed.pools = ()
        shed.task.cancel()
        return True

    def end(self, reading: Reading | None) -> bool:
        """The read is over (a None: none began); whether the server ended it (too slow,
        or its place given to another's), the task's cancellation then taken back: the
        caller raises :meth:`refusal` instead. Safe to call twice."""
        if reading is None or self._reading.pop(reading.task, None) is None:
            return False
        self._give_back(reading.pools)
        if reading.ended is not None:
            reading.task.uncancel()
            return True
        return False

    def open_stream(self, tenant: str) -> Pool:
        """A stream of ``tenant`` opens: counted until :meth:`close_stream` is given
        the pool returned (ResourceExhausted at ``max_tenant_streams``: module doc)."""
        pool = Pool(f"streams {tenant}", self.max_tenant_streams, "streams")
        if (held := self._counts.get(pool.key, 0)) >= pool.limit:
            raise ReadsFull(
                f"{held} streams of this tenant are open (at most {pool.limit}, "
                "server.max_tenant_streams): retry once one has ended",
                STREAMS_REASON,
            )
        self._take((pool,))
        return pool

    def close_stream(self, pool: Pool) -> None:
        self._give_back((pool,))

    def _take(self, pools: tuple[Pool, ...]) -> None:
        for pool in pools:
            self._counts[pool.key] = self._counts.get(pool.key, 0) + 1

    def _give_back(self, pools: tuple[Pool, ...]) -> None:
        for pool in pools:
            left = self._counts[pool.key] - 1
            if left:
                self._counts[pool.key] = left
            else:
                del self._counts[pool.key]

    async def read(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        timeout_s: float,
        pools: tuple[Pool, ...] = (),
    ) -> object:
        """``context.read()`` as :meth:`begin` times and counts it: its message, or
        :class:`MessageTimedOut`. (The gate's inference path inlines this: one
        coroutine fewer per call.)"""
        reading = self.begin(timeout_s, pools)
        try:
            return await context.read()
        except asyncio.CancelledError:
            if self.end(reading):
                raise self.refusal(reading) from None
            raise
        finally:
            self.end(reading)

    @staticmethod
    def refusal(reading: Reading) -> MessageTimedOut | ResourceExhausted:
        """What a read the server ended (:meth:`end` said so) is answered."""
        assert reading.ended is not None
        return reading.ended

    def _sweep(self) -> None:
        now = time.monotonic()
        for reading in self._reading.values():
            if reading.ended is None and reading.ends_at <= now:
                reading.ended = MessageTimedOut(
                    f"the request message did not arrive within {reading.timeout_s:g} s"
                )
                reading.task.cancel()
        self._timer = (
            asyncio.get_running_loop().call_later(self._sweep_s, self._sweep)
            if self._reading
            else None
        )
