"""Model control against a real server and Triton's own client: a model that fails to
load leaves the others serving and is listed UNAVAILABLE with its reason;
RepositoryModelLoad re-reads a model's entry from the configuration file and switches
to it once ready; RepositoryModelUnload stops routing and lets calls in flight answer;
both are refused to tenant keys. The tests marked ``both_kinds`` run against
``workers: 2`` too (a server each: model control is forwarded to the engine, which
re-reads the file); the others read or hold the server's insides (one process)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from tritonclient.utils import InferenceServerException

from mandant.config import load_config
from mandant.tenancy.keys import hash_key
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.integration import control_models
from tests.servers import ECHO_MODEL, SERVER_KINDS, Server, ServerThread, metric, serve

ADMIN_KEY = "admin-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
ACME = {"authorization": "Bearer acme-key"}
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def model(name: str, factory: str) -> dict[str, Any]:
    return {**ECHO_MODEL, "name": name, "factory": f"tests.integration.control_models:{factory}"}


def write_config(path: Path, models: list[dict[str, Any]]) -> Path:
    data = {
        "server": {
            "grpc_port": 0,
            "http_port": 0,
            "rest_port": 0,
            "grace_s": 30,
            "admin_keys": [hash_key("admin-key")],
        },
        "tenants": [{"id": "acme", "api_keys": [hash_key("acme-key")]}],
        "models": models,
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "mandant.yaml",
        [ECHO_MODEL, model("broken", "broken"), model("gated", "gated")],
    )


both_kinds = pytest.mark.parametrize("server", SERVER_KINDS, indirect=True)


@pytest.fixture
def server(request: pytest.FixtureRequest, config_file: Path) -> Iterator[Server]:
    """One process, or the kind a ``both_kinds`` test names."""
    kind = getattr(request, "param", SERVER_KINDS[0])
    control_models.RELEASE.clear()
    running = serve(kind, load_config(config_file), config_file.parent, config_file)
    try:
        yield running
    finally:
        control_models.RELEASE.set()  # no call stays blocked in the model
        running.stop()


def infer(client: tc.InferenceServerClient, name: str, headers: dict[str, str]) -> np.ndarray:
    tensor = tc.InferInput("INPUT0", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = client.infer(name, [tensor], headers=headers)
    output = result.as_numpy("OUTPUT0")
    assert output is not None
    return output


def code_of(call: Any) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status())


def index(client: tc.InferenceServerClient) -> dict[str, dict[str, str]]:
    listed = client.get_model_repository_index(headers=ACME, as_json=True)
    return {m["name"]: m for m in listed["models"]}


def test_a_model_that_fails_to_load_leaves_the_others_serving(server: Server) -> None:
    client = tc.InferenceServerClient(server.target)
    assert client.is_server_ready()
    np.testing.assert_array_equal(infer(client, "echo", ACME), X)
    listed = index(client)
    assert listed["echo"]["state"] == "READY"
    assert listed["broken"]["state"] == "UNAVAILABLE"
    # Tenants are told it failed, not why: the cause may name files or hosts.
    assert listed["broken"]["reason"] == "failed to load; the operator's log has the cause"
    with pytest.raises(InferenceServerException) as load:  # an admin is told the cause
        client.load_model("broken", headers=ADMIN)
    assert "weights missing" in str(load.value.message())
    assert code_of(lambda: infer(client, "broken", ACME)) == "StatusCode.UNAVAILABLE"
    assert not client.is_model_ready("broken", headers=ACME)
    failures = metric(server, ADMIN_KEY, "mandant_model_load_failures_total", model="broken")
    assert failures == 2  # at start, and the load
    ready = metric(server, ADMIN_KEY, "mandant_model_ready", model="broken", version="1", tenant="")
    assert ready == 0


def test_every_model_failing_leaves_a_running_server_that_is_not_ready(tmp_path: Path) -> None:
    path = write_config(tmp_path / "mandant.yaml", [model("broken", "broken")])
    with ServerThread(load_config(path), tmp_path, path) as running:
        client = tc.InferenceServerClient(running.target)
        assert client.is_server_live()
        assert not client.is_server_ready()


@both_kinds
def test_load_switches_to_the_file_s_entry_and_tenant_keys_are_refused(
    server: Server, config_file: Path
) -> None:
    client = tc.InferenceServerClient(server.target)
    np.testing.assert_array_equal(infer(client, "echo", ACME), X)
    write_config(config_file, [model("echo", "doubled"), {**ECHO_MODEL, "name": "broken"}])

    assert code_of(lambda: client.load_model("echo", headers=ACME)) == (
        "StatusCode.UNAUTHENTICATED"
    )
    np.testing.assert_array_equal(infer(client, "echo", ACME), X)  # not reloaded
    client.load_model("echo", headers=ADMIN)
    np.testing.assert_array_equal(infer(client, "echo", ACME), X * 2)

    client.load_model("broken", headers=ADMIN)  # fixed in the file: now it serves
    assert index(client)["broken"] == {"name": "broken", "version": "1", "state": "READY"}
    np.testing.assert_array_equal(infer(client, "broken", ACME), X)

    assert code_of(lambda: client.load_model("nope", headers=ADMIN)) == "StatusCode.NOT_FOUND"


@both_kinds
def test_a_load_failure_that_names_a_unix_socket_is_told_as_it_is(
    server: Server, config_file: Path
) -> None:
    """With workers: 2, a front end took any UNAVAILABLE answer of the engine quoting
    a Unix address for its own failure to reach the engine: the admin was told the
    engine was not reachable, not why the model failed."""
    client = tc.InferenceServerClient(server.target)
    write_config(config_file, [ECHO_MODEL, model("broken", "broken_at_a_socket")])
    with pytest.raises(InferenceServerException) as load:
        client.load_model("broken", headers=ADMIN)
    assert "weights service at unix:/run/weights.sock refused" in str(load.value.message())
    np.testing.assert_array_equal(infer(client, "echo", ACME), X)


def test_a_load_that_fails_keeps_the_old_model_serving(
    server: ServerThread, config_file: Path
) -> None:
    client = tc.InferenceServerClient(server.target)
    write_config(config_file, [model("echo", "broken")])
    assert code_of(lambda: client.load_model("echo", headers=ADMIN)) == "StatusCode.UNAVAILABLE"
    np.testing.assert_array_equal(infer(client, "echo", ACME), X)
    assert index(client)["echo"]["state"] == "READY"


async def test_unload_lets_calls_in_flight_answer_and_routes_no_new_ones(
    server: ServerThread,
) -> None:
    assert server.app is not None
    registry = server.app.registry
    client = tc.InferenceServerClient(server.target)
    assert code_of(lambda: client.unload_model("gated", headers=ACME)) == (
        "StatusCode.UNAUTHENTICATED"
    )
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="gated")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=list(X.shape))
        request.raw_input_contents.append(X.tobytes())
        metadata = tuple(ACME.items())
        in_flight = [
            asyncio.ensure_future(stub.ModelInfer(request, metadata=metadata)) for _ in range(3)
        ]
        (gated,) = [m for m in registry.all() if m.key.name == "gated"]
        while gated.calls < 3:  # one running, two queued behind the model's one instance
            assert not any(call.done() for call in in_flight)
            await asyncio.sleep(0.01)

        unloaded = threading.Thread(
            target=client.unload_model, args=("gated",), kwargs={"headers": ADMIN}
        )
        unloaded.start()
        while any(m.key.name == "gated" for m in registry.all()):
            assert unloaded.is_alive()
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(request, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert unloaded.is_alive()  # waits for the calls in flight

        control_models.RELEASE.set()
        answers = await asyncio.gather(*in_flight)
        await asyncio.to_thread(unloaded.join, 30)
    assert not unloaded.is_alive()
    for answer in answers:
        assert answer.raw_output_contents[0] == X.tobytes()
    assert "gated" not in index(client)
    np.testing.assert_array_equal(infer(client, "echo", ACME), X)  # the others untouched
    assert code_of(lambda: client.unload_model("gated", headers=ADMIN)) == "StatusCode.NOT_FOUND"


def test_a_reload_loads_added_and_changed_models_and_unloads_removed_ones(
    server: ServerThread, tmp_path: Path
) -> None:
    app = server.app
    assert app is not None
    client = tc.InferenceServerClient(server.target)
    path = write_config(
        tmp_path / "reloaded.yaml",
        [model("echo", "doubled"), model("broken", "broken"), {**ECHO_MODEL, "name": "added"}],
    )

    async def reload() -> list[str]:
        app.reload(load_config(path))
        assert app.model_changes is not None
        return await app.model_changes

    changes = server.call(reload())
    assert sorted(changes) == [
        "model 'added' loaded",
        "model 'broken' not loaded: model 'broken' version 1 failed to load: ModelLoadError: "
        "cannot load model 'broken' version 1: weights missing",
        "model 'echo' loaded",
        "model 'gated' unloaded",
    ]
    np.testing.assert_array_equal(infer(client, "echo", ACME), X * 2)
    np.testing.assert_array_equal(infer(client, "added", ACME), X)
    listed = index(client)
    assert sorted(listed) == ["added", "broken", "echo"]
    assert listed["broken"]["state"] == "UNAVAILABLE"
    assert code_of(lambda: infer(client, "gated", ACME)) == "StatusCode.NOT_FOUND"


async def test_no_call_fails_while_a_load_switches_the_model(
    server: Server, config_file: Path
) -> None:
    client = tc.InferenceServerClient(server.target)
    write_config(config_file, [model("echo", "doubled")])
    loaded = threading.Thread(target=client.load_model, args=("echo",), kwargs={"headers": ADMIN})
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="echo")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=list(X.shape))
        request.raw_input_contents.append(X.tobytes())
        metadata = tuple(ACME.items())

        async def caller() -> list[bytes]:
            answers = []
            while loaded.is_alive() or not answers:
                answer = await stub.ModelInfer(request, metadata=metadata)
                answers.append(answer.raw_output_contents[0])
            return answers

        loaded.start()
        answers = [
            a for batch in await asyncio.gather(*(caller() for _ in range(4))) for a in batch
        ]
        await asyncio.to_thread(loaded.join, 30)
        after = await stub.ModelInfer(request, metadata=metadata)
    assert set(answers) <= {X.tobytes(), (X * 2).tobytes()}  # every call answered
    assert after.raw_output_contents[0] == (X * 2).tobytes()
