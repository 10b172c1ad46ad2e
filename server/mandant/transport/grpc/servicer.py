"""``inference.GRPCInferenceService``: each RPC takes the parsed request and the
authenticated :class:`~mandant.types.Call`, awaits the data plane and converts the
result. Authentication, parsing and the error table live in the gate
(``gateway.py``), which builds the method handlers from :func:`method_handlers`."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import grpc

from mandant.config import ServerConfig
from mandant.errors import ModelNotFound
from mandant.events import Observer
from mandant.observability.stats import InferenceStats
from mandant.registry import Model
from mandant.scheduling.door import CallCap, FrontDoor
from mandant.service import EXTENSIONS, SERVER_NAME, DataPlane
from mandant.transport.grpc.codec import ProtoInferRequest, encode_infer_response
from mandant.transport.grpc.gateway import Access, Context, Gate, metadata_value
from mandant.transport.grpc.model_config import model_config
from mandant.transport.grpc.statistics import TENANT_METADATA, model_statistics
from mandant.transport.grpc.stream import InferStream
from mandant.transport.unread import UnreadAnswers
from mandant.types import Call, Tenant
from mandant_client._multiplex import MAX_BYTES_METADATA, MAX_INFLIGHT_METADATA
from mandant_client._multiplex import RESENDS_UNREAD as RESENDS
from mandant_client._proto import grpc_service_pb2 as pb

INFERENCE_SERVICE = "inference.GRPCInferenceService"


def _tensor_metadata(model: Model, which: str) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
        for t in getattr(model.spec, which)
    ]


class InferenceServicer:
    def __init__(
        self,
        plane: DataPlane,
        config: ServerConfig,
        observer: Observer,
        door: FrontDoor | None = None,
        stats: InferenceStats | None = None,
        cap: CallCap | None = None,
        unread: UnreadAnswers | None = None,
    ) -> None:
        """``config``: the server's bounds on streams and tensors. ``cap``: the
        server-wide cap on calls in progress, which each stream message takes a place
        under while it is served (the gate's; unary calls take theirs there).
        ``unread``: each tenant's answers not read yet (the gate's: it refuses unary
        calls at the bound; streams check their messages here; None: not counted)."""
        self._plane = plane
        self._cap = cap
        self._stats = stats or InferenceStats()
        self._max_stream_inflight = config.max_stream_inflight
        self._max_stream_bytes = STREAM_BYTES * config.max_message_bytes
        self._max_bytes_elements = config.max_bytes_elements
        self._max_stream_age_s = config.max_connection_age_s
        self._observer = observer
        self._door = door
        self._unread = unread
        self._streams: set[InferStream] = set()
        self._streams_end = False  # end_streams() was called: the server stops

    @property
    def stream_metadata(self) -> tuple[tuple[str, str], ...]:
        """A stream's initial metadata: how many of its messages, and bytes, are held at
        once (beyond, it is not read), so that a client holds the rest back itself, where
        it can withdraw a call that gives up (``mandant_client``'s multiplexed mode)."""
        return (
            (MAX_INFLIGHT_METADATA, str(self._max_stream_inflight)),
            (MAX_BYTES_METADATA, str(self._max_stream_bytes)),
        )

    def end_streams(self) -> None:
        """The server is stopping: every open stream ends (status OK) once the messages
        it has in flight are answered, so that its client opens its next one elsewhere
        instead of holding the drain for ``grace_s`` with its calls refused (streams
        opened from now on are refused, as the plane drains; one admitted just before
        ends as it begins)."""
        self._streams_end = True
        for stream in self._streams:
            stream.end()

    def check_streams(self) -> None:
        """After a reload: every open stream whose key no longer authenticates ends
        (``InferStream.check_key``), an idle one too."""
        for stream in self._streams:
            # In a context of its own: the check tags its context with the stream's
            # tenant (for the logs), and this one is the reload's.
            contextvars.copy_context().run(stream.check_key)

    def admit_stream(self) -> None:
        """Before a stream opens: once the server stops, one (a multiplexing client's
        next, as its last one ended) is refused UNAVAILABLE, as a unary call is. It was
        never ended, and held the stop for the whole grace, every message on it
        refused."""
        self._plane.refuse_if_draining()

    async def ServerLive(
        self, request: pb.ServerLiveRequest, call: Call, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._plane.live)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, call: Call, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._plane.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, call: Call, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._plane.version, extensions=EXTENSIONS
        )

    async def ModelReady(
        self, request: pb.ModelReadyRequest, call: Call, context: Context
    ) -> pb.ModelReadyResponse:
        """``ready: false`` for a model the caller cannot see (unknown, or another
        tenant's), as Triton answers for an unknown model: tools poll ``is_model_ready``
        until a model they load is up, and NOT_FOUND raised in them."""
        try:
            ready = self._plane.model_ready(call.caller, request.name, request.version)
        except ModelNotFound:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, call: Call, context: Context
    ) -> pb.ModelMetadataResponse:
        model = self._plane.model(call.caller, request.name, request.version)
        versions = [m.key.version for m in self._plane.model_versions(call.caller, request.name)]
        return pb.ModelMetadataResponse(
            name=model.key.name,
            versions=versions,
            platform=model.backend.platform,
            inputs=_tensor_metadata(model, "inputs"),
            outputs=_tensor_metadata(model, "outputs"),
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, call: Call, context: Context
    ) -> pb.ModelConfigResponse:
        model = self._plane.model(call.caller, request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(model))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, call: Call, context: Context
    ) -> pb.ModelStatisticsResponse:
        """A tenant key: its own calls; an admin key: every tenant's, or one tenant's
        with the ``mandant-tenant`` metadata (``statistics.py``)."""
        await self._stats.settled()  # every call answered so far is counted
        stats = model_statistics(
            self._plane,
            self._stats,
            call.tenant,
            metadata_value(context, TENANT_METADATA),
            request.name,
            request.version,
        )
        return pb.ModelStatisticsResponse(model_stats=stats)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, call: Call, context: Context
    ) -> pb.ModelInferResponse:
        response = await self._plane.infer(
            call,
            ProtoInferRequest(request, self._max_bytes_elements),
            context.time_remaining(),
        )
        unread, size = self._unread, response.nbytes
        if unread is not None and size:  # held until gRPC ends the call: written, or given up
            tenant = call.caller.id
            unread.take(tenant, size)  # or refused, past the tenant's bound
            context.add_done_callback(lambda _: unread.release(tenant, size))
        return encode_infer_response(response)

    async def ModelStreamInfer(
        self,
        call: Call,
        context: Context,
        caller: Callable[[], Tenant | None],
        release: Callable[[], None],
    ) -> None:
        resends = metadata_value(context, RESENDS[0]) == RESENDS[1]
        stream = InferStream(
            self._plane,
            call.caller,
            caller,
            context,
            self._max_stream_inflight,
            self._max_stream_bytes,
            self._max_bytes_elements,
            self._observer,
            self._door,
            self._cap,
            self._unread,
            # Ended at the connection's age only where the client sends the messages
            # left unread again (mandant_client's multiplexed mode says so): others
            # (tritonclient) would wait for their answers for ever.
            self._max_stream_age_s if resends else None,
            resends,
            release,
        )
        self._streams.add(stream)
        if self._streams_end:  # admitted, then the stop came as it opened
            stream.end()
        try:
            await stream.serve()
        finally:
            self._streams.discard(stream)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, call: Call, context: Context
    ) -> pb.RepositoryIndexResponse:
        models = self._plane.repository_index(call.caller)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=m.key.name,
                    version=m.key.version,
                    state=m.state,
                    reason=m.reason,
                )
                for m in models
                if m.ready or not request.ready
            ]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, call: Call, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        """Admin keys only: (re)load the model's entry from the configuration file, or
        from the ``config`` parameter (``DataPlane.load_model``)."""
        parameters = {
            name: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
            for name, value in request.parameters.items()
        }
        await self._plane.load_model(request.model_name, parameters)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, call: Call, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        """Admin keys only: stop routing the model, let its calls finish, free it.
        ``unload_dependents`` (tritonclient sends it) has nothing to act on: no ensembles."""
        await self._plane.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


#: Bytes of a stream's messages being served and answers not yet written, in
#: ``max_message_bytes``, beyond which it is not read (as REST's bodies on their way).
STREAM_BYTES = 2

#: Probes are open without a key, like Triton's; everything else needs a tenant key.
_OPEN = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})
#: Calls that take turns at the front door (``scheduling/door.py``).
_INFERENCE = frozenset({"ModelInfer"})
#: Calls an admin key may make too (every tenant's view).
_TENANT_OR_ADMIN = frozenset({"ModelStatistics"})
#: Calls only an admin key may make (tenant keys: UNAUTHENTICATED).
_ADMIN = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})


def method_access(name: str) -> Access:
    """Who may call the inference service's method ``name``."""
    if name in _OPEN:
        return Access.OPEN
    if name in _TENANT_OR_ADMIN:
        return Access.TENANT_OR_ADMIN
    return Access.ADMIN if name in _ADMIN else Access.TENANT


def method_handlers(servicer: InferenceServicer, gate: Gate) -> dict[str, grpc.RpcMethodHandler]:
    """Every method of the service as the gate's handlers, from the service descriptor
    (so a method added to the proto without a behaviour fails here, at start-up)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        name = method.name
        path = f"/{INFERENCE_SERVICE}/{name}"
        access = method_access(name)
        serialize: Callable[[Any], bytes] = _serializer(method.output_type.name)
        if method.client_streaming:
            behavior = getattr(servicer, name)
            handlers[name] = gate.stream(
                path, access, behavior, serialize, servicer.admit_stream, servicer.stream_metadata
            )
        else:
            request_type = getattr(pb, method.input_type.name)
            behavior = getattr(servicer, name)
            handlers[name] = gate.unary(
                path, access, request_type, behavior, serialize, fair=name in _INFERENCE
            )
    return handlers


def _serializer(message_name: str) -> Callable[[Any], bytes]:
    serialize: Callable[[Any], bytes] = getattr(pb, message_name).SerializeToString
    return serialize
