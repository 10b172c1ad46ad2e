"""Keepalive: a client may ping the server (to find a dead connection), with calls or
without, at ``KEEPALIVE_MIN_PING_S`` (10 s; 0.5 s here): gRPC's default sent a client
pinging more often than every 5 minutes without calls away (GOAWAY ``too_many_pings``),
and its next call failed UNAVAILABLE ``Too many pings``. And the server pings each
connection every ``KEEPALIVE_TIME_S`` (60 s; 0.5 s here) and closes one whose client
does not answer within ``KEEPALIVE_TIMEOUT_S`` (20 s; 0.5 s here)."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant.transport.grpc import server as grpc_server
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.integration.stalled_calls import StalledCalls
from tests.servers import ECHO_MODEL, ServerThread

KEY = "acme-key"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
#: Long enough for gRPC's default to send the client away (its third ping).
IDLE_S = 4.0


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerThread]:
    monkeypatch.setattr(grpc_server, "KEEPALIVE_MIN_PING_S", 0.5, raising=False)
    monkeypatch.setattr(grpc_server, "KEEPALIVE_TIME_S", 0.5, raising=False)
    monkeypatch.setattr(grpc_server, "KEEPALIVE_TIMEOUT_S", 0.5, raising=False)
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "max_tenant_streams": 1},
            "tenants": [{"id": "acme", "api_keys": [hash_key(KEY)]}],
            "models": [ECHO_MODEL],
        }
    )
    with ServerThread(config, tmp_path) as running:
        yield running


def test_a_client_pinging_at_the_allowed_rate_is_not_sent_away(server: ServerThread) -> None:
    """A stream open and idle (a multiplexed client between calls), the client pinging
    every second: the server no longer sends it away, and the stream and the next
    calls are served."""
    row = np.ones((1, 4), np.float32)
    message = pb.ModelInferRequest(model_name="echo", id="1")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=row.shape)
    message.raw_input_contents.append(row.tobytes())
    options = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    metadata = (("authorization", f"Bearer {KEY}"),)
    sent: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    with grpc.insecure_channel(server.target, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = stub.ModelStreamInfer(iter(sent.get, None), metadata=metadata, timeout=60)
        sent.put(message)
        assert next(answers).infer_response.id == "1"
        time.sleep(IDLE_S)  # the stream open and idle, the client pinging every second
        message.id = "2"
        sent.put(message)
        assert next(answers).infer_response.id == "2"
        sent.put(None)
        answer = stub.ModelInfer(message, metadata=metadata, timeout=10)
        assert answer.raw_output_contents[0] == row.tobytes()


def test_a_client_that_answers_no_ping_is_let_go_with_its_streams(server: ServerThread) -> None:
    """A client gone without a word (raw HTTP/2 that never answers the server's pings)
    holding its tenant's one stream (``max_tenant_streams: 1``), part of a message sent:
    the server closes its connection, and the tenant opens a stream again. Before, the
    connection lived until TCP gave up (never, on loopback), the stream's place with it."""
    port = int(server.target.rsplit(":", 1)[1])
    gone = StalledCalls(port, STREAM, KEY, declared=1 << 20, sent=4096)
    row = np.ones((1, 4), np.float32)
    message = pb.ModelInferRequest(model_name="echo", id="after")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=row.shape)
    message.raw_input_contents.append(row.tobytes())
    metadata = (("authorization", f"Bearer {KEY}"),)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:  # the one stream is the gone one's
                list(stub.ModelStreamInfer(iter([message]), metadata=metadata, timeout=10))
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            deadline = time.monotonic() + 10
            while True:
                try:
                    answers = stub.ModelStreamInfer(iter([message]), metadata=metadata, timeout=10)
                    assert [a.infer_response.id for a in answers] == ["after"]
                    break
                except grpc.RpcError as error:
                    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "the silent client was never let go"
                    time.sleep(0.2)
    finally:
        gone.close()
