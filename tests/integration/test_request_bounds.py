"""A request that lists more inputs, requested outputs or parameters than
``mandant.validation`` accepts is refused INVALID_ARGUMENT (REST: 400) before any
entry is read, over every transport: ModelInfer and ModelStreamInfer (one process, and
the front ends of ``workers: 2``, which would otherwise pack every entry for the
engine), and REST. The message gives the count and the bound, no client text; the
server answers the next call. (A small message can list millions of entries: the
hunter's 1.9 MiB of 10⁶ empty ``inputs {}`` held every tenant's calls for seconds.)

A gRPC message over 64 KiB has its counts read on the wire before protobuf parses it
(``wire_bounds.py``), per tensor and in all too; a message of another RPC over its
size bound is refused unparsed (in the front ends of ``workers: 2``, unforwarded)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from mandant.config import MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from mandant.transport.grpc.wire_bounds import (
    MAX_FIELDS,
    MAX_SMALL_MESSAGE_BYTES,
    MAX_UNNEEDED_FIELDS,
    PRE_PARSE_ABOVE_BYTES,
)
from mandant.validation import MAX_INPUTS, MAX_OUTPUTS, MAX_PARAMETERS
from mandant_client._proto import grpc_service_pb2 as pb
from tests.servers import ECHO_MODEL, SERVER_KINDS, Server, serve

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
MODEL_METADATA = "/inference.GRPCInferenceService/ModelMetadata"
KEY = "globex-key"
METADATA = (("authorization", f"Bearer {KEY}"),)
ROW = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    running = serve(request.param, echo_config(), tmp_path_factory.mktemp("bounds"))
    yield running
    running.stop()


def echo_config() -> MandantConfig:
    """One tenant and the echo model: quick to start."""
    return parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0},
            "tenants": [{"id": "globex", "api_keys": [hash_key(KEY)]}],
            "models": [ECHO_MODEL],
        }
    )


def echo_request(request_id: str = "") -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="echo", id=request_id)
    msg.inputs.add(name="INPUT0", datatype="FP32", shape=ROW.shape)
    msg.raw_input_contents.append(ROW.tobytes())
    return msg


def too_many_inputs() -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="echo", id="wide")
    for _ in range(MAX_INPUTS + 1):
        msg.inputs.add(name="INPUT0", datatype="FP32", shape=ROW.shape)
    return msg


def too_many_outputs() -> pb.ModelInferRequest:
    msg = echo_request("wide")
    for _ in range(MAX_OUTPUTS + 1):
        msg.outputs.add(name="OUTPUT0")
    return msg


def too_many_parameters() -> pb.ModelInferRequest:
    msg = echo_request("wide")
    for index in range(MAX_PARAMETERS + 1):
        msg.parameters[f"p{index}"].bool_param = True
    return msg


#: Each over-long list, and what the refusal says of it.
OVER: dict[str, tuple[Callable[[], pb.ModelInferRequest], str]] = {
    "inputs": (too_many_inputs, f"request has {MAX_INPUTS + 1} inputs, at most {MAX_INPUTS}"),
    "outputs": (
        too_many_outputs,
        f"request has {MAX_OUTPUTS + 1} requested outputs, at most {MAX_OUTPUTS}",
    ),
    "parameters": (
        too_many_parameters,
        f"request has {MAX_PARAMETERS + 1} parameters, at most {MAX_PARAMETERS}",
    ),
}


@pytest.mark.parametrize("listed", list(OVER))
def test_model_infer_refuses_too_many_entries(server: Server, listed: str) -> None:
    build, message = OVER[listed]
    with grpc.insecure_channel(server.target) as channel:
        infer = channel.unary_unary(
            INFER,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            infer(build(), metadata=METADATA, timeout=30)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()
        answer = infer(echo_request(), metadata=METADATA, timeout=30)  # still serving
        assert answer.raw_output_contents[0] == ROW.tobytes()


def test_stream_message_with_too_many_entries_is_answered_alone(server: Server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stream = channel.stream_stream(
            STREAM,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        sent = [build() for build, _ in OVER.values()] + [echo_request("fine")]
        answers = list(stream(iter(sent), metadata=METADATA, timeout=30))
    errors = sorted(a.error_message for a in answers if a.error_message)
    assert errors == sorted(message + " are accepted" for _, message in OVER.values())
    (fine,) = (a.infer_response for a in answers if not a.error_message)
    assert fine.id == "fine" and fine.raw_output_contents[0] == ROW.tobytes()


#: A parameter value that makes 257 parameters weigh more than 64 KiB.
LONG = "x" * (PRE_PARSE_ABOVE_BYTES // MAX_PARAMETERS)


def input_with_many_parameters() -> bytes:
    msg = echo_request("wide")
    for index in range(MAX_PARAMETERS + 1):
        msg.inputs[0].parameters[f"p{index}"].string_param = LONG
    return msg.SerializeToString()


def output_with_many_parameters() -> bytes:
    msg = echo_request("wide")
    output = msg.outputs.add(name="OUTPUT0")
    for index in range(MAX_PARAMETERS + 1):
        output.parameters[f"p{index}"].string_param = LONG
    return msg.SerializeToString()


def many_fields() -> bytes:
    """An echo request and many unknown fields (number 15, 4 bytes each): protobuf
    skips them one by one, the walk reads a few."""
    return echo_request("wide").SerializeToString() + b"\x7a\x04abcd" * MAX_FIELDS


#: Large messages refused on the wire, and what the refusal says (main parsed and
#: served each of them).
WIRE_OVER: dict[str, tuple[Callable[[], bytes], str]] = {
    "input parameters": (
        input_with_many_parameters,
        f"an input has more than {MAX_PARAMETERS} parameters, at most {MAX_PARAMETERS}",
    ),
    "output parameters": (
        output_with_many_parameters,
        f"a requested output has more than {MAX_PARAMETERS} parameters",
    ),
    "fields": (many_fields, f"request has more than {MAX_UNNEEDED_FIELDS} fields no request"),
}


@pytest.mark.parametrize("listed", list(WIRE_OVER))
def test_large_model_infer_is_refused_on_the_wire(server: Server, listed: str) -> None:
    build, message = WIRE_OVER[listed]
    raw = build()
    assert len(raw) > PRE_PARSE_ABOVE_BYTES
    with grpc.insecure_channel(server.target) as channel:
        infer = channel.unary_unary(INFER, response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            infer(raw, metadata=METADATA, timeout=30)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert message in caught.value.details()
        answer = infer(echo_request().SerializeToString(), metadata=METADATA, timeout=30)
        assert answer.raw_output_contents[0] == ROW.tobytes()


def test_large_stream_message_over_a_bound_is_answered_alone(server: Server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stream = channel.stream_stream(
            STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        sent = [build() for build, _ in WIRE_OVER.values()]
        sent.append(echo_request("fine").SerializeToString())
        answers = list(stream(iter(sent), metadata=METADATA, timeout=30))
    errors = [a.error_message for a in answers if a.error_message]
    assert len(errors) == len(WIRE_OVER)
    for _, message in WIRE_OVER.values():
        assert sum(message in error for error in errors) == 1
    # each with its id and model, read from the message's first fields, unparsed (a
    # multiplexing client matches answers by id)
    refused = [a.infer_response for a in answers if a.error_message]
    assert [(r.id, r.model_name) for r in refused] == [("wide", "echo")] * len(WIRE_OVER)
    (fine,) = (a.infer_response for a in answers if not a.error_message)
    assert fine.id == "fine" and fine.raw_output_contents[0] == ROW.tobytes()


def test_another_rpcs_large_message_is_refused_unparsed(server: Server) -> None:
    """ModelMetadata's message with an unknown field that takes it over the bound
    (one process: the gate's parse; workers: the front end, before forwarding)."""
    head = pb.ModelMetadataRequest(name="echo").SerializeToString()
    unknown = pb.ModelInferRequest(model_name="x" * MAX_SMALL_MESSAGE_BYTES)
    raw = head + unknown.SerializeToString().replace(b"\x0a", b"\x7a", 1)  # field 1 → 15
    with grpc.insecure_channel(server.target) as channel:
        metadata = channel.unary_unary(
            MODEL_METADATA, response_deserializer=pb.ModelMetadataResponse.FromString
        )
        with pytest.raises(grpc.RpcError) as caught:
            metadata(raw, metadata=METADATA, timeout=30)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"at most {MAX_SMALL_MESSAGE_BYTES} are accepted" in caught.value.details()
        assert metadata(head, metadata=METADATA, timeout=30).name == "echo"


def post_infer(server: Server, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.rest_port}/v2/models/echo/infer",
        data=json.dumps(doc).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


JSON_INPUT = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": ROW.ravel().tolist()}
MANY_PARAMETERS = {f"p{index}": True for index in range(MAX_PARAMETERS + 1)}
#: Each over-long list in a REST body, and what the refusal says of it.
JSON_OVER: dict[str, tuple[dict[str, Any], str]] = {
    "outputs": (
        {"inputs": [JSON_INPUT], "outputs": [{"name": "OUTPUT0"}] * (MAX_OUTPUTS + 1)},
        f"request has {MAX_OUTPUTS + 1} requested outputs, at most {MAX_OUTPUTS}",
    ),
    "inputs": (
        {"inputs": [JSON_INPUT] * (MAX_INPUTS + 1)},
        f"request has {MAX_INPUTS + 1} inputs, at most {MAX_INPUTS}",
    ),
    "output parameters": (
        {"inputs": [JSON_INPUT], "outputs": [{"name": "OUTPUT0", "parameters": MANY_PARAMETERS}]},
        f"output 'OUTPUT0' has {MAX_PARAMETERS + 1} parameters, at most {MAX_PARAMETERS}",
    ),
    "input parameters": (
        {"inputs": [{**JSON_INPUT, "parameters": MANY_PARAMETERS}]},
        f"input 'INPUT0' has {MAX_PARAMETERS + 1} parameters, at most {MAX_PARAMETERS}",
    ),
}


@pytest.mark.parametrize("listed", list(JSON_OVER))
def test_rest_infer_refuses_too_many_entries(server: Server, listed: str) -> None:
    doc, message = JSON_OVER[listed]
    status, answer = post_infer(server, doc)
    assert status == 400 and message in answer["error"]
    status, answer = post_infer(server, {"inputs": [JSON_INPUT]})  # still serving
    assert status == 200 and answer["outputs"][0]["data"] == ROW.ravel().tolist()
