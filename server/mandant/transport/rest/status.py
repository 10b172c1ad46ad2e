"""Domain errors as HTTP answers: the status code *name* comes from the one table in
``transport/grpc/status.py`` (so metrics stay one series across both front ends),
and this table maps each name to the HTTP status a KServe v2 REST client expects.
Bodies are ``{"error": "<message>"}``, as Triton sends them."""

from __future__ import annotations

import math

from mandant import errors
from mandant.transport.grpc.status import INTERNAL_MESSAGE, status_for

#: gRPC status name → HTTP status.
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 412,
    "RESOURCE_EXHAUSTED": 429,
    "DEADLINE_EXCEEDED": 504,
    "UNAVAILABLE": 503,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
}

__all__ = ["HTTP_STATUS", "INTERNAL_MESSAGE", "code_for", "error_headers", "http_status"]


def code_for(exc: BaseException) -> str:
    """The status name of an error (INTERNAL for anything not a domain error)."""
    name: str = status_for(exc).name
    return name


def http_status(code: str) -> int:
    return HTTP_STATUS.get(code, 500)


def error_headers(exc: BaseException) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) on 429; ``WWW-Authenticate`` on 401."""
    if isinstance(exc, errors.ResourceExhausted):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    if isinstance(exc, errors.Unauthenticated):
        return {"WWW-Authenticate": "Bearer"}
    return {}
