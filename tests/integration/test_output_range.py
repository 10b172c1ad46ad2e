"""An integer output whose values its declared (narrower) integer type cannot hold:
the codec's cast wrapped them (an int64 300 went out as UINT8 44, OK, nothing
logged). Now the call fails as when the model raises on its data: INVALID_ARGUMENT,
charged (the model ran; answered UNAVAILABLE and refunded, as a configuration's
mismatch is, a tenant ran the model as often as it liked without spending its quota),
and in a batch only the request whose values overflow fails."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.servers import SERVER_KINDS, Server, serve

QUOTA = 4
QUANT = {
    "name": "quant",
    "backend": "torch",
    "factory": "mandant.demo.models:echo",
    "device": "cpu",
    "inputs": [{"name": "INPUT0", "datatype": "INT64", "shape": [-1, 2]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "UINT8", "shape": [-1, 2]}],
    "batching": {"max_batch_size": 8, "max_queue_delay_ms": 50, "dispatch": "delay"},
}
#: Its BYTES input as text, bytes that are not UTF-8 as lone surrogates.
TEXT = {
    "name": "text",
    "backend": "torch",
    "factory": "tests.unit.torch_models:decoded",
    "inputs": [{"name": "X", "datatype": "BYTES", "shape": [-1]}],
    "outputs": [{"name": "S", "datatype": "BYTES", "shape": [-1]}],
}


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0},
            "tenants": [
                {"id": "a", "api_keys": [hash_key("a-key")], "quota": {"rows_per_day": QUOTA}},
                {"id": "b", "api_keys": [hash_key("b-key")]},
            ],
            "models": [QUANT, TEXT],
        }
    )
    running = serve(request.param, config, tmp_path_factory.mktemp("range"))
    yield running
    running.stop()


def _quant(values: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="quant")
    request.inputs.add(name="INPUT0", datatype="INT64", shape=[1, 2])
    request.raw_input_contents.append(np.array([values], np.int64).tobytes())
    return request


async def test_values_out_of_range_fail_that_call_alone_and_stay_charged(server: Server) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def call(key: str, values: list[int]) -> tuple[str, bytes]:
            try:
                answer = await stub.ModelInfer(
                    _quant(values), metadata=(("authorization", f"Bearer {key}"),), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, (exc.details() or "").encode()
            return "OK", answer.raw_output_contents[0]

        # In one batch (the model waits 50 ms for company): b's fits, a's overflows.
        fits, overflows = await asyncio.gather(call("b-key", [7, 255]), call("a-key", [300, 1]))
        assert fits == ("OK", bytes([7, 255]))
        assert overflows[0] == "INVALID_ARGUMENT", overflows
        assert b"failed on this request's inputs" in overflows[1]
        for _ in range(QUOTA - 1):  # a's quota is spent by calls that ran
            assert (await call("a-key", [-1, 0]))[0] == "INVALID_ARGUMENT"
        code, details = await call("a-key", [1, 2])
        assert code == "RESOURCE_EXHAUSTED" and b"quota" in details, (code, details)


async def test_text_that_is_not_unicode_fails_that_call_not_internal(server: Server) -> None:
    """A model's text holding a lone surrogate failed INTERNAL, a traceback logged for
    every call; now as a model's failure on the request's data."""
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def call(value: bytes) -> pb.ModelInferResponse:
            request = pb.ModelInferRequest(model_name="text")
            request.inputs.add(name="X", datatype="BYTES", shape=[1])
            request.raw_input_contents.append(len(value).to_bytes(4, "little") + value)
            metadata = (("authorization", "Bearer b-key"),)
            return await stub.ModelInfer(request, metadata=metadata, timeout=30)

        answer = await call("é".encode())
        assert answer.raw_output_contents[0] == b"\x02\x00\x00\x00" + "é".encode()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(b"\xff")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "failed on this request's inputs" in (refused.value.details() or "")
