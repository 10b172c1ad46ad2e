"""Everything a client can get wrong, over real gRPC: each gets its documented status
and a message naming the problem, and the server keeps serving afterwards."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import yaml

from mandant.config import parse_config
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.servers import DEMO_CONFIG, SERVER_KINDS, Server, auth, serve

INVALID = grpc.StatusCode.INVALID_ARGUMENT
METADATA = tuple(auth("acme").items())


@pytest.fixture(scope="module", params=SERVER_KINDS)
def small_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The demo with a 1 MiB message limit, to test oversize requests cheaply, and a
    BYTES echo (``bytes_echo``)."""
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0,
                      "max_message_bytes": 1 << 20}  # fmt: skip
    data["models"].append(
        {
            "name": "bytes_echo",
            "factory": "mandant.demo.models:echo",
            "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "BYTES", "shape": [-1]}],
        }
    )
    config = parse_config(data, str(DEMO_CONFIG))
    server = serve(request.param, config, tmp_path_factory.mktemp("small"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(small_server: Server) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(small_server.target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(
    model: str = "classifier",
    name: str = "INPUT0",
    datatype: str = "FP32",
    shape: tuple[int, ...] = (1, 256),
    raw: bytes | None = None,
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is None:
        raw = np.zeros(shape, np.float32).tobytes() if all(d >= 0 for d in shape) else b""
    request.raw_input_contents.append(raw)
    return request


def _bytes_request(raw: bytes, shape: tuple[int, ...] = (2,)) -> pb.ModelInferRequest:
    return _request(model="echo", datatype="FP32", shape=shape, raw=raw)


def _echo(
    shape: list[int] | None = None,
    input_parameters: dict[str, pb.InferParameter] | None = None,
    output_parameters: dict[str, pb.InferParameter] | None = None,
    raw: bool = True,
    output: str = "OUTPUT0",
) -> pb.ModelInferRequest:
    """One FP32 ``INPUT0`` to ``echo`` (``[1, 1]`` unless ``shape``), with these input
    or requested-output parameters (on ``output``), its value in raw_input_contents
    unless not ``raw``."""
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(
        name="INPUT0", datatype="FP32", shape=shape or [1, 1], parameters=input_parameters
    )
    if output_parameters is not None:
        request.outputs.add(name=output, parameters=output_parameters)
    if raw:
        request.raw_input_contents.append(b"\0" * 4)
    return request


def _with_parameters(
    request: pb.ModelInferRequest, **parameters: pb.InferParameter
) -> pb.ModelInferRequest:
    for name, value in parameters.items():
        request.parameters[name].CopyFrom(value)
    return request


SHM_REGION = pb.InferParameter(string_param="r")

CASES: dict[str, tuple[pb.ModelInferRequest, str]] = {
    "wrong input name": (
        _request(name="IMAGE"),
        "unexpected input 'IMAGE'; model 'classifier' takes INPUT0",
    ),
    "wrong datatype": (
        _request(datatype="INT32"),
        "input 'INPUT0': expected datatype FP32, got INT32",
    ),
    "unknown datatype": (_request(datatype="FLOAT"), "expected datatype FP32, got FLOAT"),
    "wrong shape": (
        _request(shape=(1, 255)),
        "input 'INPUT0': expected shape [-1, 256], got [1, 255]",
    ),
    "wrong rank": (_request(shape=(256,)), "expected shape [-1, 256], got [256]"),
    "negative dimension": (_request(shape=(-1, 256)), "negative size"),
    # Two negative sizes make a positive count that raw bytes can match.
    "negative dimensions": (
        _request(model="echo", shape=(-2, -2), raw=b"\0" * 16),
        "input 'INPUT0': shape [-2, -2] has a negative size",
    ),
    "negative dimensions, typed contents": (
        pb.ModelInferRequest(
            model_name="echo",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="INPUT0",
                    datatype="FP32",
                    shape=[-1, -1],
                    contents=pb.InferTensorContents(fp32_contents=[1.0]),
                )
            ],
        ),
        "input 'INPUT0': shape [-1, -1] has a negative size",
    ),
    # Nothing to hold, yet no array can be indexed that far.
    "empty tensor too large to index": (
        _request(model="echo", shape=(2**62, 0), raw=b""),
        f"input 'INPUT0': shape [{2**62}, 0] is too large",
    ),
    # Rows of nothing, charged as rows: past any batch, and past the counters' types.
    "empty tensor of more rows than a batch": (
        _request(model="echo", shape=(2**31, 0), raw=b""),
        f"input 'INPUT0': {2**31} rows, at most {2**31 - 1} are accepted",
    ),
    "short raw bytes": (
        _request(raw=b"\0" * 1000),
        "input 'INPUT0': FP32 [1, 256] needs 1024 bytes, got 1000",
    ),
    "long raw bytes": (_request(raw=b"\0" * 1028), "needs 1024 bytes, got 1028"),
    "empty request": (pb.ModelInferRequest(model_name="classifier"), "request has no inputs"),
    "raw count mismatch": (
        pb.ModelInferRequest(
            model_name="classifier",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="INPUT0", datatype="FP32", shape=[1, 256]
                )
            ],
            raw_input_contents=[b"\0" * 1024, b"\0" * 4],
        ),
        "raw_input_contents has 2 entries for 1 inputs",
    ),
    "typed count mismatch": (
        pb.ModelInferRequest(
            model_name="classifier",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="INPUT0",
                    datatype="FP32",
                    shape=[1, 256],
                    contents=pb.InferTensorContents(fp32_contents=[1.0] * 10),
                )
            ],
        ),
        "needs 256 values in contents.fp32_contents, got 10",
    ),
    "duplicate input": (
        pb.ModelInferRequest(
            model_name="echo",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 1]),
                pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 1]),
            ],
            raw_input_contents=[b"\0" * 4, b"\0" * 4],
        ),
        "input 'INPUT0' appears twice",
    ),
    "bad timeout parameter": (
        pb.ModelInferRequest(
            model_name="echo",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 1])
            ],
            raw_input_contents=[b"\0" * 4],
            parameters={"timeout": pb.InferParameter(string_param="soon")},
        ),
        "parameter 'timeout' is a non-negative 64-bit integer (microseconds)",
    ),
    # Triton's sequences (a stateful model's requests): there is no sequence batcher, and
    # they were accepted and served as unrelated requests, without a word
    "sequence id": (
        _with_parameters(_echo(), sequence_id=pb.InferParameter(int64_param=5)),
        "parameter 'sequence_id': sequences are not supported",
    ),
    "sequence id as a string, with its start": (
        _with_parameters(
            _echo(),
            sequence_id=pb.InferParameter(string_param="abc"),
            sequence_start=pb.InferParameter(bool_param=True),
        ),
        "parameter 'sequence_id': sequences are not supported",
    ),
    "sequence end": (
        _with_parameters(_echo(), sequence_end=pb.InferParameter(bool_param=True)),
        "parameter 'sequence_end': sequences are not supported",
    ),
    # numpy makes no array of more than 64 dimensions (workers: 2 answered INTERNAL)
    "65 dimensions": (
        _echo(shape=[1] * 65),
        "input 'INPUT0': shape has 65 dimensions, at most 64 are accepted",
    ),
    # Triton's classification extension: refused, not answered with the raw tensor
    "classification": (
        _echo(output_parameters={"classification": pb.InferParameter(int64_param=2)}),
        "the classification extension is not supported",
    ),
    "shared memory input": (
        _echo(input_parameters={"shared_memory_region": SHM_REGION}, raw=False),
        "input 'INPUT0': shared memory is not supported",
    ),
    # With raw contents too: the raw bytes were taken for the region's data, unrefused.
    "shared memory input beside raw contents": (
        _echo(input_parameters={"shared_memory_region": SHM_REGION}),
        "input 'INPUT0': shared memory is not supported",
    ),
    "shared memory output": (
        _echo(output_parameters={"shared_memory_region": SHM_REGION}),
        "output 'OUTPUT0': shared memory is not supported",
    ),
    # The name is the client's, not yet checked against the model: cut to 64 characters
    # (20,000 came back whole, past gRPC's 16 KiB bound on a status message).
    "shared memory output of a long name": (
        _echo(output_parameters={"shared_memory_region": SHM_REGION}, output="Z" * 20_000),
        f"output '{'Z' * 64}…': shared memory is not supported",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub, case: str) -> None:
    request, message = CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, metadata=METADATA)
    assert err.value.code() == INVALID, err.value.details()
    assert message in err.value.details()
    _still_serving(stub)


def _bytes_model_request(raw: bytes, count: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="bytes_echo")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[count])
    request.raw_input_contents.append(raw)
    return request


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x05\x00", 1, "1 BYTES elements need at least 4 bytes of length prefixes, got 2"),
        (struct.pack("<I", 10) + b"abc", 1, "element 0 declares 10 bytes, 3 remain"),
        (struct.pack("<I", 1) + b"a" + b"zz", 1, "2 bytes left after 1 BYTES elements"),
        (struct.pack("<I", 1) + b"a", 2, "need at least 8 bytes of length prefixes, got 5"),
        (struct.pack("<I", 1) + b"abcd", 2, "ends inside element 1's length"),
        (struct.pack("<I", 0xFFFFFFFF) + b"a", 1, "declares 4294967295 bytes"),
        # A shape claiming 2**40 elements: refused before anything is allocated.
        (struct.pack("<I", 1) + b"a", 2**40, f"{2**40} rows, at most {2**31 - 1} are accepted"),
        (struct.pack("<I", 1) + b"a", 2**30, "need at least 4294967296 bytes"),
    ],
)
def test_broken_bytes_prefixes(
    stub: pb_grpc.GRPCInferenceServiceStub, raw: bytes, count: int, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_bytes_model_request(raw, count), metadata=METADATA)
    assert err.value.code() == INVALID
    assert message in err.value.details()
    good = struct.pack("<I", 2) + b"ok" + struct.pack("<I", 0)
    reply = stub.ModelInfer(_bytes_model_request(good, 2), metadata=METADATA)
    assert reply.raw_output_contents[0] == good


def test_an_empty_request_is_answered_with_empty_outputs(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    """Zero rows, in raw bytes and in typed contents, to a model with and without
    batching: answered, not an error."""
    raw = stub.ModelInfer(_request(model="echo", shape=(0, 4), raw=b""), metadata=METADATA)
    typed = pb.ModelInferRequest(model_name="echo")
    typed.inputs.add(name="INPUT0", datatype="FP32", shape=[0, 4])
    typed_reply = stub.ModelInfer(typed, metadata=METADATA)
    for reply in (raw, typed_reply):
        assert list(reply.outputs[0].shape) == [0, 4]
        assert reply.raw_output_contents[0] == b""
    batched = stub.ModelInfer(_request(shape=(0, 256), raw=b""), metadata=METADATA)
    assert list(batched.outputs[0].shape) == [0, 16]
    reply = stub.ModelInfer(_bytes_model_request(b"", 0), metadata=METADATA)
    assert list(reply.outputs[0].shape) == [0] and reply.raw_output_contents[0] == b""


def test_an_unknown_model_is_not_found_whatever_its_tensors(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    """The model is resolved before its tensors are looked at, through a front end
    too (which puts them in frames before the engine resolves the model)."""
    for shape in [(2**40, 2**40, 0), (-2, -2), (2**62, 0)]:
        request = _request(model="nope", shape=shape, raw=b"\0" * 16 if min(shape) < 0 else b"")
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, metadata=METADATA)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
        assert err.value.details() == "model 'nope' not found"


def test_oversize_message_is_refused(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    rows = (2 << 20) // 1024  # 2 MiB against a 1 MiB limit
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_request(shape=(rows, 256)), metadata=METADATA)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serving(stub)


def test_an_answer_larger_than_the_request_limit_is_sent(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    """The limit is on requests: an answer a few bytes larger than a request just under
    it (echo adds its output's name and datatype) was refused once the model had run,
    on a stream ending the stream."""
    request = pb.ModelInferRequest(model_name="echo", id="big")
    values = ((1 << 20) - 40) // 4  # the request 3 bytes under the limit, its answer 1 over
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, values])
    request.raw_input_contents.append(np.arange(values, dtype=np.float32).tobytes())
    assert request.ByteSize() < 1 << 20
    reply = stub.ModelInfer(request, metadata=METADATA)
    assert reply.ByteSize() > 1 << 20
    assert reply.raw_output_contents[0] == request.raw_input_contents[0]
    small = pb.ModelInferRequest(model_name="echo", id="small")
    small.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    small.raw_input_contents.append(b"\0" * 4)
    answers = list(stub.ModelStreamInfer(iter([request, small]), metadata=METADATA))
    assert sorted((a.error_message, a.infer_response.id) for a in answers) == [
        ("", "big"),
        ("", "small"),
    ]


def test_unknown_version_is_not_found(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = _request()
    request.model_version = "7"
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, metadata=METADATA)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "model 'classifier' version '7' not found"


def test_unimplemented_rpcs_say_so(small_server: Server) -> None:
    with grpc.insecure_channel(small_server.target) as channel:
        stats = channel.unary_unary("/inference.GRPCInferenceService/CudaSharedMemoryStatus")
        with pytest.raises(grpc.RpcError) as err:
            stats(b"", metadata=METADATA)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _still_serving(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    reply = stub.ModelInfer(_request(), metadata=METADATA)
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).shape == (16,)
