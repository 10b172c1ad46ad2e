"""Usage counters in Redis, beside the limits, so that a fleet-wide usage report (what
billing reads) is one number per figure, whatever replica answers.

Per tenant and UTC period, one hash (``{prefix}:{tenant}:usage:day:2024-05-17`` and
``…:usage:month:2024-05``) with fields ``requests:<code>``, ``rows:<model>``,
``compute_seconds:<model>`` and ``rejections:<reason>``. The request path only adds to
a dict in this process (:meth:`RedisUsage.add`), filed under the UTC day of the wall
clock when it is counted (that day's bounds cached: a datetime only when the wall
leaves them, at midnight or when the clock steps back); every
``flush_interval_s`` the sums go to Redis in one pipeline: one script per tenant and
day counted in (its hashes share the tenant's hash tag, so one Redis Cluster slot)
that adds every field to that day's hash and to its month's and sets their expiry.
Counts land in the day and month they were counted in, however late they are sent
(a Redis outage across midnight or a month end, a flush held back or refused). Day
hashes expire 35 days after their day, month hashes 400 days after their month: a
day's counts sent later than that are gone at once.

Each tenant's sums are counted once, whatever fails:

- a tenant whose script Redis refused (an error reply, such as ``OOM`` near
  ``maxmemory``) took nothing: its sums go with the next flush; the other tenants of
  that flush are counted;
- a flush whose replies never came (a timeout, a dropped connection: Redis may have
  applied all, some or none of it) is sent again, the same sums under the same
  sequence numbers: each script call of this process has one, increasing in the
  order they are sent, and the script applies a tenant's sums of a day only if the
  marker key of that tenant and day (``…:usage:flushed:<replica>:<day>``, kept
  ``MARKER_KEEP_S``) holds a smaller one — a marker per day, as one flush sends a
  tenant one call per day: with one per tenant, a day's call Redis refused and a
  later day's it applied, both replies lost, made the resent earlier call look
  applied for good. A tenant's newer sums wait until that flush is settled;
- a flush cancelled while it was on its way (a report's caller gone, the graceful
  stop) is kept as one whose replies were lost: sent again, counted once.

A Redis outage delays the counts and loses none while this process lives; a graceful
stop flushes the rest. Counts this process held when it died are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError, ResponseError

from mandant.config import LimitsConfig
from mandant.tenancy.limits import Clock
from mandant.tenancy.quota import WALL, PeriodKind, period_at
from mandant.tenancy.redis_store import period_trackers, redis_client

logger = logging.getLogger(__name__)

#: How often this process's sums go to Redis, in seconds.
FLUSH_INTERVAL_S = 1.0
#: How long a period's hash outlives the period, in seconds.
KEEP_S: dict[PeriodKind, int] = {"day": 35 * 86400, "month": 400 * 86400}
#: How long a tenant's flush marker outlives this process's last flush for it: a
#: flush sent again later than this (Redis unreachable for so long after a reply was
#: lost) could count twice.
MARKER_KEEP_S = 7 * 86400
#: The periods a fleet report gives, by their name in the report.
PERIODS: dict[str, PeriodKind] = {"today": "day", "this_month": "month"}
#: The tenants' scripts a flush sends in one pipeline (one stretch of the event loop).
FLUSH_PIPELINE_TENANTS = 100
#: A read of at most this many tenants adds this process's counts not yet sent to
#: what Redis holds, instead of flushing every tenant's first.
OWN_READ_TENANTS = 1

#: (tenant, figure, label) → amount, as :meth:`RedisUsage.add` sums them.
Counts = dict[tuple[str, str, str], float]

#: KEYS: a tenant's day and month hashes, then this process's marker for that tenant
#: and day. ARGV: the hashes' expiry times (epoch s), the call's sequence number, the
#: marker's lifetime (s), then field, amount pairs (an amount with a '.' or an
#: exponent is added as a float). Returns 1 if the marker says it was applied already.
#: Every integer sum is checked before anything is added: Redis keeps what a script
#: wrote before it failed, and a refused flush is sent again (once an overflowing sum
#: left the others added, and they were added again at every flush).
FLUSH_LUA = """
if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[3]) then return 1 end
for k = 1, 2 do
  for i = 5, #ARGV, 2 do
    if not string.find(ARGV[i + 1], '[.eE]') then
      local sum = tonumber(redis.call('HGET', KEYS[k], ARGV[i]) or '0') + tonumber(ARGV[i + 1])
      if math.abs(sum) >= 9.2e18 then
        return redis.error_reply('usage sum out of range: ' .. ARGV[i])
      end
    end
  end
end
for k = 1, 2 do
  for i = 5, #ARGV, 2 do
    if string.find(ARGV[i + 1], '[.eE]') then
      redis.call('HINCRBYFLOAT', KEYS[k], ARGV[i], ARGV[i + 1])
    else
      redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
    end
  end
  redis.call('EXPIREAT', KEYS[k], ARGV[k])
end
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
return 0
"""

_ERRORS = (RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class _Day:
    """A UTC day counts are filed under: its hash names, bounds (wall seconds) and
    the expiry times of its day and month hashes."""

    key: str
    month: str
    start: float
    end: float
    expiry: tuple[int, int]


def _day_at(wall: float) -> _Day:
    day, month = period_at("day", wall), period_at("month", wall)
    expiry = (int(day.reset_at) + KEEP_S["day"], int(month.reset_at) + KEEP_S["month"])
    return _Day(day.key, month.key, day.start, day.reset_at, expiry)


@dataclass(frozen=True, slots=True)
class _Sums:
    """One tenant's sums of one day in one flush: the script's keys and arguments,
    kept as they are to be sent again, and the counts they carry."""

    tenant: str
    day: _Day
    keys: list[str]
    args: list[str | int | float]
    counts: Counts


class RedisUsage:
    def __init__(
        self, config: LimitsConfig, wall: Clock = WALL, flush_interval_s: float = FLUSH_INTERVAL_S
    ) -> None:
        self._client = redis_client(config)
        self._flush_script = self._client.register_script(FLUSH_LUA)
        self._prefix = config.key_prefix
        self._wall = wall
        self._periods = period_trackers(wall())
        self._interval_s = flush_interval_s
        self._replica = secrets.token_hex(8)  # whose flush markers
        self._sequence = 0
        #: Counts not yet sent, by the day they were counted in; ``_today`` is the
        #: current day's, ``_day`` that day (the wall's when last counted).
        self._day = _day_at(wall())
        self._today: Counts = {}
        self._counts: dict[_Day, Counts] = {self._day: self._today}
        #: Sent, reply lost: sent again as they are, in the same order (by tenant).
        self._unsettled: dict[str, list[_Sums]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._lock = asyncio.Lock()  # one flush at a time (the timer's, a report's)
        #: Monotonic: the last flush Redis did not answer (None: it answered).
        self._failed_at: float | None = None
        self._refusing = False  # the last flush had tenants' sums refused (logged once)

    def add(self, tenant: str, figure: str, label: str, amount: float) -> None:
        """Count ``amount`` for ``tenant`` (in process; Redis at the next flush):
        ``figure`` is ``requests``, ``rows``, ``compute_seconds`` or ``rejections``,
        ``label`` the status code, model or reason. Filed under the wall's UTC day."""
        day = self._day
        wall = self._wall()
        if not day.start <= wall < day.end:
            day = self._day = _day_at(wall)
            self._today = self._counts.setdefault(day, {})
        key = (tenant, figure, label)
        counts = self._today
        counts[key] = counts.get(key, 0) + amount

    def _count(self, day: _Day, counted: tuple[str, str, str], amount: float) -> None:
        """Count ``amount`` again under ``day`` (sums held back or refused)."""
        counts = self._counts.setdefault(day, {})
        counts[counted] = counts.get(counted, 0) + amount

    async def start(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush_every_interval())

    async def aclose(self) -> None:
        self._closing = True  # the flusher ends even if redis-py swallows its cancel
        if self._flusher is not None:  # (asyncio.wait_for in sends, Python < 3.12)
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush_all()
        await self._client.aclose()

    async def _flush_all(self) -> bool:
        """Flush until nothing is left (a tenant whose last flush lost its reply holds
        its newer counts back until that flush settles: a few rounds send both); False
        if Redis did not take them."""
        for _ in range(3):
            if not await self.flush():
                return False
            if not (self._unsettled or any(self._counts.values())):
                break
        return True

    async def _flush_every_interval(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._interval_s)
            await self.flush()

    def _key(self, tenant: str, kind: str, period: str) -> str:
        return f"{self._prefix}:{{{tenant}}}:usage:{kind}:{period}"

    def _new_sums(self) -> list[_Sums]:
        """This process's counts since the last flush, per tenant and day counted in,
        each under a new sequence number (a tenant with an unsettled flush keeps its
        counts here)."""
        pending, self._counts = self._counts, {}
        self._today = self._counts[self._day] = {}
        sums = []
        for day, counts in pending.items():
            by_tenant: dict[str, Counts] = {}
            for counted, amount in counts.items():
                tenant = counted[0]
                if tenant in self._unsettled:
                    self._count(day, counted, amount)
                else:
                    by_tenant.setdefault(tenant, {})[counted] = amount
            for tenant, tenant_counts in by_tenant.items():
                keys = [
                    self._key(tenant, "day", day.key),
                    self._key(tenant, "month", day.month),
                    f"{self._prefix}:{{{tenant}}}:usage:flushed:{self._replica}:{day.key}",
                ]
                self._sequence += 1
                args: list[str | int | float] = [*day.expiry, self._sequence, MARKER_KEEP_S]
                for (_, figure, label), amount in tenant_counts.items():
                    args += (f"{figure}:{label}", amount)
                sums.append(_Sums(tenant, day, keys, args, tenant_counts))
        return sums

    async def flush(self) -> bool:
        """Send this process's sums to Redis; False if Redis did not take them all
        (what it did not take goes with the next flush, counted once)."""
        async with self._lock:
            batch = [*(s for held in self._unsettled.values() for s in held), *self._new_sums()]
            if not batch:
                return True
            self._unsettled = {}
            replies: list[object] = []
            try:
                # A pipeline a piece, each reply awaited: redis-py packs a pipeline's
                # commands and parses its replies in one stretch of the event loop
                # (1,000 tenants' scripts held every call 20-90 ms at each flush).
                for start in range(0, len(batch), FLUSH_PIPELINE_TENANTS):
                    async with self._client.pipeline(transaction=False) as pipe:
                        for sums in batch[start : start + FLUSH_PIPELINE_TENANTS]:
                            await self._flush_script(keys=sums.keys, args=sums.args, client=pipe)
                        replies += await pipe.execute(raise_on_error=False)
            except _ERRORS as exc:
                failure: BaseException | None = exc
            except asyncio.CancelledError:  # maybe sent, maybe applied: kept to resend
                for sums in batch:
                    self._unsettled.setdefault(sums.tenant, []).append(sums)
                raise
            else:
                failure = None
            refused: list[ResponseError] = []
            for index, sums in enumerate(batch):
                reply = replies[index] if index < len(replies) else None
                if reply is None:  # maybe applied: the same sums again, as they are
                    self._unsettled.setdefault(sums.tenant, []).append(sums)
                elif isinstance(reply, ResponseError):  # took nothing
                    refused.append(reply)
                    for counted, amount in sums.counts.items():
                        self._count(sums.day, counted, amount)
            if failure is not None:
                if self._failed_at is None:
                    logger.warning(
                        "usage counters: redis did not take them (%s)", type(failure).__name__
                    )
                self._failed_at = time.monotonic()
                return False
            self._failed_at = None
            if refused and not self._refusing:  # Redis answers, refusing some (OOM, ...)
                logger.warning(
                    "usage counters: redis refused %d of %d tenants' sums: %s",
                    len(refused),
                    len(batch),
                    refused[0],
                )
            self._refusing = bool(refused)
            return not refused

    async def read(self, tenants: Sequence[str]) -> dict[str, dict[str, dict[str, float]]] | None:
        """Every replica's counts: tenant → ``today``/``this_month`` → field →
        amount; None if Redis does not answer (or did not, at the last flush, less than
        ``flush_interval_s`` ago: no wait). This process's own are flushed first, or,
        for a few tenants (a tenant's own report) none of whose sums are on their way
        unsettled, added as they are: each tenant's report flushed every tenant's sums,
        one script each with the event loop held (1,000 tenants: up to 0.1 s a read,
        ten reads a second allowed)."""
        failed_at = self._failed_at
        if failed_at is not None and time.monotonic() - failed_at < self._interval_s:
            return None
        if len(tenants) <= OWN_READ_TENANTS:
            async with self._lock:  # no flush meanwhile: its sums in neither place
                failed_at = self._failed_at  # while it waited for the lock: no wait either
                if failed_at is not None and time.monotonic() - failed_at < self._interval_s:
                    return None
                if self._unsettled.keys().isdisjoint(tenants):
                    wall = self._wall()
                    return await self._read(tenants, wall, self._pending(tenants, wall))
        await self._flush_all()
        if self._failed_at is not None and self._failed_at != failed_at:
            return None  # it did not answer now (sums it refused: read on)
        return await self._read(tenants, self._wall(), {})

    async def _read(
        self,
        tenants: Sequence[str],
        wall: float,
        pending: dict[str, dict[str, dict[str, float]]],
    ) -> dict[str, dict[str, dict[str, float]]] | None:
        """:meth:`read`'s figures from Redis, ``pending`` added."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for tenant in tenants:
                    for kind in PERIODS.values():
                        pipe.hgetall(self._key(tenant, kind, self._periods[kind].at(wall).key))
                replies = iter(await pipe.execute(raise_on_error=False))
        except _ERRORS as exc:
            logger.warning("usage report: fleet counters unavailable (%s)", type(exc).__name__)
            # The next reports skip Redis too for a while: a flush with nothing to send
            # did not notice the outage, and every report waited its timeout_ms.
            self._failed_at = time.monotonic()
            return None
        self._failed_at = None
        counts = {}
        for tenant in tenants:
            periods = {name: next(replies) for name in PERIODS}
            try:
                counts[tenant] = {name: _figures(reply) for name, reply in periods.items()}
                for name, added in pending.get(tenant, {}).items():
                    figures = counts[tenant][name]
                    for field, amount in added.items():
                        figures[field] = figures.get(field, 0) + amount
            except (RedisError, ValueError) as exc:
                # Another program's key in its place: that tenant's fleet figures only
                # (the whole report went without them, every tenant's).
                logger.warning(
                    "usage report: tenant %s's fleet counters cannot be read (%s): check "
                    "its keys %s",
                    tenant,
                    exc,
                    self._key(tenant, "*", "*"),
                )
        return counts

    def _pending(
        self, tenants: Sequence[str], wall: float
    ) -> dict[str, dict[str, dict[str, float]]]:
        """This process's counts of ``tenants`` not sent yet, as :meth:`read` gives
        them: tenant → ``today``/``this_month`` → field → amount (a day's counts in
        its month, and in today where it is today)."""
        wanted = set(tenants)
        today = self._periods["day"].at(wall).key
        month = self._periods["month"].at(wall).key
        pending: dict[str, dict[str, dict[str, float]]] = {}
        for day, counts in self._counts.items():
            periods = [
                name
                for name, same in (("today", day.key == today), ("this_month", day.month == month))
                if same
            ]
            for (tenant, figure, label), amount in counts.items() if periods else ():
                if tenant in wanted:
                    field = f"{figure}:{label}"
                    for name in periods:
                        figures = pending.setdefault(tenant, {}).setdefault(name, {})
                        figures[field] = figures.get(field, 0) + amount
        return pending


def _figures(reply: object) -> dict[str, float]:
    """A period's hash as read (an error Redis answered for it, raised)."""
    if isinstance(reply, Exception):
        raise reply
    if not isinstance(reply, dict):
        raise ValueError(f"not a hash: {type(reply).__name__}")
    return {field.decode(): float(value) for field, value in reply.items()}


def shared_usage_for(limits: LimitsConfig) -> RedisUsage | None:
    """Fleet-wide usage counters where the limits live in Redis; None with ``local``."""
    return RedisUsage(limits) if limits.store == "redis" else None
