"""KServe v2 protobuf messages ⇄ numpy arrays.

Fixed-size datatypes in ``raw_input_contents`` decode with ``numpy.frombuffer``: the
arrays view the request's bytes (read-only, no copy). BYTES elements are each a
4-byte little-endian length followed by that many bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod
from typing import cast

import numpy as np

from mandant.config import DEFAULT_MAX_BYTES_ELEMENTS
from mandant.errors import InvalidInput, shown
from mandant.types import DATATYPES, InferResponse, TensorHeader, datatype_of
from mandant.validation import (
    MAX_PARAMETERS,
    MAX_RANK,
    NO_CLASSIFICATION,
    NO_SHARED_MEMORY,
    SHARED_MEMORY,
    check_bytes_count,
    check_counts,
    check_parameter_count,
    check_rank,
    check_raw_size,
    check_shape,
)
from mandant.wire import join_bytes, split_bytes
from mandant_client._proto import grpc_service_pb2 as pb

#: The typed ``contents`` field each datatype travels in.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

#: The numpy type of each typed ``contents`` field as protobuf declares it.
_FIELD_DTYPE = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}


def parameter_value(param: pb.InferParameter) -> bool | int | float | str:
    which = param.WhichOneof("parameter_choice")
    if which is None:
        raise InvalidInput("a request parameter has no value")
    value: bool | int | float | str = getattr(param, which)
    return value


def decode_bytes(
    raw: bytes, count: int, name: str, max_elements: int = DEFAULT_MAX_BYTES_ELEMENTS
) -> np.ndarray:
    """Split input ``name``'s length-prefixed BYTES elements into an object array."""
    check_bytes_count(count, name, max_elements)
    try:
        return split_bytes(raw, count)
    except ValueError as exc:
        raise InvalidInput(f"input '{name}': {exc}") from None


encode_bytes = join_bytes


def decode_raw(
    raw: bytes, header: TensorHeader, max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS
) -> np.ndarray:
    check_raw_size(raw, header, max_bytes_elements)
    return _decode_sized(raw, header, max_bytes_elements)


def _decode_sized(raw: bytes, header: TensorHeader, max_bytes_elements: int) -> np.ndarray:
    """:func:`decode_raw` of bytes whose size :func:`check_raw_size` accepted."""
    if header.datatype == "BYTES":
        count = prod(header.shape)
        return decode_bytes(raw, count, header.name, max_bytes_elements).reshape(header.shape)
    return np.frombuffer(raw, dtype=DATATYPES[header.datatype]).reshape(header.shape)


def decode_typed(
    frame: bytes | memoryview,
    header: TensorHeader,
    max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS,
) -> np.ndarray:
    """:func:`decode_contents` of an input's typed contents as
    :meth:`ProtoInferRequest.typed_inputs` serialized them."""
    contents = pb.InferTensorContents.FromString(cast(bytes, frame))  # parses any buffer
    return decode_contents(contents, header, max_bytes_elements)


def decode_contents(
    contents: pb.InferTensorContents,
    header: TensorHeader,
    max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS,
) -> np.ndarray:
    """Typed contents, converted in one numpy call each (the repeated fields expose
    their values as a buffer: 10⁶ FP32 values take well under 1 ms; 10⁶ BYTES about
    45 ms, hence their bound), after the value count is checked against the shape."""
    field = CONTENTS_FIELD.get(header.datatype)
    if field is None:
        raise InvalidInput(
            f"input '{header.name}': {header.datatype} travels in raw_input_contents only"
        )
    count = check_shape(header)
    if header.datatype == "BYTES":
        check_bytes_count(count, header.name, max_bytes_elements)
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input '{header.name}': shape {list(header.shape)} needs {count} values "
            f"in contents.{field}, got {len(values)}"
        )
    if header.datatype == "BYTES":
        array: np.ndarray = np.array(values, dtype=np.object_)
        return array.reshape(header.shape)
    dtype = DATATYPES[header.datatype]
    wide: np.ndarray = np.array(values, dtype=_FIELD_DTYPE[field])
    if dtype.kind in "iu" and dtype.itemsize < wide.dtype.itemsize and wide.size:
        info = np.iinfo(dtype)  # type: ignore[type-var]
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(
                f"input '{header.name}': a value in contents.{field} is out of range for "
                f"{header.datatype}"
            )
    return wide.astype(dtype, copy=False).reshape(header.shape)


class ProtoInferRequest:
    """A ``ModelInferRequest`` seen through :class:`mandant.types.EncodedRequest`.

    Headers are read once, and each ``raw_input_contents`` entry is taken out of the
    message once (upb makes a new ``bytes`` on every element access). A message that
    lists more inputs, outputs or parameters than :func:`check_counts` accepts is
    refused on construction, before any entry is read: a small message can list
    millions (an empty ``inputs {}`` is 2 bytes), each of which would cost a Python
    object on the event loop (and, in a front end of ``workers: N``, a place in the
    engine's message)."""

    __slots__ = ("_checked", "_headers", "_max_bytes_elements", "_msg", "_raw")

    def __init__(
        self, msg: pb.ModelInferRequest, max_bytes_elements: int = DEFAULT_MAX_BYTES_ELEMENTS
    ) -> None:
        check_counts(len(msg.inputs), len(msg.outputs), len(msg.parameters))
        self._msg = msg
        self._max_bytes_elements = max_bytes_elements
        self._headers: list[TensorHeader] | None = None
        self._raw: list[bytes] | None = None
        self._checked = False  # check_payload passed

    @property
    def model_name(self) -> str:
        return self._msg.model_name

    @property
    def model_version(self) -> str:
        return self._msg.model_version

    @property
    def request_id(self) -> str:
        return self._msg.id

    def input_headers(self) -> Sequence[TensorHeader]:
        if self._headers is None:
            headers = []
            for tensor in self._msg.inputs:
                shape = tensor.shape
                if len(shape) > MAX_RANK:  # before it is copied: 1 byte a dimension
                    check_rank(len(shape), tensor.name)
                parameters = tensor.parameters
                if parameters:
                    # One rule at every size (the wire walk counts them above 64 KiB;
                    # REST always): a map's len() reads none of its entries.
                    if len(parameters) > MAX_PARAMETERS:
                        check_parameter_count(len(parameters), f"input '{shown(tensor.name)}'")
                    # Raw contents or typed, alike (with raw ones it was not looked at:
                    # the raw bytes were taken for the region's data).
                    if SHARED_MEMORY in parameters:
                        raise InvalidInput(f"input '{shown(tensor.name)}': {NO_SHARED_MEMORY}")
                headers.append(TensorHeader(tensor.name, tensor.datatype, tuple(shape)))
            self._headers = headers
        return self._headers

    def requested_outputs(self) -> Sequence[str]:
        outputs = self._msg.outputs
        if not outputs:
            return ()
        for output in outputs:
            parameters = output.parameters
            if parameters:
                if len(parameters) > MAX_PARAMETERS:
                    check_parameter_count(len(parameters), f"output '{shown(output.name)}'")
                classes = parameters.get("classification")
                if classes is not None and parameter_value(classes):
                    raise InvalidInput(NO_CLASSIFICATION)
                if SHARED_MEMORY in parameters:
                    raise InvalidInput(f"output '{shown(output.name)}': {NO_SHARED_MEMORY}")
        return [o.name for o in outputs]

    def parameters(self) -> Mapping[str, bool | int | float | str]:
        parameters = self._msg.parameters
        if not parameters:
            return _NO_PARAMETERS
        return {key: parameter_value(value) for key, value in parameters.items()}

    def _raw_contents(self) -> list[bytes]:
        if self._raw is None:
            raw, inputs = self._msg.raw_input_contents, len(self._msg.inputs)
            if raw and len(raw) != inputs:  # counted before any entry is copied
                raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {inputs} inputs")
            self._raw = list(raw)
        return self._raw

    def check_payload(self) -> None:
        if self._checked:
            return
        raw = self._raw_contents()
        if not raw:
            return  # typed contents are counted while decoding
        for header, data in zip(self.input_headers(), raw, strict=True):
            if header.datatype in DATATYPES:  # an unknown one was refused by validation
                check_raw_size(data, header, self._max_bytes_elements)
        self._checked = True

    def raw_inputs(self) -> Sequence[bytes] | None:
        raw = self._raw_contents()
        if not raw:
            return None
        if any(tensor.HasField("contents") for tensor in self._msg.inputs):
            return None  # both contents and raw: decoding says so
        return raw

    def typed_inputs(self) -> Sequence[bytes] | None:
        if self._raw_contents() or all(h.datatype != "BYTES" for h in self.input_headers()):
            return None  # raw (or both: decoding says so), or numbers: cheap to decode
        return [tensor.contents.SerializeToString() for tensor in self._msg.inputs]

    def decode_inputs(self) -> dict[str, np.ndarray]:
        self.check_payload()
        raw = self._raw_contents()
        headers = self.input_headers()
        if raw:
            for tensor in self._msg.inputs:
                if tensor.HasField("contents"):
                    raise InvalidInput(
                        f"input '{tensor.name}': both contents and raw_input_contents given"
                    )
            return {
                header.name: _decode_sized(data, header, self._max_bytes_elements)
                for header, data in zip(headers, raw, strict=True)
            }
        return {
            header.name: decode_contents(tensor.contents, header, self._max_bytes_elements)
            for header, tensor in zip(headers, self._msg.inputs, strict=True)
        }


_NO_PARAMETERS: Mapping[str, bool | int | float | str] = {}


def encode_infer_response(
    response: InferResponse, into: pb.ModelInferResponse | None = None
) -> pb.ModelInferResponse:
    """Outputs go in ``raw_output_contents``, cast to each declared datatype. ``into``:
    an empty message to fill, such as a stream response's ``infer_response`` (a
    message handed to a parent's constructor is copied whole: ≈ 0.3 ms per 4 MB)."""
    declared = {spec.name: spec.datatype for spec in response.output_specs}
    msg = pb.ModelInferResponse() if into is None else into
    msg.model_name = response.model_name
    msg.model_version = response.model_version
    msg.id = response.request_id
    for name, array in response.outputs.items():
        datatype = declared.get(name) or datatype_of(array)
        if datatype == "BYTES":
            data = encode_bytes(array)
        else:
            data = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
        msg.outputs.add(name=name, datatype=datatype, shape=array.shape)
        msg.raw_output_contents.append(data)
    return msg
