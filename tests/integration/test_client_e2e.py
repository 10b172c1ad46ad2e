"""mandant_client against a real grpc.aio server with a minimal fake servicer.

Proves the wire calls, the ``authorization`` header, the channel's 64 MiB limits and the
error/trailer mapping end to end, for ``Client`` (in a thread) and ``AsyncClient``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest

from mandant_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    ModelIndexEntry,
    ModelNotFound,
    QuotaExceeded,
    RateLimited,
    ServerError,
    TensorMetadata,
    Unauthenticated,
    Unavailable,
)
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc

API_KEY = "acme-demo-key"
BIG = 64 * 1024 * 1024


class FakeInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Echoes inputs; a few magic model names fail the way Mandant does."""

    def __init__(self) -> None:
        self.seen_metadata: list[dict[str, str]] = []
        self.seen_requests: list[pb.ModelInferRequest] = []

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.seen_metadata.append(metadata)
        if metadata.get("authorization") != f"Bearer {API_KEY}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authenticate(context)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authenticate(context)
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authenticate(context)
        return pb.ServerMetadataResponse(name="fake", version="1", extensions=["a", "b"])

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authenticate(context)
        return pb.ModelReadyResponse(ready=request.name == "classifier")

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authenticate(context)
        if request.name != "classifier":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} not found")
        return pb.ModelMetadataResponse(
            name="classifier",
            versions=["1"],
            platform="pytorch",
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name="INPUT0", datatype="FP32", shape=[-1, 256]
                )
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name="OUTPUT0", datatype="FP32", shape=[-1, 16]
                )
            ],
        )

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authenticate(context)
        response = pb.RepositoryIndexResponse()
        response.models.add(name="classifier", version="1", state="READY")
        return response

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._authenticate(context)
        self.seen_requests.append(request)
        name = request.model_name
        if name == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "model 'missing' not found")
        if name in ("limited", "quota"):
            details = "rate limit exceeded" if name == "limited" else "daily quota exceeded"
            pushback = "1500" if name == "limited" else "60000"
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                details,
                trailing_metadata=(("grpc-retry-pushback-ms", pushback),),
            )
        if name == "slow":
            await asyncio.sleep(5)
        if name == "broken":
            await context.abort(grpc.StatusCode.INTERNAL, "internal error, request id 42")
        response = pb.ModelInferResponse(model_name=name, id=request.id)
        if name == "typed":
            out = response.outputs.add(name="OUT", datatype="INT32", shape=[2])
            out.contents.int_contents.extend([7, -7])
            return response
        for tensor in request.inputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.extend(request.raw_input_contents)
        return response


@dataclass
class FakeServer:
    target: str
    servicer: FakeInferenceServicer
    seen: list[Any] = field(default_factory=list)


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    options = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]
    grpc_server = grpc.aio.server(options=options)
    servicer = FakeInferenceServicer()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        yield FakeServer(target=f"127.0.0.1:{port}", servicer=servicer)
    finally:
        await grpc_server.stop(0)


def sync_session(target: str) -> dict[str, Any]:
    """Every call of the sync client, run in a worker thread."""
    batch = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    with Client(target, api_key=API_KEY, timeout_s=5) as client:
        return {
            "live": client.server_live(),
            "ready": client.server_ready(),
            "server": client.server_metadata(),
            "model_ready": client.model_ready("classifier"),
            "metadata": client.model_metadata("classifier"),
            "models": client.models(),
            "batch": batch,
            "outputs": client.infer(
                "classifier",
                {"INPUT0": batch, "WORDS": np.array(["hi", "ü"], dtype=object)},
                version="1",
                request_id="req-1",
                parameters={"priority": 2, "tag": "x", "flag": True, "ratio": 0.5},
            ),
        }


async def test_sync_client_every_call(server: FakeServer) -> None:
    result = await asyncio.to_thread(sync_session, server.target)

    assert result["live"] and result["ready"] and result["model_ready"]
    assert result["server"].extensions == ["a", "b"]
    assert result["metadata"].inputs == [TensorMetadata("INPUT0", "FP32", [-1, 256])]
    assert result["metadata"].outputs == [TensorMetadata("OUTPUT0", "FP32", [-1, 16])]
    assert result["models"] == [ModelIndexEntry("classifier", "1", "READY")]
    np.testing.assert_array_equal(result["outputs"]["INPUT0"], result["batch"])
    assert result["outputs"]["WORDS"].tolist() == [b"hi", "ü".encode()]

    assert all(m["authorization"] == f"Bearer {API_KEY}" for m in server.servicer.seen_metadata)
    assert len(server.servicer.seen_metadata) == 7
    sent = server.servicer.seen_requests[0]
    assert (sent.model_name, sent.model_version, sent.id) == ("classifier", "1", "req-1")
    assert sent.parameters["priority"].int64_param == 2
    assert sent.parameters["tag"].string_param == "x"
    assert sent.parameters["flag"].bool_param is True
    assert sent.parameters["ratio"].double_param == 0.5


def sync_infer(target: str, model: str, api_key: str | None = API_KEY) -> Any:
    with Client(target, api_key=api_key) as client:
        return client.infer(model, {"X": np.zeros(3, np.float32)}, timeout_s=2)


async def test_sync_client_maps_errors_and_pushback(server: FakeServer) -> None:
    with pytest.raises(RateLimited) as limited:
        await asyncio.to_thread(sync_infer, server.target, "limited")
    assert limited.value.retry_after_s == 1.5
    assert limited.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert isinstance(limited.value.__cause__, grpc.RpcError)

    with pytest.raises(QuotaExceeded) as quota:
        await asyncio.to_thread(sync_infer, server.target, "quota")
    assert quota.value.retry_after_s == 60.0

    with pytest.raises(ModelNotFound):
        await asyncio.to_thread(sync_infer, server.target, "missing")
    with pytest.raises(Unauthenticated):
        await asyncio.to_thread(sync_infer, server.target, "classifier", "wrong-key")
    with pytest.raises(Unauthenticated):
        await asyncio.to_thread(sync_infer, server.target, "classifier", None)
    with pytest.raises(ServerError) as broken:
        await asyncio.to_thread(sync_infer, server.target, "broken")
    assert broken.value.code is grpc.StatusCode.INTERNAL


async def test_async_client_calls_and_errors(server: FakeServer) -> None:
    async with AsyncClient(server.target, api_key=API_KEY, timeout_s=5) as client:
        assert await client.server_live()
        assert await client.server_ready()
        assert await client.model_ready("classifier")
        assert not await client.model_ready("other")
        assert (await client.server_metadata()).name == "fake"
        assert (await client.model_metadata("classifier")).platform == "pytorch"
        assert await client.models() == [ModelIndexEntry("classifier", "1", "READY")]

        batch = np.arange(256, dtype=np.float32).reshape(1, 256)
        outputs = await client.infer("classifier", {"INPUT0": batch}, outputs=["INPUT0"])
        np.testing.assert_array_equal(outputs["INPUT0"], batch)
        assert [o.name for o in server.servicer.seen_requests[-1].outputs] == ["INPUT0"]

        typed = await client.infer("typed", {"X": np.zeros(1, np.int32)})
        assert typed["OUT"].tolist() == [7, -7]

        with pytest.raises(RateLimited) as limited:
            await client.infer("limited", {"X": np.zeros(1, np.float32)})
        assert limited.value.retry_after_s == 1.5
        with pytest.raises(QuotaExceeded):
            await client.infer("quota", {"X": np.zeros(1, np.float32)})
        with pytest.raises(ModelNotFound):
            await client.model_metadata("secret")
        with pytest.raises(DeadlineExceeded):
            await client.infer("slow", {"X": np.zeros(1, np.float32)}, timeout_s=0.05)

    async with AsyncClient(server.target, api_key="wrong") as client:
        with pytest.raises(Unauthenticated):
            await client.server_live()


async def test_messages_above_grpc_default_4mib_pass(server: FakeServer) -> None:
    big = np.ones((5, 1024, 1024), dtype=np.float32)  # 20 MiB each way
    async with AsyncClient(server.target, api_key=API_KEY) as client:
        outputs = await client.infer("classifier", {"INPUT0": big})
    np.testing.assert_array_equal(outputs["INPUT0"], big)


async def test_no_server_is_unavailable() -> None:
    async with AsyncClient("127.0.0.1:1", api_key=API_KEY, timeout_s=5) as client:
        with pytest.raises(Unavailable):
            await client.server_live()
