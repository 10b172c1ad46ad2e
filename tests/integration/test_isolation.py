"""The isolation matrix: every demo tenant × every model × every RPC that names a
model (metadata, readiness, config, statistics, inference unary and streamed). What
a tenant may not see does not exist for it: NOT_FOUND with exactly the message an
unknown model gets."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.servers import DEMO_KEYS, Server, auth

#: tenant → model → the platform it sees (None: the model does not exist for it)
VISIBLE: dict[str, dict[str, str | None]] = {
    "acme": {"classifier": "pytorch", "echo": "pytorch", "fraud": "pytorch_torchscript"},
    "globex": {"classifier": "pytorch", "echo": "pytorch", "fraud": None},
    "initech": {"classifier": "pytorch", "echo": "pytorch", "fraud": None},
}
MODELS = ["classifier", "echo", "fraud", "no-such-model"]
INPUT_WIDTH = {"classifier": 256, "echo": 4, "fraud": 32, "no-such-model": 4}


def _input(model: str) -> list[triton.InferInput]:
    x = np.full((2, INPUT_WIDTH[model]), 0.5, np.float32)
    tensor = triton.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def _calls(
    client: triton.InferenceServerClient, model: str, headers: dict[str, str]
) -> dict[str, object]:
    return {
        "ModelMetadata": lambda: client.get_model_metadata(model, headers=headers),
        "ModelReady": lambda: client.is_model_ready(model, headers=headers),
        "ModelConfig": lambda: client.get_model_config(model, headers=headers),
        "ModelStatistics": lambda: client.get_inference_statistics(model, headers=headers),
        "ModelInfer": lambda: client.infer(model, _input(model), headers=headers),
        "ModelStreamInfer": lambda: _streamed(client, model, headers),
    }


def _streamed(
    client: triton.InferenceServerClient, model: str, headers: dict[str, str]
) -> triton.InferResult:
    """One message on a ModelStreamInfer stream: its answer, or its error raised."""
    answers: queue.Queue[tuple[triton.InferResult | None, InferenceServerException | None]]
    answers = queue.Queue()
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)), headers=headers
    )
    try:
        client.async_stream_infer(model, _input(model))
        result, error = answers.get(timeout=30)
    finally:
        client.stop_stream()
    if error is not None:
        raise error
    assert result is not None
    return result


RPCS = ["ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics", "ModelInfer"]


@pytest.mark.parametrize("tenant", list(VISIBLE))
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rpc", [*RPCS, "ModelStreamInfer"])
def test_matrix(demo: Server, tenant: str, model: str, rpc: str) -> None:
    client = triton.InferenceServerClient(demo.target)
    call = _calls(client, model, auth(tenant))[rpc]
    if VISIBLE[tenant].get(model):
        result = call()  # type: ignore[operator]
        if rpc == "ModelReady":
            assert result is True
        if rpc == "ModelMetadata":
            assert result.platform == VISIBLE[tenant][model]
        return
    if rpc == "ModelReady":  # as Triton answers for an unknown model (tools poll it)
        assert call() is False  # type: ignore[operator]
        return
    with pytest.raises(InferenceServerException) as err:
        call()  # type: ignore[operator]
    if rpc != "ModelStreamInfer":  # a stream's message answers with its text alone
        assert err.value.status() == "StatusCode.NOT_FOUND"
    assert err.value.message() == f"model '{model}' not found"


@pytest.mark.parametrize("tenant", list(VISIBLE))
def test_repository_index_lists_only_visible_models(demo: Server, tenant: str) -> None:
    client = triton.InferenceServerClient(demo.target)
    index = client.get_model_repository_index(headers=auth(tenant), as_json=True)
    names = sorted(m["name"] for m in index["models"])
    assert names == sorted(m for m, platform in VISIBLE[tenant].items() if platform)
    assert all(m["state"] == "READY" for m in index["models"])


def test_tuned_variant_answers_globex_only(demo: Server) -> None:
    client = triton.InferenceServerClient(demo.target)
    outputs = {
        tenant: client.infer("classifier", _input("classifier"), headers=auth(tenant)).as_numpy(
            "OUTPUT0"
        )
        for tenant in DEMO_KEYS
    }
    # the same model; float sums may differ in the last bits with the input's memory
    np.testing.assert_allclose(outputs["acme"], outputs["initech"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(outputs["acme"], outputs["globex"])


@pytest.mark.parametrize("rpc", ["ModelMetadata", "ModelReady", "ModelInfer", "RepositoryIndex"])
@pytest.mark.parametrize("key", [None, "wrong-key", "Bearer", "acme-demo-key-2"])
def test_model_rpcs_need_a_valid_key(demo: Server, rpc: str, key: str | None) -> None:
    client = triton.InferenceServerClient(demo.target)
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    calls = {
        **_calls(client, "classifier", headers),
        "RepositoryIndex": lambda: client.get_model_repository_index(headers=headers),
    }
    with pytest.raises(InferenceServerException) as err:
        calls[rpc]()  # type: ignore[operator]
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"
    assert err.value.message() == "missing or invalid API key"


def test_probes_and_health_stay_open(demo: Server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    client = triton.InferenceServerClient(demo.target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "mandant"
    with grpc.insecure_channel(demo.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(demo: Server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(demo.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="inference.GRPCInferenceService"
            ),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests)))
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "mandant.admin.v1.AdminService",
        "grpc.health.v1.Health",
    } <= names
    assert described.file_descriptor_response.file_descriptor_proto
