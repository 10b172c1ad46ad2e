"""Gathering at the front end on a real server (``scheduling/gather.py``): under a flood
of unary calls from two tenants, calls are held and let go together, and every call is
answered with its own input, whichever group it ran in, and ``/metrics`` counts the
groups (with ``workers: 2``, every front end's, in the engine); ``front_gather_ms: 0``
turns gathering off."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from mandant.config import MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from mandant_client._proto import grpc_service_pb2 as pb
from tests.servers import ECHO_MODEL, Server, ServerThread, WorkersServer, metric

INFER = "/inference.GRPCInferenceService/ModelInfer"
KEYS = {"a": "a-key", "b": "b-key"}
#: A channel of its own connection: the kernel spreads connections over front ends.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
GROUPS, GATHERED = "mandant_front_gather_groups_total", "mandant_front_gathered_calls_total"


ADMIN_KEY = "admin-key"


def _config(**server: float) -> MandantConfig:
    return parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "admin_keys": [hash_key(ADMIN_KEY)],
                **server,
            },
            "tenants": [
                {"id": tenant, "api_keys": [hash_key(key)]} for tenant, key in KEYS.items()
            ],
            "models": [ECHO_MODEL],
        },
        "test",
    )


async def _flood(
    target: str, calls: int, inflight: int, connections: int = 1
) -> list[tuple[float, float]]:
    """``calls`` unary calls, ``inflight`` at a time over ``connections`` connections,
    alternating tenants, each with its own value: (value sent, value answered) for
    each."""
    answered: list[tuple[float, float]] = []
    values = iter(range(calls))

    async def worker(channel: grpc.aio.Channel) -> None:
        infer = channel.unary_unary(
            INFER,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        for value in values:
            tenant = "ab"[value % 2]
            request = pb.ModelInferRequest(model_name="echo", id=str(value))
            request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(np.full((1, 4), value, np.float32).tobytes())
            response = await infer(
                request, metadata=(("authorization", f"Bearer {KEYS[tenant]}"),), timeout=30
            )
            assert response.id == str(value)
            (out,) = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(1, 4)
            assert set(out.tolist()) == {float(value)}, (value, out)
            answered.append((float(value), float(out[0])))

    channels = [
        grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(connections)
    ]
    try:
        await asyncio.gather(*(worker(channels[n % connections]) for n in range(inflight)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return answered


def _gathered(server: Server) -> tuple[float | None, float | None]:
    """``/metrics``' groups and gathered calls once they stand still (a front end of
    ``workers: N`` sends its events to the engine within 50 ms of its answers)."""
    shown = None, None
    for _ in range(50):
        now = metric(server, ADMIN_KEY, GROUPS), metric(server, ADMIN_KEY, GATHERED)
        if now == shown:
            break
        shown = now
        time.sleep(0.2)
    return shown


@pytest.mark.parametrize("workers", [1, 2])
def test_calls_of_a_flood_are_held_together_and_answered_their_own(
    tmp_path: Path, workers: int
) -> None:
    """... and ``/metrics`` counts the groups and the calls in them: with ``workers:
    2``, the front ends' counts in the engine's ``/metrics``."""
    config = _config(front_gather_ms=20)
    with (
        ServerThread(config, tmp_path) if workers == 1 else WorkersServer(config, tmp_path)
    ) as server:
        answered = asyncio.run(_flood(server.target, 3000, 64, connections=4))
        groups, gathered = _gathered(server)
    assert len(answered) == 3000 and all(sent == got for sent, got in answered)
    assert groups is not None and gathered is not None
    assert groups > 0 and gathered > groups, (groups, gathered)  # groups of several calls
    assert gathered <= 3000  # each call is counted in one group at most


@pytest.mark.parametrize("server", [{"front_gather_ms": 0}, {"front_gather_calls": 1}])
def test_gathering_off(tmp_path: Path, server: dict[str, float]) -> None:
    with ServerThread(_config(**server), tmp_path) as running:
        assert running.app is not None
        assert running.app.grpc.gate.gather is None
        answered = asyncio.run(_flood(running.target, 200, 16))
        assert (metric(running, ADMIN_KEY, GROUPS), metric(running, ADMIN_KEY, GATHERED)) == (0, 0)
    assert len(answered) == 200


def test_groups_are_at_most_the_door_slots(tmp_path: Path) -> None:
    """Held calls keep their places at the door, so with 8 slots a group of 32 could
    never fill: the server makes groups of at most 8."""
    with ServerThread(_config(front_door_slots=8), tmp_path) as running:
        assert running.app is not None
        gather = running.app.grpc.gate.gather
        assert gather is not None and gather.target == 8
