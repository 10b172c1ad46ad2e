"""Buckets and quota counts in Redis, shared by every replica.

One Lua script per call (the calls of one event-loop turn sent as one pipeline),
atomic in Redis: it refills each bucket from Redis' own
``TIME`` (replicas' clocks do not matter), checks every bucket and quota, and then
either takes from all of them (bucket state in a hash with an expiry; quotas with
``INCRBY`` + ``EXPIREAT``) or from none and says which limit refused and the wait.
Quota keys name their UTC period (``…:rows_per_day:2024-05-17``), so a new period
starts at zero and old ones expire. A call admitted but then not run is refunded by a
second script on the same keys and arguments: tokens back up to each bucket's burst,
quota rows back in the period they were counted in (``DECRBY``, never below zero).
A caller cancelled while its acquire was on the way is refunded the same way. Every
key of one tenant carries the hash tag ``{tenant}``, so a call's keys share one Redis
Cluster slot.

Every Redis or socket failure becomes :class:`StoreUnavailable` here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from mandant.config import LimitsConfig
from mandant.tenancy.limits import Clock
from mandant.tenancy.policy import Denial, Plan, Scope, StoreUnavailable, cost
from mandant.tenancy.quota import WALL, PeriodKind, PeriodTracker

logger = logging.getLogger(__name__)

#: KEYS: bucket keys, then quota keys. ARGV: #buckets, #quotas, then per bucket
#: (rate, burst, cost), then per quota (limit, cost, expire_at). Returns {0, "0"}
#: when admitted, else {i, wait_s} with i the 1-based index of the refusing key
#: (wait_s is "-1" for quotas: the caller knows when its period ends).
ACQUIRE_LUA = """
local nb = tonumber(ARGV[1])
local nq = tonumber(ARGV[2])
local clock = redis.call('TIME')
local stamp = clock[1] .. '.' .. string.format('%06d', tonumber(clock[2]))
local now = tonumber(stamp)
local levels = {}
for i = 1, nb do
  local base = 2 + 3 * (i - 1)
  local rate = tonumber(ARGV[base + 1])
  local burst = tonumber(ARGV[base + 2])
  local need = tonumber(ARGV[base + 3])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local level = tonumber(state[1])
  local ts = tonumber(state[2])
  if level == nil or ts == nil then
    level = burst
  elseif now > ts then
    level = level + (now - ts) * rate
  end
  if level > burst then level = burst end
  if level < need then
    return {i, string.format('%.17g', (need - level) / rate)}
  end
  levels[i] = level
end
local qbase = 2 + 3 * nb
for j = 1, nq do
  local base = qbase + 3 * (j - 1)
  local used = tonumber(redis.call('GET', KEYS[nb + j]) or '0')
  if used + tonumber(ARGV[base + 2]) > tonumber(ARGV[base + 1]) then
    return {nb + j, '-1'}
  end
end
for i = 1, nb do
  local base = 2 + 3 * (i - 1)
  local rate = tonumber(ARGV[base + 1])
  local burst = tonumber(ARGV[base + 2])
  local left = levels[i] - tonumber(ARGV[base + 3])
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', left), 'ts', stamp)
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
end
for j = 1, nq do
  local base = qbase + 3 * (j - 1)
  redis.call('INCRBY', KEYS[nb + j], ARGV[base + 2])
  redis.call('EXPIREAT', KEYS[nb + j], ARGV[base + 3])
end
return {0, '0'}
"""

#: ACQUIRE_LUA's KEYS and ARGV; gives back each bucket's cost (up to its burst; a
#: bucket whose key expired is full already) and each quota's cost (a quota key that
#: expired belongs to a period that is over). Returns 0.
REFUND_LUA = """
local nb = tonumber(ARGV[1])
local nq = tonumber(ARGV[2])
local clock = redis.call('TIME')
local stamp = clock[1] .. '.' .. string.format('%06d', tonumber(clock[2]))
local now = tonumber(stamp)
for i = 1, nb do
  local base = 2 + 3 * (i - 1)
  local rate = tonumber(ARGV[base + 1])
  local burst = tonumber(ARGV[base + 2])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local level = tonumber(state[1])
  local ts = tonumber(state[2])
  if level ~= nil and ts ~= nil then
    if now > ts then level = level + (now - ts) * rate end
    level = level + tonumber(ARGV[base + 3])
    if level > burst then level = burst end
    redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', level), 'ts', stamp)
    redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
  end
end
local qbase = 2 + 3 * nb
for j = 1, nq do
  local raw = redis.call('GET', KEYS[nb + j])
  if raw then
    local give = math.min(tonumber(raw), tonumber(ARGV[qbase + 3 * (j - 1) + 2]))
    if give > 0 then redis.call('DECRBY', KEYS[nb + j], give) end
  end
end
return 0
"""

#: Quota keys outlive their period by this much (clock skew between replicas).
QUOTA_KEY_GRACE_S = 3600


@dataclass(frozen=True, slots=True)
class _Call:
    """One script call waiting for the next pipeline, and the future of its reply."""

    script: AsyncScript
    keys: list[str]
    args: list[Any]
    future: asyncio.Future[Any]


def _refund_done(future: asyncio.Future[Any]) -> None:
    """A refund is not awaited by anyone: a failed one is logged here (the tokens
    refill anyway; the quota rows stay counted)."""
    if not future.cancelled() and future.exception() is not None:
        logger.warning("limits store redis: a refund was lost (%s)", future.exception())


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
        self._acquire_script = self._client.register_script(ACQUIRE_LUA)
        self._refund_script = self._client.register_script(REFUND_LUA)
        self._prefix = config.key_prefix
        self._wall = wall
        self._periods = period_trackers(wall())
        self._bucket_keys: dict[tuple[str, str], tuple[Plan, list[str]]] = {}
        self._pending: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Load the script; an unreachable Redis is not fatal (admission falls back)."""
        try:
            for script in (ACQUIRE_LUA, REFUND_LUA):
                await self._client.script_load(script)
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("limits store redis not reachable at start: %s", type(exc).__name__)

    async def aclose(self) -> None:
        while self._sending or self._pending:  # refunds the last replies queued, too
            if self._sending:
                await asyncio.gather(*self._sending, return_exceptions=True)
            else:
                await asyncio.sleep(0)
        await self._client.aclose()

    async def acquire(self, plan: Plan, rows: int, wall: float) -> Denial | None:
        keys, args, resets = self._arguments(plan, rows, wall)
        index, wait = await self._batched(self._acquire_script, keys, args)
        index = int(index)
        if index == 0:
            return None
        if index <= len(plan.buckets):
            scope, rate = plan.buckets[index - 1]
            return Denial(rate, scope, float(wait))
        position = index - 1 - len(plan.buckets)
        scope, quota = plan.quotas[position]
        return Denial(quota, scope, max(0.0, resets[position] - wall))

    def refund(self, plan: Plan, rows: int, wall: float) -> None:
        keys, args, _ = self._arguments(plan, rows, wall)
        self._batched(self._refund_script, keys, args).add_done_callback(_refund_done)

    def _arguments(
        self, plan: Plan, rows: int, wall: float
    ) -> tuple[list[str], list[float | int | str], list[float]]:
        """The scripts' KEYS and ARGV for one call, and when each quota period ends."""
        cached = self._bucket_keys.get((plan.tenant, plan.model))
        if cached is None or cached[0] is not plan:
            cached = self._bucket_keys[(plan.tenant, plan.model)] = (
                plan,
                [f"{_scope_part(self._prefix, s)}:{rate.name}" for s, rate in plan.buckets],
            )
        keys = list(cached[1])
        args: list[float | int | str] = [len(plan.buckets), len(plan.quotas)]
        for _, rate in plan.buckets:
            args += (rate.per_s, rate.burst, cost(rate, rows))
        resets: list[float] = []
        for scope, quota in plan.quotas:
            period = self._periods[quota.period].at(wall)
            keys.append(f"{_scope_part(self._prefix, scope)}:{quota.name}:{period.key}")
            args += (quota.limit, rows, int(period.reset_at) + QUOTA_KEY_GRACE_S)
            resets.append(period.reset_at)
        return keys, args, resets

    def _batched(
        self, script: AsyncScript, keys: list[str], args: list[float | int | str]
    ) -> asyncio.Future[Any]:
        """The script's reply for one call. Calls made in the same turn of the event
        loop go to Redis together, as one pipeline: one round trip, one socket write
        and read, instead of one per call (each script still runs atomically)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Call(script, keys, args, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(pending))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, pending: list[_Call]) -> None:
        try:
            if len(pending) == 1:
                call = pending[0]
                replies = [await call.script(keys=call.keys, args=call.args)]
            else:  # the pipeline gives its connection back however it ends
                async with self._client.pipeline(transaction=False) as pipe:
                    for call in pending:
                        await call.script(keys=call.keys, args=call.args, client=pipe)
                    replies = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            await self._client.connection_pool.disconnect(inuse_connections=False)
            error = StoreUnavailable(f"redis: {type(exc).__name__}")
            error.__cause__ = exc
            for call in pending:
                if not call.future.done():
                    call.future.set_exception(error)
            return
        for call, reply in zip(pending, replies, strict=True):
            if not call.future.done():
                call.future.set_result(reply)
            elif call.script is self._acquire_script and int(reply[0]) == 0:
                # Its caller was cancelled while Redis admitted it: nothing will run.
                self._batched(self._refund_script, call.keys, call.args).add_done_callback(
                    _refund_done
                )

    async def used(self, scope: Scope, quota_name: str, period: PeriodKind) -> int:
        current = self._periods[period].at(self._wall())
        key = f"{_scope_part(self._prefix, scope)}:{quota_name}:{current.key}"
        try:
            value = await self._client.get(key)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
        return int(value or 0)
