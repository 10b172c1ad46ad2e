"""``server.max_connection_age_s``: the server closes a client's HTTP/2 connection
(GOAWAY) after that age, and the client's calls go on, on a new connection; without
it one connection serves the client for good."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.servers import ServerThread, demo_config


def _connections_during_calls(target: str, seconds: float) -> tuple[int, int]:
    """How many times the channel became READY (one per connection) while it made
    calls for ``seconds``, and how many calls it made (each one succeeded)."""
    readies = 0
    lock = threading.Lock()

    def watch(state: grpc.ChannelConnectivity) -> None:
        nonlocal readies
        if state is grpc.ChannelConnectivity.READY:
            with lock:
                readies += 1

    calls = 0
    with grpc.insecure_channel(target) as channel:
        channel.subscribe(watch, try_to_connect=True)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            stub.ServerLive(pb.ServerLiveRequest(), wait_for_ready=True, timeout=5)
            calls += 1
            time.sleep(0.01)
        channel.unsubscribe(watch)
    return readies, calls


@pytest.mark.parametrize("age_s", [None, 0.5])
def test_connections_are_closed_at_their_age_and_calls_go_on(
    age_s: float | None, tmp_path: Path
) -> None:
    config = demo_config(max_connection_age_s=age_s, grace_s=1)
    with ServerThread(config, tmp_path) as server:
        readies, calls = _connections_during_calls(server.target, 2.5)
    assert calls > 50
    if age_s is None:
        assert readies == 1
    else:
        assert readies >= 3  # ~every 0.5 s (±10% jitter) over 2.5 s: a new connection
