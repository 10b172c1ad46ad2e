"""Triton's ModelConfig and ModelStatistics through ``tritonclient.grpc`` against a real
Mandant server (the demo configuration): resolved per tenant like every model RPC; a
tenant's statistics hold its own calls only; an admin key sees every tenant's."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from tritonclient.utils import InferenceServerException

from mandant.config import parse_config
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.servers import DEMO_CONFIG, SERVER_KINDS, Server, auth, serving, wait_for_calls

ADMIN = auth("admin-demo-key")
#: Calls each tenant makes before the tests look (rows per call).
CALLS = {"acme": [1, 3], "initech": [2], "globex": [4]}


def _config() -> Any:
    """The demo, with globex's tuned classifier batching differently from the base."""
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0}
    tuned = data["models"][1]
    assert (tuned["tenant"], tuned["base"]) == ("globex", "classifier")
    tuned["batching"] = {"max_batch_size": 8, "max_queue_delay_ms": 0.5}
    tuned["instances"] = 2
    return parse_config(data, str(DEMO_CONFIG))


def _input(rows: int, width: int = 256) -> triton.InferInput:
    tensor = triton.InferInput("INPUT0", [rows, width], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, width), np.float32))
    return tensor


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with serving(request.param, _config(), tmp_path_factory.mktemp("modelconfig")) as running:
        client = triton.InferenceServerClient(running.target)
        for tenant, calls in CALLS.items():
            for rows in calls:
                client.infer("classifier", [_input(rows)], headers=auth(tenant))
        with pytest.raises(InferenceServerException):  # a failed call of acme's
            client.infer("classifier", [_input(1, width=3)], headers=auth("acme"))
        client.close()
        wait_for_calls(running, "admin-demo-key", 5)
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.target)
    yield client
    client.close()


def _status(call: Any) -> str:
    with pytest.raises(InferenceServerException) as err:
        call()
    return str(err.value.status())


# -- ModelConfig ------------------------------------------------------------------------


def test_shared_batched_model_config(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("classifier", headers=auth("acme")).config
    assert (config.name, config.backend, config.platform) == ("classifier", "torch", "pytorch")
    assert config.max_batch_size == 64
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", triton.model_config_pb2.TYPE_FP32, [256])
    ]
    assert [(t.name, list(t.dims)) for t in config.output] == [("OUTPUT0", [16])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    (group,) = config.instance_group
    assert group.count == 1 and group.kind == triton.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.version_policy.WhichOneof("policy_choice") == "all"  # the default


def test_tuned_variant_config_for_its_tenant_only(client: triton.InferenceServerClient) -> None:
    tuned = client.get_model_config("classifier", headers=auth("globex")).config
    assert tuned.max_batch_size == 8 and tuned.instance_group[0].count == 2
    assert tuned.dynamic_batching.max_queue_delay_microseconds == 500
    base = client.get_model_config("classifier", headers=auth("initech")).config
    assert base.max_batch_size == 64 and base.instance_group[0].count == 1


def test_unbatched_private_model_keeps_the_batch_dimension(
    client: triton.InferenceServerClient,
) -> None:
    config = client.get_model_config("fraud", headers=auth("acme")).config
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in config.input] == [("INPUT0", [-1, 32])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("SCORE", [-1, 1])]
    as_json = client.get_model_config("fraud", headers=auth("acme"), as_json=True)["config"]
    assert as_json["input"][0]["data_type"] == "TYPE_FP32"


def test_private_model_config_is_not_found_for_others(
    client: triton.InferenceServerClient,
) -> None:
    for tenant in ("globex", "initech"):
        assert _status(lambda t=tenant: client.get_model_config("fraud", headers=auth(t))) == (
            "StatusCode.NOT_FOUND"
        )
    assert _status(lambda: client.get_model_config("classifier", "7", headers=auth("acme"))) == (
        "StatusCode.NOT_FOUND"
    )


def test_model_config_needs_a_tenant_key(client: triton.InferenceServerClient) -> None:
    for headers in (ADMIN, auth("no-such-key"), None):
        assert _status(lambda h=headers: client.get_model_config("classifier", headers=h)) == (
            "StatusCode.UNAUTHENTICATED"
        )


# -- ModelStatistics ----------------------------------------------------------------------


def _by_name(reply: Any) -> dict[str, Any]:
    return {f"{s.name}:{s.version}": s for s in reply.model_stats}


def test_a_tenant_sees_its_own_calls_only(client: triton.InferenceServerClient) -> None:
    (acme,) = client.get_inference_statistics("classifier", headers=auth("acme")).model_stats
    assert (acme.name, acme.version) == ("classifier", "1")
    infer = acme.inference_stats
    assert infer.success.count == 2 and infer.success.ns > 0
    assert infer.fail.count == 1
    assert infer.queue.count == 2 and infer.compute_infer.count == 2
    assert (acme.inference_count, acme.execution_count) == (4, 2)
    # Batches mix tenants: their sizes would say what others sent (admins see them).
    assert not acme.batch_stats
    assert acme.last_inference > 1_600_000_000_000  # ms since the epoch
    (initech,) = client.get_inference_statistics("classifier", headers=auth("initech")).model_stats
    assert initech.inference_stats.success.count == 1 and initech.inference_count == 2
    assert initech.inference_stats.fail.count == 0
    (globex,) = client.get_inference_statistics("classifier", headers=auth("globex")).model_stats
    assert globex.inference_stats.success.count == 1 and globex.inference_count == 4
    assert not globex.batch_stats


def test_every_model_a_tenant_sees_and_not_another_s(
    client: triton.InferenceServerClient,
) -> None:
    acme = _by_name(client.get_inference_statistics(headers=auth("acme")))
    assert sorted(acme) == ["classifier:1", "echo:1", "fraud:1"]
    assert acme["fraud:1"].inference_stats.success.count == 0
    globex = _by_name(client.get_inference_statistics(headers=auth("globex")))
    assert sorted(globex) == ["classifier:1", "echo:1"]
    assert (
        _status(lambda: client.get_inference_statistics("fraud", headers=auth("globex")))
        == "StatusCode.NOT_FOUND"
    )


def test_admin_sees_every_tenant_s_totals(client: triton.InferenceServerClient) -> None:
    totals = _by_name(client.get_inference_statistics(headers=ADMIN))
    assert sorted(totals) == ["acme/fraud:1", "classifier:1", "echo:1", "globex/classifier:1"]
    shared = totals["classifier:1"]  # acme's and initech's calls, not globex's variant
    assert shared.inference_stats.success.count == 3 and shared.inference_count == 6
    assert shared.inference_stats.fail.count == 1
    assert totals["globex/classifier:1"].inference_count == 4
    assert sum(b.compute_infer.count for b in shared.batch_stats) >= 3  # admins see batches
    # Each execution once, whichever tenants' rows it held (summing the tenants' own
    # entries counted a shared batch once per tenant in it).
    assert shared.execution_count == sum(b.compute_infer.count for b in shared.batch_stats)
    assert sum(b.batch_size * b.compute_infer.count for b in shared.batch_stats) == 6
    named = _by_name(client.get_inference_statistics("classifier", headers=ADMIN))
    assert sorted(named) == ["classifier:1", "globex/classifier:1"]
    # "01" is version 1 for an admin too, as for a tenant (it was NOT_FOUND).
    padded = _by_name(client.get_inference_statistics("classifier", "01", headers=ADMIN))
    assert sorted(padded) == ["classifier:1", "globex/classifier:1"]


def test_no_model_name_means_every_model_whatever_the_version(
    client: triton.InferenceServerClient,
) -> None:
    """With no name and a version, an admin got that version's models only, a tenant
    every model (as Triton, which has no model to hold the version to): every model."""
    for headers in (ADMIN, auth("acme")):
        every = _by_name(client.get_inference_statistics(headers=headers))
        assert sorted(_by_name(client.get_inference_statistics("", "2", headers=headers))) == (
            sorted(every)
        )


def test_admin_filters_one_tenant_with_metadata(client: triton.InferenceServerClient) -> None:
    for tenant, calls in CALLS.items():
        headers = {**ADMIN, "mandant-tenant": tenant}
        (stats,) = client.get_inference_statistics("classifier", headers=headers).model_stats
        assert stats.name == "classifier" and stats.inference_count == sum(calls)
    acme_view = client.get_inference_statistics(headers={**ADMIN, "mandant-tenant": "acme"})
    assert acme_view == client.get_inference_statistics(headers=auth("acme"))


def test_admin_naming_no_configured_tenant_is_refused(client: triton.InferenceServerClient) -> None:
    """As GetUsage: a name no tenant has is an error, not an empty tenant's zeros."""
    with pytest.raises(InferenceServerException) as err:
        client.get_inference_statistics(headers={**ADMIN, "mandant-tenant": "acmee"})
    assert str(err.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "no tenant 'acmee' is configured" in str(err.value.message())


def test_statistics_refuse_unknown_keys(client: triton.InferenceServerClient) -> None:
    for headers in (auth("no-such-key"), None):
        assert _status(lambda h=headers: client.get_inference_statistics(headers=h)) == (
            "StatusCode.UNAUTHENTICATED"
        )


def test_stream_calls_count_for_their_tenant(server: Server) -> None:
    request = pb.ModelInferRequest(
        model_name="echo",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 2])
        ],
        raw_input_contents=[np.ones((1, 2), np.float32).tobytes()],
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = list(
            stub.ModelStreamInfer(iter([request, request]), metadata=auth("initech").items())
        )
        assert [a.error_message for a in answers] == ["", ""]
        for _ in range(1000):  # workers: the front end reports the calls just after
            reply = stub.ModelStatistics(
                pb.ModelStatisticsRequest(name="echo"), metadata=auth("initech").items()
            )
            (echo,) = reply.model_stats
            if echo.inference_stats.success.count >= 2:
                break
            time.sleep(0.01)
        assert echo.version == "1" and echo.inference_stats.success.count == 2
        acme = stub.ModelStatistics(
            pb.ModelStatisticsRequest(name="echo"), metadata=auth("acme").items()
        )
        assert acme.model_stats[0].inference_stats.success.count == 0


def test_server_metadata_names_the_extensions(client: triton.InferenceServerClient) -> None:
    extensions = client.get_server_metadata().extensions
    assert {"model_configuration", "statistics", "binary_tensor_data"} <= set(extensions)
