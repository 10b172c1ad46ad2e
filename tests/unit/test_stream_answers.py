"""Every ModelStreamInfer message is answered with its own id, so that a multiplexed
client can match the answer to its call, even where serving it failed unexpectedly
before its message was parsed (INTERNAL)."""

from __future__ import annotations

import logging
from typing import Any, cast

import grpc
import pytest

from mandant.events import NullObserver
from mandant.transport.grpc.stream import InferStream
from mandant.types import Tenant
from mandant_client._proto import grpc_service_pb2 as pb


class _Plane:
    def __init__(self) -> None:
        self.tenant_snapshot = object()


class _Context:
    """A stream whose client sent ``messages`` then half-closed."""

    def __init__(self, messages: list[bytes]) -> None:
        self._messages = list(messages)
        self.written: list[pb.ModelStreamInferResponse] = []

    async def read(self) -> Any:
        return self._messages.pop(0) if self._messages else grpc.aio.EOF

    async def write(self, message: pb.ModelStreamInferResponse) -> None:
        self.written.append(message)

    def time_remaining(self) -> float | None:
        return None


def _failing_stream(context: _Context) -> InferStream:
    """A stream of tenant acme whose every message fails before it is parsed (the
    tenant directory breaks): each is answered INTERNAL, with its id."""

    def authenticate() -> Tenant:
        raise RuntimeError("the tenant directory broke")

    return InferStream(
        cast(Any, _Plane()),
        Tenant("acme"),
        authenticate,
        cast(Any, context),
        4,
        1 << 20,
        16,
        NullObserver(),
    )


async def test_an_unexpected_failure_before_parsing_is_answered_with_the_message_id() -> None:
    request = pb.ModelInferRequest(model_name="echo", id="call#1")
    context = _Context([request.SerializeToString()])
    stream = _failing_stream(context)
    await stream.serve()
    (answer,) = context.written
    assert answer.error_message
    assert answer.infer_response.id == "call#1"
    assert answer.infer_response.model_name == "echo"
    assert answer.infer_response.parameters["status_code"].string_param == "INTERNAL"


async def test_a_write_after_the_server_stopped_ends_the_stream_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server stopped at the end of its grace with a stream's message still to
    answer: grpc.aio refuses the write (``_ServerStoppedError``), which escaped as an
    internal error with a traceback for each stream still open. The stream ends,
    logged at DEBUG only."""
    from grpc._cython import cygrpc

    class _Stopped(_Context):
        async def write(self, message: pb.ModelStreamInferResponse) -> None:
            raise cygrpc._ServerStoppedError("Server already stopped.")

    request = pb.ModelInferRequest(model_name="echo", id="call#1")
    context = _Stopped([request.SerializeToString()])

    stream = _failing_stream(context)
    with caplog.at_level(logging.INFO, logger="mandant.transport.grpc.stream"):
        await stream.serve()
    # (The test's own INTERNAL answer is logged, its RuntimeError: not the write's.)
    raised = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert not [exc for exc in raised if isinstance(exc, cygrpc.BaseError)]
