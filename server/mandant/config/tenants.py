"""``tenants:`` and ``limits:``: who may call (API key hashes, client certificate
identities), each tenant's rate limits, quotas, concurrency, fair-share weight, priority
and SLO, per-model overrides of its limits, and where rate-limit and quota state lives
(this process or Redis)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from mandant.config._base import _NAME, _Frozen, _hashes_only

#: A rate a bucket refills at: a token in 11.6 days at the least (a wait computed from
#: a denormal rate was infinite, and its refusal failed INTERNAL), 10¹² a second at most.
_Rate = Annotated[float, Field(ge=1e-6, le=1e12)]
#: A bucket's size (1 at the least: ``_whole_call``).
_Burst = Annotated[float, Field(gt=0, le=1e15)]
#: Rows of a quota: a signed 64-bit count (the usage report's and Redis's).
_Rows = Annotated[int, Field(gt=0, le=2**63 - 1)]


class RateLimitConfig(_Frozen):
    requests_per_s: _Rate | None = None
    burst: _Burst | None = None
    rows_per_s: _Rate | None = None
    rows_burst: _Burst | None = None

    @model_validator(mode="after")
    def _bursts(self) -> RateLimitConfig:
        if self.burst is not None and self.requests_per_s is None:
            raise ValueError("'burst' needs 'requests_per_s'")
        if self.rows_burst is not None and self.rows_per_s is None:
            raise ValueError("'rows_burst' needs 'rows_per_s'")
        return self

    @field_validator("burst", "rows_burst")
    @classmethod
    def _whole_call(cls, value: float | None) -> float | None:
        if value is not None and value < 1:
            raise ValueError(
                "must be at least 1: a call takes at least one token, so a smaller "
                "burst refuses every call"
            )
        return value


class QuotaConfig(_Frozen):
    rows_per_day: _Rows | None = None
    rows_per_month: _Rows | None = None


class ModelLimitsConfig(_Frozen):
    """A tenant's limits on one model: each section set here replaces the tenant's
    section of the same name for calls to that model (own buckets, own counts)."""

    rate_limit: RateLimitConfig | None = None
    quota: QuotaConfig | None = None


class LimitsConfig(_Frozen):
    """Where rate-limit and quota state lives: ``local`` (this process) or ``redis``
    (shared by every replica). ``on_store_error`` decides what happens while Redis is
    unreachable: ``allow`` falls back to this process's own buckets, ``deny`` refuses."""

    store: Literal["local", "redis"] = "local"
    url: str | None = None
    on_store_error: Literal["allow", "deny"] = "allow"
    key_prefix: str = "mandant"
    timeout_ms: Annotated[float, Field(gt=0)] = 250.0
    retry_interval_s: Annotated[float, Field(gt=0)] = 1.0

    @model_validator(mode="after")
    def _url(self) -> LimitsConfig:
        if self.store == "redis" and not self.url:
            raise ValueError("store 'redis' needs a 'url' (redis://host:port/db)")
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("'url' starts with redis://, rediss:// or unix://")
        if self.url:
            # Here, not at the top: redis is 0.15 s of every process's start, and only a
            # redis store's processes need it.
            from redis.connection import parse_url

            try:
                parse_url(self.url)  # type: ignore[no-untyped-call]
            except ValueError:  # its words quote the URL's parts: a password, maybe
                raise ValueError(
                    "'url' is not a Redis URL that can be read (its value is not shown: it "
                    "may hold a password; percent-encode '/', '@', ':' and '%' in one)"
                ) from None
        return self


#: The longest SLO latency, a day (1e308 ms passed: the dashboard's charts, drawn to a
#: quarter above it, overflowed to Infinity and drew NaN).
MAX_SLO_LATENCY_MS = 86_400_000


class SloConfig(_Frozen):
    latency_ms: Annotated[float, Field(gt=0, le=MAX_SLO_LATENCY_MS)]
    percentile: Annotated[float, Field(gt=0, lt=100)] = 99
    objective: Annotated[float, Field(gt=0, lt=1)] = 0.99


class TenantConfig(_Frozen):
    id: str
    api_keys: tuple[str, ...] = ()
    #: Client certificate identities that are this tenant (with ``server.tls.client_ca``):
    #: ``CN=<subject common name>`` or a subject alternative name (``spiffe://…`` URI,
    #: DNS name). A call without a key whose verified certificate carries one is this
    #: tenant; a call with a key is the key's tenant.
    client_certs: tuple[Annotated[str, Field(min_length=1, max_length=1024)], ...] = ()
    rate_limit: RateLimitConfig | None = None
    max_concurrency: Annotated[int, Field(gt=0)] | None = None
    quota: QuotaConfig | None = None
    #: Fair-share weight, 10⁻⁶ to 10⁶ (1e-320 made the batcher's rounds infinite:
    #: a shared model stopped for every tenant).
    weight: Annotated[float, Field(ge=1e-6, le=1e6)] = 1.0
    priority: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0  # as a v2 priority
    slo: SloConfig | None = None
    models: Mapping[str, ModelLimitsConfig] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("must be 1-128 letters, digits, '_', '.', '-'")
        return value

    @field_validator("api_keys")
    @classmethod
    def _hashes_only(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        return _hashes_only(keys)
