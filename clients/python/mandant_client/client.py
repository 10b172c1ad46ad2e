"""``Client``: the synchronous Mandant client over a plain ``grpc`` channel."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy.typing as npt

from mandant_client import _requests
from mandant_client._multiplex import DEFAULT_MAX_IN_FLIGHT
from mandant_client._multiplex_sync import SyncMultiplexer
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from mandant_client._requests import ChannelOptions, ParameterValue
from mandant_client.errors import from_rpc_error
from mandant_client.tensors import Array, decode_outputs, text
from mandant_client.types import ModelIndexEntry, ModelMetadata, ServerMetadata


class Client:
    """Blocking client for one Mandant (or any KServe v2 gRPC) server.

    Every call sends ``authorization: Bearer <api_key>`` and raises a
    :class:`~mandant_client.errors.MandantClientError` subclass on failure.
    ``timeout_s`` is the default deadline of each call (None: no deadline).

    With ``multiplex=True``, concurrent ``infer`` calls share one ``ModelStreamInfer``
    stream (opened by the first call or by :meth:`open_stream`, reopened after it
    fails, closed with the client), at most ``max_in_flight`` messages at a time; they
    raise the same exceptions as unary calls. Other methods stay unary.
    ``connections``: how many HTTP/2 connections ``infer`` calls are spread over,
    round-robin (each with its own stream under ``multiplex=True``). One connection
    reaches one server process; a server with several gRPC front ends
    (``workers: N``), or replicas behind a connection-level balancer, balance
    connections, not calls, so give a busy client at least as many connections as
    there are processes to reach. Other methods use the first connection.

    Once :meth:`close` begins, calls still pending and calls made later raise
    :class:`~mandant_client.errors.Unavailable` ("the client was closed"). A client
    never closed is closed when it is collected.
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
                grpc.insecure_channel(target, options=channel_options) for _ in range(connections)
            ]
        else:
            self._channels = [
                grpc.secure_channel(target, credentials, options=channel_options)
                for _ in range(connections)
            ]
        self._stubs = [GRPCInferenceServiceStub(c) for c in self._channels]  # type: ignore[no-untyped-call]
        self._stub = self._stubs[0]
        self._turn = itertools.cycle(range(connections))
        self._timeout_s = _requests.call_timeout(timeout_s)
        max_send_bytes = _requests.max_send_bytes(channel_options)
        self._multiplexers = (
            [
                SyncMultiplexer(stub, self._metadata, max_in_flight, max_send_bytes)
                for stub in self._stubs
            ]
            if multiplex
            else None
        )
        self._closed = False
        # Closed when collected if never closed: a multiplexed stream's threads keep it
        # open otherwise, and its connection's share of the server's streams with it
        # (50 dropped clients held 151 threads; other clients' calls timed out).
        self._release = weakref.finalize(self, _close_all, self._multiplexers or [], self._channels)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def open_stream(self) -> None:
        """Open the multiplexed stream now rather than on the first ``infer``."""
        if self._multiplexers is None:
            raise RuntimeError("open_stream() needs a client made with multiplex=True")
        for multiplexer in self._multiplexers:
            multiplexer.open()

    def close(self) -> None:
        self._closed = True
        self._release()  # once, whoever comes first: this or the collector

    def infer(
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
            response = self._multiplexers[turn].infer(request, raw_bytes, timeout)
        else:
            response = self._unary(self._stubs[turn].ModelInfer, request, timeout, request_id)
        return decode_outputs(response)

    def model_metadata(self, model: str, version: str | int | None = None) -> ModelMetadata:
        request = pb.ModelMetadataRequest(
            name=text("model", model), version=_requests.model_version(version)
        )
        response: pb.ModelMetadataResponse = self._unary(self._stub.ModelMetadata, request)
        return _requests.model_metadata(response)

    def model_ready(self, model: str, version: str | int | None = None) -> bool:
        request = pb.ModelReadyRequest(
            name=text("model", model), version=_requests.model_version(version)
        )
        response: pb.ModelReadyResponse = self._unary(self._stub.ModelReady, request)
        return bool(response.ready)

    def models(self) -> list[ModelIndexEntry]:
        request = pb.RepositoryIndexRequest()
        response: pb.RepositoryIndexResponse = self._unary(self._stub.RepositoryIndex, request)
        return _requests.model_index(response)

    def server_live(self) -> bool:
        response: pb.ServerLiveResponse = self._unary(self._stub.ServerLive, pb.ServerLiveRequest())
        return bool(response.live)

    def server_ready(self) -> bool:
        response: pb.ServerReadyResponse = self._unary(
            self._stub.ServerReady, pb.ServerReadyRequest()
        )
        return bool(response.ready)

    def server_metadata(self) -> ServerMetadata:
        response: pb.ServerMetadataResponse = self._unary(
            self._stub.ServerMetadata, pb.ServerMetadataRequest()
        )
        return _requests.server_metadata(response)

    def _unary(
        self,
        method: Callable[..., Any],
        request: Any,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> Any:
        timeout = _requests.call_timeout(timeout_s, self._timeout_s)
        if self._closed:
            raise _requests.client_closed(request_id)
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:  # CANCELLED "Channel closed!" when close() ran
            if self._closed:
                raise _requests.client_closed(request_id) from exc
            raise from_rpc_error(exc, request_id) from exc
        except ValueError as exc:  # grpc's "closed channel": close() ran on another thread
            if self._closed:
                raise _requests.client_closed(request_id) from exc
            raise


def _close_all(multiplexers: list[SyncMultiplexer], channels: list[grpc.Channel]) -> None:
    """What a client holds, closed: its streams (pending calls fail), then its channels."""
    for multiplexer in multiplexers:
        multiplexer.close()
    for channel in channels:
        channel.close()
