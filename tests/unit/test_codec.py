"""The server's codec: zero-copy decoding of every datatype, BYTES framing, and
hypothesis driving it with random tensors and random bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mandant.errors import InvalidInput
from mandant.transport.grpc.codec import (
    ProtoInferRequest,
    decode_bytes,
    encode_bytes,
    encode_infer_response,
)
from mandant.types import DATATYPES, InferResponse, TensorSpec
from mandant_client._proto import grpc_service_pb2 as pb

FIXED = [name for name in DATATYPES if name != "BYTES"]


def _request(datatype: str, shape: tuple[int, ...], raw: bytes) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="X", datatype=datatype, shape=shape)
    msg.raw_input_contents.append(raw)
    return msg


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from(FIXED))
    dtype = DATATYPES[datatype]
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
    return datatype, draw(hnp.arrays(dtype, shape))


@given(tensors())
def test_fixed_size_datatypes_decode_as_views(case: tuple[str, np.ndarray]) -> None:
    datatype, array = case
    msg = _request(datatype, array.shape, array.tobytes())
    decoded = ProtoInferRequest(msg).decode_inputs()["X"]
    assert decoded.dtype == DATATYPES[datatype] and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    if array.size:
        assert not decoded.flags.writeable  # a view of the message's bytes, not a copy


@given(st.lists(st.binary(max_size=40), min_size=0, max_size=12))
def test_bytes_round_trip(items: list[bytes]) -> None:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    assert list(decode_bytes(encode_bytes(array), len(items), "X")) == items


@given(st.binary(max_size=64), st.integers(0, 6))
@settings(max_examples=300)
def test_random_bytes_never_crash_the_bytes_decoder(raw: bytes, count: int) -> None:
    try:
        out = decode_bytes(raw, count, "X")
    except InvalidInput:
        return
    assert len(out) == count and encode_bytes(out) == raw


@given(
    st.sampled_from(list(DATATYPES)),
    st.lists(st.integers(0, 4), max_size=3),
    st.binary(max_size=64),
)
@settings(max_examples=300)
def test_random_raw_payloads_decode_or_are_invalid(
    datatype: str, shape: list[int], raw: bytes
) -> None:
    msg = _request(datatype, tuple(shape), raw)
    try:
        arrays = ProtoInferRequest(msg).decode_inputs()
    except InvalidInput:
        return
    assert arrays["X"].shape == tuple(shape)


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("BOOL", "bool_contents", [True, False]),
        ("UINT8", "uint_contents", [0, 255]),
        ("UINT16", "uint_contents", [0, 65535]),
        ("UINT32", "uint_contents", [0, 2**32 - 1]),
        ("UINT64", "uint64_contents", [0, 2**64 - 1]),
        ("INT8", "int_contents", [-128, 127]),
        ("INT16", "int_contents", [-(2**15), 2**15 - 1]),
        ("INT32", "int_contents", [-(2**31), 2**31 - 1]),
        ("INT64", "int64_contents", [-(2**63), 2**63 - 1]),
        ("FP32", "fp32_contents", [1.5, -2.0]),
        ("FP64", "fp64_contents", [1e300, -2.0]),
        ("BYTES", "bytes_contents", [b"a", b""]),
    ],
)
def test_typed_contents(datatype: str, field: str, values: list[object]) -> None:
    msg = pb.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="X", datatype=datatype, shape=[2])
    getattr(tensor.contents, field).extend(values)
    decoded = ProtoInferRequest(msg).decode_inputs()["X"]
    assert decoded.tolist() == values


def test_typed_value_out_of_range_is_invalid() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="X", datatype="UINT8", shape=[1]).contents.uint_contents.append(300)
    with pytest.raises(InvalidInput, match="out of range for UINT8"):
        ProtoInferRequest(msg).decode_inputs()


def test_fp16_has_no_typed_contents() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="X", datatype="FP16", shape=[1])
    with pytest.raises(InvalidInput, match="FP16 travels in raw_input_contents only"):
        ProtoInferRequest(msg).decode_inputs()


def test_parameters_of_every_kind() -> None:
    msg = pb.ModelInferRequest(
        parameters={
            "a": pb.InferParameter(bool_param=True),
            "b": pb.InferParameter(int64_param=-3),
            "c": pb.InferParameter(string_param="x"),
            "d": pb.InferParameter(double_param=0.5),
            "e": pb.InferParameter(uint64_param=7),
        }
    )
    assert ProtoInferRequest(msg).parameters() == {"a": True, "b": -3, "c": "x", "d": 0.5, "e": 7}
    msg.parameters["f"].CopyFrom(pb.InferParameter())
    with pytest.raises(InvalidInput, match="parameter has no value"):
        ProtoInferRequest(msg).parameters()


def test_response_casts_to_the_declared_datatype_and_frames_bytes() -> None:
    words = np.array([b"hi", "h\u00e9"], dtype=np.object_)
    response = InferResponse(
        "m",
        "1",
        "id",
        outputs={"Y": np.arange(3, dtype=np.float64), "W": words},
        output_specs=(TensorSpec("Y", "FP32", (-1,)), TensorSpec("W", "BYTES", (-1,))),
    )
    msg = encode_infer_response(response)
    assert [(o.name, o.datatype, list(o.shape)) for o in msg.outputs] == [
        ("Y", "FP32", [3]),
        ("W", "BYTES", [2]),
    ]
    assert np.frombuffer(msg.raw_output_contents[0], np.float32).tolist() == [0, 1, 2]
    assert (
        msg.raw_output_contents[1]
        == struct.pack("<I", 2) + b"hi" + struct.pack("<I", 3) + "hé".encode()
    )
