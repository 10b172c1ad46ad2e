"""Keepalive: a client may ping the server (to find a dead connection), with calls or
without, at ``KEEPALIVE_MIN_PING_S`` (10 s; 0.5 s here): gRPC's default sent a client
pinging more often than every 5 minutes without calls away (GOAWAY ``too_many_pings``),
and its next call failed UNAVAILABLE ``Too many pings``. And the server pings each
connection every ``KEEPALIVE_TIME_S`` (60 s; 0.5 s here) and closes one whose client
does not answer within ``KEEPALIVE_TIMEOUT_S`` (20 s; 0.5 s here). The other way, the
channels to Triton, and mandant_client with the keepalive its README gives, find a
server gone silent. Each sets gRPC's ``ping_timeout_ms``: without it, gRPC waits a
minute for a ping's answer, whatever the keepalive timeout."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import numpy as np
import pytest

from mandant.backends.channels import CHANNEL_OPTIONS, ChannelPool
from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant.transport.grpc import server as grpc_server
from mandant_client import Client, Unavailable
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


class SilentPeer:
    """An HTTP/2 server that answers the connection's first exchange, then nothing, not
    even pings: a server whose host or network is gone, the connection still open."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        peer, _ = self._listener.accept()
        self._sockets.append(peer)
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        connection.initiate_connection()
        peer.sendall(connection.data_to_send())
        peer.settimeout(0.1)
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            with contextlib.suppress(TimeoutError):
                data = peer.recv(1 << 16)
                connection.receive_data(data)
                peer.sendall(connection.data_to_send())

    def close(self) -> None:
        for peer in self._sockets:
            peer.close()
        self._listener.close()


#: The keepalive the Python client's README gives, in seconds here: 1 s and 1 s.
CLIENT_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.http2.ping_timeout_ms", 1000),
]


def test_a_client_with_the_readmes_keepalive_finds_a_silent_server() -> None:
    """mandant_client with the README's keepalive options (scaled down): a call to a
    server gone silent fails Unavailable about a ping and its timeout later, not at its
    deadline (with keepalive_time and keepalive_timeout alone: at its deadline)."""
    peer = SilentPeer()
    try:
        with Client(peer.target, api_key=KEY, options=CLIENT_KEEPALIVE) as client:
            start = time.monotonic()
            with pytest.raises(Unavailable):
                client.infer("echo", {"INPUT0": np.ones((1, 4), np.float32)}, timeout_s=30)
            assert time.monotonic() - start < 10
    finally:
        peer.close()


#: Where gRPC's keepalive times are set: a ping's interval, and its answer's timeout.
KEEPALIVE_TIMES = {
    "grpc.keepalive_time_ms",
    "grpc.keepalive_timeout_ms",
    "grpc.http2.ping_timeout_ms",
}


async def test_the_triton_channels_keepalive_finds_a_silent_server() -> None:
    """The channel to a Triton server (``CHANNEL_OPTIONS``, its keepalive times scaled
    down to 1 s): a call to a server gone silent fails UNAVAILABLE a ping and its
    timeout later, not at its deadline."""
    scaled = tuple(
        (name, 1000 if name in KEEPALIVE_TIMES else value) for name, value in CHANNEL_OPTIONS
    )
    peer = SilentPeer()
    pool = ChannelPool(scaled)
    try:
        channel = pool.acquire(peer.target)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.ServerLive(pb.ServerLiveRequest(), timeout=30)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 10
    finally:
        await pool.release(peer.target)
        peer.close()
