"""BYTES tensors over real gRPC: every framing (empty, equal-length, mixed elements,
NULs) comes back unchanged through a BYTES echo model, and a tensor with more elements
than ``server.max_bytes_elements`` is refused with INVALID_ARGUMENT before it is
decoded (unframing BYTES is Python work on the event loop every tenant shares)."""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from mandant.config import DEFAULT_MAX_BYTES_ELEMENTS, MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.servers import SERVER_KINDS, Server, serve

KEY = "bytes-tenant-key"
METADATA = (("authorization", f"Bearer {KEY}"),)
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def bytes_config(**server: object) -> MandantConfig:
    """A BYTES echo model (``bytes_echo``) for tenant ``t``."""
    return parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, **server},
            "tenants": [{"id": "t", "api_keys": [hash_key(KEY)]}],
            "models": [
                {
                    "name": "bytes_echo",
                    "factory": "mandant.demo.models:echo",
                    "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [-1]}],
                    "outputs": [{"name": "OUTPUT0", "datatype": "BYTES", "shape": [-1]}],
                }
            ],
        }
    )


@pytest.fixture(scope="module", params=SERVER_KINDS)
def stub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    """One process, then ``workers: 2`` (a front end hands the client's BYTES on as
    they came, raw or typed, and the engine splits them)."""
    server = serve(request.param, bytes_config(), tmp_path_factory.mktemp("bytes"))
    with grpc.insecure_channel(server.target, OPTIONS) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
    server.stop()


@pytest.fixture(scope="module", params=SERVER_KINDS)
def bounded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``server.max_bytes_elements: 8``."""
    server = serve(
        request.param, bytes_config(max_bytes_elements=8), tmp_path_factory.mktemp("bound")
    )
    yield server
    server.stop()


def framed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def raw_request(raw: bytes, count: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="bytes_echo")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[count])
    request.raw_input_contents.append(raw)
    return request


RNG = np.random.default_rng(11)
SHAPES = {
    "empty": [b""] * 1000,
    "equal lengths": [bytes(RNG.integers(1, 256, 16, dtype=np.uint8)) for _ in range(1000)],
    "equal lengths, NULs at the ends": [b"\x00ab\x00", b"cd\x00\x00", b"\x00\x00\x00\x00"] * 50,
    "mixed lengths": [bytes(RNG.integers(0, 256, n, dtype=np.uint8)) for n in range(300)],
    "one element": [b"hello"],
}


def typed_request(items: list[bytes], count: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="bytes_echo")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[count])
    tensor.contents.bytes_contents.extend(items)
    return request


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed contents"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_bytes_come_back_unchanged(
    stub: pb_grpc.GRPCInferenceServiceStub, case: str, typed: bool
) -> None:
    items = SHAPES[case]
    build = typed_request if typed else lambda i, n: raw_request(framed(i), n)
    reply = stub.ModelInfer(build(items, len(items)), metadata=METADATA)
    assert list(reply.outputs[0].shape) == [len(items)]
    assert reply.raw_output_contents[0] == framed(items)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (raw_request(framed([b"abcdefgh", b"c"]), 3), "ends inside element 2's length"),
        (raw_request(framed([b"ab", b"c", b"d"]), 2), "bytes left after 2 BYTES elements"),
        (raw_request(b"\xff\xff\x00\x00abcd", 2), "element 0 declares 65535 bytes"),
        (typed_request([b"ab"], 2), "needs 2 values in contents.bytes_contents, got 1"),
    ],
    ids=["an element short", "an element more", "a length past the end", "a value short"],
)
def test_bytes_that_do_not_match_their_shape_are_invalid(
    stub: pb_grpc.GRPCInferenceServiceStub, request_: pb.ModelInferRequest, message: str
) -> None:
    """Found where one process finds them, when the engine splits them after
    admission; same status and message in both layouts."""
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_, metadata=METADATA)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("input 'INPUT0': ")
    assert message in err.value.details()


def test_the_element_bound_is_the_last_that_is_served(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    count = DEFAULT_MAX_BYTES_ELEMENTS
    reply = stub.ModelInfer(raw_request(bytes(4 * count), count), metadata=METADATA)
    assert reply.raw_output_contents[0] == bytes(4 * count)


@pytest.mark.parametrize("how", ["raw", "typed contents"])
def test_more_bytes_elements_than_the_bound_are_invalid(
    stub: pb_grpc.GRPCInferenceServiceStub, how: str
) -> None:
    count = DEFAULT_MAX_BYTES_ELEMENTS + 1
    if how == "raw":
        request = raw_request(bytes(4 * count), count)  # empty elements: 4 bytes each
    else:
        request = pb.ModelInferRequest(model_name="bytes_echo")
        tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[count])
        tensor.contents.bytes_contents.extend([b""] * count)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, metadata=METADATA)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{count} BYTES elements, at most {DEFAULT_MAX_BYTES_ELEMENTS}" in err.value.details()
    reply = stub.ModelInfer(raw_request(framed([b"ok"]), 1), metadata=METADATA)
    assert reply.raw_output_contents[0] == framed([b"ok"])


def test_a_configured_bound_applies_on_unary_calls_and_streams(bounded: Server) -> None:
    with grpc.insecure_channel(bounded.target, OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(raw_request(framed([b"x"] * 8), 8), metadata=METADATA)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(raw_request(framed([b"x"] * 9), 9), metadata=METADATA)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        answers = list(
            stub.ModelStreamInfer(iter([raw_request(framed([b"x"] * 9), 9)]), metadata=METADATA)
        )
        status = answers[0].infer_response.parameters["status_code"].string_param
        assert status == "INVALID_ARGUMENT"


def _rest_infer(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/bytes_echo/infer",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {KEY}", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def test_the_bound_applies_on_rest_too_binary_and_json(bounded: Server) -> None:
    """The same ``server.max_bytes_elements`` on the REST port, for BYTES sent as binary
    data and as JSON strings: one check for every transport."""
    port = bounded.rest_port
    for count, expected in ((8, 200), (9, 400)):
        raw = framed([b"x"] * count)
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "datatype": "BYTES",
                        "shape": [count],
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ]
            }
        ).encode()
        status, answer = _rest_infer(
            port, head + raw, {"Inference-Header-Content-Length": str(len(head))}
        )
        assert status == expected, answer
        as_json = {
            "inputs": [
                {"name": "INPUT0", "datatype": "BYTES", "shape": [count], "data": ["x"] * count}
            ]
        }
        status, answer = _rest_infer(port, json.dumps(as_json).encode(), {})
        assert status == expected, answer
        if expected == 400:
            assert b"at most 8 are accepted" in answer
