"""The REST codec on its own: JSON data of every shape and kind, the binary-data
framing (zero-copy views of the body), the response layout tritonclient.http reads,
the status table and the ``rest_port`` setting."""

from __future__ import annotations

import asyncio
import json
import re
import tracemalloc
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mandant import errors
from mandant.config import parse_config
from mandant.errors import ConfigError, InvalidInput
from mandant.transport.rest.codec import (
    JSON_CHARS_PER_TURN,
    JSON_VALUES_PER_TURN,
    BodyTooLarge,
    JsonInferRequest,
    JsonTurns,
    Turn,
    decode_json_data,
    encode_answer,
    encode_infer_response,
)
from mandant.transport.rest.status import HTTP_STATUS, code_for, error_headers, http_status
from mandant.types import DATATYPES, InferResponse, TensorHeader, TensorSpec
from tests.fakes import with_loop_turns

NUMERIC = [t for t in DATATYPES if t != "BYTES"]
T = TypeVar("T")


def header(datatype: str, shape: tuple[int, ...], name: str = "X") -> TensorHeader:
    return TensorHeader(name, datatype, shape)


@pytest.mark.parametrize("datatype", NUMERIC)
@given(data=st.data())
def test_json_values_round_trip_exactly(datatype: str, data: st.DataObject) -> None:
    dtype = DATATYPES[datatype]
    elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    array = data.draw(
        hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=3), elements=elements)
    )
    nested = json.loads(json.dumps(array.tolist()))
    for value in (nested, array.reshape(-1).tolist()):
        got = decode_json_data(value, header(datatype, array.shape))
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("INT32", [1, 2, 3], "needs 4 values in data, got 3"),
        ("INT32", [[1, 2], [3]], "not INT32"),
        ("INT32", [1.5, 2, 3, 4], "not INT32"),
        ("INT32", ["1", 2, 3, 4], "not INT32"),
        ("UINT8", [0, 1, 2, 256], "out of range for UINT8"),
        ("UINT64", [2**64, 1, 2, 3], "out of range for UINT64"),
        ("UINT64", [2**64 - 1, 1, 2, -1], "out of range for UINT64"),
        ("INT64", [2**63, 1, 2, 3], "out of range for INT64"),
        ("FP32", [1e39, 1, 2, 3], "out of range for FP32"),
        ("FP16", [1, 2, 3, 70000], "out of range for FP16"),
        ("BOOL", [1, 0, 1, 0], "not BOOL"),
        ("FP32", [True, 2, 3, 4], "not FP32"),  # read as 1.0 with status 200
        ("FP64", [[1.5, 2], [3, False]], "not FP64"),
        ("INT32", [[1, 2], [True, 4]], "not INT32"),
        ("UINT8", [False, 7, 1, 2], "not UINT8"),
        ("FP32", [1, 2, None, 4], "not FP32"),
        ("FP32", [1, 2, {"a": 1}, 4], "not FP32"),
        ("BYTES", ["a", "b", 3, "d"], "not BYTES"),
        ("BYTES", [["a", "b"], ["c"]], "needs 4 values"),
    ],
)
def test_json_data_of_the_wrong_count_or_kind_is_invalid(
    datatype: str, data: Any, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_json_data(data, header(datatype, (2, 2)))


def test_json_infinities_stay_what_the_client_sent() -> None:
    """Out of range means a finite number the datatype cannot hold; an infinity or
    NaN the client wrote (Python's JSON reads them) is a value like any other."""
    got = decode_json_data([float("inf"), float("nan")], header("FP32", (2,)))
    assert np.isinf(got[0]) and np.isnan(got[1])


def _json_input(datatype: str, data: str) -> bytes:
    tensor = f'{{"name": "x", "datatype": "{datatype}", "shape": [2], "data": {data}}}'
    return f'{{"inputs": [{tensor}]}}'.encode()


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
@pytest.mark.parametrize("data", ["[1e400, 1]", "[-1e400, 1]", "[Infinity, 1e999]"])
def test_a_json_number_beyond_a_double_is_out_of_range(datatype: str, data: str) -> None:
    """``json`` reads ``1e400`` as infinity: it ran as one (``1e39`` for FP32 was
    refused), where Triton refuses the number."""
    request = JsonInferRequest("m", "", _json_input(datatype, data), None)
    with pytest.raises(InvalidInput, match=f"a value is out of range for {datatype}"):
        request.decode_inputs()


def test_a_number_beyond_a_double_elsewhere_leaves_a_tensor_s_infinity_alone() -> None:
    """Whether ``1e400`` was sent is asked of the tensor's own data: one in a request
    parameter, or in another input, made this input's literal ``Infinity`` out of
    range."""
    body = json.dumps(
        {
            "parameters": {"note": "PLACEHOLDER"},
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2], "data": "INF"},
                {"name": "y", "datatype": "FP32", "shape": [2], "data": "HUGE"},
            ],
        }
    )
    body = body.replace('"PLACEHOLDER"', "1e400").replace('"INF"', "[Infinity, 1]")
    request = JsonInferRequest("m", "", body.replace('"HUGE"', "[1e400, 1]").encode(), None)
    with pytest.raises(InvalidInput, match=r"input 'y'.*out of range for FP32"):
        request.decode_inputs()  # y's own 1e400 is refused, x decodes first
    request = JsonInferRequest("m", "", body.replace('"HUGE"', "[2, 1]").encode(), None)
    assert request.decode_inputs()["x"].tolist() == [np.inf, 1.0]


@pytest.mark.parametrize("length", [1, 100])
def test_an_id_that_is_not_valid_unicode_is_invalid_input(length: int) -> None:
    """JSON may escape a lone UTF-16 surrogate (``"\\ud800"``), which has no UTF-8: an
    id of more than 64 of them failed the id's length check, INTERNAL (a traceback),
    and a shorter one was echoed back."""
    body = '{"id": "' + "\\ud800" * length + '", "inputs": []}'
    with pytest.raises(InvalidInput, match="'id' is not valid Unicode"):
        JsonInferRequest("m", "", body.encode(), None)


@pytest.mark.parametrize(
    ("output", "binary"),
    [
        ({"name": "Y"}, frozenset({"Y"})),  # binary_data_output decides
        ({"name": "Y", "parameters": {"binary_data": False}}, frozenset()),  # its own
        ({"name": "Y", "parameters": {"binary_data": True}}, frozenset({"Y"})),
    ],
)
def test_binary_data_output_applies_to_named_outputs_without_their_own(
    output: dict[str, Any], binary: frozenset[str]
) -> None:
    """Triton's binary-data extension: ``binary_data_output`` applies to every output,
    and an output's ``binary_data`` overrides it; it was ignored once outputs were
    named (every output came back as JSON)."""
    body = {"parameters": {"binary_data_output": True}, "inputs": [], "outputs": [output]}
    assert JsonInferRequest("m", "", json.dumps(body).encode(), None).binary_outputs() == binary


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("[Infinity, -Infinity]", [np.inf, -np.inf]),  # the client's own infinities
        ("[18446744073709551616, 1.5]", [2.0**64, 1.5]),  # JSON.stringify(2 ** 64)
        ("[-9223372036854775809, 1e308]", [-(2.0**63), 1e308]),
    ],
)
def test_json_numbers_a_double_holds_are_read_whatever_their_form(
    data: str, expected: list[float]
) -> None:
    """Integers beyond 64 bits were refused for float datatypes as values "that are
    not FP64" (numpy made objects of them)."""
    got = JsonInferRequest("m", "", _json_input("FP64", data), None).decode_inputs()["x"]
    assert got.tolist() == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("[" + "9" * 400 + ", 1]", "out of range for FP64"),
        ("[true, 18446744073709551616]", "not FP64"),
        ('["1", 18446744073709551616]', "not FP64"),
    ],
)
def test_large_json_integers_are_still_numbers_a_double_holds(data: str, message: str) -> None:
    request = JsonInferRequest("m", "", _json_input("FP64", data), None)
    with pytest.raises(InvalidInput, match=message):
        request.decode_inputs()


def test_json_bytes_are_utf8_text() -> None:
    got = decode_json_data([["café", ""], ["a", "b"]], header("BYTES", (2, 2)))
    assert got.tolist() == [["café".encode(), b""], [b"a", b"b"]]


def test_deeply_nested_json_is_invalid_not_a_crash() -> None:
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(InvalidInput, match="not a valid JSON"):
        JsonInferRequest("m", "", body, None)


def test_json_cut_short_by_the_header_length_says_the_header_delimits_it() -> None:
    """A valid JSON body with Inference-Header-Content-Length too short was "the
    request body is not a valid JSON inference request"."""
    body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}]})
    message = (
        "the first 10 bytes of the body (Inference-Header-Content-Length) are not a valid "
        "JSON inference request"
    )
    with pytest.raises(InvalidInput, match=re.escape(message)):
        JsonInferRequest("m", "", body.encode(), "10")
    JsonInferRequest("m", "", body.encode(), str(len(body)))


def test_the_headerless_binary_form_is_refused_by_name() -> None:
    """Triton's ``Inference-Header-Content-Length: 0`` (the body one input's raw
    bytes) is not served: the message says so, not that the JSON is broken."""
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length: 0"):
        JsonInferRequest("m", "", bytes(16), "0")


def _binary_body(arrays: dict[str, np.ndarray]) -> tuple[bytes, str]:
    head = json.dumps(
        {
            "id": "r",
            "inputs": [
                {
                    "name": name,
                    "datatype": "FP32" if a.dtype == np.float32 else "INT64",
                    "shape": list(a.shape),
                    "parameters": {"binary_data_size": a.nbytes},
                }
                for name, a in arrays.items()
            ],
            "outputs": [{"name": "Y", "parameters": {"binary_data": True}}, {"name": "Z"}],
        }
    ).encode()
    return head + b"".join(a.tobytes() for a in arrays.values()), str(len(head))


def test_binary_inputs_view_the_body_without_a_copy() -> None:
    arrays = {"A": np.arange(6, dtype="<f4").reshape(2, 3), "B": np.arange(4, dtype="<i8")}
    body, length = _binary_body(arrays)
    request = JsonInferRequest("m", "2", body, length)
    assert (request.model_name, request.model_version, request.request_id) == ("m", "2", "r")
    assert [h.name for h in request.input_headers()] == ["A", "B"]
    assert request.requested_outputs() == ["Y", "Z"]
    assert request.binary_outputs() == frozenset({"Y"})
    request.check_payload()
    decoded = request.decode_inputs()
    whole = np.frombuffer(body, np.uint8)
    for name, array in arrays.items():
        np.testing.assert_array_equal(decoded[name], array)
        assert np.shares_memory(decoded[name], whole)


def test_binary_bytes_elements_are_split() -> None:
    raw = b"\x02\x00\x00\x00hi\x00\x00\x00\x00"
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "S",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    request = JsonInferRequest("m", "", head + raw, str(len(head)))
    assert request.decode_inputs()["S"].tolist() == [b"hi", b""]
    bad = JsonInferRequest("m", "", head + raw[:-1] + b"\x01", str(len(head)))
    with pytest.raises(InvalidInput, match="input 'S'"):
        bad.decode_inputs()


def test_a_large_bytes_input_is_copied_once_out_of_the_body() -> None:
    """The element is taken out of the body straight into its own ``bytes``."""
    size = 8 << 20
    raw = b"\x00\x00\x80\x00" + b"\x01" * size
    head = json.dumps(
        {"inputs": [{"name": "S", "datatype": "BYTES", "shape": [1],
                     "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()  # fmt: skip
    request = JsonInferRequest("m", "", memoryview(head + raw), str(len(head)))
    tracemalloc.start()
    try:
        decoded = request.decode_inputs()["S"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.tolist() == [b"\x01" * size]
    assert peak < 1.25 * size


async def test_large_json_answers_write_one_piece_a_turn_in_all_tenants_in_turn() -> None:
    """Tenant a's three large JSON answers and b's one, at once: one piece of any of
    them per turn of the event loop (each yielded between its own pieces, so four
    wrote four pieces a turn and another call waited four times as long), b's pieces
    between a's (round robin by tenant, not one answer after another)."""
    turns = JsonTurns()
    tick = 0
    written: list[tuple[str, int]] = []  # (tenant, turn of the loop) of each piece

    async def ticking() -> None:
        nonlocal tick
        while True:
            tick += 1
            await asyncio.sleep(0)

    def counted(tenant: str) -> Turn:
        turn = turns.turn(tenant)

        async def piece() -> None:
            await turn()
            written.append((tenant, tick))

        return piece

    values = np.arange(3 * JSON_VALUES_PER_TURN, dtype=np.float32)
    response = InferResponse("m", "1", "", {"Y": values})
    clock = asyncio.create_task(ticking())
    try:
        answers = await asyncio.gather(
            *(encode_answer(response, False, counted(t)) for t in ("a", "a", "a", "b"))
        )
    finally:
        clock.cancel()
    assert all(json.loads(a.joined())["outputs"][0]["data"] == values.tolist() for a in answers)
    assert len(written) == 12
    assert len({when for _, when in written}) == 12  # never two pieces in one turn
    b_pieces = [i for i, (tenant, _) in enumerate(written) if tenant == "b"]
    assert b_pieces == [1, 3, 5], written  # a, b, a, b, a, b, then a's other answers


@pytest.mark.parametrize(
    ("outputs", "turns"),
    [
        ({"Y": np.zeros(3 * JSON_VALUES_PER_TURN, np.float32)}, 3),
        # many outputs, each one piece: an answer of 32 so held the loop 0.5 s
        ({f"Y{i}": np.zeros(JSON_VALUES_PER_TURN, np.float32) for i in range(4)}, 4),
        # 31,457 elements of 100 characters (and 16 more each, counted): 4 turns' worth,
        # the first piece too (each of N answers at once wrote its first at once)
        ({"S": np.array([b"x" * 100] * (3 * JSON_CHARS_PER_TURN // 100), np.object_)}, 4),
        ({"Y": np.zeros(100, np.float32), "S": np.array([b"x"], np.object_)}, 0),  # small
    ],
    ids=["one output", "many outputs", "bytes", "small"],
)
async def test_every_piece_of_a_large_answer_waits_for_its_turn(
    outputs: dict[str, np.ndarray], turns: int
) -> None:
    """JSON_VALUES_PER_TURN values (BYTES: JSON_CHARS_PER_TURN characters) a turn,
    counted over the whole answer, whatever outputs they are of; a small answer takes
    no turn."""
    taken = 0

    async def turn() -> None:
        nonlocal taken
        taken += 1

    answer = await encode_answer(InferResponse("m", "1", "", outputs), False, turn)
    assert taken == turns
    got = {o["name"]: o["data"] for o in json.loads(answer.joined())["outputs"]}
    assert got == {
        name: [v.decode() for v in array] if array.dtype == object else array.tolist()
        for name, array in outputs.items()
    }


async def test_a_lone_large_answer_writes_a_piece_every_loop_turn() -> None:
    """Its turns come one a loop turn, not one every other (each waited for the turn
    after the one that let it go)."""
    turns = JsonTurns()
    response = InferResponse("m", "1", "", {"Y": np.zeros(10 * JSON_VALUES_PER_TURN)})
    _, loop_turns = await with_loop_turns(encode_answer(response, False, turns.turn("a")))
    assert loop_turns <= 10 + 3, loop_turns


async def test_a_large_binary_bytes_output_is_written_as_it_is() -> None:
    """A binary BYTES output's large element is a piece of the answer itself: joined
    with its prefix first, it was one more 48 MiB copy on the event loop."""
    element = b"\x02" * (1 << 20)
    response = InferResponse(
        model_name="m",
        model_version="1",
        request_id="",
        outputs={"S": np.array([b"a", element], dtype=np.object_)},
        output_specs=(),
    )
    answer = await encode_answer(response, True)
    assert any(piece is element for piece in answer.pieces)
    assert answer.header_length is not None
    body = answer.joined()
    assert len(body) == answer.size
    (output,) = json.loads(body[: answer.header_length])["outputs"]
    assert output["parameters"] == {"binary_data_size": 4 + 1 + 4 + len(element)}
    assert body[answer.header_length :] == b"\x01\0\0\0a" + b"\0\0\x10\0" + element


async def test_response_layout_is_json_then_each_binary_output() -> None:
    response = InferResponse(
        model_name="m",
        model_version="1",
        request_id="r",
        outputs={
            "A": np.array([[1, 2]], dtype=np.int64),  # declared FP32: sent as FP32
            "S": np.array([b"x", b"yz"], dtype=np.object_),
            "J": np.array([True, False]),
        },
        output_specs=(TensorSpec("A", "FP32", (-1, 2)),),
    )
    body, length = await encode_infer_response(response, frozenset({"A", "S"}))
    assert length is not None
    head = json.loads(body[:length])
    assert head == {
        "model_name": "m",
        "model_version": "1",
        "id": "r",
        "outputs": [
            {
                "name": "A",
                "datatype": "FP32",
                "shape": [1, 2],
                "parameters": {"binary_data_size": 8},
            },
            {
                "name": "S",
                "datatype": "BYTES",
                "shape": [2],
                "parameters": {"binary_data_size": 11},
            },
            {"name": "J", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        ],
    }
    assert body[length:] == np.array([1, 2], "<f4").tobytes() + b"\x01\0\0\0x\x02\0\0\0yz"
    only_json, none = await encode_infer_response(response, False)
    assert none is None
    assert json.loads(only_json)["outputs"][1]["data"] == ["x", "yz"]


async def test_non_utf8_bytes_output_as_json_says_to_ask_for_binary() -> None:
    response = InferResponse("m", "1", "", {"S": np.array([b"\xff"], dtype=np.object_)})
    with pytest.raises(InvalidInput, match="binary_data"):
        await encode_infer_response(response, False)


@pytest.mark.parametrize(
    "strings",
    [
        ["é" * (3 * JSON_CHARS_PER_TURN // 2 + 1)],  # one element, cut inside characters
        ["\x01" * JSON_CHARS_PER_TURN, "a", "😀" * JSON_CHARS_PER_TURN, ""],
        ["x" * 100] * (3 * JSON_CHARS_PER_TURN // 100),  # many small ones
    ],
    ids=["one large", "mixed", "many small"],
)
async def test_a_large_bytes_output_as_json_is_written_over_several_loop_turns(
    strings: list[str],
) -> None:
    """BYTES values were decoded and escaped a piece of 16,384 elements at a time: one
    element of 48 MiB held every other call 4 s. Pieces are counted in characters now,
    a large element written a piece at a time, and the answer is the same."""
    values = np.array([text.encode() for text in strings], dtype=np.object_)
    response = InferResponse("m", "1", "", {"S": values})
    (body, _), turns = await with_loop_turns(encode_infer_response(response, False))
    assert turns >= 2
    assert json.loads(body)["outputs"][0]["data"] == strings
    assert body == json.dumps(  # as one json.dumps writes it
        {
            "model_name": "m",
            "model_version": "1",
            "outputs": [{"name": "S", "datatype": "BYTES", "shape": [len(strings)],
                         "data": strings}],
        },
        separators=(",", ":"),
    ).encode()  # fmt: skip


async def test_a_large_non_utf8_bytes_element_says_to_ask_for_binary() -> None:
    response = InferResponse(
        "m", "1", "", {"S": np.array([b"a" * 3 * JSON_CHARS_PER_TURN + b"\xff"], np.object_)}
    )
    with pytest.raises(InvalidInput, match="binary_data"):
        await encode_infer_response(response, False)


async def test_a_large_json_output_is_written_over_several_loop_turns() -> None:
    """10⁶ values take about 0.5 s to write as JSON: the loop serves other calls
    meanwhile, and the answer is the same as written at once."""
    values = np.arange(3 * JSON_VALUES_PER_TURN + 5, dtype=np.float32) / 7
    response = InferResponse("m", "1", "r", {"Y": values.reshape(1, -1), "Z": values[:3]})
    (body, length), turns = await with_loop_turns(encode_infer_response(response, False))
    assert length is None and turns >= 3  # one per piece after the first
    doc = json.loads(body)
    assert doc["outputs"][0]["shape"] == [1, values.size]
    assert doc["outputs"][0]["data"] == values.tolist()
    assert doc["outputs"][1] == {"name": "Z", "datatype": "FP32", "shape": [3],
                                 "data": values[:3].tolist()}  # fmt: skip
    assert body == json.dumps(  # as one json.dumps writes it
        {
            "model_name": "m",
            "model_version": "1",
            "id": "r",
            "outputs": [
                {"name": "Y", "datatype": "FP32", "shape": [1, values.size],
                 "data": values.tolist()},
                {"name": "Z", "datatype": "FP32", "shape": [3], "data": values[:3].tolist()},
            ],
        },
        separators=(",", ":"),
    ).encode()  # fmt: skip


@pytest.mark.parametrize("datatype", NUMERIC)
@given(data=st.data())
def test_json_answers_hold_each_value_exactly(datatype: str, data: st.DataObject) -> None:
    """An output's values written as JSON read back as they are: floats as the doubles
    they are (as Triton writes them: FP32 0.1 is 0.10000000149011612, not 0.1), NaN and
    the infinities as the literals Python's JSON reads (not null), integers to the
    last bit, booleans as booleans; whatever the output array's layout."""
    dtype = DATATYPES[datatype]
    flat = data.draw(hnp.arrays(dtype, st.integers(1, 40), elements=hnp.from_dtype(dtype)))
    if data.draw(st.booleans(), label="strided"):  # a view every other value apart
        flat = np.stack([flat, flat], axis=1)[:, 0]
    response = InferResponse("m", "1", "", {"Y": flat})
    body, _ = asyncio.run(encode_infer_response(response, False))
    values = json.loads(body)["outputs"][0]["data"]
    if dtype.kind == "f":
        expected = flat.astype(np.float64).tolist()
        assert all(isinstance(v, float) for v in values)
        np.testing.assert_array_equal(np.array(values), np.array(expected))
    else:
        assert values == flat.tolist()
        assert all(type(v) is type(e) for v, e in zip(values, flat.tolist(), strict=True))


def test_a_json_part_over_the_bound_is_refused_before_it_is_parsed() -> None:
    body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1],
                                   "data": [1.0]}]}).encode()  # fmt: skip
    JsonInferRequest("m", "", body, None, max_json_bytes=len(body))
    with pytest.raises(BodyTooLarge, match="send large tensors as binary data"):
        JsonInferRequest("m", "", body + b" " * 10, None, max_json_bytes=len(body))
    # The binary tensors after the JSON do not count.
    head = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1],
                                   "parameters": {"binary_data_size": 4}}]}).encode()  # fmt: skip
    JsonInferRequest("m", "", head + b"\0" * 4, str(len(head)), max_json_bytes=len(head))


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.Unauthenticated(), 401),
        (errors.ModelNotFound("m"), 404),
        (errors.InvalidInput("x"), 400),
        (errors.ModelFailed("m"), 400),
        (errors.FailedPrecondition("x"), 412),
        (errors.RateLimited("x", 0.2), 429),
        (errors.QueueFull("x", 3.5), 429),
        (errors.DeadlineExceeded("x"), 504),
        (errors.Unavailable("x"), 503),
        (RuntimeError("bug"), 500),
    ],
)
def test_every_error_has_its_http_status(error: Exception, status: int) -> None:
    assert http_status(code_for(error)) == status


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert error_headers(errors.RateLimited("x", 0.2)) == {"Retry-After": "1"}
    assert error_headers(errors.QueueFull("x", 3.5)) == {"Retry-After": "4"}
    assert error_headers(errors.InvalidInput("x")) == {}


def test_every_grpc_code_of_the_table_has_an_http_status() -> None:
    from mandant.transport.grpc.status import STATUS

    assert {code.name for _, code in STATUS} <= set(HTTP_STATUS)


def test_rest_port_is_validated_and_defaults_to_tritons() -> None:
    assert parse_config({}).server.rest_port == 8000
    with pytest.raises(ConfigError, match=r"server\.rest_port"):
        parse_config({"server": {"rest_port": 70000}})
