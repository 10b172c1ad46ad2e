"""Keepalive: a client may ping the server (to find a dead connection), with calls or
without, at ``KEEPALIVE_MIN_PING_S`` (10 s; 0.5 s here): gRPC's default sent a client
pinging more often than every 5 minutes without calls away (GOAWAY ``too_many_pings``),
and its next call failed UNAVAILABLE ``Too many pings``."""

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
from tests.servers import ECHO_MODEL, ServerThread

KEY = "acme-key"
#: Long enough for gRPC's default to send the client away (its third ping).
IDLE_S = 4.0


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerThread]:
    monkeypatch.setattr(grpc_server, "KEEPALIVE_MIN_PING_S", 0.5, raising=False)
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0},
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
