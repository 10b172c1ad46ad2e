"""Every RPC of the inference service passes the one interceptor: a test walks each
one with a data plane that raises each domain error (and a bug), and checks the
status code, the message, the pushback trailer, and that no traceback leaks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from mandant import errors
from mandant.config import ServerConfig
from mandant.transport.grpc.server import GrpcServer
from mandant.types import Tenant
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc

RPCS = [m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods]
REQUESTS = {
    "ServerLive": pb.ServerLiveRequest(),
    "ServerReady": pb.ServerReadyRequest(),
    "ServerMetadata": pb.ServerMetadataRequest(),
    "ModelReady": pb.ModelReadyRequest(name="m"),
    "ModelMetadata": pb.ModelMetadataRequest(name="m"),
    "ModelInfer": pb.ModelInferRequest(model_name="m", id="req-42"),
    "RepositoryIndex": pb.RepositoryIndexRequest(),
}
ERRORS: list[tuple[BaseException, grpc.StatusCode]] = [
    (errors.ModelNotFound("m"), grpc.StatusCode.NOT_FOUND),
    (errors.InvalidInput("bad tensor"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.RateLimited("slow down", retry_after_s=0.25), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (
        errors.QuotaExceeded("quota rows_per_day", retry_after_s=3600),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    (errors.QueueFull("queue full", retry_after_s=0.0001), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable("backend down"), grpc.StatusCode.UNAVAILABLE),
    (RuntimeError("secret internals /etc/passwd"), grpc.StatusCode.INTERNAL),
]


class RaisingPlane:
    """Stands in for DataPlane: authenticates anyone, then raises ``error``."""

    version = "test"

    def __init__(self) -> None:
        self.error: BaseException = RuntimeError()

    def authenticate(self, authorization: str | None) -> Tenant:
        return Tenant("t")

    def drain(self) -> None:
        return None

    def _raise(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error

    live = property(_raise)
    ready = property(_raise)
    model = model_versions = model_ready = repository_index = _raise

    async def infer(self, *args: Any) -> Any:
        raise self.error


@pytest.fixture
async def served() -> AsyncIterator[tuple[RaisingPlane, pb_grpc.GRPCInferenceServiceStub]]:
    plane = RaisingPlane()
    server = GrpcServer(plane, ServerConfig(grpc_port=0))  # type: ignore[arg-type]
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield plane, pb_grpc.GRPCInferenceServiceStub(channel)
    await server.stop(0)


def test_every_rpc_is_covered() -> None:
    assert sorted(RPCS) == sorted(REQUESTS)


async def test_every_rpc_maps_every_error(
    served: tuple[RaisingPlane, pb_grpc.GRPCInferenceServiceStub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    plane, stub = served
    for rpc in RPCS:
        if rpc == "ServerMetadata":
            continue  # answers from constants only
        for error, code in ERRORS:
            plane.error = error
            call = getattr(stub, rpc)(REQUESTS[rpc], metadata=(("authorization", "Bearer x"),))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == code, (rpc, error)
            details = err.value.details() or ""
            if code == grpc.StatusCode.INTERNAL:
                assert details.startswith("internal error (request id ")
                assert "secret" not in details and "Traceback" not in details
            else:
                assert details == str(error)
            trailers = dict(await call.trailing_metadata() or ())
            if isinstance(error, errors.ResourceExhausted):
                expected = max(1, round(error.retry_after_s * 1000))
                assert trailers["grpc-retry-pushback-ms"] == str(expected)
            else:
                assert "grpc-retry-pushback-ms" not in trailers


async def test_internal_errors_are_logged_with_the_request_id(
    served: tuple[RaisingPlane, pb_grpc.GRPCInferenceServiceStub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    plane, stub = served
    plane.error = RuntimeError("boom")
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ModelInfer(REQUESTS["ModelInfer"])
    assert err.value.details() == "internal error (request id req-42)"
    assert any("req-42" in r.getMessage() and r.exc_info for r in caplog.records)
