"""A model that is no longer served (unloaded by an admin, or removed by a reload)
leaves no figures behind, on real servers: its series leave ``/metrics``, its rows the
dashboard, its statistics ModelStatistics; loaded again it starts from zero. What a
tenant is billed stays in ``/usage``. The calls that were in flight when it was
unloaded count before its figures go, and do not bring them back after."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mandant.config import load_config
from mandant.tenancy.keys import hash_key
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.integration import control_models
from tests.integration.test_model_control import ACME, ADMIN, ADMIN_KEY, X, infer, model
from tests.servers import ECHO_MODEL, SERVER_KINDS, Server, ServerThread, http_get, serving

GLOBEX = {"authorization": "Bearer globex-key"}


def write_config(path: Path, models: list[dict[str, Any]]) -> Path:
    data = {
        "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "grace_s": 30,
                   "admin_keys": [hash_key(ADMIN_KEY)]},
        "tenants": [{"id": "acme", "api_keys": [hash_key("acme-key")]},
                    {"id": "globex", "api_keys": [hash_key("globex-key")]}],
        "models": models,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return path


def series(server: Server, model: str, prefix: str = "mandant_", **labels: str) -> list[str]:
    """The samples of ``/metrics`` whose name starts with ``prefix``, labelled with
    ``model`` and ``labels``."""
    status, body = http_get(server, "/metrics", ADMIN_KEY)
    assert status == 200, body
    return [
        f"{sample.name}{sample.labels}"
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name.startswith(prefix)
        and sample.labels.get("model") == model
        and labels.items() <= sample.labels.items()
    ]


def dashboard_models(server: Server) -> list[tuple[str, str]]:
    status, body = http_get(server, "/api/dashboard", ADMIN_KEY)
    assert status == 200, body
    return sorted((row["name"], row["owner"]) for row in json.loads(body)["models"])


def usage(server: Server, tenant: str) -> dict[str, Any]:
    status, body = http_get(server, "/usage", ADMIN_KEY)
    assert status == 200, body
    entry: dict[str, Any] = json.loads(body)["tenants"][tenant]
    return entry


def statistics(client: tc.InferenceServerClient, name: str) -> pb.ModelStatistics:
    (stats,) = client.get_inference_statistics(name, headers=ADMIN).model_stats
    return stats


def eventually(check: Callable[[], bool], timeout_s: float = 10) -> None:
    """Until ``check`` holds (``workers: N``: a front end's reports reach the engine a
    little after its answers)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the time given"
        time.sleep(0.02)


def calls_counted(server: Server, tenant: str, name: str) -> float:
    status, body = http_get(server, "/metrics", ADMIN_KEY)
    assert status == 200, body
    return sum(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "mandant_requests_total"
        and sample.labels["tenant"] == tenant
        and sample.labels["model"] == name
    )


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_an_unloaded_model_leaves_no_figures_and_comes_back_from_zero(
    kind: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "mandant.yaml", [ECHO_MODEL])
    with serving(kind, load_config(path), tmp_path, path) as server:
        client = tc.InferenceServerClient(server.target)
        entry = json.dumps(model("added", "doubled"))  # any name an admin chooses
        client.load_model("added", config=entry, headers=ADMIN)
        np.testing.assert_array_equal(infer(client, "added", ACME), X * 2)
        np.testing.assert_array_equal(infer(client, "echo", ACME), X)
        eventually(lambda: calls_counted(server, "acme", "added") == 1)
        assert any(s.startswith("mandant_batch_size_count") for s in series(server, "added"))
        assert ("added", "") in dashboard_models(server)
        assert statistics(client, "added").inference_count == 2

        client.unload_model("added", headers=ADMIN)
        eventually(lambda: not series(server, "added"))
        assert dashboard_models(server) == [("echo", "")]
        assert calls_counted(server, "acme", "echo") == 1  # the others keep theirs
        billed = usage(server, "acme")  # billing figures stay
        assert billed["rows"] == {"added": 2, "echo": 2}
        assert billed["requests"]["OK"] == 2
        assert billed["admitted_rows"] == 4

        client.load_model("added", config=entry, headers=ADMIN)
        assert statistics(client, "added").inference_count == 0
        states = ("mandant_model_ready", "mandant_backend_circuit_open")  # not figures
        assert [s for s in series(server, "added") if not s.startswith(states)] == []
        infer(client, "added", ACME)
        eventually(lambda: calls_counted(server, "acme", "added") > 0)
        assert calls_counted(server, "acme", "added") == 1
        assert statistics(client, "added").inference_count == 2
        assert usage(server, "acme")["rows"] == {"added": 4, "echo": 2}


def test_a_reload_forgets_a_removed_model_and_a_tenant_s_removed_variant(
    tmp_path: Path,
) -> None:
    variant = {key: value for key, value in model("echo", "doubled").items() if key != "name"}
    variant.update(base="echo", tenant="acme")
    path = write_config(tmp_path / "mandant.yaml", [ECHO_MODEL, variant, model("gone", "tripled")])
    with ServerThread(load_config(path), tmp_path, path) as server:
        app = server.app
        assert app is not None
        client = tc.InferenceServerClient(server.target)
        np.testing.assert_array_equal(infer(client, "echo", ACME), X * 2)  # its variant
        np.testing.assert_array_equal(infer(client, "echo", GLOBEX), X)
        np.testing.assert_array_equal(infer(client, "gone", ACME), X * 3)
        assert series(server, "echo", "mandant_batch_size", tenant="acme")  # the variant's
        assert ("echo", "acme") in dashboard_models(server)

        write_config(path, [ECHO_MODEL])

        async def reload() -> list[str]:
            app.reload(load_config(path))
            assert app.model_changes is not None
            return await app.model_changes

        assert sorted(server.call(reload())) == [
            "model 'echo' changed; the versions of tenant 'acme' unloaded",
            "model 'gone' unloaded",
        ]
        # The old versions are freed in the background, once their calls answered.
        eventually(lambda: not series(server, "gone"))
        eventually(lambda: not series(server, "echo", "mandant_batch_size", tenant="acme"))
        assert series(server, "echo", "mandant_batch_size", tenant="")  # the shared one's stay
        assert calls_counted(server, "acme", "echo") == 1  # ... and acme's calls to "echo"
        assert dashboard_models(server) == [("echo", "")]
        assert usage(server, "acme")["rows"] == {"echo": 2, "gone": 2}
        np.testing.assert_array_equal(infer(client, "echo", ACME), X)  # now the shared one


async def test_calls_in_flight_count_before_their_model_is_forgotten(tmp_path: Path) -> None:
    path = write_config(tmp_path / "mandant.yaml", [ECHO_MODEL, model("gated", "gated")])
    control_models.RELEASE.clear()
    server = ServerThread(load_config(path), tmp_path, path).start()
    try:
        assert server.app is not None
        registry = server.app.registry
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="gated")
            request.inputs.add(name="INPUT0", datatype="FP32", shape=list(X.shape))
            request.raw_input_contents.append(X.tobytes())
            in_flight = [
                asyncio.ensure_future(stub.ModelInfer(request, metadata=tuple(ACME.items())))
                for _ in range(2)
            ]
            (gated,) = [m for m in registry.all() if m.key.name == "gated"]
            while gated.calls < 2:  # one running, one queued behind it
                assert not any(call.done() for call in in_flight)
                await asyncio.sleep(0.01)
            client = tc.InferenceServerClient(server.target)
            unloading = threading.Thread(
                target=client.unload_model, args=("gated",), kwargs={"headers": ADMIN}
            )
            unloading.start()
            while any(m.key.name == "gated" for m in registry.all()):
                assert unloading.is_alive()
                await asyncio.sleep(0.01)
            # Not routed to any more, its calls still running: its figures stay.
            assert series(server, "gated")
            control_models.RELEASE.set()
            await asyncio.gather(*in_flight)
            await asyncio.to_thread(unloading.join, 30)
        # Once the unload is answered, its figures are gone, and the last calls'
        # events, recorded before, brought none back.
        assert not series(server, "gated")
        assert calls_counted(server, "acme", "") == 0  # none came late, without its model
        assert usage(server, "acme")["requests"] == {"OK": 2}
        assert usage(server, "acme")["rows"] == {"gated": 4}
    finally:
        control_models.RELEASE.set()
        server.stop()
