"""The one table from domain errors to gRPC status codes (DESIGN.md's contract)."""

from __future__ import annotations

import grpc

from mandant import errors

#: Most specific class first; the first ``isinstance`` match wins.
STATUS: tuple[tuple[type[errors.MandantError], grpc.StatusCode], ...] = (
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelFailed, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
)

INTERNAL_MESSAGE = "internal error (request id {request_id})"


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code of a domain error; INTERNAL for anything else."""
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def trailers_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata: ``grpc-retry-pushback-ms`` on RESOURCE_EXHAUSTED."""
    if isinstance(exc, errors.ResourceExhausted):
        return (("grpc-retry-pushback-ms", str(max(1, round(exc.retry_after_s * 1000)))),)
    return ()
