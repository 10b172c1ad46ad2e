"""Every RPC of Triton's inference protocol (tritonclient's own service descriptor, not
our proto) either passes the one gate or answers UNIMPLEMENTED: a test walks each served
one with a data plane that raises each domain error (and a bug), and checks the status
code, the message, the pushback trailer, and that no traceback leaks. The stream's
per-message answers carry the same codes. The walk of Triton's RPCs runs against the
real demo too, one process and ``workers: 2`` (whose front ends forward what they do
not serve themselves); the rest needs the stand-in plane, in the test's process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as triton_pb

from mandant import errors
from mandant.config import ServerConfig
from mandant.tenancy.keys import hash_key
from mandant.transport.grpc.server import GrpcServer
from mandant.types import Tenant
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.servers import Server, auth

TRITON_RPCS = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
SERVED = {m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
RPCS = sorted(SERVED - {"ModelStreamInfer"})
REQUESTS = {
    "ServerLive": pb.ServerLiveRequest(),
    "ServerReady": pb.ServerReadyRequest(),
    "ServerMetadata": pb.ServerMetadataRequest(),
    "ModelReady": pb.ModelReadyRequest(name="m"),
    "ModelMetadata": pb.ModelMetadataRequest(name="m"),
    "ModelConfig": pb.ModelConfigRequest(name="m"),
    "ModelStatistics": pb.ModelStatisticsRequest(name="m"),
    "ModelInfer": pb.ModelInferRequest(model_name="m", id="req-42"),
    "RepositoryIndex": pb.RepositoryIndexRequest(),
    "RepositoryModelLoad": pb.RepositoryModelLoadRequest(model_name="m"),
    "RepositoryModelUnload": pb.RepositoryModelUnloadRequest(model_name="m"),
}
#: RPCs for admin keys only: the walks below call with key ``x``, an admin key too.
ADMIN_RPCS = ("RepositoryModelLoad", "RepositoryModelUnload")
ERRORS: list[tuple[BaseException, grpc.StatusCode]] = [
    (errors.ModelNotFound("m"), grpc.StatusCode.NOT_FOUND),
    (errors.InvalidInput("bad tensor"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelFailed("m", "req-42"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPrecondition("can never fit"), grpc.StatusCode.FAILED_PRECONDITION),
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
    """Stands in for DataPlane: authenticates anyone as a tenant, then raises ``error``."""

    version = "test"
    tenant_snapshot = None  # never reloaded

    def __init__(self) -> None:
        self.error: BaseException = RuntimeError()
        self.target = ""

    def authenticate(self, authorization: str | None) -> Tenant:
        return Tenant("t")

    def drain(self) -> None:
        return None

    def refuse_if_draining(self) -> None:  # a stream opens (its messages raise)
        return None

    def _raise(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error

    live = property(_raise)
    ready = property(_raise)
    model = model_versions = model_ready = repository_index = all_models = _raise
    load_model = unload_model = _raise

    async def infer(self, *args: Any) -> Any:
        raise self.error


@pytest.fixture
async def served() -> AsyncIterator[tuple[RaisingPlane, pb_grpc.GRPCInferenceServiceStub]]:
    plane = RaisingPlane()
    config = ServerConfig(grpc_port=0, admin_keys=[hash_key("x")])
    server = GrpcServer(plane, config)  # type: ignore[arg-type]
    port = await server.start()
    plane.target = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(plane.target) as channel:
        yield plane, pb_grpc.GRPCInferenceServiceStub(channel)
    await server.stop(0)


def test_every_served_rpc_is_walked_and_is_triton_s() -> None:
    assert sorted(RPCS) == sorted(REQUESTS)
    assert {m.name for m in TRITON_RPCS} >= SERVED


async def test_every_triton_rpc_is_served_or_unimplemented(
    served: tuple[RaisingPlane, pb_grpc.GRPCInferenceServiceStub],
) -> None:
    """Triton's own client stubs, for every method of Triton's protocol: a method we do
    not serve answers UNIMPLEMENTED (a clean status, not a hang or INTERNAL)."""
    plane, _ = served
    plane.error = errors.InvalidInput("walked")
    async with grpc.aio.insecure_channel(plane.target) as channel:
        for method in TRITON_RPCS:
            await _walk(channel, method)


async def test_a_real_server_serves_every_triton_rpc_or_says_unimplemented(
    demo: Server,
) -> None:
    async with grpc.aio.insecure_channel(demo.target) as channel:
        for method in TRITON_RPCS:
            await _walk(channel, method, tuple(auth("acme").items()))


async def _walk(
    channel: grpc.aio.Channel,
    method: Any,
    metadata: tuple[tuple[str, str], ...] = (("authorization", "Bearer x"),),
) -> None:
    path = f"/inference.GRPCInferenceService/{method.name}"
    request = getattr(triton_pb, method.input_type.name)().SerializeToString()
    if method.client_streaming:
        call = channel.stream_stream(path)(metadata=metadata)
        await call.write(request)
        await call.done_writing()
        async for _ in call:  # the status follows the answers
            pass
        code = await call.code()
    else:
        try:
            await channel.unary_unary(path)(request, metadata=metadata)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
    if method.name in SERVED:
        assert code not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL), method.name
    else:
        assert code == grpc.StatusCode.UNIMPLEMENTED, method.name


async def test_the_stream_maps_every_error_per_message(
    served: tuple[RaisingPlane, pb_grpc.GRPCInferenceServiceStub],
) -> None:
    plane, stub = served
    for error, code in ERRORS:
        plane.error = error
        call = stub.ModelStreamInfer(metadata=(("authorization", "Bearer x"),))
        await call.write(REQUESTS["ModelInfer"])
        answer = await call.read()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        parameters = answer.infer_response.parameters
        assert parameters["status_code"].string_param == code.name, error
        assert answer.infer_response.id == "req-42"
        if code == grpc.StatusCode.INTERNAL:
            assert answer.error_message == "internal error (request id req-42)"
        else:
            assert answer.error_message == str(error)
        if isinstance(error, errors.ResourceExhausted):
            expected = max(1, round(error.retry_after_s * 1000))
            assert parameters["retry_pushback_ms"].int64_param == expected
        else:
            assert "retry_pushback_ms" not in parameters


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
            if rpc == "ModelReady" and code == grpc.StatusCode.NOT_FOUND:
                assert not (await call).ready  # as Triton answers for an unknown model
                continue
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


async def test_model_control_refuses_keys_that_are_not_admin_keys(
    served: tuple[RaisingPlane, pb_grpc.GRPCInferenceServiceStub],
) -> None:
    """The stand-in plane takes any key as a tenant's; model control asks the admin keys."""
    plane, stub = served
    plane.error = errors.InvalidInput("reached the plane")
    for rpc in ADMIN_RPCS:
        for metadata in [(("authorization", "Bearer tenant-key"),), ()]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(stub, rpc)(REQUESTS[rpc], metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, rpc


async def test_internal_errors_are_logged_with_the_request_id(
    served: tuple[RaisingPlane, pb_grpc.GRPCInferenceServiceStub],
    caplog: pytest.LogCaptureFixture,
) -> None:
    plane, stub = served
    plane.error = RuntimeError("boom")
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ModelInfer(REQUESTS["ModelInfer"], metadata=(("authorization", "Bearer x"),))
    assert err.value.details() == "internal error (request id req-42)"
    assert any("req-42" in r.getMessage() and r.exc_info for r in caplog.records)
