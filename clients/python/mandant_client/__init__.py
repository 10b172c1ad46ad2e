"""Light Python client for the Mandant inference server (KServe v2 gRPC protocol).

Needs only grpcio, protobuf and numpy::

    from mandant_client import Client

    with Client("127.0.0.1:8001", api_key="...") as client:
        outputs = client.infer("classifier", {"INPUT0": batch})
"""

from __future__ import annotations

from mandant_client._requests import MAX_MESSAGE_BYTES
from mandant_client.async_client import AsyncClient
from mandant_client.client import Client
from mandant_client.errors import (
    ERRORS_BY_CODE,
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
    error_for,
    from_rpc_error,
)
from mandant_client.tensors import (
    DATATYPES,
    Datatype,
    decode_outputs,
    encode_inputs,
    encode_tensor,
    to_numpy_dtype,
    to_v2_datatype,
)
from mandant_client.types import ModelIndexEntry, ModelMetadata, ServerMetadata, TensorMetadata

__all__ = [
    "DATATYPES",
    "ERRORS_BY_CODE",
    "MAX_MESSAGE_BYTES",
    "AsyncClient",
    "Client",
    "Datatype",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidInput",
    "MandantClientError",
    "ModelIndexEntry",
    "ModelMetadata",
    "ModelNotFound",
    "QuotaExceeded",
    "RateLimited",
    "ResourceExhausted",
    "ServerError",
    "ServerMetadata",
    "TensorMetadata",
    "Unauthenticated",
    "Unavailable",
    "decode_outputs",
    "encode_inputs",
    "encode_tensor",
    "error_for",
    "from_rpc_error",
    "to_numpy_dtype",
    "to_v2_datatype",
]
