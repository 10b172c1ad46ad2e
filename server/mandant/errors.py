"""Domain exceptions. No transport in them: ``transport/grpc/status.py`` maps each
class to a gRPC status code through one table.

    MandantError
    ├── Unauthenticated          no key, unknown key, revoked key
    ├── ModelNotFound            unknown model, or private to another tenant
    ├── InvalidInput             wrong tensor name, dtype, shape, byte size; malformed
    ├── ModelFailed              the model raised on this request's own data (it ran)
    ├── FailedPrecondition       a call that can never fit a tenant's limits (no retry)
    ├── ResourceExhausted        carries ``retry_after_s``
    │   ├── RateLimited
    │   ├── QuotaExceeded
    │   ├── QueueFull
    │   └── ServerBusy
    ├── DeadlineExceeded         deadline passed while queued
    ├── Unavailable              backend down, server draining
    └── ConfigError              a configuration file that does not validate

The message of every class except ConfigError is sent to the client as is, so it
never holds internals, keys or another tenant's names.
"""

from __future__ import annotations

#: The most characters of client text (a model or tensor name) a message repeats.
SHOWN_CHARS = 64


def shown(text: str) -> str:
    """Client text as a message may repeat it: cut to :data:`SHOWN_CHARS`."""
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


def encodable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate (JSON's ``"\\ud800"`` reads
    as one) written as its escape. gRPC encodes a status message as UTF-8, and one it
    cannot encode sent no status at all: the call went unanswered."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


#: What a front end of ``workers: N`` says of calls while the engine is away.
ENGINE_DOWN = "the inference engine is not reachable; retry shortly"
ENGINE_LOST = "the inference engine stopped while serving this call; retry"
#: A call forwarded to the engine (model control, metadata, …) whose answer was lost:
#: the engine may have read it before it stopped, or read it when it wakes.
ENGINE_LOST_FORWARDED = (
    "the inference engine stopped while serving this call, which it may yet have carried "
    "out; check, then retry"
)


class MandantError(Exception):
    """Base of every error Mandant raises on purpose."""


class Unauthenticated(MandantError):
    def __init__(self, message: str = "missing or invalid API key") -> None:
        super().__init__(message)


class ModelNotFound(MandantError):
    def __init__(self, name: str, version: str | None = None) -> None:
        where = f"model '{shown(name)}'" + (f" version '{shown(version)}'" if version else "")
        super().__init__(f"{where} not found")
        self.name = name
        self.version = version


class InvalidInput(MandantError):
    pass


class ModelFailed(MandantError):
    """The model raised on this request's own inputs: its batch was split and this
    request failed alone. The caller's error (INVALID_ARGUMENT, no retry); the model
    ran, so the call is charged. The message names the model, never the exception."""

    def __init__(self, model: str, request_id: str = "") -> None:
        where = f" (request id {request_id})" if request_id else ""
        super().__init__(f"model '{model}' failed on this request's inputs{where}")
        self.model = model


class FailedPrecondition(MandantError):
    """A call that can never fit the tenant's configured limits (e.g. more rows than
    a whole quota period allows): retrying cannot help, so no pushback."""


#: The longest wait a refusal hints at (a year: a monthly quota's is a month): a hint
#: is sent as milliseconds in a signed 64-bit value and REST's whole seconds.
MAX_RETRY_AFTER_S = 366 * 86400.0


class ResourceExhausted(MandantError):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = min(max(0.0, retry_after_s), MAX_RETRY_AFTER_S)


class RateLimited(ResourceExhausted):
    pass


class QuotaExceeded(ResourceExhausted):
    pass


class QueueFull(ResourceExhausted):
    pass


class ServerBusy(ResourceExhausted):
    """The server-wide cap on calls in progress is reached."""


class DeadlineExceeded(MandantError):
    pass


class DeadlinePassedWhileRunning(DeadlineExceeded):
    """The deadline passed while the backend computed the call (Triton): the model had
    its rows, so the call stays charged. A deadline passed before the model ran (in a
    queue, or waiting to be run again after its batch failed) is refunded."""


class Unavailable(MandantError):
    pass


class ConfigError(MandantError):
    """A configuration that does not validate; ``errors`` lists (field path, reason)."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in errors)
        super().__init__(f"{source}: {len(errors)} error(s)\n{lines}")
        self.source = source
        self.errors = errors
