"""Usage counters in Redis, beside the limits, so that a fleet-wide usage report (what
billing reads) is one number per figure, whatever replica answers.

Per tenant and UTC period, one hash (``{prefix}:{tenant}:usage:day:2024-05-17`` and
``…:usage:month:2024-05``) with fields ``requests:<code>``, ``rows:<model>``,
``compute_seconds:<model>`` and ``rejections:<reason>``. The request path only adds to
a dict in this process (:meth:`RedisUsage.add`); every ``flush_interval_s`` the sums
go to Redis in one pipeline, as the admits go in one pipeline per loop turn: one
script per tenant (its day and month hashes share the tenant's hash tag, so one
Redis Cluster slot) that adds every field to both and sets their expiry. Counts that
Redis did not take stay here and go with the next flush (a Redis outage delays them,
loses none while this process lives); a graceful stop flushes the rest. A flush
counts its sums in the period it runs in (a call just before midnight UTC may land in
the next day: by at most ``flush_interval_s``). Day hashes expire 35 days after
their day, month hashes 400 days after their month.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from redis.exceptions import RedisError

from mandant.config import LimitsConfig
from mandant.tenancy.limits import Clock
from mandant.tenancy.quota import WALL, PeriodKind
from mandant.tenancy.redis_store import period_trackers, redis_client

logger = logging.getLogger(__name__)

#: How often this process's sums go to Redis, in seconds.
FLUSH_INTERVAL_S = 1.0
#: How long a period's hash outlives the period, in seconds.
KEEP_S: dict[PeriodKind, int] = {"day": 35 * 86400, "month": 400 * 86400}
#: The periods a fleet report gives, by their name in the report.
PERIODS: dict[str, PeriodKind] = {"today": "day", "this_month": "month"}

#: (tenant, figure, label) → amount, as :meth:`RedisUsage.add` sums them.
Counts = dict[tuple[str, str, str], float]

#: KEYS: a tenant's day and month hashes. ARGV: their expiry times (epoch s), then
#: field, amount pairs (an amount with a '.' or an exponent is added as a float).
FLUSH_LUA = """
for k = 1, #KEYS do
  for i = 3, #ARGV, 2 do
    if string.find(ARGV[i + 1], '[.eE]') then
      redis.call('HINCRBYFLOAT', KEYS[k], ARGV[i], ARGV[i + 1])
    else
      redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
    end
  end
  redis.call('EXPIREAT', KEYS[k], ARGV[k])
end
return 0
"""


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
        self._counts: Counts = {}
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one flush at a time (the timer's, a report's)
        self._failing = False

    def add(self, tenant: str, figure: str, label: str, amount: float) -> None:
        """Count ``amount`` for ``tenant`` (in process; Redis at the next flush):
        ``figure`` is ``requests``, ``rows``, ``compute_seconds`` or ``rejections``,
        ``label`` the status code, model or reason."""
        key = (tenant, figure, label)
        counts = self._counts
        counts[key] = counts.get(key, 0) + amount

    async def start(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush_every_interval())

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()
        await self._client.aclose()

    async def _flush_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.flush()

    def _key(self, tenant: str, kind: str, period: str) -> str:
        return f"{self._prefix}:{{{tenant}}}:usage:{kind}:{period}"

    async def flush(self) -> bool:
        """Send this process's sums to Redis; False if Redis did not take them (they
        stay for the next flush)."""
        async with self._lock:
            counts, self._counts = self._counts, {}
            if not counts:
                return True
            wall = self._wall()
            periods = [(kind, tracker.at(wall)) for kind, tracker in self._periods.items()]
            expiry = [int(period.reset_at) + KEEP_S[kind] for kind, period in periods]
            fields: dict[str, list[str | float]] = {}
            for (tenant, figure, label), amount in counts.items():
                fields.setdefault(tenant, []).extend((f"{figure}:{label}", amount))
            try:  # the pipeline gives its connection back however it ends
                async with self._client.pipeline(transaction=False) as pipe:
                    for tenant, pairs in fields.items():
                        keys = [self._key(tenant, kind, period.key) for kind, period in periods]
                        await self._flush_script(keys=keys, args=[*expiry, *pairs], client=pipe)
                    await pipe.execute()
            except (RedisError, OSError, TimeoutError) as exc:
                for counted, amount in counts.items():  # kept for the next flush
                    self._counts[counted] = self._counts.get(counted, 0) + amount
                if not self._failing:
                    logger.warning("usage counters: redis did not take them (%s)", exc)
                self._failing = True
                return False
            self._failing = False
            return True

    async def read(self, tenants: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
        """Every replica's counts, after this process's own are flushed: tenant →
        ``today``/``this_month`` → field → amount. Raises on a Redis failure."""
        await self.flush()
        wall = self._wall()
        async with self._client.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                for kind in PERIODS.values():
                    pipe.hgetall(self._key(tenant, kind, self._periods[kind].at(wall).key))
            replies = iter(await pipe.execute())
        return {
            tenant: {
                name: {field.decode(): float(value) for field, value in next(replies).items()}
                for name in PERIODS
            }
            for tenant in tenants
        }


def shared_usage_for(limits: LimitsConfig) -> RedisUsage | None:
    """Fleet-wide usage counters where the limits live in Redis; None with ``local``."""
    return RedisUsage(limits) if limits.store == "redis" else None
