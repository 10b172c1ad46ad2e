"""Both decoders compare a list's length with its bound before reading any entry: a
shape of more than MAX_RANK dimensions is refused before it is copied (the checks
that look at names and sizes come later), over-long lists on construction, and the
bounds themselves are accepted. Over real servers: tests/integration/test_request_bounds.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mandant.errors import InvalidInput
from mandant.transport.grpc.codec import ProtoInferRequest
from mandant.transport.rest.codec import JsonInferRequest
from mandant.validation import MAX_INPUTS, MAX_OUTPUTS, MAX_PARAMETERS, MAX_RANK
from mandant_client._proto import grpc_service_pb2 as pb

WIDE = f"shape has {MAX_RANK + 1} dimensions, at most {MAX_RANK} are accepted"


def proto(inputs: int = 1, outputs: int = 0, parameters: int = 0) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    for index in range(inputs):
        msg.inputs.add(name=f"IN{index}", datatype="FP32", shape=[1])
    for index in range(outputs):
        msg.outputs.add(name=f"OUT{index}")
    for index in range(parameters):
        msg.parameters[f"p{index}"].int64_param = index
    return msg


def test_proto_shape_rank_is_refused_before_its_headers_are_made() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x" * 10_000, datatype="FP32", shape=[1] * (MAX_RANK + 1))
    with pytest.raises(InvalidInput, match=WIDE) as caught:
        ProtoInferRequest(msg).input_headers()
    assert len(str(caught.value)) < 200  # the name is cut, not echoed
    msg.inputs[0].ClearField("shape")
    msg.inputs[0].shape.extend([1] * MAX_RANK)
    assert len(ProtoInferRequest(msg).input_headers()[0].shape) == MAX_RANK


def test_proto_counts_are_bounded_on_construction() -> None:
    request = ProtoInferRequest(proto(MAX_INPUTS, MAX_OUTPUTS, MAX_PARAMETERS))
    assert len(request.input_headers()) == MAX_INPUTS
    assert len(request.requested_outputs()) == MAX_OUTPUTS
    assert len(request.parameters()) == MAX_PARAMETERS
    for over in ({"inputs": MAX_INPUTS + 1}, {"outputs": MAX_OUTPUTS + 1}):
        with pytest.raises(InvalidInput, match="at most 1024 are accepted"):
            ProtoInferRequest(proto(**over))
    with pytest.raises(InvalidInput, match=f"{MAX_PARAMETERS + 1} parameters"):
        ProtoInferRequest(proto(parameters=MAX_PARAMETERS + 1))


def test_proto_tensor_parameters_are_bounded_at_every_size() -> None:
    """A message under the wire walk's 64 KiB: an input's or a requested output's
    parameters were counted only above it (and always over REST)."""
    msg = pb.ModelInferRequest(model_name="m")
    tensor = msg.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    output = msg.outputs.add(name="OUTPUT0")
    for index in range(MAX_PARAMETERS):
        tensor.parameters[f"p{index}"].bool_param = True
        output.parameters[f"p{index}"].bool_param = True
    assert msg.ByteSize() < 64 * 1024
    ProtoInferRequest(msg).input_headers()
    ProtoInferRequest(msg).requested_outputs()
    tensor.parameters["one more"].bool_param = True
    output.parameters["one more"].bool_param = True
    over = f"{MAX_PARAMETERS + 1} parameters, at most {MAX_PARAMETERS} are accepted"
    with pytest.raises(InvalidInput, match=f"input 'INPUT0' has {over}"):
        ProtoInferRequest(msg).input_headers()
    with pytest.raises(InvalidInput, match=f"output 'OUTPUT0' has {over}"):
        ProtoInferRequest(msg).requested_outputs()


def json_request(doc: dict[str, Any]) -> JsonInferRequest:
    return JsonInferRequest("m", "", json.dumps(doc).encode(), None)


def test_json_shape_rank_is_refused_on_construction() -> None:
    tensor = {"name": "INPUT0", "datatype": "FP32", "data": [1.0]}
    with pytest.raises(InvalidInput, match=WIDE):
        json_request({"inputs": [{**tensor, "shape": [1] * (MAX_RANK + 1)}]})
    request = json_request({"inputs": [{**tensor, "shape": [1] * MAX_RANK}]})
    assert len(request.input_headers()[0].shape) == MAX_RANK


def test_json_parameter_maps_are_bounded() -> None:
    tensor = {"name": "INPUT0", "datatype": "FP32", "shape": [1], "data": [1.0]}
    most = {f"p{index}": index for index in range(MAX_PARAMETERS)}
    over = {**most, "one more": 0}
    request = json_request(
        {
            "parameters": most,
            "inputs": [{**tensor, "parameters": most}],
            "outputs": [{"name": "OUTPUT0", "parameters": most}],
        }
    )
    assert len(request.parameters()) == MAX_PARAMETERS
    for doc, holder in (
        ({"parameters": over, "inputs": [tensor]}, "request"),
        ({"inputs": [{**tensor, "parameters": over}]}, "input 'INPUT0'"),
        ({"inputs": [tensor], "outputs": [{"name": "OUTPUT0", "parameters": over}]}, "output"),
    ):
        with pytest.raises(InvalidInput, match=f"{holder}.* {MAX_PARAMETERS + 1} parameters"):
            json_request(doc)
