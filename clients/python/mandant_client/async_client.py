"""``AsyncClient``: the asyncio Mandant client over a ``grpc.aio`` channel."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy.typing as npt

from mandant_client import _requests
from mandant_client._multiplex import DEFAULT_MAX_IN_FLIGHT
from mandant_client._multiplex_aio import AioMultiplexer
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from mandant_client._requests import ChannelOptions, ParameterValue
from mandant_client.errors import from_rpc_error
from mandant_client.tensors import Array, decode_outputs, text
from mandant_client.types import ModelIndexEntry, ModelMetadata, ServerMetadata


class AsyncClient:
    """asyncio client for one Mandant (or any KServe v2 gRPC) server: the same
    arguments, errors, multiplexed stream and connection spreading as
    :class:`~mandant_client.client.Client`, with coroutines for methods.

    Make it inside the event loop that uses it: a ``grpc.aio`` channel belongs to the
    loop it was made in, and other loops' calls raise RuntimeError.
    """

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        timeout_s: float | None = None,
        options: ChannelOptions = (),
        multiplex: bool = False,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        connections: int = 1,
    ) -> None:
        credentials = _requests.channel_credentials(tls)
        self._metadata = _requests.auth_metadata(api_key)  # a bad key: before any channel
        channel_options = _requests.channel_options(options, connections)
        if credentials is None:
            self._channels = [
                grpc.aio.insecure_channel(target, options=channel_options)
                for _ in range(connections)
            ]
        else:
            self._channels = [
                grpc.aio.secure_channel(target, credentials, options=channel_options)
                for _ in range(connections)
            ]
        self._stubs = [GRPCInferenceServiceStub(c) for c in self._channels]  # type: ignore[no-untyped-call]
        self._stub = self._stubs[0]
        self._turn = itertools.cycle(range(connections))
        self._timeout_s = _requests.call_timeout(timeout_s)
        max_send_bytes = _requests.max_send_bytes(channel_options)
        self._multiplexers = (
            [
                AioMultiplexer(stub, self._metadata, max_in_flight, max_send_bytes)
                for stub in self._stubs
            ]
            if multiplex
            else None
        )
        self._closed = False
        # Collected unclosed, its streams are cancelled (their tasks kept them open, each
        # a place among the tenant's streams on the server: after 64 such clients the
        # tenant's next streams were refused). Its channels close as grpc.aio's do.
        self._release = weakref.finalize(self, _abandon_all, self._multiplexers or [])
        self._release.atexit = False  # at exit the loop, and the calls, are gone

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def open_stream(self) -> None:
        """Open the multiplexed stream now rather than on the first ``infer``."""
        if self._multiplexers is None:
            raise RuntimeError("open_stream() needs a client made with multiplex=True")
        for multiplexer in self._multiplexers:
            multiplexer.open()

    async def close(self) -> None:
        self._closed = True
        self._release.detach()
        for multiplexer in self._multiplexers or ():
            await multiplexer.aclose()
        for channel in self._channels:
            await channel.close()

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
        parameters: Mapping[str, ParameterValue] | None = None,
    ) -> dict[str, Array]:
        """Run ``model`` on ``inputs``; the outputs (all, or those named) by name."""
        request, raw_bytes = _requests.infer_request(
            model, inputs, version, outputs, request_id, parameters
        )
        timeout = _requests.call_timeout(timeout_s, self._timeout_s)
        turn = next(self._turn)
        if self._multiplexers is not None:
            response = await self._multiplexers[turn].infer(request, raw_bytes, timeout)
        else:
            response = await self._unary(self._stubs[turn].ModelInfer, request, timeout, request_id)
        return decode_outputs(response)

    async def model_metadata(self, model: str, version: str | int | None = None) -> ModelMetadata:
        request = pb.ModelMetadataRequest(
            name=text("model", model), version=_requests.model_version(version)
        )
        response: pb.ModelMetadataResponse = await self._unary(self._stub.ModelMetadata, request)
        return _requests.model_metadata(response)

    async def model_ready(self, model: str, version: str | int | None = None) -> bool:
        request = pb.ModelReadyRequest(
            name=text("model", model), version=_requests.model_version(version)
        )
        response: pb.ModelReadyResponse = await self._unary(self._stub.ModelReady, request)
        return bool(response.ready)

    async def models(self) -> list[ModelIndexEntry]:
        request = pb.RepositoryIndexRequest()
        response: pb.RepositoryIndexResponse = await self._unary(
            self._stub.RepositoryIndex, request
        )
        return _requests.model_index(response)

    async def server_live(self) -> bool:
        response: pb.ServerLiveResponse = await self._unary(
            self._stub.ServerLive, pb.ServerLiveRequest()
        )
        return bool(response.live)

    async def server_ready(self) -> bool:
        response: pb.ServerReadyResponse = await self._unary(
            self._stub.ServerReady, pb.ServerReadyRequest()
        )
        return bool(response.ready)

    async def server_metadata(self) -> ServerMetadata:
        response: pb.ServerMetadataResponse = await self._unary(
            self._stub.ServerMetadata, pb.ServerMetadataRequest()
        )
        return _requests.server_metadata(response)

    async def _unary(
        self,
        method: Callable[..., Awaitable[Any]],
        request: Any,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> Any:
        timeout = _requests.call_timeout(timeout_s, self._timeout_s)
        if self._closed:
            raise _requests.client_closed(request_id)
        try:
            return await method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, request_id) from exc
        except asyncio.CancelledError:  # close() cancels the channel's calls
            if self._closed and not _cancelled_by_caller():
                raise _requests.client_closed(request_id) from None
            raise


def _cancelled_by_caller() -> bool:
    """Whether the running task was asked to cancel (True when Python cannot tell: 3.10
    has no ``Task.cancelling``), so that a caller's cancellation stays one."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


def _abandon_all(multiplexers: list[AioMultiplexer]) -> None:
    """A collected client's streams, cancelled: from the collector, anywhere (an event
    loop already closed makes that fail: nothing is left open then)."""
    for multiplexer in multiplexers:
        with contextlib.suppress(Exception):
            multiplexer.abandon()
