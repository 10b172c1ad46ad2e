"""Domain exceptions. No transport in them: ``transport/grpc/status.py`` maps each
class to a gRPC status code through one table.

    MandantError
    ├── Unauthenticated          no key, unknown key, revoked key
    ├── ModelNotFound            unknown model, or private to another tenant
    ├── InvalidInput             wrong tensor name, dtype, shape, byte size; malformed
    ├── ResourceExhausted        carries ``retry_after_s``
    │   ├── RateLimited
    │   ├── QuotaExceeded
    │   └── QueueFull
    ├── DeadlineExceeded         deadline passed while queued
    ├── Unavailable              backend down, server draining
    └── ConfigError              a configuration file that does not validate

The message of every class except ConfigError is sent to the client as is, so it
never holds internals, keys or another tenant's names.
"""

from __future__ import annotations


class MandantError(Exception):
    """Base of every error Mandant raises on purpose."""


class Unauthenticated(MandantError):
    def __init__(self, message: str = "missing or invalid API key") -> None:
        super().__init__(message)


class ModelNotFound(MandantError):
    def __init__(self, name: str, version: str | None = None) -> None:
        where = f"model '{name}'" + (f" version '{version}'" if version else "")
        super().__init__(f"{where} not found")
        self.name = name
        self.version = version


class InvalidInput(MandantError):
    pass


class ResourceExhausted(MandantError):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(0.0, retry_after_s)


class RateLimited(ResourceExhausted):
    pass


class QuotaExceeded(ResourceExhausted):
    pass


class QueueFull(ResourceExhausted):
    pass


class DeadlineExceeded(MandantError):
    pass


class Unavailable(MandantError):
    pass


class ConfigError(MandantError):
    """A configuration that does not validate; ``errors`` lists (field path, reason)."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in errors)
        super().__init__(f"{source}: {len(errors)} error(s)\n{lines}")
        self.source = source
        self.errors = errors
