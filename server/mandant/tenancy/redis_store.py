"""Buckets and quota counts in Redis, shared by every replica.

One Lua script per call (the calls of one event-loop turn written to one connection
at once: one round trip), atomic in Redis: it refills each bucket from Redis' own
``TIME``, checks every bucket and quota, and then either takes from all of them
(bucket state in a hash with an expiry; quotas with ``INCRBY`` + ``EXPIRE``) or
from none and says which limit has the longest wait, and that wait. Quota keys name
their UTC period (``…:rows_per_day:2024-05-17``), so a new period starts at zero and
old ones expire. A call admitted but then not run is refunded by a second script on
the same keys (those of the period it was charged in, even after midnight): tokens
back as far as each bucket would hold them (by the take marks the acquire returned;
see :mod:`mandant.tenancy.limits`), quota rows back (``DECRBY``, never below zero). A
caller cancelled while its acquire was on the way is refunded the same way. Every key
of one tenant carries the hash tag ``{tenant}``, so a call's keys share one Redis
Cluster slot.

Each call of a turn is decided by its own reply: an error reply (``OOM`` near
``maxmemory``, ``NOSCRIPT`` after a restart: the script is loaded and the call sent
again) fails that call only; the others stand as Redis decided them.

Work that arrives too late is not charged: an acquire carries the time, on Redis' own
clock, after which it must not take anything (``VALID_SHARE`` of ``timeout_ms`` after
it was written; this replica's offset to Redis' ``TIME`` is measured on connecting
and every ``CLOCK_SYNC_S``, so neither host's clock setting matters). A stalled Redis
that runs it when it wakes, after this replica gave up on it (refused it, or charged
it locally), takes nothing. A reply that comes late though Redis ran the script in time
(this replica stalled: a paused container, CPU throttling; or the reply's way back
did) is read on for :data:`LATE_REPLY_TIMEOUTS` more ``timeout_ms`` on its connection,
and an acquire it says admitted is refunded: its caller was refused or charged locally.
A refund that never left this process (no connection), or that Redis refused before
it ran (``OOM``, ``LOADING`` while a restarted Redis reads its data, …), is kept and
sent with the next batch that reaches Redis. So is one that was written but not
answered, every :data:`RESEND_S` until it is answered: each refund first sets a marker
key of its own (``SET NX``, kept :data:`REFUND_MARK_S`), and from its first write
carries a deadline on Redis' clock (:data:`REFUND_VALID_S` later) after which it
gives back nothing, so that it gives back once however often it reaches Redis. It
was not sent again, taken for run when Redis woke; but a connection closed while
Redis held its scripts (``CLIENT PAUSE WRITE``, as a failover does) loses them, and
their rows stayed charged.

Every Redis or socket failure becomes :class:`StoreUnavailable` here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import itertools
import logging
import math
import re
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis.asyncio as redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from mandant.config import LimitsConfig
from mandant.tenancy.limits import MAX_PEAKS, Clock
from mandant.tenancy.policy import (
    Denial,
    Marks,
    Plan,
    Scope,
    StoreRefused,
    StoreUnavailable,
    cost,
)
from mandant.tenancy.quota import WALL, PeriodKind, PeriodTracker

logger = logging.getLogger(__name__)

#: The Lua both scripts share. A bucket's hash keeps the levels its takes found as
#: ``limits.Peaks`` does (a falling staircase by take mark), newest first: 'peaks',
#: "mark:level,…", of 'steps' entries, so that a take, which pops and pushes at the
#: newest end, costs what it pops (not a parse of every step); and the 'rate' and
#: 'burst' (ARGV's text) its last take was made under.
PEAKS_LUA = """
-- How long a bucket's key lives: until it would be full again, and a second; at most
-- ten years. PEXPIRE takes an integer, and Lua writes a number from 1e17 up as
-- "1e+17": a burst 1e14 times its rate failed every call, blamed on the tenant's keys.
local function bucket_ttl_ms(burst, rate)
  return string.format('%.0f', math.min(math.ceil(burst / rate * 1000) + 1000, 315360000000))
end
local function push_level(peaks, steps, mark, level)
  while steps > 0 do
    local comma = string.find(peaks, ',', 1, true)
    local newest = comma and string.sub(peaks, 1, comma - 1) or peaks
    local colon = string.find(newest, ':', 1, true)
    if tonumber(string.sub(newest, colon + 1)) > level then break end
    peaks = comma and string.sub(peaks, comma + 1) or ''
    steps = steps - 1
  end
  local step = string.format('%.0f:%.17g', mark, level)
  if steps > 0 then peaks = step .. ',' .. peaks else peaks = step end
  steps = steps + 1
  local dropped = nil
  if steps > MAX_PEAKS then  -- keep the newer half; the newest step cut is the floor
    local comma = 0
    for _ = 1, KEPT_PEAKS do comma = string.find(peaks, ',', comma + 1, true) end
    dropped = string.sub(peaks, comma + 1, string.find(peaks, ':', comma + 1, true) - 1)
    peaks = string.sub(peaks, 1, comma - 1)
    steps = KEPT_PEAKS
  end
  return peaks, steps, dropped
end
local function sound_levels(peaks, steps)
  if not peaks then return true end
  local count = 0
  for entry in string.gmatch(peaks, '[^,]+') do
    local level = tonumber(string.match(entry, '^%d+:(.+)$'))
    if level == nil or level ~= level or math.abs(level) == math.huge then return false end
    count = count + 1
  end
  return count == steps
end
local function read_levels(peaks)
  local marks, levels = {}, {}
  for m, l in string.gmatch(peaks or '', '(%d+):([^,]+)') do
    marks[#marks + 1], levels[#levels + 1] = tonumber(m), tonumber(l)
  end
  return marks, levels
end
local function levels_text(marks, levels)
  local parts = {}
  for k = 1, #marks do parts[k] = string.format('%.0f:%.17g', marks[k], levels[k]) end
  return table.concat(parts, ',')
end
""".replace("MAX_PEAKS", str(MAX_PEAKS)).replace("KEPT_PEAKS", str(MAX_PEAKS // 2))

#: KEYS: bucket keys, then quota keys. ARGV: the time (Redis' clock, seconds) after
#: which nothing may be taken, #buckets, #quotas, then per bucket (rate, burst, cost,
#: take mark: 0 here), then per quota (limit, cost, ttl_s, wait_s if it refuses).
#: Returns {0, "0", take mark per bucket} when admitted, {-1, "0"} when it ran too
#: late (nothing taken), else {i, wait_s} with i the 1-based index of the limit with
#: the longest wait. A bucket's hash keeps its level ('tokens' at 'ts') and the
#: levels its takes found (PEAKS_LUA; takes before 'floor' get nothing back). A take's
#: mark is Redis' TIME in microseconds, or one more than the last take's (the newest
#: step's), so marks rise while the key lives; a key that expired (the bucket was
#: full) starts again later.
#: A take under another rate or burst than the last (a reload) first adds a step at
#: the burst, as ``TokenBucket.reconfigure`` does: takes before it get nothing back.
ACQUIRE_LUA = (
    PEAKS_LUA
    + """
local clock = redis.call('TIME')
local stamp = clock[1] .. '.' .. string.format('%06d', tonumber(clock[2]))
local now = tonumber(stamp)
if now > tonumber(ARGV[1]) then return {-1, '0'} end
local nb = tonumber(ARGV[2])
local nq = tonumber(ARGV[3])
local levels, states = {}, {}
local refuse, longest = 0, 0
for i = 1, nb do
  local base = 3 + 4 * (i - 1)
  local rate = tonumber(ARGV[base + 1])
  local burst = tonumber(ARGV[base + 2])
  local need = tonumber(ARGV[base + 3])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts', 'peaks', 'steps', 'floor', 'rate',
    'burst')
  if not sound_levels(state[3], tonumber(state[4])) then
    state = {}  -- a hash another program wrote: the bucket is taken as new
  end
  local level = tonumber(state[1])
  local ts = tonumber(state[2])
  if level == nil or ts == nil or level ~= level or ts ~= ts  -- absent, NaN,
      or math.abs(level) == math.huge or math.abs(ts) == math.huge then  -- or infinite
    level = burst
  elseif now > ts then
    level = level + (now - ts) * rate
  end
  if level > burst then level = burst end
  if level < need and (need - level) / rate > longest then
    refuse, longest = i, (need - level) / rate
  end
  levels[i], states[i] = level, state
end
local qbase = 3 + 4 * nb
for j = 1, nq do
  local base = qbase + 4 * (j - 1)
  local raw = redis.call('GET', KEYS[nb + j]) or '0'
  if not string.match(raw, '^%-?%d+$') or string.len(raw) > 18 then
    -- Another program's value: refused before anything is written (a take that
    -- failed at INCRBY had charged the buckets and the quotas before it).
    return redis.error_reply('value is not an integer or out of range (a quota count)')
  end
  local used = tonumber(raw)
  if used + tonumber(ARGV[base + 2]) > tonumber(ARGV[base + 1]) then
    local wait = tonumber(ARGV[base + 4])
    if refuse == 0 or wait > longest then refuse, longest = nb + j, wait end
  end
end
if refuse > 0 then return {refuse, string.format('%.17g', longest)} end
local reply = {0, '0'}
local micros = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
for i = 1, nb do
  local base = 3 + 4 * (i - 1)
  local rate = tonumber(ARGV[base + 1])
  local burst = tonumber(ARGV[base + 2])
  local state = states[i]
  local peaks, steps = state[3] or '', tonumber(state[4]) or 0
  local mark = micros
  if steps > 0 then  -- the newest step is the last take's
    local last = tonumber(string.sub(peaks, 1, string.find(peaks, ':', 1, true) - 1))
    if mark <= last then mark = last + 1 end
  end
  local floor, dropped = nil, nil
  local reconfigured = state[6] ~= ARGV[base + 1] or state[7] ~= ARGV[base + 2]
  if reconfigured and state[6] then
    peaks, steps, floor = push_level(peaks, steps, mark, burst)
    mark = mark + 1
  end
  peaks, steps, dropped = push_level(peaks, steps, mark, levels[i])
  floor = dropped or floor
  if floor then redis.call('HSET', KEYS[i], 'floor', floor) end
  if reconfigured then
    redis.call('HSET', KEYS[i], 'rate', ARGV[base + 1], 'burst', ARGV[base + 2])
  end
  local left = levels[i] - tonumber(ARGV[base + 3])
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', left), 'ts', stamp,
    'peaks', peaks, 'steps', steps)
  redis.call('PEXPIRE', KEYS[i], bucket_ttl_ms(burst, rate))
  reply[i + 2] = mark
end
for j = 1, nq do
  local base = qbase + 4 * (j - 1)
  redis.call('INCRBY', KEYS[nb + j], ARGV[base + 2])
  if redis.call('TTL', KEYS[nb + j]) < tonumber(ARGV[base + 3]) then
    redis.call('EXPIRE', KEYS[nb + j], ARGV[base + 3])  -- never shortened (QUOTA_KEY_GRACE_S)
  end
end
return reply
"""
)

#: A refund gives back nothing once this long has passed, on Redis' clock, since it
#: was first written; one written but not answered is sent again until then (module
#: doc). Far above a failover's pause of writes.
REFUND_VALID_S = 20
#: How long a refund's marker key lives: past its deadline, with room for the error
#: of the clock offset. One a refund (2,000 a second: about 10 MB in Redis).
REFUND_MARK_S = 30

#: ACQUIRE_LUA's KEYS and ARGV, with the take marks it returned and, in ARGV[1], the
#: refund's own deadline (:data:`REFUND_VALID_S`; past it, nothing), and one more key:
#: the refund's marker; one already set (the refund ran) gives nothing. Gives
#: back each bucket's cost as far as the bucket would hold it had it never been
#: taken, and raises the levels later takes found to match (``limits.Peaks.refund``;
#: nothing to a bucket whose key expired, full since, or whose last take was under
#: another rate or burst: a reload since the take), and each quota's cost (a quota key
#: that expired belongs to a period that is long over). Returns 0.
REFUND_LUA = (
    PEAKS_LUA
    + """
local nb = tonumber(ARGV[2])
local nq = tonumber(ARGV[3])
local clock = redis.call('TIME')
local stamp = clock[1] .. '.' .. string.format('%06d', tonumber(clock[2]))
local now = tonumber(stamp)
if now > tonumber(ARGV[1]) then return 0 end
if not redis.call('SET', KEYS[nb + nq + 1], '1', 'NX', 'EX', REFUND_MARK_S) then
  return 0
end
for i = 1, nb do
  local base = 3 + 4 * (i - 1)
  local rate = tonumber(ARGV[base + 1])
  local burst = tonumber(ARGV[base + 2])
  local cost = tonumber(ARGV[base + 3])
  local mark = tonumber(ARGV[base + 4])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts', 'peaks', 'floor', 'rate', 'burst')
  local level = tonumber(state[1])
  local ts = tonumber(state[2])
  if level ~= nil and ts ~= nil and state[5] == ARGV[base + 1] and state[6] == ARGV[base + 2]
      and mark >= (tonumber(state[4]) or 0) then
    if now > ts then level = level + (now - ts) * rate end
    if level > burst then level = burst end
    local marks, peaks = read_levels(state[3])
    local newer = 0  -- the steps of takes after this one: the newest first
    while newer < #marks and marks[newer + 1] > mark do newer = newer + 1 end
    local give
    if newer == 0 then
      give = math.min(cost, burst - level)
    else
      local first = peaks[newer]
      local lift = math.min(cost, burst - first)
      if lift > 0 then
        for k = 1, newer do peaks[k] = peaks[k] + lift end
        while newer < #marks and peaks[newer + 1] <= peaks[newer] do
          table.remove(marks, newer + 1)
          table.remove(peaks, newer + 1)
        end
        redis.call('HSET', KEYS[i], 'peaks', levels_text(marks, peaks), 'steps', #marks)
      end
      give = math.min(cost, burst - math.max(first, level))
    end
    if give > 0 then level = level + give end
    redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', level), 'ts', stamp)
    redis.call('PEXPIRE', KEYS[i], bucket_ttl_ms(burst, rate))
  end
end
local qbase = 3 + 4 * nb
for j = 1, nq do
  local raw = redis.call('GET', KEYS[nb + j])
  if raw then
    local give = math.min(tonumber(raw), tonumber(ARGV[qbase + 4 * (j - 1) + 2]))
    if give > 0 then redis.call('DECRBY', KEYS[nb + j], give) end
  end
end
return 0
""".replace("REFUND_MARK_S", str(REFUND_MARK_S))
)

#: Quota keys outlive their period by this much (clock skew between replicas). Their
#: lifetime goes to Redis as a length (``EXPIRE``), not a moment: read on Redis' clock,
#: a moment set by a replica whose clock was over an hour behind was already past,
#: and every take deleted the day's count (the quota never bound for the rest of it).
#: A take only lengthens it: a replica over an hour ahead would end it early (the
#: count gone before the period, the quota given again).
QUOTA_KEY_GRACE_S = 3600
#: An acquire must run in Redis within this share of ``timeout_ms`` after it was
#: written, or it takes nothing: the rest covers the error of the clock offset and
#: the reply's way back, so that what this replica gave up on stays uncharged.
VALID_SHARE = 0.8
#: This replica's clock is compared with Redis' ``TIME`` again after this long.
CLOCK_SYNC_S = 30.0
#: Replies not read within ``timeout_ms`` are read on for this many more (at least a
#: second), so that what a late acquire took is given back (module doc).
LATE_REPLY_TIMEOUTS = 4
#: Refunds kept while Redis cannot be reached, at most (one more is logged as lost).
MAX_KEPT_REFUNDS = 100_000
#: A refund written but not answered is sent again after this long, if no call's batch
#: took it first.
RESEND_S = 1.0

_SCRIPTS: Final = {
    "acquire": (hashlib.sha1(ACQUIRE_LUA.encode()).hexdigest(), ACQUIRE_LUA),
    "refund": (hashlib.sha1(REFUND_LUA.encode()).hexdigest(), REFUND_LUA),
}
#: What a failed operation of this module's client raises.
_ERRORS = (RedisError, OSError, TimeoutError)


class _Unanswered(enum.Enum):
    """A call's reply that never came: the call was not written (Redis never had
    it), or it was written and the reply was lost (Redis may have run it)."""

    UNSENT = enum.auto()
    LOST = enum.auto()


_UNSENT: Final = _Unanswered.UNSENT
_LOST: Final = _Unanswered.LOST

_Kind = Literal["acquire", "refund", "get"]


@dataclass(frozen=True, slots=True)
class _Call:
    """One operation waiting for the next batch, and the future of its reply (None
    for a refund: nobody waits for it)."""

    kind: _Kind
    keys: list[str]
    args: list[float | int | str]
    future: asyncio.Future[Any] | None
    #: A refund once written: the time.monotonic() after which it gives back nothing
    #: (:data:`REFUND_VALID_S` after its first write; Redis checks it on its clock).
    due_by: float | None = None


#: An error reply: Redis refused the command (redis-py makes ``-LOADING`` a connection
#: error, though the connection is sound and the next replies come on it).
_ErrorReply = ResponseError | BusyLoadingError
#: Refusals redis-py names, of a script that never ran (:func:`_never_ran`).
_REFUSED = OutOfMemoryError | ReadOnlyError | NoScriptError | BusyLoadingError | MasterDownError


def _never_ran(error: _ErrorReply) -> bool:
    """Whether Redis refused a script before it wrote anything (so sending it again
    cannot count it twice): out of memory (checked at a script's first write), a
    read-only replica, a missing script, busy with another script, loading its data
    (a restart), no reachable primary."""
    # redis-py takes the code out of the text of the errors it names, not the others'.
    return isinstance(error, _REFUSED) or str(error).startswith(("BUSY", "NOREPLICAS", "MISCONF"))


#: A quota count as the acquire script takes it (digits, a sign, 18 characters at
#: most); anything else another program wrote.
_COUNT = re.compile(rb"(?=.{1,18}$)-?\d+")


def _own_keys(error: _ErrorReply) -> str | None:
    """What an error reply says of the call's own keys, if that is what it is about:
    ``WRONGTYPE`` (a key another program wrote), or the script failing on what a key
    holds (a corrupted bucket, a count that is not an integer). That call alone fails
    (:class:`StoreRefused`): taken for an outage, one tenant's bad key sent every
    tenant's calls to ``on_store_error`` for ``retry_interval_s`` at a time. Any other
    error reply (out of memory, a read-only replica, loading, ACL rules, …) is Redis'
    as a whole."""
    text = str(error)  # redis-py leaves out the code ERR, not the others
    if text.startswith("WRONGTYPE"):
        return "WRONGTYPE"
    if text.startswith(
        (
            "value is not an integer",
            "hash value is not an integer",
            "increment or decrement would overflow",
        )
    ):
        return "a count that is not an integer"  # INCRBY on a key another program wrote
    lua_error = text.startswith(("user_script:", "Error running script"))
    if lua_error and "can't run this command" not in text:  # not an ACL rule's refusal
        return "a script error on its keys"
    return None


def redis_client(config: LimitsConfig) -> redis.Redis:
    """A client of the limits store at ``config.url``: ``timeout_ms`` for every
    operation and connection, no retries (a failure is the store's policy's to handle)."""
    assert config.url is not None
    timeout_s = config.timeout_ms / 1000.0
    return redis.Redis.from_url(
        config.url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def period_trackers(now: float) -> dict[PeriodKind, PeriodTracker]:
    """The quota day and month as of ``now`` (wall clock)."""
    return {"day": PeriodTracker("day", now), "month": PeriodTracker("month", now)}


def _scope_part(prefix: str, scope: Scope) -> str:
    tenant, model = scope
    return f"{prefix}:{{{tenant}}}:{model if model is not None else '*'}"


class RedisStore:
    name = "redis"

    def __init__(self, config: LimitsConfig, wall: Clock = WALL) -> None:
        self._client = redis_client(config)
        self._prefix = config.key_prefix
        self._wall = wall
        self._timeout_s = config.timeout_ms / 1000.0
        self._periods = period_trackers(wall())
        self._bucket_keys: dict[tuple[str, str], tuple[Plan, list[str]]] = {}
        self._pending: list[_Call] = []
        self._kept: list[_Call] = []  # refunds that never reached Redis
        # Each refund's marker key: this store's own token and a count.
        self._refund_names = (
            f"refund:{secrets.token_hex(8)}:{number}" for number in itertools.count()
        )
        self._resend: asyncio.TimerHandle | None = None  # the next try of those kept
        self._closing = False
        self._sending: set[asyncio.Task[None]] = set()
        # Redis' TIME minus time.monotonic(), at most (measured so that a deadline
        # computed with it is never later, on Redis' clock, than meant), and until
        # when that measure is used.
        self._offset_s: float | None = None
        self._offset_until = 0.0

    async def start(self) -> None:
        """Load the scripts and read Redis' clock; an unreachable Redis is not fatal
        (admission falls back; both are done again when needed)."""
        pool = self._client.connection_pool
        try:
            connection = await self._connection()
            try:
                await self._load_scripts(connection)
                await self._sync_clock(connection)
            finally:
                await pool.release(connection)
        except _ERRORS as exc:
            logger.warning("limits store redis not reachable at start: %s", type(exc).__name__)

    async def aclose(self) -> None:
        self._closing = True  # no more timed tries: the last one is below
        if self._resend is not None:
            self._resend.cancel()
        await self._drain()  # refunds the last replies queued, too
        if self._kept:  # one more try for the refunds Redis has not had
            self._flush()
            await self._drain()
        if self._kept:
            logger.warning(
                "limits store redis: %d refunds never reached Redis (closing)", len(self._kept)
            )
        if self._resend is not None:  # armed by the last settling
            self._resend.cancel()
        await self._client.aclose()

    async def _drain(self) -> None:
        while self._sending or self._pending:
            if self._sending:
                await asyncio.gather(*self._sending, return_exceptions=True)
            else:
                await asyncio.sleep(0)

    async def acquire(self, plan: Plan, rows: int, wall: float) -> Denial | Marks:
        keys, args, resets = self._arguments(plan, rows, wall)
        admitting = self._batched("acquire", keys, args)
        try:
            reply = await admitting
        except asyncio.CancelledError:
            # Cancelled as Redis' admission was being handed over (its reply set, this
            # call not yet resumed): nothing will run, so it gives back what it took.
            # (Cancelled before the reply came, the reply's settling does that.)
            handed = admitting.done() and not admitting.cancelled() and not admitting.exception()
            if handed and int(admitting.result()[0]) == 0:
                self.refund(plan, rows, wall, _marks(admitting.result()))
            raise
        index, wait = int(reply[0]), float(reply[1])
        if index == 0:
            return _marks(reply)
        if index <= len(plan.buckets):
            scope, rate = plan.buckets[index - 1]
            return Denial(rate, scope, wait)
        position = index - 1 - len(plan.buckets)
        scope, quota = plan.quotas[position]
        return Denial(quota, scope, max(0.0, resets[position] - wall))

    def refund(self, plan: Plan, rows: int, wall: float, marks: Marks) -> None:
        keys, args, _ = self._arguments(plan, rows, wall)
        self._queue(self._refund_call(keys, _marked(args, marks)))

    def _refund_call(self, keys: list[str], args: list[float | int | str]) -> _Call:
        """A refund of an acquire's ``keys``, with its marker key (in its tenant's
        hash slot: every key of a call shares the first one's ``{tenant}``)."""
        return _Call("refund", [*keys, f"{keys[0]}:{next(self._refund_names)}"], args, None)

    async def used(self, scope: Scope, quota_name: str, period: PeriodKind) -> int:
        """Rows counted against one quota in its current period; the reads of one
        event-loop turn (a usage report's, for every tenant) go in one batch."""
        current = self._periods[period].at(self._wall())
        key = f"{_scope_part(self._prefix, scope)}:{quota_name}:{current.key}"
        value = await self._batched("get", [key], [])
        if value is not None and not _COUNT.fullmatch(value):  # as the script reads it
            raise StoreRefused("redis: a count that is not an integer")
        return int(value or 0)

    def _arguments(
        self, plan: Plan, rows: int, wall: float
    ) -> tuple[list[str], list[float | int | str], list[float]]:
        """The scripts' KEYS and ARGV (but the deadline) for one call, and when each
        quota period ends. Quota keys are those of the period of ``wall``."""
        cached = self._bucket_keys.get((plan.tenant, plan.model))
        if cached is None or cached[0] is not plan:
            cached = self._bucket_keys[(plan.tenant, plan.model)] = (
                plan,
                [f"{_scope_part(self._prefix, s)}:{rate.name}" for s, rate in plan.buckets],
            )
        keys = list(cached[1])
        args: list[float | int | str] = [len(plan.buckets), len(plan.quotas)]
        for _, rate in plan.buckets:
            args += (rate.per_s, rate.burst, cost(rate, rows), 0)
        resets: list[float] = []
        for scope, quota in plan.quotas:
            period = self._periods[quota.period].at(wall)
            keys.append(f"{_scope_part(self._prefix, scope)}:{quota.name}:{period.key}")
            ttl_s = math.ceil(max(0.0, period.reset_at - wall)) + QUOTA_KEY_GRACE_S
            args += (quota.limit, rows, ttl_s, max(0.0, period.reset_at - wall))
            resets.append(period.reset_at)
        return keys, args, resets

    def _batched(
        self, kind: _Kind, keys: list[str], args: list[float | int | str]
    ) -> asyncio.Future[Any]:
        """The reply of one operation. Operations made in the same turn of the event
        loop go to Redis together: one socket write and one round trip, instead of
        one per call (each script still runs atomically)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue(_Call(kind, keys, args, future))
        return future

    def _queue(self, call: _Call) -> None:
        self._pending.append(call)
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        # Calls first: a backlog of kept refunds must not push them past their deadline.
        kept = self._kept
        if any(call.due_by is not None for call in kept):
            kept = self._unexpired(kept)
        calls, self._pending = self._pending + kept, []
        self._kept = []
        self._track(self._send(calls))

    def _send_kept(self) -> None:
        self._resend = None
        if self._kept and not self._pending:
            self._flush()

    @staticmethod
    def _unexpired(kept: list[_Call]) -> list[_Call]:
        """``kept`` but the refunds past their deadline (Redis would take nothing)."""
        now = time.monotonic()
        due = [call for call in kept if call.due_by is None or call.due_by > now]
        if len(due) < len(kept):
            logger.warning(
                "limits store redis: %d refund(s) written but not answered within %d s are "
                "given up; Redis applied those it ran",
                len(kept) - len(due),
                REFUND_VALID_S,
            )
        return due

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task that :meth:`aclose` waits for."""
        task = asyncio.get_running_loop().create_task(work)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[_Call]) -> None:
        pool = self._client.connection_pool
        try:
            connection = await self._connection()
        except _ERRORS as exc:  # nothing was written
            await pool.disconnect(inuse_connections=False)
            self._settle(calls, [_UNSENT] * len(calls), exc)
            return
        late: list[_Call] = []  # written, their replies not read in time
        try:
            replies, failure = await self._exchange(connection, calls, late)
        finally:
            if not late:
                await pool.release(connection)
        if late:  # the connection goes with them, then back to the pool
            self._track(self._read_late(connection, late))
        if failure is not None:
            self._offset_s = None  # measured again on the next connection
            await pool.disconnect(inuse_connections=False)
        self._settle(calls, replies, failure)

    async def _connection(self) -> AbstractConnection:
        """A connection from the pool that Redis has not closed: one it closed (Redis
        restarted or went away) is made again here, so that a write to a dead peer
        never passes for a command sent."""
        pool = self._client.connection_pool
        connection: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            if await connection.can_read():  # closed by Redis (or data nobody asked for)
                await connection.disconnect()
                await connection.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await pool.release(connection)
            raise
        return connection

    async def _exchange(
        self, connection: AbstractConnection, calls: list[_Call], late: list[_Call]
    ) -> tuple[list[Any], BaseException | None]:
        """Each call's reply (an error reply as its exception, ``_UNSENT`` or
        ``_LOST`` where none came), and the failure that ended the exchange early.
        Acquires carry a deadline on Redis' clock; the replies are awaited for at
        most ``timeout_ms`` from the write, which is after that deadline. Where that
        time ran out with the calls written, the acquires whose replies were not read
        go to ``late`` (:meth:`_read_late` reads them on, the connection kept)."""
        replies: list[Any] = [_UNSENT] * len(calls)
        written: list[int] = []
        try:
            if self._offset_s is None or time.monotonic() >= self._offset_until:
                await self._sync_clock(connection)
            assert self._offset_s is not None
            written_at = time.monotonic()
            deadline = f"{self._offset_s + written_at + VALID_SHARE * self._timeout_s:.6f}"
            todo = list(range(len(calls)))
            async with asyncio.timeout(self._timeout_s):
                for attempt in range(2):
                    if attempt:  # Redis restarted: load the scripts, send those calls again
                        await self._load_scripts(connection)
                    for i in todo:  # a refund's deadline runs from its first write
                        if calls[i].kind == "refund" and calls[i].due_by is None:
                            calls[i] = dataclasses.replace(
                                calls[i], due_by=written_at + REFUND_VALID_S
                            )
                    commands = [self._command(calls[i], deadline) for i in todo]
                    for i in todo:
                        replies[i] = _LOST
                    await connection.send_packed_command(
                        connection.pack_commands(commands), check_health=False
                    )
                    written = todo
                    for i in todo:
                        replies[i] = await _reply(connection)
                    written = []
                    todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
                    if not todo:
                        break
        except _ERRORS as exc:
            unread = [calls[i] for i in written if replies[i] is _LOST]
            if isinstance(exc, TimeoutError) and any(c.kind == "acquire" for c in unread):
                late.extend(unread)  # replies in order: these are the last ones
            else:
                await connection.disconnect()
            return replies, exc
        return replies, None

    async def _read_late(self, connection: AbstractConnection, calls: list[_Call]) -> None:
        """Read the replies of ``calls`` that did not come within ``timeout_ms`` (their
        callers were answered without them), for :data:`LATE_REPLY_TIMEOUTS` more at
        most, and refund each acquire one says admitted; then close the connection."""
        given_back = 0
        try:
            async with asyncio.timeout(max(1.0, LATE_REPLY_TIMEOUTS * self._timeout_s)):
                for call in calls:
                    reply = await _reply(connection, math.inf)  # the timeout above only
                    given_back += self._give_back(call, reply)
        except _ERRORS:
            pass  # those Redis ran in time stay charged
        finally:
            await connection.disconnect()
            await self._client.connection_pool.release(connection)
        if given_back:
            logger.warning(
                "limits store redis: %d call(s) answered after timeout_ms (this process "
                "or the network stalled): what Redis took for them is given back",
                given_back,
            )

    def _command(self, call: _Call, deadline: str) -> tuple[float | int | str, ...]:
        """``deadline``: an acquire's, on Redis' clock; a refund has its own."""
        if call.kind == "get":
            return ("GET", call.keys[0])
        if call.due_by is not None:
            assert self._offset_s is not None
            deadline = f"{self._offset_s + call.due_by:.6f}"
        sha, _ = _SCRIPTS[call.kind]
        return ("EVALSHA", sha, len(call.keys), *call.keys, deadline, *call.args)

    async def _load_scripts(self, connection: AbstractConnection) -> None:
        for _, script in _SCRIPTS.values():
            await connection.send_command("SCRIPT", "LOAD", script, check_health=False)
            await connection.read_response()

    async def _sync_clock(self, connection: AbstractConnection) -> None:
        """Measure Redis' TIME against time.monotonic(): Redis read its clock at some
        moment before the reply came, so ``TIME - received`` is at most the offset
        (a deadline made with it falls early, never late, by the round trip)."""
        await connection.send_command("TIME", check_health=False)
        seconds, micros = await connection.read_response()
        received = time.monotonic()
        self._offset_s = int(seconds) + int(micros) / 1e6 - received
        self._offset_until = received + CLOCK_SYNC_S

    def _settle(
        self, calls: list[_Call], replies: list[Any], failure: BaseException | None
    ) -> None:
        lost = unanswered = 0
        for call, reply in zip(calls, replies, strict=True):
            if call.future is None:
                outcome = self._settle_refund(call, reply)
                lost += outcome == "lost"
                unanswered += outcome == "unanswered"
                continue
            if call.future.done():  # its caller was cancelled meanwhile: nothing runs
                self._give_back(call, reply)
                continue
            if isinstance(reply, _Unanswered):
                error = StoreUnavailable(f"redis: {type(failure).__name__}")
                error.__cause__ = failure
            elif isinstance(reply, _ErrorReply) and (own := _own_keys(reply)) is not None:
                error = StoreRefused(f"redis: {own}")
                error.__cause__ = reply
            elif isinstance(reply, _ErrorReply):
                error = StoreUnavailable(f"redis: {type(reply).__name__}")
                error.__cause__ = reply
            elif call.kind == "acquire" and int(reply[0]) == -1:
                # Redis ran it after its deadline (a stall, or Redis' clock moved):
                # it took nothing; the clock is measured again.
                self._offset_s = None
                error = StoreUnavailable("redis: too slow (the call passed its deadline)")
            else:
                call.future.set_result(reply)
                continue
            call.future.set_exception(error)
        if lost:  # one line a batch, however many (a backlog flooded the log)
            logger.warning("limits store redis: %d refund(s) lost (too many kept)", lost)
        if self._resend is None and not self._closing and any(c.due_by for c in self._kept):
            # A refund once written is sent again before its deadline, calls or not (kept
            # refunds otherwise wait for the next call's batch), until Redis answers.
            self._resend = asyncio.get_running_loop().call_later(RESEND_S, self._send_kept)
        if unanswered:
            logger.warning(
                "limits store redis: %d refund(s) sent but not answered (%s); sent again "
                "(each gives back once)",
                unanswered,
                type(failure).__name__ if failure is not None else "an error reply",
            )

    def _give_back(self, call: _Call, reply: Any) -> bool:
        """Refund what an acquire whose caller did not get its ``reply`` took, if it
        admitted (the caller left, or the reply came too late); whether it did."""
        if call.kind != "acquire" or not isinstance(reply, list) or int(reply[0]) != 0:
            return False
        self._queue(self._refund_call(call.keys, _marked(call.args, _marks(reply))))
        return True

    def _settle_refund(self, call: _Call, reply: Any) -> str:
        """Keep a refund that never ran, or may not have, for the next batch; what
        became of it: ``kept``, ``unanswered`` (sent, no reply: kept too), ``lost`` (too
        many kept), or ``done`` (run, or an error reply about its keys: it cannot)."""
        if reply is _UNSENT or (isinstance(reply, _ErrorReply) and _never_ran(reply)):
            outcome = "kept"
        elif reply is _LOST or (isinstance(reply, _ErrorReply) and _own_keys(reply) is None):
            outcome = "unanswered"  # it may have run: its marker and deadline make it safe
        else:
            return "done"
        if len(self._kept) < MAX_KEPT_REFUNDS:
            self._kept.append(call)  # goes with the next batch
            return outcome
        return "lost"


def _marks(reply: list[Any]) -> Marks:
    """The take marks of an admitting acquire's reply."""
    return tuple(int(mark) for mark in reply[2:])


def _marked(args: list[float | int | str], marks: Marks) -> list[float | int | str]:
    """An acquire's ARGV (but the deadline) with the take marks it returned: the
    refund's."""
    args = list(args)
    for i, mark in enumerate(marks):
        args[2 + 4 * i + 3] = mark
    return args


async def _reply(connection: AbstractConnection, timeout_s: float | None = None) -> Any:
    """The next reply on ``connection`` (``timeout_s``: redis-py's read timeout, the
    client's ``socket_timeout`` where None; ``math.inf``: none); an error reply is
    returned, not raised. A failed or cancelled read leaves the connection open
    (redis-py would close it), to be read on (:meth:`RedisStore._read_late`; its parser
    keeps what it had read of a reply) or closed by the caller."""
    try:
        return await connection.read_response(timeout=timeout_s, disconnect_on_error=False)
    except (ResponseError, BusyLoadingError) as exc:
        return exc
