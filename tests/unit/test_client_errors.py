"""The client's status-code table: every gRPC code lands on exactly one exception class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
import pytest

from mandant_client import (
    ERRORS_BY_CODE,
    AsyncClient,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    MandantClientError,
    ModelNotFound,
    QuotaExceeded,
    RateLimited,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)


class FakeRpcError(grpc.RpcError):
    """Shaped like grpc's sync ``_InactiveRpcError`` and ``grpc.aio.AioRpcError``."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__()
        self._code = code
        self._details = details
        self._trailing = tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


EXPECTED: dict[grpc.StatusCode, type[MandantClientError]] = {
    grpc.StatusCode.OK: ServerError,
    grpc.StatusCode.CANCELLED: Unavailable,
    grpc.StatusCode.UNKNOWN: ServerError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.ALREADY_EXISTS: ServerError,
    grpc.StatusCode.PERMISSION_DENIED: ServerError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: ServerError,
    grpc.StatusCode.OUT_OF_RANGE: ServerError,
    grpc.StatusCode.UNIMPLEMENTED: ServerError,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: ServerError,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def test_every_status_code_is_covered() -> None:
    assert set(EXPECTED) == set(grpc.StatusCode)


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_status_code_maps_to_one_class(code: grpc.StatusCode) -> None:
    error = from_rpc_error(FakeRpcError(code, "boom"))

    assert type(error) is EXPECTED[code]
    assert isinstance(error, MandantClientError)
    assert error.code is code
    assert error.message == "boom"
    assert "boom" in str(error)


def test_table_values_are_in_the_tree() -> None:
    for cls in ERRORS_BY_CODE.values():
        assert issubclass(cls, MandantClientError)


@pytest.mark.parametrize(
    ("details", "cls"),
    [
        ("rate limit requests_per_s=10 exceeded for tenant acme", RateLimited),
        ("queue full", RateLimited),
        ("quota rows_per_day=1000 exceeded for tenant acme", QuotaExceeded),
        # A name that says "quota" does not make a rate limit a quota (it did).
        ("rate limit requests_per_s=1 exceeded for tenant quotation-svc", RateLimited),
        ("rate limit rows_per_s=5 exceeded for tenant t2 on model quota_scorer", RateLimited),
    ],
)
def test_resource_exhausted_splits_on_quota(details: str, cls: type[ResourceExhausted]) -> None:
    error = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, details))
    assert type(error) is cls
    assert isinstance(error, ResourceExhausted)
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.retry_after_s is None


@pytest.mark.parametrize(
    "details",
    [
        "CLIENT: Sent message larger than max (73400354 vs. 67108864)",  # the client's limit
        "Received message larger than max (73400354 vs. 33554432)",  # the server's
    ],
)
def test_a_message_over_the_size_limit_is_invalid_input_not_retryable(details: str) -> None:
    """The same call fails the same way every time: not RateLimited, which callers retry."""
    exc = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
    error = from_rpc_error(exc, "r-1")
    assert type(error) is InvalidInput and not isinstance(error, ResourceExhausted)
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED  # as gRPC said it
    assert (error.message, error.request_id) == (details, "r-1")


@pytest.mark.parametrize(
    ("trailing", "retry_after_s"),
    [
        ([("grpc-retry-pushback-ms", "1500")], 1.5),
        ([("other", "x"), ("grpc-retry-pushback-ms", "0")], 0.0),
        ([("Grpc-Retry-Pushback-Ms", " 250 ")], 0.25),
        ([("grpc-retry-pushback-ms", b"20")], 0.02),
        ([("grpc-retry-pushback-ms", "-1")], None),
        ([("grpc-retry-pushback-ms", "soon")], None),
        ([("retry-after", "3")], None),
        ([], None),
    ],
)
def test_retry_after_from_trailing_metadata(
    trailing: list[tuple[str, Any]], retry_after_s: float | None
) -> None:
    for details, cls in (("slow down", RateLimited), ("quota rows_per_day=1", QuotaExceeded)):
        exc = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, details, trailing)
        error = from_rpc_error(exc)
        assert type(error) is cls
        assert isinstance(error, ResourceExhausted)
        assert error.retry_after_s == retry_after_s


def test_bare_rpc_error_without_call_methods_is_server_error() -> None:
    error = from_rpc_error(grpc.RpcError("channel broke"))
    assert type(error) is ServerError
    assert error.code is grpc.StatusCode.UNKNOWN
    assert error.message == "channel broke"


def test_empty_details_fall_back_to_the_code_name() -> None:
    error = from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, ""))
    assert type(error) is Unavailable
    assert error.message == "UNAVAILABLE"


def test_client_side_errors_carry_their_default_code() -> None:
    assert InvalidInput("bad").code is grpc.StatusCode.INVALID_ARGUMENT
    assert RateLimited("slow", retry_after_s=2.0).retry_after_s == 2.0
    assert RateLimited("slow").code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_errors_carry_the_callers_request_id() -> None:
    limited = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow"), "r-1")
    assert isinstance(limited, RateLimited) and limited.request_id == "r-1"
    assert from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "gone")).request_id == ""


@pytest.mark.parametrize(
    ("inputs", "parameters"),
    [
        ({"X": np.ones(2, np.complex64)}, None),  # no datatype of the protocol holds it
        ({"X": np.ones(2, np.float32)}, {"p": object()}),  # no parameter type either
    ],
)
async def test_what_cannot_be_sent_is_invalid_input_with_the_callers_request_id(
    inputs: dict[str, Any], parameters: Any
) -> None:
    """Refused before anything is sent, as the server's refusals are: with the id the
    caller gave (it had none)."""
    with Client("127.0.0.1:1", api_key="k") as client, pytest.raises(InvalidInput) as sync_refused:
        client.infer("m", inputs, request_id="r3", parameters=parameters)
    async with AsyncClient("127.0.0.1:1", api_key="k") as async_client:
        with pytest.raises(InvalidInput) as async_refused:
            await async_client.infer("m", inputs, request_id="r3", parameters=parameters)
    assert sync_refused.value.request_id == async_refused.value.request_id == "r3"


@pytest.mark.parametrize("key", [None, "", "\n", "  "])
def test_no_key_or_a_blank_one_sends_no_authorization(key: str | None) -> None:
    """A blank key (an empty secret file) was sent as ``Bearer `` after stripping: a
    call meant to go as its client certificate's tenant (mTLS) was refused
    UNAUTHENTICATED."""
    from mandant_client import _requests

    assert _requests.auth_metadata(key) == ()
    assert _requests.auth_metadata(" k\n") == (("authorization", "Bearer k"),)
