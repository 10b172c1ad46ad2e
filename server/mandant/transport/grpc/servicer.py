"""``inference.GRPCInferenceService``: each RPC reads the tenant, converts the request,
awaits the data plane and converts the result. Errors are mapped by the interceptor."""

from __future__ import annotations

from typing import TypeAlias

import grpc

from mandant.context import current_tenant
from mandant.registry import Model
from mandant.service import EXTENSIONS, SERVER_NAME, DataPlane
from mandant.transport.grpc.codec import ProtoInferRequest, encode_infer_response
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc

Context: TypeAlias = grpc.aio.ServicerContext


def _tensor_metadata(model: Model, which: str) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
        for t in getattr(model.spec, which)
    ]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._plane.live)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._plane.version, extensions=EXTENSIONS
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        ready = self._plane.model_ready(current_tenant.get(), request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        tenant = current_tenant.get()
        model = self._plane.model(tenant, request.name, request.version)
        versions = [m.key.version for m in self._plane.model_versions(tenant, request.name)]
        return pb.ModelMetadataResponse(
            name=model.key.name,
            versions=versions,
            platform=model.backend.platform,
            inputs=_tensor_metadata(model, "inputs"),
            outputs=_tensor_metadata(model, "outputs"),
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        response = await self._plane.infer(
            current_tenant.get(), ProtoInferRequest(request), context.time_remaining()
        )
        return encode_infer_response(response)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        models = self._plane.repository_index(current_tenant.get())
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=m.key.name,
                    version=m.key.version,
                    state="READY" if m.ready else "UNAVAILABLE",
                )
                for m in models
                if m.ready or not request.ready
            ]
        )
