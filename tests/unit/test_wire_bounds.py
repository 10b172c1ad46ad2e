"""The walk of a large ModelInferRequest's wire format before protobuf parses it
(``wire_bounds.py``, through ``gateway.parse``): every count bound, at it and over it;
shapes packed and unpacked; the walk stops at the first entry over a bound (a tail
it never reads may be anything); bytes that are not the wire format get the parser's
answer; a message of another RPC is refused over its size bound."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from google.protobuf.message import DecodeError

from mandant.errors import InvalidInput
from mandant.service import MAX_LOAD_CONFIG_CHARS
from mandant.transport.grpc.gateway import parse
from mandant.transport.grpc.wire_bounds import (
    BYTES_PER_FIELD,
    MAX_FIELDS,
    MAX_SMALL_MESSAGE_BYTES,
    MAX_UNNEEDED_FIELDS,
    PRE_PARSE_ABOVE_BYTES,
    check_small_message,
    naming_prefix,
)
from mandant.validation import MAX_INPUTS, MAX_OUTPUTS, MAX_PARAMETERS, MAX_RANK
from mandant_client._proto import grpc_service_pb2 as pb

Request = pb.ModelInferRequest
#: Bytes that are no protobuf message: a tag whose varint never ends.
GARBAGE = b"\xff" * 16
NOT_VALID = "the request is not a valid ModelInferRequest message"


def starting(text: str) -> str:
    """A ``match`` pattern: a message that starts with ``text``."""
    return "^" + re.escape(text)


SHAPE_OVER = starting("an input's shape has more than 64 dimensions, at most 64 are accepted")


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def large(msg: Request) -> bytes:
    """``msg`` serialized, with a raw tensor that makes it larger than the threshold
    (one large entry, as a real request has)."""
    msg.raw_input_contents.insert(0, bytes(PRE_PARSE_ABOVE_BYTES))
    return msg.SerializeToString()


def with_inputs(count: int) -> Request:
    msg = Request(model_name="echo")
    for _ in range(count):
        msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    return msg


def with_raw_contents(count: int) -> Request:
    msg = Request(model_name="echo")
    msg.raw_input_contents.extend([b""] * (count - 1))  # large() adds one
    return msg


def with_outputs(count: int) -> Request:
    msg = Request(model_name="echo")
    for _ in range(count):
        msg.outputs.add(name="OUTPUT0")
    return msg


def with_parameters(count: int) -> Request:
    msg = Request(model_name="echo")
    for index in range(count):
        msg.parameters[f"p{index}"].bool_param = True
    return msg


def with_input_parameters(count: int) -> Request:
    msg = Request(model_name="echo")
    tensor = msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    for index in range(count):
        tensor.parameters[f"p{index}"].int64_param = index
    return msg


def with_output_parameters(count: int) -> Request:
    msg = Request(model_name="echo")
    output = msg.outputs.add(name="OUTPUT0")
    for index in range(count):
        output.parameters[f"p{index}"].string_param = "x"
    return msg


def with_rank(rank: int) -> Request:
    """A packed shape of ``rank`` dimensions of 10 bytes each (-1)."""
    msg = Request(model_name="echo")
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[-1] * rank)
    return msg


#: Each count, its bound, and the start of its refusal.
BOUNDS: dict[str, tuple[Callable[[int], Request], int, str]] = {
    "inputs": (with_inputs, MAX_INPUTS, "request has more than 1024 inputs"),
    "raw_input_contents": (
        with_raw_contents,
        MAX_INPUTS,
        "request has more than 1024 raw_input_contents entries",
    ),
    "outputs": (with_outputs, MAX_OUTPUTS, "request has more than 1024 requested outputs"),
    "parameters": (with_parameters, MAX_PARAMETERS, "request has more than 256 parameters"),
    "input parameters": (
        with_input_parameters,
        MAX_PARAMETERS,
        "an input has more than 256 parameters",
    ),
    "output parameters": (
        with_output_parameters,
        MAX_PARAMETERS,
        "a requested output has more than 256 parameters",
    ),
    "packed shape": (with_rank, MAX_RANK, "an input's shape has more than 64 dimensions"),
}


@pytest.mark.parametrize("count", list(BOUNDS))
def test_a_count_at_its_bound_is_parsed(count: str) -> None:
    build, bound, _ = BOUNDS[count]
    raw = large(build(bound))
    assert parse(Request, raw) == Request.FromString(raw)


@pytest.mark.parametrize("count", list(BOUNDS))
def test_a_count_over_its_bound_is_refused_before_the_rest_is_read(count: str) -> None:
    build, bound, refusal = BOUNDS[count]
    raw = large(build(bound + 1))
    with pytest.raises(
        InvalidInput, match=starting(f"{refusal}, at most {bound} are accepted") + "$"
    ):
        parse(Request, raw)
    # The walk stops at the entry over the bound: what follows is never read.
    with pytest.raises(InvalidInput, match=starting(refusal)):
        parse(Request, raw + GARBAGE)


def unpacked_input(rank: int) -> bytes:
    """An input whose shape's dimensions each come as their own field (varint 1)."""
    return field(5, field(1, b"INPUT0") + b"\x18\x01" * rank)


@pytest.mark.parametrize(
    ("packed", "unpacked"), [(0, MAX_RANK), (MAX_RANK - 1, 1), (1, MAX_RANK - 1)]
)
def test_a_shapes_dimensions_count_packed_and_unpacked_together(packed: int, unpacked: int) -> None:
    tensor = field(1, b"INPUT0") + field(3, b"\x02" * packed) + b"\x18\x01" * unpacked
    head = large(Request())
    raw = head + field(5, tensor)
    assert len(parse(Request, raw).inputs[0].shape) == MAX_RANK
    with pytest.raises(InvalidInput, match=SHAPE_OVER):
        parse(Request, head + field(5, tensor + b"\x18\x01") + GARBAGE)
    with pytest.raises(InvalidInput, match=SHAPE_OVER):
        parse(Request, raw + unpacked_input(MAX_RANK + 1) + GARBAGE)


def test_a_packed_shape_longer_than_any_of_64_dimensions_is_refused_unread() -> None:
    packed = b"\x80" * (MAX_RANK * 10) + b"\x01"  # 641 bytes: over 64 varints at most
    raw = large(Request()) + field(5, field(3, packed))
    with pytest.raises(InvalidInput, match=SHAPE_OVER):
        parse(Request, raw)


def unknown_fields(count: int) -> bytes:
    """``count`` unknown fields (number 15, varint 0)."""
    return b"\x78\x00" * count


def test_fields_no_request_needs_are_refused_past_their_budget() -> None:
    """Unknown fields, a wire type other than the field's, a single field sent again:
    protobuf skips them far faster than the walk reads them (82 KB of 16,000 tiny
    unknown fields took the walk 10 ms, protobuf 0.1 ms), so only a few are read."""
    head = large(Request(model_name="echo"))
    fits = head + unknown_fields(MAX_UNNEEDED_FIELDS)
    assert parse(Request, fits).model_name == "echo"
    refusal = starting(f"request has more than {MAX_UNNEEDED_FIELDS} fields no request needs")
    with pytest.raises(InvalidInput, match=refusal):
        parse(Request, fits + unknown_fields(1) + GARBAGE)
    with pytest.raises(InvalidInput, match=refusal):  # in a tensor too; the rest unread
        parse(Request, head + field(6, unknown_fields(MAX_UNNEEDED_FIELDS + 1)) + GARBAGE)
    with pytest.raises(InvalidInput, match=refusal):  # a single field sent again
        parse(Request, head + field(3, b"id") * (MAX_UNNEEDED_FIELDS + 2) + GARBAGE)
    with pytest.raises(InvalidInput, match=refusal):  # a known field of another wire type
        parse(Request, head + b"\x28\x00" * (MAX_UNNEEDED_FIELDS + 1) + GARBAGE)


def test_fields_past_one_per_8_bytes_are_refused() -> None:
    """Fields a request may have (each input's parameters, within their bound), more
    than one per BYTES_PER_FIELD bytes of the message: the walk stops there, however
    large the message (at MAX_FIELDS for any size)."""
    dense = field(5, field(4, b"") * MAX_PARAMETERS) * 60  # 2 bytes a field
    raw = large(Request(model_name="echo")) + dense
    assert len(raw) // BYTES_PER_FIELD < 60 * (MAX_PARAMETERS + 1) < MAX_FIELDS
    with pytest.raises(InvalidInput, match=starting("request has more fields than its size")):
        parse(Request, raw + GARBAGE)
    padded = large(Request(model_name="echo")) + field(7, bytes(MAX_FIELDS * BYTES_PER_FIELD))
    parse(Request, padded + dense[: len(dense) // 2])  # within one per 8 bytes: parsed
    with pytest.raises(InvalidInput, match=starting("request has more fields than its size")):
        parse(Request, padded + dense * 2)  # more than MAX_FIELDS, whatever the size


#: Bytes that are not the wire format, after a valid large head.
MALFORMED: dict[str, bytes] = {
    "a varint that runs past the end": b"\x08\x80",
    "a varint of 11 bytes": b"\x08" + b"\xff" * 10 + b"\x01",
    "a length past the end": b"\x0a\x05abc",
    "a tag that runs past the end": b"\x80",
    "field number 0": b"\x00\x00",
    "wire type 6": b"\x0e",
    "wire type 7": b"\x0f",
    "an end group alone": b"\x0c",
    "a length past its input's end": field(5, b"\x0a\x05abc") + b"\x00" * 4,
    "a packed shape past its input's end": field(5, b"\x1a\x05abc") + b"\x00" * 4,
    "a varint that runs past its output's end": field(6, b"\x10\x80"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_bytes_that_are_not_the_wire_format_get_the_parsers_answer(case: str) -> None:
    raw = large(Request(model_name="echo")) + MALFORMED[case]
    with pytest.raises(DecodeError):
        Request.FromString(raw)  # the parser refuses them too
    with pytest.raises(InvalidInput, match=starting(NOT_VALID) + "$"):
        parse(Request, raw)


def test_groups_which_no_proto3_message_has_are_refused() -> None:
    raw = large(Request(model_name="echo")) + b"\x7b" + field(5, b"") * 2 + b"\x7c"
    assert Request.FromString(raw).model_name == "echo"  # upb would skip it unread
    with pytest.raises(InvalidInput, match=starting(NOT_VALID) + "$"):
        parse(Request, raw)


def test_a_request_at_every_count_bound_is_parsed() -> None:
    msg = Request(model_name="echo", model_version="1", id="wide")
    for index in range(MAX_PARAMETERS):
        msg.parameters[f"p{index}"].bool_param = True
    for index in range(MAX_INPUTS):
        msg.inputs.add(name=f"INPUT{index}", datatype="FP32", shape=[-1] * MAX_RANK)
        msg.raw_input_contents.append(bytes(64))
    for index in range(MAX_OUTPUTS):
        msg.outputs.add(name=f"OUTPUT{index}")
    raw = msg.SerializeToString()
    assert len(raw) > PRE_PARSE_ABOVE_BYTES
    assert parse(Request, raw) == msg


def test_a_small_message_is_left_to_the_parser_and_the_checks_after_it() -> None:
    raw = with_inputs(MAX_INPUTS + 1).SerializeToString()
    assert len(raw) <= PRE_PARSE_ABOVE_BYTES
    assert len(parse(Request, raw).inputs) == MAX_INPUTS + 1


def test_a_large_legitimate_request_is_parsed() -> None:
    msg = Request(model_name="echo", model_version="1", id="r1")
    msg.parameters["priority"].int64_param = 1
    tensor = msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1 << 18])
    tensor.parameters["note"].string_param = "x"
    msg.outputs.add(name="OUTPUT0")
    msg.raw_input_contents.append(bytes(1 << 20))
    raw = msg.SerializeToString()
    assert parse(Request, raw) == msg


def load_request(config: str) -> pb.RepositoryModelLoadRequest:
    msg = pb.RepositoryModelLoadRequest(repository_name="", model_name="m" * 256)
    msg.parameters["config"].string_param = config
    return msg


def test_the_largest_load_request_fits_the_bound_of_small_messages() -> None:
    msg = load_request("\U0001f600" * MAX_LOAD_CONFIG_CHARS)  # 4 bytes each in UTF-8
    raw = msg.SerializeToString()
    assert len(raw) > PRE_PARSE_ABOVE_BYTES
    assert parse(pb.RepositoryModelLoadRequest, raw) == msg


def test_another_rpcs_message_over_its_bound_is_refused_before_it_is_parsed() -> None:
    head = pb.ModelMetadataRequest(name="echo").SerializeToString()
    padding = MAX_SMALL_MESSAGE_BYTES - len(head) - 4  # an unknown field's tag and length
    fits = head + field(15, bytes(padding))
    assert len(fits) == MAX_SMALL_MESSAGE_BYTES
    check_small_message(fits)
    assert parse(pb.ModelMetadataRequest, fits).name == "echo"
    over = head + field(15, bytes(padding + 1))
    assert pb.ModelMetadataRequest.FromString(over).name == "echo"  # a valid message
    refusal = starting(
        f"the request message has {len(over)} bytes, at most {MAX_SMALL_MESSAGE_BYTES}"
    )
    with pytest.raises(InvalidInput, match=refusal):
        parse(pb.ModelMetadataRequest, over)


def test_the_naming_prefix_is_the_leading_id_and_names_only() -> None:
    msg = pb.ModelInferRequest(model_name="echo", model_version="2", id="m-7")
    msg.parameters["p"].int64_param = 1
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    raw = msg.SerializeToString() + b"\x7a\x04abcd" * 10  # and unknown fields
    named = pb.ModelInferRequest.FromString(naming_prefix(raw))
    assert (named.model_name, named.model_version, named.id) == ("echo", "2", "m-7")
    assert not named.inputs and not named.parameters
    assert naming_prefix(b"\x0a\xff") == b""  # a length past the end: not the wire format
    assert naming_prefix(pb.ModelInferRequest(id="x").SerializeToString()[:2]) == b""
    # Names read whole, then bytes that are not the wire format: the names stay.
    whole = pb.ModelInferRequest(model_name="echo", id="m-8").SerializeToString()
    named = pb.ModelInferRequest.FromString(naming_prefix(whole + b"\x0a\xff"))
    assert (named.model_name, named.id) == ("echo", "m-8")
