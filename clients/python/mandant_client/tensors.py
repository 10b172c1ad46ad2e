"""numpy ⇄ KServe v2 tensors: one datatype table, encode to raw bytes, decode zero-copy.

Inputs travel in ``raw_input_contents`` (little-endian, row-major). Outputs are read from
``raw_output_contents`` when the server sends them, else from the typed ``contents``.
Fixed-size outputs are ``numpy.frombuffer`` views on the message bytes (read-only, no copy).
BYTES elements are framed as a 4-byte little-endian length followed by the bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client.errors import InvalidInput, ServerError

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Datatype:
    """One v2 datatype: its numpy dtype and the typed ``contents`` field that carries it."""

    name: str
    dtype: np.dtype[Any]
    contents_field: str | None  # None: raw only (FP16)


def _row(name: str, dtype: str, contents_field: str | None) -> tuple[str, Datatype]:
    return name, Datatype(name, np.dtype(dtype), contents_field)


# The one table: v2 datatype <-> numpy dtype (little-endian) <-> typed contents field.
DATATYPES: Mapping[str, Datatype] = dict(
    [
        _row("BOOL", "|b1", "bool_contents"),
        _row("UINT8", "|u1", "uint_contents"),
        _row("UINT16", "<u2", "uint_contents"),
        _row("UINT32", "<u4", "uint_contents"),
        _row("UINT64", "<u8", "uint64_contents"),
        _row("INT8", "|i1", "int_contents"),
        _row("INT16", "<i2", "int_contents"),
        _row("INT32", "<i4", "int_contents"),
        _row("INT64", "<i8", "int64_contents"),
        _row("FP16", "<f2", None),
        _row("FP32", "<f4", "fp32_contents"),
        _row("FP64", "<f8", "fp64_contents"),
        _row("BYTES", "O", "bytes_contents"),
    ]
)

# numpy (kind, itemsize) -> v2 name, derived from the table; str/bytes arrays are BYTES too.
_BY_NUMPY: dict[tuple[str, int], str] = {
    (spec.dtype.kind, spec.dtype.itemsize): name
    for name, spec in DATATYPES.items()
    if name != "BYTES"
}
_BYTES_KINDS = frozenset("OSU")
_LENGTH = struct.Struct("<I")


def to_v2_datatype(dtype: npt.DTypeLike) -> str:
    """The v2 datatype name for a numpy dtype; InvalidInput when there is none."""
    np_dtype = np.dtype(dtype)
    if np_dtype.kind in _BYTES_KINDS:
        return "BYTES"
    name = _BY_NUMPY.get((np_dtype.kind, np_dtype.itemsize))
    if name is None:
        raise InvalidInput(f"numpy dtype {np_dtype} has no KServe v2 datatype")
    return name


def to_numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The (little-endian) numpy dtype for a v2 datatype; object for BYTES."""
    spec = DATATYPES.get(datatype)
    if spec is None:
        raise InvalidInput(f"unknown KServe v2 datatype {datatype!r}")
    return spec.dtype


def text(what: str, value: object) -> str:
    """``value``, a name or id the request carries as a protobuf string: a ``TypeError``
    for anything but a str, ``InvalidInput`` for a str UTF-8 cannot write (a lone
    surrogate, as ``surrogateescape`` decoding leaves): protobuf refused both with
    errors that named nothing ("bad argument type for built-in operation"), outside
    the client's exceptions."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__} {value!r}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"{what} {value!r} is not UTF-8 text ({exc.reason})") from None
    return value


def encode_tensor(
    name: str, value: npt.ArrayLike
) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes]:
    """One input tensor's metadata and its raw bytes. Python bytes and str (in lists)
    are kept whole: numpy would make them a fixed-width array, which drops their
    trailing NUL bytes (an ``S``/``U`` array the caller built has already lost them)."""
    try:
        array = np.asarray(value)
    except ValueError as exc:  # a ragged list: numpy's ValueError named no input
        raise InvalidInput(f"input {name!r} is not an array: {exc}") from None
    if array.dtype.kind in "SU" and not isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value, dtype=object)
    datatype = to_v2_datatype(array.dtype)
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=text("input name", name), datatype=datatype, shape=list(array.shape)
    )
    if datatype == "BYTES":
        return tensor, _encode_bytes(array, name)
    little = np.ascontiguousarray(array).astype(DATATYPES[datatype].dtype, copy=False)
    return tensor, little.tobytes()


def encode_inputs(request: pb.ModelInferRequest, inputs: Mapping[str, npt.ArrayLike]) -> int:
    """Append every input to ``request.inputs`` and ``request.raw_input_contents``, in order;
    the number of raw bytes appended (reading it back from the message copies them)."""
    raws: list[bytes] = []
    for name, value in inputs.items():
        tensor, raw = encode_tensor(name, value)
        request.inputs.append(tensor)
        raws.append(raw)
    request.raw_input_contents.extend(raws)
    return sum(len(raw) for raw in raws)


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, Array]:
    """Every output of a response as a numpy array, keyed by output name."""
    raws = response.raw_output_contents
    if raws and len(raws) != len(response.outputs):
        raise ServerError(
            f"response has {len(response.outputs)} outputs but {len(raws)} raw contents"
        )
    decoded: dict[str, Array] = {}
    for index, tensor in enumerate(response.outputs):
        if raws:
            decoded[tensor.name] = decode_raw(tensor.datatype, tensor.shape, raws[index])
        else:
            decoded[tensor.name] = decode_contents(tensor.datatype, tensor.shape, tensor.contents)
    return decoded


def decode_raw(datatype: str, shape: Sequence[int], raw: bytes) -> Array:
    """A tensor from its raw bytes; a read-only view on ``raw`` for fixed-size types."""
    spec, dims, count = _output_spec(datatype, shape)
    if spec.name == "BYTES":
        return _decode_bytes(raw, count).reshape(dims)
    expected = count * spec.dtype.itemsize
    if len(raw) != expected:
        raise ServerError(
            f"{datatype} tensor of shape {dims} needs {expected} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=spec.dtype).reshape(dims)


def decode_contents(datatype: str, shape: Sequence[int], contents: pb.InferTensorContents) -> Array:
    """A tensor from the typed ``contents`` field that its datatype uses."""
    spec, dims, count = _output_spec(datatype, shape)
    if spec.contents_field is None:
        raise ServerError(f"{datatype} travels as raw contents only")
    values = getattr(contents, spec.contents_field)
    if len(values) != count:
        raise ServerError(
            f"{datatype} tensor of shape {dims} needs {count} values, got {len(values)}"
        )
    if spec.name == "BYTES":
        array = np.fromiter((bytes(v) for v in values), dtype=object, count=count)
    else:
        array = np.array(values, dtype=spec.dtype)
    return array.reshape(dims)


def _output_spec(datatype: str, shape: Sequence[int]) -> tuple[Datatype, tuple[int, ...], int]:
    spec = DATATYPES.get(datatype)
    if spec is None:
        raise ServerError(f"response uses unknown datatype {datatype!r}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ServerError(f"response shape {list(dims)} has a negative dimension")
    # An empty tensor's other dimensions too must be ones an array can index: numpy
    # refuses [0, 2**62] with its own ValueError, not a client error.
    if math.prod(d for d in dims if d) * spec.dtype.itemsize > np.iinfo(np.intp).max:
        raise ServerError(f"response shape {list(dims)} is larger than an array can be")
    return spec, dims, math.prod(dims)


def _encode_bytes(array: Array, name: str) -> bytes:
    parts: list[bytes] = []
    for item in _flat_items(array):
        if isinstance(item, str):
            try:
                data = item.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate (surrogateescape)
                raise InvalidInput(
                    f"BYTES input {name!r} holds a str that is not UTF-8 text "
                    f"({exc.reason}); send bytes"
                ) from None
        elif isinstance(item, bytes | bytearray | memoryview):
            data = bytes(item)
        else:
            raise InvalidInput(
                f"BYTES input {name!r} holds a {type(item).__name__}; expected bytes or str"
            )
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _flat_items(array: Array) -> Iterable[Any]:
    return array.ravel(order="C").tolist() if array.dtype.kind != "O" else array.ravel(order="C")


def _decode_bytes(raw: bytes, count: int) -> Array:
    items: list[bytes] = []
    offset, end = 0, len(raw)
    while offset < end:
        if offset + _LENGTH.size > end:
            raise ServerError("BYTES tensor ends inside a length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > end:
            raise ServerError("BYTES tensor element runs past the end of its contents")
        items.append(raw[offset : offset + length])
        offset += length
    if len(items) != count:
        raise ServerError(f"BYTES tensor needs {count} elements, got {len(items)}")
    return np.fromiter(items, dtype=object, count=count)
