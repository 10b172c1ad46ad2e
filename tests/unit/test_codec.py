"""The server's codec: zero-copy decoding of every datatype, BYTES framing, and
hypothesis driving it with random tensors and random bytes."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mandant.config import DEFAULT_MAX_BYTES_ELEMENTS, parse_config
from mandant.errors import ConfigError, InvalidInput
from mandant.transport.grpc.codec import (
    ProtoInferRequest,
    check_raw_size,
    decode_bytes,
    decode_contents,
    decode_raw,
    encode_bytes,
    encode_infer_response,
)
from mandant.types import DATATYPES, InferResponse, TensorHeader, TensorSpec
from mandant.wire import PIECE_BYTES, bytes_pieces, join_bytes, split_bytes
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


def _framed(items: list[bytes]) -> bytes:
    """The reference framing, one element at a time."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _objects(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array


#: Elements of one common length (the strided fast path), NULs and all.
same_length = st.integers(0, 6).flatmap(
    lambda n: st.lists(st.binary(min_size=n, max_size=n), max_size=12)
)
mixed_length = st.lists(st.binary(max_size=40), max_size=12)


#: Elements of :data:`PIECE_BYTES` or more (pieces of their own) among small ones.
with_large = st.lists(
    st.one_of(
        st.binary(max_size=12),
        st.sampled_from([PIECE_BYTES, PIECE_BYTES + 3]).map(lambda n: b"\x07" * n),
    ),
    max_size=6,
)


@given(st.one_of(same_length, mixed_length, with_large))
@settings(max_examples=300)
def test_split_and_join_agree_with_the_reference_framing(items: list[bytes]) -> None:
    raw = _framed(items)
    assert join_bytes(_objects(items)) == raw
    assert b"".join(bytes_pieces(_objects(items))) == raw
    for source in (raw, memoryview(bytearray(raw)).toreadonly()):
        split = split_bytes(source, len(items))
        assert split.dtype == np.object_ and split.shape == (len(items),)
        assert [type(item) for item in split] == [bytes] * len(items)
        assert split.tolist() == items


def test_a_large_element_is_copied_once_each_way() -> None:
    """A large element is taken out of the view it arrived in straight into its own
    ``bytes`` (a whole copy of the view first made a 48 MiB REST element one more
    stretch of the event loop), and written out as itself, after its prefix."""
    size = 8 << 20
    raw = memoryview(_framed([b"\x01" * size])).toreadonly()
    tracemalloc.start()
    try:
        (element,) = split_bytes(raw, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert element == b"\x01" * size
    assert peak < 1.25 * size  # the element; not a copy of the view beside it
    items = [b"a", element, b"bc"]
    pieces = bytes_pieces(_objects(items))
    assert any(piece is element for piece in pieces)
    assert b"".join(pieces) == _framed(items)
    assert bytes_pieces(_objects([b"a", b"bc"])) == [_framed([b"a", b"bc"])]  # small: one


def _reference_split(raw: bytes, count: int) -> list[bytes] | None:
    """The framing read one element at a time; None where it is broken."""
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            return None
        (length,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + length > len(raw):
            return None
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return items if offset == len(raw) else None


@given(same_length.filter(bool), st.data())
@settings(max_examples=150)
def test_one_changed_prefix_among_equal_lengths_reads_as_the_reference_does(
    items: list[bytes], data: st.DataObject
) -> None:
    """Equal lengths take the strided path: a single prefix that disagrees (same total
    size) must be read as the element-by-element reading does, never as the common
    length."""
    raw = bytearray(_framed(items))
    index = data.draw(st.integers(0, len(items) - 1))
    changed = data.draw(st.integers(0, 12).filter(lambda n: n != len(items[0])))
    struct.pack_into("<I", raw, index * (4 + len(items[0])), changed)
    want = _reference_split(bytes(raw), len(items))
    if want is None:
        with pytest.raises(ValueError):
            split_bytes(bytes(raw), len(items))
    else:
        assert split_bytes(bytes(raw), len(items)).tolist() == want


@given(st.binary(max_size=48), st.integers(0, 8))
@settings(max_examples=500)
def test_random_bytes_split_as_the_reference_does(raw: bytes, count: int) -> None:
    want = _reference_split(raw, count)
    for source in (raw, memoryview(raw)):
        if want is None:
            with pytest.raises(ValueError):
                split_bytes(source, count)
        else:
            assert split_bytes(source, count).tolist() == want


def test_elements_ending_in_nul_keep_their_nuls() -> None:
    items = [b"a\x00", b"\x00\x00", b"bc", b"\x00d"]
    assert split_bytes(_framed(items), 4).tolist() == items
    assert split_bytes(_framed(items[:1] * 3), 3).tolist() == items[:1] * 3


def test_join_takes_str_and_fixed_width_arrays() -> None:
    assert join_bytes(np.array(["h\u00e9", "x"])) == _framed(["hé".encode(), b"x"])
    assert join_bytes(np.array([b"ab", b"c"], dtype="S2")) == _framed([b"ab", b"c"])
    assert join_bytes(np.array([["a", b"b"]], dtype=np.object_)) == _framed([b"a", b"b"])
    assert join_bytes(np.empty((0, 3), dtype=np.object_)) == b""


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (_framed([b"ab", b"cd"]) + b"z", 2, "1 bytes left after 2 BYTES elements"),
        (
            _framed([b"ab"]) + struct.pack("<I", 3) + b"cd",
            2,
            "element 1 declares 3 bytes, 2 remain",
        ),
        (_framed([b"abcdefg"]) + b"\x01\x00", 2, "ends inside element 1's length"),
        (b"", 0, ""),
        (b"\x00", 0, "1 bytes left after 0 BYTES elements"),
    ],
)
def test_broken_framing_says_where(raw: bytes, count: int, message: str) -> None:
    if not message:
        assert split_bytes(raw, count).shape == (0,)
        return
    with pytest.raises(ValueError, match=message):
        split_bytes(raw, count)


def _bytes_request(count: int, raw: bytes | None = None) -> pb.ModelInferRequest:
    return _request("BYTES", (count,), bytes(4 * count) if raw is None else raw)  # all empty


def test_bytes_tensors_above_the_element_bound_are_refused_before_decoding() -> None:
    header = TensorHeader("X", "BYTES", (2, 3))
    raw = _framed([b"ab"] * 6)
    assert decode_raw(raw, header, max_bytes_elements=6).shape == (2, 3)
    with pytest.raises(InvalidInput, match="6 BYTES elements, at most 5 are accepted"):
        check_raw_size(raw, header, max_bytes_elements=5)
    with pytest.raises(InvalidInput, match="at most 5"):
        decode_raw(raw, header, max_bytes_elements=5)
    with pytest.raises(InvalidInput, match="at most 5"):
        decode_bytes(raw, 6, "X", max_elements=5)
    contents = pb.InferTensorContents(bytes_contents=[b"ab"] * 6)
    assert decode_contents(contents, header, max_bytes_elements=6).tolist() == [[b"ab"] * 3] * 2
    with pytest.raises(InvalidInput, match="at most 5"):
        decode_contents(contents, header, max_bytes_elements=5)
    # Fixed-size tensors are views, bounded by the message size only.
    floats = np.zeros(7, np.float32)
    view = decode_raw(floats.tobytes(), TensorHeader("X", "FP32", (7,)), max_bytes_elements=5)
    assert view.shape == (7,)


def test_the_default_element_bound_applies_to_requests() -> None:
    """A request of empty BYTES elements one above the default bound (1 MiB, which used
    to take a quarter of a second of Python on the event loop), refused before any is
    read."""
    at_bound = ProtoInferRequest(_bytes_request(DEFAULT_MAX_BYTES_ELEMENTS))
    at_bound.check_payload()
    assert at_bound.decode_inputs()["X"].shape == (DEFAULT_MAX_BYTES_ELEMENTS,)
    over = ProtoInferRequest(_bytes_request(DEFAULT_MAX_BYTES_ELEMENTS + 1))
    with pytest.raises(InvalidInput, match="at most"):
        over.check_payload()
    with pytest.raises(InvalidInput, match="at most"):
        over.decode_inputs()


def test_the_element_bound_is_a_validated_server_setting() -> None:
    base = {"tenants": [], "models": []}
    assert parse_config(base).server.max_bytes_elements == DEFAULT_MAX_BYTES_ELEMENTS
    assert (
        parse_config({**base, "server": {"max_bytes_elements": 8}}).server.max_bytes_elements == 8
    )
    with pytest.raises(ConfigError, match=r"server\.max_bytes_elements"):
        parse_config({**base, "server": {"max_bytes_elements": 0}})


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


@given(tensors())
def test_raw_inputs_are_the_bytes_that_decode(case: tuple[str, np.ndarray]) -> None:
    """What a front end of ``workers: N`` hands on unread is what decoding reads."""
    datatype, array = case
    request = ProtoInferRequest(_request(datatype, array.shape, array.tobytes()))
    request.check_payload()
    raw = request.raw_inputs()
    assert raw is not None and len(raw) == 1
    decoded = np.frombuffer(raw[0], DATATYPES[datatype]).reshape(array.shape)
    np.testing.assert_array_equal(decoded, request.decode_inputs()["X"])


def test_raw_inputs_are_the_raw_contents_bytes_too_and_none_where_typed_ones_are_given() -> None:
    element = join_bytes(np.array([b"id"], dtype=object))
    assert ProtoInferRequest(_request("BYTES", (1,), element)).raw_inputs() == [element]
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="X", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    both = _request("FP32", (1,), np.ones(1, np.float32).tobytes())
    both.inputs[0].contents.fp32_contents.append(1.0)
    for msg in (typed, both):
        assert ProtoInferRequest(msg).raw_inputs() is None
    assert ProtoInferRequest(typed).typed_inputs() is None  # numbers: the front end decodes
    typed.inputs.add(name="S", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"id")
    assert ProtoInferRequest(typed).typed_inputs() == [
        tensor.contents.SerializeToString() for tensor in typed.inputs
    ]
    both_bytes = _request("BYTES", (1,), element)
    both_bytes.inputs[0].contents.bytes_contents.append(b"id")
    assert ProtoInferRequest(both_bytes).typed_inputs() is None  # decoding says "both given"


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


def test_a_stream_answer_is_encoded_in_place() -> None:
    """ModelStreamInfer fills its response's ``infer_response`` (no copy of the outputs
    into a wrapper): the same message as a unary answer."""
    response = InferResponse(
        "m", "1", "7", {"Y": np.arange(4, dtype=np.int32)}, (TensorSpec("Y", "INT32", (-1,)),)
    )
    answer = pb.ModelStreamInferResponse()
    encode_infer_response(response, into=answer.infer_response)
    assert answer.infer_response == encode_infer_response(response)
    assert answer.infer_response.id == "7" and not answer.error_message
