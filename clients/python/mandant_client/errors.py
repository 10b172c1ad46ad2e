"""The client's one exception tree, and the one table that maps gRPC status codes onto it.

::

    MandantClientError            .code (grpc.StatusCode), .message
    ├── Unauthenticated           UNAUTHENTICATED: no key, unknown key, revoked key
    ├── ModelNotFound             NOT_FOUND: unknown model, or private to another tenant
    ├── InvalidInput              INVALID_ARGUMENT: wrong tensor name, dtype, shape, size;
    │                             RESOURCE_EXHAUSTED of a message over gRPC's size limit
    ├── ResourceExhausted         RESOURCE_EXHAUSTED, .retry_after_s
    │   ├── RateLimited           rate limit, concurrency cap, queue full
    │   └── QuotaExceeded         the server's message mentions the quota
    ├── FailedPrecondition        FAILED_PRECONDITION: the call can never fit the limits
    ├── DeadlineExceeded          DEADLINE_EXCEEDED
    ├── Unavailable               UNAVAILABLE: server down or draining, backend down;
    │                             CANCELLED sent by the server (it stopped mid-call)
    └── ServerError               INTERNAL, UNKNOWN and every other code

Both clients translate at the call site: ``raise from_rpc_error(exc) from exc``; an
error answered inside a ``ModelStreamInfer`` stream goes through :func:`error_for`, the
same table. ``request_id`` is the caller's own request id for ``infer`` ("" otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
#: In gRPC's RESOURCE_EXHAUSTED for a message over a size limit, on either side ("Sent
#: message larger than max (N vs. M)", "Received message larger than max …").
MESSAGE_TOO_LARGE = "message larger than max"
#: How the server's refusal for a spent quota begins (its admission builds the message
#: from this): RESOURCE_EXHAUSTED is :class:`QuotaExceeded` for it, :class:`RateLimited`
#: otherwise (a tenant's or a model's name may say "quota": "quota" anywhere in the
#: message made a rate limit of tenant ``quotation-svc`` a spent quota).
QUOTA_REFUSAL = "quota "


class MandantClientError(Exception):
    """Base of every error the Mandant client raises."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, request_id: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Unauthenticated(MandantClientError):
    """The API key is missing, unknown or revoked."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class ModelNotFound(MandantClientError):
    """No model of that name and version is visible to this tenant."""

    default_code = grpc.StatusCode.NOT_FOUND


class InvalidInput(MandantClientError):
    """The request does not fit the model (tensor name, datatype, shape, byte size), or a
    message is over gRPC's size limit (code RESOURCE_EXHAUSTED, as gRPC says it): the
    same call fails the same way every time, so unlike ``ResourceExhausted`` it is not
    worth retrying."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(MandantClientError):
    """The server refused the request for now; retry after ``retry_after_s`` if given."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        code: grpc.StatusCode | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(message, code=code, request_id=request_id)
        self.retry_after_s = retry_after_s


class RateLimited(ResourceExhausted):
    """The tenant's rate limit, concurrency cap or queue is full."""


class QuotaExceeded(ResourceExhausted):
    """The tenant's quota (e.g. rows per day) is spent."""


class FailedPrecondition(MandantClientError):
    """The call can never fit the tenant's limits (e.g. more rows than a quota period):
    retrying the same call cannot help."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(MandantClientError):
    """The deadline passed before the server answered."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(MandantClientError):
    """The server (or its backend) cannot be reached or is draining."""

    default_code = grpc.StatusCode.UNAVAILABLE


class ServerError(MandantClientError):
    """The server failed (INTERNAL, UNKNOWN, any other code), or answered malformed data."""

    default_code = grpc.StatusCode.INTERNAL


# The one table: gRPC status code -> exception class. Codes not listed -> ServerError.
ERRORS_BY_CODE: dict[grpc.StatusCode, type[MandantClientError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    # Only a server (or a proxy) sends CANCELLED: a call of this client cancelled here
    # raises CancelledError, or Unavailable once close() ran. gRPC cancels the calls a
    # stopping server had not answered when its grace ran out: retryable, as UNAVAILABLE.
    grpc.StatusCode.CANCELLED: Unavailable,
}


def from_rpc_error(exc: grpc.RpcError, request_id: str = "") -> MandantClientError:
    """Translate a sync (``grpc.Call``) or asyncio (``AioRpcError``) RPC error."""
    code = _call_attr(exc, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = _call_attr(exc, "details")
    message = details if isinstance(details, str) and details else str(exc) or code.name
    retry_after_s = None
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after_s = retry_after_from_metadata(_call_attr(exc, "trailing_metadata"))
    return error_for(code, message, retry_after_s=retry_after_s, request_id=request_id)


def error_for(
    code: grpc.StatusCode,
    message: str,
    *,
    retry_after_s: float | None = None,
    request_id: str = "",
) -> MandantClientError:
    """The exception for a status code and message, through :data:`ERRORS_BY_CODE`.
    RESOURCE_EXHAUSTED is retryable except for a message over the size limit, which
    is :class:`InvalidInput` with the code gRPC gave."""
    message = message or code.name
    cls = ERRORS_BY_CODE.get(code, ServerError)
    if cls is ResourceExhausted and MESSAGE_TOO_LARGE in message:
        return InvalidInput(message, code=code, request_id=request_id)
    if cls is ResourceExhausted:
        exhausted = QuotaExceeded if message.startswith(QUOTA_REFUSAL) else RateLimited
        return exhausted(message, retry_after_s=retry_after_s, code=code, request_id=request_id)
    return cls(message, code=code, request_id=request_id)


def retry_after_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> float | None:
    """Seconds from ``grpc-retry-pushback-ms``; None when absent, malformed or negative."""
    for key, value in metadata or ():
        if key.lower() != RETRY_PUSHBACK_KEY:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        try:
            millis = int(text.strip())
        except ValueError:
            return None
        return millis / 1000.0 if millis >= 0 else None
    return None


def _call_attr(exc: grpc.RpcError, name: str) -> Any:
    """``exc.<name>()`` when the error is also a call object, else None."""
    method = getattr(exc, name, None)
    if not callable(method):
        return None
    try:
        return method()
    except Exception:  # a half-built error object must not hide the original one
        return None
