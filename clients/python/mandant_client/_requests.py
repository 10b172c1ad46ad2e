"""Transport-neutral glue shared by ``Client`` and ``AsyncClient``.

Builds request messages, turns responses into the public dataclasses, and holds the
channel defaults. Nothing here performs I/O.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client.errors import InvalidInput, MandantClientError, Unavailable
from mandant_client.tensors import encode_inputs, text
from mandant_client.types import ModelIndexEntry, ModelMetadata, ServerMetadata, TensorMetadata

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: The longest time a call is given (about three years); a longer one, infinity too,
#: is this. gRPC's deadline (1e10 s overflowed it: the call failed DEADLINE_EXCEEDED at
#: once), a thread's wait (a ``time_t``) and the v2 ``timeout`` parameter (int64 µs,
#: set by the multiplexed mode) all hold it.
MAX_TIMEOUT_S = 1e8

ChannelOptions = Sequence[tuple[str, Any]]
Metadata = tuple[tuple[str, str], ...]
ParameterValue = bool | int | float | str

_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1


def call_timeout(timeout_s: float | None, default: float | None = None) -> float | None:
    """A call's time: its own ``timeout_s``, else the client's ``default`` (None: no
    deadline), at most :data:`MAX_TIMEOUT_S`. NaN is refused (ValueError)."""
    timeout = timeout_s if timeout_s is not None else default
    if timeout is None:
        return None
    if math.isnan(timeout):
        raise ValueError("timeout_s is a number of seconds (or None), not NaN")
    return min(float(timeout), MAX_TIMEOUT_S)


def channel_options(options: ChannelOptions, connections: int = 1) -> list[tuple[str, Any]]:
    """64 MiB send/receive limits, overridden by whatever the caller passes; with
    several ``connections``, each channel keeps its own (grpc otherwise shares one
    connection between channels to the same target)."""
    if connections < 1:
        raise ValueError(f"connections must be at least 1, got {connections}")
    merged: dict[str, Any] = {
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    }
    if connections > 1:
        merged["grpc.use_local_subchannel_pool"] = 1
    merged.update(dict(options))
    return list(merged.items())


def max_send_bytes(options: ChannelOptions) -> int | None:
    """The send limit of a channel made with ``options`` (those of :func:`channel_options`);
    None when unlimited (grpc's -1)."""
    limit = dict(options).get("grpc.max_send_message_length", MAX_MESSAGE_BYTES)
    return int(limit) if int(limit) >= 0 else None


def client_closed(request_id: str = "") -> Unavailable:
    """What a call raises once ``close()`` has begun: one pending then (in flight, or
    waiting for a slot on the stream) or one made after. Unavailable, as the README
    promises, rather than whatever grpc raises on a closed channel (ValueError,
    UsageError, CANCELLED, a bare CancelledError)."""
    return Unavailable("the client was closed", request_id=request_id)


def channel_credentials(tls: bool | grpc.ChannelCredentials) -> grpc.ChannelCredentials | None:
    """None for plaintext, system roots for ``True``, else the credentials given."""
    if isinstance(tls, bool):
        return grpc.ssl_channel_credentials() if tls else None
    return tls


def auth_metadata(api_key: str | None) -> Metadata:
    """The ``authorization: Bearer <key>`` header sent on every call. The key without
    surrounding whitespace (as read from a file, its final newline: gRPC refused the
    header on every call, the async client's error not even a MandantClientError); one
    that is not printable ASCII, which gRPC cannot send, is a ValueError now (the key
    not repeated)."""
    key = (api_key or "").strip()
    if not key:  # none (an empty secret file): the channel's certificate, if any
        return ()
    if not (key.isascii() and key.isprintable()):
        raise ValueError("api_key holds characters a gRPC header cannot carry")
    return (("authorization", f"Bearer {key}"),)


def model_version(version: str | int | None) -> str:
    """The wire form of ``version``: versions are strings ("1", as Triton names them),
    but callers write ints, so an int is sent as its decimal string; None (and "") leave
    the choice to the server. Checked here because protobuf refuses anything else with
    "bad argument type for built-in operation", which names nothing."""
    accepts = "version must be a str, a non-negative int or None"
    if version is None:
        return ""
    if isinstance(version, str):
        return text("version", version)
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"{accepts}, got {type(version).__name__} {version!r}")
    if version < 0:
        raise ValueError(f"{accepts}, got {version}")
    return str(version)


def infer_request(
    model: str,
    inputs: Mapping[str, npt.ArrayLike],
    version: str | int | None,
    outputs: Sequence[str] | None,
    request_id: str,
    parameters: Mapping[str, ParameterValue] | None,
) -> tuple[pb.ModelInferRequest, int]:
    """The request, and the bytes of its ``raw_input_contents`` (for the stream's cheap
    size check, :func:`mandant_client._multiplex.ready`). What cannot be sent is
    :class:`InvalidInput` with ``request_id``, as the server's refusals are."""
    try:
        request = pb.ModelInferRequest(
            model_name=text("model", model),
            model_version=model_version(version),
            id=text("request_id", request_id or ""),  # None: no id, as ""
        )
        raw_bytes = encode_inputs(request, inputs)
        for name in outputs or ():
            request.outputs.add(name=text("output name", name))
        for key, value in (parameters or {}).items():
            request.parameters[text("parameter name", key)].CopyFrom(infer_parameter(key, value))
    except MandantClientError as exc:
        exc.request_id = request_id
        raise
    return request, raw_bytes


def infer_parameter(key: str, value: ParameterValue) -> pb.InferParameter:
    """numpy's scalars count as the Python number they hold (``np.int64(1)`` was
    refused where ``np.float64`` passed, a float)."""
    if isinstance(value, bool | np.bool_):
        return pb.InferParameter(bool_param=bool(value))
    if isinstance(value, numbers.Integral):
        number = int(value)
        if -_INT64_MAX - 1 <= number <= _INT64_MAX:
            return pb.InferParameter(int64_param=number)
        if 0 <= number <= _UINT64_MAX:
            return pb.InferParameter(uint64_param=number)
        raise InvalidInput(f"parameter {key!r} does not fit in 64 bits")
    if isinstance(value, numbers.Real):
        return pb.InferParameter(double_param=float(value))
    if isinstance(value, str):
        return pb.InferParameter(string_param=text(f"parameter {key!r}", value))
    raise InvalidInput(f"parameter {key!r} must be bool, int, float or str")


def model_metadata(response: pb.ModelMetadataResponse) -> ModelMetadata:
    return ModelMetadata(
        name=response.name,
        versions=list(response.versions),
        platform=response.platform,
        inputs=[_tensor_metadata(t) for t in response.inputs],
        outputs=[_tensor_metadata(t) for t in response.outputs],
    )


def model_index(response: pb.RepositoryIndexResponse) -> list[ModelIndexEntry]:
    return [
        ModelIndexEntry(name=m.name, version=m.version, state=m.state, reason=m.reason)
        for m in response.models
    ]


def server_metadata(response: pb.ServerMetadataResponse) -> ServerMetadata:
    return ServerMetadata(
        name=response.name, version=response.version, extensions=list(response.extensions)
    )


def _tensor_metadata(tensor: pb.ModelMetadataResponse.TensorMetadata) -> TensorMetadata:
    return TensorMetadata(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
