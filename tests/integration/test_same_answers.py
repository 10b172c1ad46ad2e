"""One process and ``workers: 2`` give every request the same answer: the same status
and message for each mistake a client can make, the same outputs otherwise.

The two layouts check a request in different places: one process resolves the model,
validates the tensors against it and only then reads their bytes; a front end reads
and frames the tensors first (it has no models) and the engine resolves and validates.
Requests are generated, mostly near-valid (one or two things wrong, in the tensors'
names, datatypes, shapes, bytes or contents, the model, its version, the parameters),
and sent to the demo served both ways."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mandant_client._proto import grpc_service_pb2 as pb
from tests.servers import DEMO_KEYS, ServerThread, WorkersServer

INFER = "/inference.GRPCInferenceService/ModelInfer"
#: model → (input width, datatype) as the demo declares it ("nope" is no model).
MODELS = {"classifier": 256, "echo": 4, "fraud": 32, "nope": 4}
DATATYPES = ["FP32", "FP32", "FP32", "INT32", "FP16", "BYTES", "BOOL", "FLOAT", ""]
#: Dimensions: ordinary, empty, negative, and larger than any array.
DIMS = st.sampled_from([0, 1, 2, 3, 4, 32, 256, -1, -2, 2**40, 2**62])
ITEMSIZE = {"FP32": 4, "INT32": 4, "FP16": 2, "BOOL": 1}
#: Parameters of an input or a requested output that a request may not use here.
TENSOR_PARAMETERS = ["shared_memory_region", "classification", "binary_data"]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """(tenant, a serialized ModelInferRequest)."""
    model = draw(st.sampled_from(list(MODELS)))
    message = pb.ModelInferRequest(model_name=model)
    message.model_version = draw(st.sampled_from(["", "", "", "1", "2"]))
    message.id = draw(st.sampled_from(["", "r1"]))
    rows = draw(st.sampled_from([0, 1, 1, 2, 65]))
    shape = [rows, MODELS[model]]
    if draw(st.booleans()):
        shape = draw(st.lists(DIMS, min_size=0, max_size=3))
    if draw(st.integers(0, 9)) == 0:
        shape = [1] * 65  # more dimensions than numpy takes
    tensor = message.inputs.add(
        name=draw(st.sampled_from(["INPUT0", "INPUT0", "INPUT0", "IN"])),
        datatype=draw(st.sampled_from(DATATYPES)),
        shape=shape,
    )
    small = all(0 <= d <= 4096 for d in shape)
    count = int(np.prod(shape)) if small else 0
    size = count * ITEMSIZE.get(tensor.datatype, 1) if count <= 1 << 16 else 0
    how = draw(st.sampled_from(["raw", "raw", "raw", "typed", "both", "none"]))
    if how in ("raw", "both"):
        size += draw(st.sampled_from([0, 0, 0, 1, -1, 16]))
        message.raw_input_contents.append(b"\x01" * max(0, size))
    if how in ("typed", "both"):
        values = count + draw(st.sampled_from([0, 0, 1, -1]))
        tensor.contents.fp32_contents.extend([0.5] * max(0, min(values, 1 << 16)))
    if draw(st.integers(0, 6)) == 0:
        tensor.parameters[draw(st.sampled_from(TENSOR_PARAMETERS))].string_param = "r"
    if draw(st.integers(0, 4)) == 0:
        output = message.outputs.add(name=draw(st.sampled_from(["OUTPUT0", "SCORE", "OUT"])))
        if draw(st.booleans()):
            output.parameters[draw(st.sampled_from(TENSOR_PARAMETERS))].int64_param = 2
    if draw(st.integers(0, 4)) == 0:
        name = draw(st.sampled_from(["priority", "timeout", "other"]))
        value = draw(st.sampled_from([1, -1, 0]))
        message.parameters[name].int64_param = value
    tenant = draw(st.sampled_from(["acme", "acme", "globex"]))
    return tenant, message.SerializeToString()


@pytest.fixture(scope="module")
def infers(demo_server: ServerThread, demo_workers_server: WorkersServer) -> Iterator[list[Any]]:
    channels = [grpc.insecure_channel(s.target) for s in (demo_server, demo_workers_server)]
    yield [channel.unary_unary(INFER) for channel in channels]
    for channel in channels:
        channel.close()


def _answer(infer: Any, tenant: str, raw: bytes) -> tuple[str, object]:
    metadata = (("authorization", f"Bearer {DEMO_KEYS[tenant]}"),)
    try:
        reply = pb.ModelInferResponse.FromString(infer(raw, metadata=metadata, timeout=30))
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()
    outputs = [
        (o.name, o.datatype, list(o.shape), np.frombuffer(data, np.float32).tolist())
        for o, data in zip(reply.outputs, reply.raw_output_contents, strict=True)
    ]
    return "OK", (reply.model_name, reply.model_version, reply.id, outputs)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=requests())
def test_one_process_and_two_front_ends_answer_alike(
    infers: list[Any], request: tuple[str, bytes]
) -> None:
    tenant, raw = request
    (code, one), (code_two, two) = (_answer(infer, tenant, raw) for infer in infers)
    assert code not in ("INTERNAL", "UNKNOWN"), one
    assert code_two == code, (one, two)
    if code != "OK":
        assert one == two
        return
    assert isinstance(one, tuple) and isinstance(two, tuple)
    assert one[:3] == two[:3]
    for (*header, values), (*header_two, values_two) in zip(one[3], two[3], strict=True):
        assert header == header_two
        # Same weights; the processes' math libraries may round differently.
        np.testing.assert_allclose(values, values_two, rtol=1e-5, atol=1e-6)


def _refused(model: str, shape: list[int], input_name: str = "INPUT0", **outputs: Any) -> bytes:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name=input_name, datatype="FP32", shape=shape)
    message.raw_input_contents.append(b"\0" * 4)
    for name, parameter in outputs.items():
        message.outputs.add(name="OUTPUT0").parameters[name].CopyFrom(parameter)
    return message.SerializeToString()


CLASSIFY = pb.InferParameter(int64_param=3)
SHARED = pb.InferParameter(string_param="r")


@pytest.mark.parametrize(
    ("tenant", "raw", "code"),
    [
        ("acme", _refused("nope", [1] * 65), "NOT_FOUND"),
        ("globex", _refused("fraud", [1] * 65), "NOT_FOUND"),  # acme's private model
        ("acme", _refused("nope", [1, 1], classification=CLASSIFY), "NOT_FOUND"),
        ("globex", _refused("fraud", [1, 1], shared_memory_region=SHARED), "NOT_FOUND"),
        ("acme", _refused("echo", [1, 1], "IN", classification=CLASSIFY), "INVALID_ARGUMENT"),
    ],
    ids=["65 dims, no model", "65 dims, private", "classification, no model",
         "shared memory, private", "wrong input and classification"],
)  # fmt: skip
def test_what_one_process_checks_after_resolving_a_front_end_checks_there_too(
    infers: list[Any], tenant: str, raw: bytes, code: str
) -> None:
    """A front end read the inputs' and requested outputs' headers before handing a
    call on, and refused what it found there at once: an unknown model (or another
    tenant's private one) with a 65-dimension input or a classification output was
    INVALID_ARGUMENT, where one process says NOT_FOUND; a wrong input name was
    answered with the output's refusal (one process checks inputs first)."""
    one, two = (_answer(infer, tenant, raw) for infer in infers)
    assert one == two
    assert one[0] == code, one
