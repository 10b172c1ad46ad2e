"""numpy ⇄ v2 tensor codec of the light client: round trips, typed contents, zero-copy."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mandant_client import (
    DATATYPES,
    InvalidInput,
    ServerError,
    decode_outputs,
    encode_inputs,
    to_numpy_dtype,
    to_v2_datatype,
)
from mandant_client._proto import grpc_service_pb2 as pb

FIXED_DATATYPES = [name for name in DATATYPES if name != "BYTES"]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


def echo_response(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """What a server that returns its inputs unchanged would answer, via the wire."""
    response = pb.ModelInferResponse(model_name=request.model_name)
    for tensor in request.inputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    response.raw_output_contents.extend(request.raw_input_contents)
    return pb.ModelInferResponse.FromString(response.SerializeToString())


def round_trip(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    request = pb.ModelInferRequest(model_name="m")
    encode_inputs(request, inputs)
    wire = pb.ModelInferRequest.FromString(request.SerializeToString())
    return decode_outputs(echo_response(wire))


@st.composite
def fixed_arrays(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from(FIXED_DATATYPES))
    # any byte order in, little-endian on the wire
    dtype = DATATYPES[datatype].dtype.newbyteorder(draw(st.sampled_from("<>=")))
    array = draw(hnp.arrays(dtype, SHAPES))
    if draw(st.booleans()) and array.ndim >= 2:
        array = array.T  # not C-contiguous
    return datatype, array


@given(fixed_arrays())
@settings(max_examples=300, deadline=None)
def test_fixed_size_round_trip_every_datatype(case: tuple[str, np.ndarray]) -> None:
    datatype, array = case
    request = pb.ModelInferRequest()
    encode_inputs(request, {"X": array})
    assert request.inputs[0].datatype == datatype
    assert list(request.inputs[0].shape) == list(array.shape)
    expected_raw = array.astype(DATATYPES[datatype].dtype).tobytes(order="C")
    assert request.raw_input_contents[0] == expected_raw

    decoded = round_trip({"X": array})["X"]
    assert decoded.dtype == DATATYPES[datatype].dtype
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


@given(fixed_arrays(), fixed_arrays())
@settings(max_examples=50, deadline=None)
def test_several_inputs_keep_their_own_bytes(
    a: tuple[str, np.ndarray], b: tuple[str, np.ndarray]
) -> None:
    decoded = round_trip({"A": a[1], "B": b[1]})
    assert list(decoded) == ["A", "B"]
    np.testing.assert_array_equal(decoded["A"], a[1])
    np.testing.assert_array_equal(decoded["B"], b[1])


@given(hnp.arrays(object, SHAPES, elements=st.binary(max_size=20)))
@settings(max_examples=150, deadline=None)
def test_bytes_round_trip(array: np.ndarray) -> None:
    decoded = round_trip({"B": array})["B"]
    assert decoded.dtype == object
    assert decoded.shape == array.shape
    assert decoded.tolist() == array.tolist()


@given(hnp.arrays(object, SHAPES, elements=st.text(max_size=10)))
@settings(max_examples=100, deadline=None)
def test_bytes_from_str_are_utf8(array: np.ndarray) -> None:
    decoded = round_trip({"S": array})["S"]
    expected = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(array)
    assert decoded.shape == array.shape
    assert decoded.tolist() == expected.tolist()


def test_bytes_wire_format_is_length_prefixed_utf8() -> None:
    request = pb.ModelInferRequest()
    encode_inputs(request, {"S": np.array(["é", b"\x00ab"], dtype=object)})
    assert request.inputs[0].datatype == "BYTES"
    expected = struct.pack("<I", 2) + "é".encode() + struct.pack("<I", 3) + b"\x00ab"
    assert request.raw_input_contents[0] == expected


def test_numpy_str_and_bytes_arrays_are_bytes() -> None:
    decoded = round_trip({"U": np.array([["ä", "b"]]), "S": np.array([b"xy", b"z"])})
    assert decoded["U"].tolist() == [["ä".encode(), b"b"]]
    assert decoded["S"].tolist() == [b"xy", b"z"]


def test_python_lists_of_bytes_and_str_keep_trailing_nul_bytes() -> None:
    # numpy would make them fixed-width S/U arrays, which drop trailing NULs
    decoded = round_trip(
        {
            "B": [b"ab\x00", b"\x00\x00"],
            "S": [["x\x00"], ["y"]],
            "T": (b"\x00",),
        }
    )
    assert decoded["B"].tolist() == [b"ab\x00", b"\x00\x00"]
    assert decoded["S"].tolist() == [[b"x\x00"], [b"y"]]
    assert decoded["T"].tolist() == [b"\x00"]


def test_bytes_input_with_non_bytes_element_is_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        encode_inputs(pb.ModelInferRequest(), {"X": np.array([b"a", 3], dtype=object)})


@pytest.mark.parametrize("dtype", ["complex64", "datetime64[s]", "V4"])
def test_dtype_without_v2_datatype_is_invalid_input(dtype: str) -> None:
    with pytest.raises(InvalidInput):
        encode_inputs(pb.ModelInferRequest(), {"X": np.zeros(2, dtype=dtype)})


def test_datatype_table_both_ways() -> None:
    for name, spec in DATATYPES.items():
        assert to_numpy_dtype(name) == spec.dtype
        assert to_v2_datatype(spec.dtype) == name
    assert to_v2_datatype(np.dtype(">i4")) == "INT32"
    with pytest.raises(InvalidInput):
        to_numpy_dtype("FP8")


TYPED_CASES: list[tuple[str, str, list[Any]]] = [
    ("BOOL", "bool_contents", [True, False, True, True]),
    ("UINT8", "uint_contents", [0, 1, 200, 255]),
    ("UINT16", "uint_contents", [0, 1, 65_000, 65_535]),
    ("UINT32", "uint_contents", [0, 1, 2**31, 2**32 - 1]),
    ("UINT64", "uint64_contents", [0, 1, 2**63, 2**64 - 1]),
    ("INT8", "int_contents", [-128, -1, 0, 127]),
    ("INT16", "int_contents", [-32_768, -1, 0, 32_767]),
    ("INT32", "int_contents", [-(2**31), -1, 0, 2**31 - 1]),
    ("INT64", "int64_contents", [-(2**63), -1, 0, 2**63 - 1]),
    ("FP32", "fp32_contents", [-1.5, 0.0, 0.25, 3.0]),
    ("FP64", "fp64_contents", [-1e300, 0.0, 0.1, 2.5]),
    ("BYTES", "bytes_contents", [b"a", b"", "ü".encode(), b"\x00\x01"]),
]


@pytest.mark.parametrize(("datatype", "field", "values"), TYPED_CASES)
def test_typed_contents_decode(datatype: str, field: str, values: list[Any]) -> None:
    response = pb.ModelInferResponse()
    out = response.outputs.add(name="Y", datatype=datatype, shape=[2, 2])
    getattr(out.contents, field).extend(values)
    response = pb.ModelInferResponse.FromString(response.SerializeToString())

    decoded = decode_outputs(response)["Y"]

    assert decoded.shape == (2, 2)
    assert decoded.dtype == DATATYPES[datatype].dtype
    assert decoded.ravel().tolist() == values


def test_typed_contents_for_fp16_is_refused() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="Y", datatype="FP16", shape=[1])
    with pytest.raises(ServerError):
        decode_outputs(response)


@pytest.mark.parametrize("datatype", FIXED_DATATYPES)
def test_raw_decode_is_zero_copy_and_read_only(datatype: str) -> None:
    dtype = DATATYPES[datatype].dtype
    response = pb.ModelInferResponse()
    response.outputs.add(name="Y", datatype=datatype, shape=[2, 3])
    response.raw_output_contents.append(np.ones(6, dtype=dtype).tobytes())

    decoded = decode_outputs(response)["Y"]

    assert decoded.shape == (2, 3)
    assert decoded.base is not None  # a view on the message bytes, not a copy
    assert isinstance(_root_base(decoded), bytes)
    assert not decoded.flags.writeable


def _root_base(array: np.ndarray) -> object:
    base: object = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base


@pytest.mark.parametrize(
    ("datatype", "shape", "raw"),
    [
        ("FP32", [2], b"\x00" * 7),
        ("BYTES", [1], b"\x05\x00\x00\x00ab"),
        ("BYTES", [2], struct.pack("<I", 1) + b"a"),
        ("BYTES", [1], b"\x01\x00"),
        ("FP32", [-1], b""),
        ("FP4", [1], b"\x00"),
        # Empty, but no array can have its other dimension (numpy's own ValueError).
        ("FP32", [0, 2**62], b""),
        ("BYTES", [2**62, 0], b""),
    ],
)
def test_malformed_raw_output_is_server_error(datatype: str, shape: list[int], raw: bytes) -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="Y", datatype=datatype, shape=shape)
    response.raw_output_contents.append(raw)
    with pytest.raises(ServerError):
        decode_outputs(response)


def test_raw_contents_count_must_match_outputs() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="A", datatype="INT32", shape=[1])
    response.outputs.add(name="B", datatype="INT32", shape=[1])
    response.raw_output_contents.append(b"\x00" * 4)
    with pytest.raises(ServerError):
        decode_outputs(response)


def test_typed_contents_count_must_match_shape() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="Y", datatype="INT32", shape=[3]).contents.int_contents.extend([1])
    with pytest.raises(ServerError):
        decode_outputs(response)
