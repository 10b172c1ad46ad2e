"""Readiness on a real server: per model (ModelReady, ``mandant_model_ready``), the
server's by ``server.ready_when``, with ``/readyz``, ServerReady and gRPC health
always agreeing; and on shutdown, while in-flight calls finish, ``/readyz`` is 503
and gRPC health watchers are told NOT_SERVING."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from mandant.config import ServerConfig, parse_config
from mandant.registry import ModelRegistry
from mandant.scheduling.direct import DirectScheduler
from mandant.service import DataPlane
from mandant.tenancy.directory import TenantDirectory
from mandant.tenancy.keys import hash_key
from mandant.transport.grpc.server import GrpcServer
from mandant_client import Client
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.fakes import FakeBackend
from tests.servers import (
    ECHO_MODEL,
    SERVER_KINDS,
    Server,
    ServerThread,
    free_port,
    http_get,
    http_get_port,
    serving,
)

ADMIN = "readiness-admin"
KEY = (("authorization", "Bearer t-key"),)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _config(ready_when: str | None, models: list[dict[str, Any]]) -> Any:
    server: dict[str, Any] = {"grpc_port": 0, "http_port": 0, "admin_keys": [hash_key(ADMIN)]}
    if ready_when is not None:
        server["ready_when"] = ready_when
    return parse_config(
        {
            "server": server,
            "tenants": [{"id": "t", "api_keys": [hash_key("t-key")]}],
            "models": models,
        }
    )


def _unreachable_triton() -> dict[str, Any]:
    """A Triton model whose server is not there: it starts, and stays not ready."""
    return {
        "name": "remote",
        "backend": "triton",
        "triton": {"url": f"127.0.0.1:{free_port()}", "model": "m", "health_interval_s": 0.2},
        "inputs": ECHO_MODEL["inputs"],
        "outputs": ECHO_MODEL["outputs"],
    }


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    return int(reply.status)


#: (server kind, ``ready_when``): every setting against one process; against
#: ``workers: 2`` the one where the engine is not ready (the front ends' gRPC health
#: follows the engine's readiness).
HALF_READY = [
    *((SERVER_KINDS[0], ready_when) for ready_when in (None, "any_model", "all_models")),
    (SERVER_KINDS[1], "all_models"),
]


@pytest.fixture(params=HALF_READY, ids=[f"{kind}-{when}" for kind, when in HALF_READY])
def half_ready(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, bool]]:
    """A server with a ready model and an unready one, and whether it is ready."""
    kind, ready_when = request.param
    config = _config(ready_when, [ECHO_MODEL, _unreachable_triton()])
    with serving(kind, config, tmp_path) as server:
        yield server, ready_when != "all_models"  # the default is any_model


def test_one_unready_model_and_the_server_agree_everywhere(
    half_ready: tuple[Server, bool],
) -> None:
    server, expected = half_ready
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest()).ready is expected
        for name, ready in (("echo", True), ("remote", False)):
            reply = stub.ModelReady(pb.ModelReadyRequest(name=name), metadata=KEY)
            assert reply.ready is ready, name
    status, _ = http_get(server, "/readyz")
    assert status == (200 if expected else 503)
    assert _health(server.target) == (SERVING if expected else NOT_SERVING)
    _, metrics = http_get(server, "/metrics", key=ADMIN)
    ready = {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(metrics.decode())
        for sample in family.samples
        if sample.name == "mandant_model_ready"
    }
    assert ready == {"echo": 1.0, "remote": 0.0}
    if expected:  # the replica stays in service: the ready model answers
        with Client(server.target, api_key="t-key") as client:
            client.infer("echo", {"INPUT0": np.ones((1, 2), np.float32)})


def test_a_triton_model_whose_server_does_not_answer_says_so_in_the_index(
    tmp_path: Path,
) -> None:
    """Its reason was empty, beside the failed model's text; it says why, never where
    (the index is the tenants': no address, no port)."""
    remote = {**_unreachable_triton(), "triton": {"url": "127.0.0.1:1", "model": "m"}}
    with ServerThread(_config(None, [ECHO_MODEL, remote]), tmp_path) as server:
        with Client(server.target, api_key="t-key") as client:
            listed = {m.name: m for m in client.models()}
        rest = triton_http.InferenceServerClient(f"127.0.0.1:{server.rest_port}")
        over_rest = {m["name"]: m for m in rest.get_model_repository_index(headers=dict(KEY))}
    said = "its Triton backend does not answer"
    assert (listed["remote"].state, listed["remote"].reason) == ("UNAVAILABLE", said)
    assert (listed["echo"].state, listed["echo"].reason) == ("READY", "")
    assert over_rest["remote"] == {
        "name": "remote",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": said,
    }
    assert over_rest["echo"]["reason"] == ""


def test_shutdown_turns_readyz_and_grpc_health_off_while_calls_finish(tmp_path: Path) -> None:
    slow = {
        **ECHO_MODEL,
        "name": "slow",
        "factory": "tests.integration.slow_models:sleepy",
        "factory_args": {"seconds": 1.5},
    }
    server = ServerThread(_config(None, [slow]), tmp_path).start()
    app = server.app
    assert app is not None
    try:
        http_port = app.http_port
        assert http_get_port(http_port, "/readyz")[0] == 200
        channel = grpc.insecure_channel(server.target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        assert next(watch).status == SERVING
        results: dict[str, Any] = {}

        def call() -> None:
            with Client(server.target, api_key="t-key") as client:
                results["out"] = client.infer("slow", {"INPUT0": np.ones((1, 2), np.float32)})

        worker = threading.Thread(target=call)
        worker.start()
        while app.admission.inflight("t") == 0:  # the call is in the model now
            time.sleep(0.01)
        stopping = threading.Thread(target=server.call, args=(app.aclose(10),))
        stopping.start()
        assert next(watch).status == NOT_SERVING
        while app.admission.inflight("t"):  # draining: the call is still running
            status, body = http_get_port(http_port, "/readyz")
            if status == 503:
                break
        assert (status, body) == (503, b'{"ready": false}')
        # The open Watch ends by itself (status OK) once it has said NOT_SERVING: open,
        # it held the stop for its whole grace (gRPC waits for every call).
        assert list(watch) == []
        worker.join(20)
        assert "out" in results  # the in-flight call finished
        stopping.join(5)  # well within the 10 s grace, the channel still open
        assert not stopping.is_alive()
        channel.close()
    finally:
        server.app = None
        server.stop()


async def test_grpc_health_follows_a_model_that_stops_being_ready(tmp_path: Path) -> None:
    """A real grpc.aio server over a real data plane and registry: when the only
    model's backend stops, health watchers are told NOT_SERVING, like /readyz."""
    spec = parse_config({"models": [ECHO_MODEL]}).model_specs(tmp_path)[0]
    backend = FakeBackend(spec)
    registry = ModelRegistry([spec], lambda _: backend, lambda s, b: DirectScheduler(b, s.name))
    await registry.start()
    plane = DataPlane(TenantDirectory(), registry, ready_when="all_models")
    server = GrpcServer(plane, ServerConfig(grpc_port=0))
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30
            )
            assert (await watch.read()).status == SERVING
            await backend.aclose()  # the model is no longer ready
            assert (await watch.read()).status == NOT_SERVING
            assert plane.ready is False
            watch.cancel()
    finally:
        await server.stop(0)
        await registry.aclose()
