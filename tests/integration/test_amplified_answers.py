"""Answers far larger than their requests, not read: the bounds on unread answers hold
for them too. Both bounds were checked only as a call or message began, so calls that
all began before any answer was made all passed: one tenant's 60-byte messages, each
answered 4 MiB, held 512 MiB on one stream (its bound: two ``max_message_bytes``) and
over 1 GiB across calls, against a tenant's bound of 4 MiB (a hunt's measure). An
answer that would take its stream or its tenant past twice the bound is now refused as
it is handed over, unless it is alone (``transport/unread.py``, ``InferStream._take``);
twice, so that a batch's answers to a client that reads them are not (at the bound
itself, half of them were)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant.transport.unread import UNREAD_REASON
from mandant_client._proto import grpc_service_pb2 as pb
from tests.integration.test_unread_answers import unread_post
from tests.servers import SERVER_KINDS, Server, WorkersServer, metric, serve

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
ADMIN_KEY = "admin-key"
MIB = 1 << 20
#: A 4-byte request answered with this many bytes (a little under 1 MiB).
ANSWER = MIB - 4096
#: A tenant's bound: four answers; a stream's: two ``max_message_bytes``, two answers.
#: Answers are refused past twice either.
BOUND, MESSAGE_BYTES = 4 * MIB, MIB
#: Each its own TCP connection, whose receive window stays at gRPC's 64 KiB.
SLOW_READER = (("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0))
METADATA = (("authorization", "Bearer acme-key"),)
#: A client that reads, taking answers of any size.
BIG_ANSWERS = (("grpc.max_receive_message_length", -1),)


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "rest_port": 0,
                "max_unread_answer_bytes": BOUND,
                "max_message_bytes": MESSAGE_BYTES,
                "admin_keys": [hash_key(ADMIN_KEY)],
            },
            "tenants": [{"id": "acme", "api_keys": [hash_key("acme-key")]}],
            "models": [
                {
                    "name": "widen",
                    "backend": "torch",
                    "factory": "benchmarks._models:widen",
                    "factory_args": {"width": ANSWER // 4},
                    "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 1]}],
                    "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1, ANSWER // 4]}],
                },
                {  # ANSWER each, the calls of a second made at once (up to 16)
                    "name": "widen_burst",
                    "backend": "torch",
                    "factory": "benchmarks._models:widen",
                    "factory_args": {"width": ANSWER // 4},
                    "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 1]}],
                    "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1, ANSWER // 4]}],
                    "batching": {
                        "max_batch_size": 16,
                        "max_queue_delay_ms": 1000,
                        "dispatch": "delay",
                    },
                },
                {  # 8 MiB answers (more than the kernel takes unread), made together
                    "name": "widen_batched",
                    "backend": "torch",
                    "factory": "benchmarks._models:widen",
                    "factory_args": {"width": 2 * MIB},
                    "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 1]}],
                    "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1, 2 * MIB]}],
                    "batching": {
                        "max_batch_size": 16,
                        "max_queue_delay_ms": 1000,
                        "dispatch": "delay",
                    },
                },
            ],
        }
    )
    running = serve(request.param, config, tmp_path_factory.mktemp("amplified"))
    yield running
    running.stop()


def _request(request_id: str = "", model: str = "widen") -> bytes:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="X", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(np.ones(1, np.float32).tobytes())
    return request.SerializeToString()


def _refusals(server: Server) -> float:
    labels = {"tenant": "acme", "reason": UNREAD_REASON, "model": ""}
    return metric(server, ADMIN_KEY, "mandant_rejections_total", **labels) or 0.0


async def _until_refused(server: Server, at_least: float) -> None:
    deadline = time.monotonic() + 20
    while _refusals(server) < at_least:
        assert time.monotonic() < deadline, f"{_refusals(server)} answers refused"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)  # the last answers of the burst handed over


async def test_a_stream_s_unread_large_answers_stop_at_its_bound(server: Server) -> None:
    """One stream, 16 messages of 4 bytes sent at once and answered in one batch,
    nothing read: four answers are held (twice the stream's bound of 2 MiB), the
    others refused in the stream, each with its own id; the stream goes on. (Answered
    one by one, the stream would stop reading at its bound: backpressure.)"""
    before = _refusals(server)
    async with grpc.aio.insecure_channel(server.target, options=SLOW_READER) as channel:
        stream = channel.stream_stream(STREAM)(metadata=METADATA)
        for index in range(16):
            await stream.write(_request(str(index), model="widen_burst"))
        await _until_refused(server, before + 12)
        answered, refused = set(), set()
        for _ in range(16):
            answer = pb.ModelStreamInferResponse.FromString(await stream.read())
            if answer.error_message:
                assert "this stream's answers are not read yet" in answer.error_message
                status = answer.infer_response.parameters["status_code"].string_param
                assert status == "RESOURCE_EXHAUSTED"
                refused.add(answer.infer_response.id)
            else:
                assert len(answer.infer_response.raw_output_contents[0]) == ANSWER
                answered.add(answer.infer_response.id)
        assert len(answered) == 4 and answered | refused == {str(i) for i in range(16)}
        # Read, the stream serves again.
        await stream.write(_request("again"))
        answer = pb.ModelStreamInferResponse.FromString(await stream.read())
        assert not answer.error_message and answer.infer_response.id == "again"
        stream.cancel()


async def test_unary_calls_unread_large_answers_stop_at_the_tenant_s_bound(
    server: Server,
) -> None:
    """24 calls on connections of their own, each sent whole before any answer was
    made, nothing read: eight answers (twice the tenant's bound) are held in each process
    that counts (each front end, with ``workers: 2``), the others refused
    RESOURCE_EXHAUSTED; before, every one was held."""
    processes = 2 if isinstance(server, WorkersServer) else 1
    before = _refusals(server)
    channels = [grpc.aio.insecure_channel(server.target, options=SLOW_READER) for _ in range(24)]
    try:
        calls = []
        codes = []
        for channel in channels:
            call = channel.stream_stream(INFER)(metadata=METADATA)
            try:
                await call.write(_request())
                await call.done_writing()
            except grpc.aio.AioRpcError:
                # Refused at the gate once earlier answers were held, before the client
                # wrote (gRPC's core fails the write: INTERNAL).
                codes.append(grpc.StatusCode.RESOURCE_EXHAUSTED)
                continue
            calls.append(call)
        await _until_refused(server, before + 24 - 8 * processes)
        for call in calls:
            try:
                answer = pb.ModelInferResponse.FromString(await call.read())
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                assert "answers are not read yet by its clients" in (exc.details() or "")
            else:
                assert len(answer.raw_output_contents[0]) == ANSWER
                codes.append(grpc.StatusCode.OK)
        assert codes.count(grpc.StatusCode.OK) <= 8 * processes, codes
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 24 - 8 * processes, codes
    finally:
        for channel in channels:
            await channel.close()
    # Their connections closed, the answers are forgotten (a moment later): served again.
    deadline = time.monotonic() + 15
    async with grpc.aio.insecure_channel(server.target, options=BIG_ANSWERS) as channel:
        while True:
            try:
                answer = await channel.unary_unary(INFER)(_request(), metadata=METADATA, timeout=10)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "still refused"
                await asyncio.sleep(0.05)
        assert len(pb.ModelInferResponse.FromString(answer).raw_output_contents[0]) == ANSWER


async def test_a_batch_s_answers_to_clients_that_read_are_all_answered(server: Server) -> None:
    """Eight answers of one batch, 8 MiB in all, to a client that reads: all handed over
    before any is written, twice the tenant's bound and, on a stream, four answers to
    twice its bound. Refused at the bound itself, half of them were."""
    async with grpc.aio.insecure_channel(server.target, options=BIG_ANSWERS) as channel:
        method = channel.unary_unary(INFER)
        answers = await asyncio.gather(
            *(method(_request(model="widen_burst"), metadata=METADATA, timeout=30)
              for _ in range(8))
        )  # fmt: skip
        assert all(len(pb.ModelInferResponse.FromString(a).raw_output_contents[0]) == ANSWER
                   for a in answers)  # fmt: skip
        stream = channel.stream_stream(STREAM)(metadata=METADATA)
        for index in range(4):
            await stream.write(_request(str(index), model="widen_burst"))
        for _ in range(4):
            answer = pb.ModelStreamInferResponse.FromString(await stream.read())
            assert not answer.error_message, answer.error_message
        stream.cancel()


def _rest_call(port: int) -> socket.socket:
    """A REST call of acme asking for its answer in binary, sent whole on a connection
    of its own whose client reads nothing yet (its receive buffer kept small)."""
    head = json.dumps(
        {
            "inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}],
            "outputs": [{"name": "Y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return unread_post(
        port, "/v2/models/widen_batched/infer", {"Authorization": "Bearer acme-key"}, head
    )


async def test_rest_calls_unread_large_answers_stop_at_the_tenant_s_bound(
    server: Server,
) -> None:
    """The same over REST (served by one process in both layouts), 16 calls whose
    answers of 8 MiB are made in one batch: one is held (alone, past the bound), the
    others refused 429 for unread answers; before, all 16 were held."""
    before = _refusals(server)
    connections = [_rest_call(server.rest_port) for _ in range(16)]
    try:
        await _until_refused(server, before + 15)
        statuses = []
        for connection in connections:
            connection.settimeout(10)
            answer = http.client.HTTPResponse(connection)
            answer.begin()
            body = answer.read()
            statuses.append(answer.status)
            if answer.status == 429:
                assert b"answers are not read yet by its clients" in body
            else:
                assert answer.status == 200 and len(body) > 8 * MIB
    finally:
        for connection in connections:
            connection.close()
    assert statuses.count(200) == 1 and statuses.count(429) == 15, statuses
