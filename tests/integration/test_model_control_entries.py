"""Model control beyond the file (issue 12, item 3), on real servers and Triton's own
clients: RepositoryModelLoad with a ``config`` parameter (a JSON model entry), over
gRPC and REST; ``version_policy``; warm-up requests that run before a version gets
traffic (at start, on a load and on a reload); metrics labels for a model loaded after
start; RepositoryIndex over REST."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from mandant.config import load_config, parse_config
from mandant.tenancy.keys import hash_key
from mandant_client._proto import admin_pb2, admin_pb2_grpc
from tests.integration import control_models
from tests.integration.test_model_control import (
    ACME,
    ADMIN,
    X,
    code_of,
    index,
    infer,
    model,
    write_config,
)
from tests.servers import ECHO_MODEL, SERVER_KINDS, ServerThread, WorkersServer, http_get, serve

GATED_WARMUP = [{"inputs": {"INPUT0": {"datatype": "FP32", "shape": [1, 4]}}, "count": 1}]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    path = write_config(tmp_path / "mandant.yaml", [ECHO_MODEL, model("broken", "broken")])
    control_models.RELEASE.clear()
    running = ServerThread(load_config(path), tmp_path, path).start()
    try:
        yield running
    finally:
        control_models.RELEASE.set()  # no warm-up or call stays blocked in the model
        running.stop()


def metrics(http_port: int) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/metrics", headers={"Authorization": ADMIN["authorization"]}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return str(answer.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the series ``name`` with exactly ``labels`` (0 if absent)."""
    for line in text.splitlines():
        match = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if match and match[1] == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match[2]))
            if found == labels:
                return float(match[3])
    return 0.0


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_load_with_a_config_entry_adds_a_model_with_its_own_metrics(
    kind: str, tmp_path: Path
) -> None:
    running = serve(kind, parse_config(_config_data([ECHO_MODEL])), tmp_path)
    try:
        client = tc.InferenceServerClient(running.target)
        entry = json.dumps(model("added", "doubled"))
        assert code_of(lambda: client.load_model("added", config=entry, headers=ACME)) == (
            "StatusCode.UNAUTHENTICATED"
        )
        client.load_model("added", config=entry, headers=ADMIN)
        np.testing.assert_array_equal(infer(client, "added", ACME), X * 2)
        assert index(client)["added"]["state"] == "READY"

        http_port = running.http_port if isinstance(running, WorkersServer) else _http(running)
        labels = {"tenant": "acme", "model": "added"}
        text = metrics(http_port)
        for _ in range(100):  # a front end's events reach the engine within 50 ms
            if sample(text, "mandant_requests_total", code="OK", **labels):
                break
            time.sleep(0.1)
            text = metrics(http_port)
        assert sample(text, "mandant_requests_total", code="OK", **labels) == 1
        assert sample(text, "mandant_rows_total", **labels) == 2
        assert sample(text, "mandant_batch_size_count", model="added", tenant="") == 1
    finally:
        running.stop()


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_a_load_failure_whose_text_cannot_be_utf_8_is_answered(kind: str, tmp_path: Path) -> None:
    """A config entry is JSON, where ``"\\ud800"`` reads as a lone surrogate: a
    factory argument so named made the load's failure text one gRPC cannot encode as a
    status message, and the load went unanswered (its client waited for its deadline,
    or for ever; with ``workers: 2`` a front end's place with it). Now UNAVAILABLE with
    the text escaped, at once; the model it would replace serves on."""
    running = serve(kind, parse_config(_config_data([ECHO_MODEL])), tmp_path)
    try:
        client = tc.InferenceServerClient(running.target)
        entry = json.dumps({**ECHO_MODEL, "factory_args": {"\ud800": 1}})
        assert "\\ud800" in entry  # the JSON escape, which json.loads reads as a surrogate
        start = time.monotonic()
        with pytest.raises(InferenceServerException) as load:
            client.load_model("echo", config=entry, headers=ADMIN, client_timeout=20)
        assert load.value.status() == "StatusCode.UNAVAILABLE"
        assert "\\ud800" in str(load.value.message())
        assert time.monotonic() - start < 15
        np.testing.assert_array_equal(infer(client, "echo", ACME), X)
    finally:
        running.stop()


def _http(running: ServerThread) -> int:
    assert running.app is not None
    return running.app.http_port


def _config_data(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "grace_s": 30,
                   "admin_keys": [hash_key("admin-key")]},
        "tenants": [{"id": "acme", "api_keys": [hash_key("acme-key")]}],
        "models": models,
    }  # fmt: skip


def test_a_config_entry_replaces_the_file_s_until_the_next_plain_load(
    server: ServerThread,
) -> None:
    client = tc.InferenceServerClient(server.target)
    client.load_model("echo", config=json.dumps(model("echo", "tripled")), headers=ADMIN)
    np.testing.assert_array_equal(infer(client, "echo", ACME), X * 3)
    as_list = json.dumps([model("echo", "doubled")])  # a list of entries, one per version
    client.load_model("echo", config=as_list, headers=ADMIN)
    np.testing.assert_array_equal(infer(client, "echo", ACME), X * 2)
    client.load_model("echo", headers=ADMIN)  # the file's entry again
    np.testing.assert_array_equal(infer(client, "echo", ACME), X)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"config": "{not json"}, "(json)"),
        ({"config": "[" * 5000 + "]" * 5000}, "nested too deeply"),
        ({"config": json.dumps({"name": "echo", "max_batch_size": 8})}, "max_batch_size"),
        ({"config": json.dumps(model("other", "doubled"))}, "must name the model loaded"),
        ({"config": json.dumps({**model("echo", "doubled"), "tenant": "x"})}, "unknown tenant"),
        ({"config": json.dumps([])}, "a model entry or a list"),
        ({"files": {"file:1/model.pt": b"weights"}}, "'file:' overrides are not supported"),
    ],
)
def test_a_bad_load_parameter_is_invalid_argument_and_changes_nothing(
    server: ServerThread, parameters: dict[str, Any], message: str
) -> None:
    client = tc.InferenceServerClient(server.target)
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("echo", headers=ADMIN, **parameters)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in str(caught.value.message())
    np.testing.assert_array_equal(infer(client, "echo", ACME), X)


def test_rest_repository_index_load_and_unload(server: ServerThread) -> None:
    assert server.app is not None
    rest = th.InferenceServerClient(f"127.0.0.1:{server.app.rest_port}")
    listed = {m["name"]: m for m in rest.get_model_repository_index(headers=ACME)}
    assert listed["echo"] == {"name": "echo", "version": "1", "state": "READY", "reason": ""}
    assert listed["broken"]["state"] == "UNAVAILABLE"
    assert listed["broken"]["reason"] == "failed to load; the operator's log has the cause"

    entry = json.dumps(model("broken", "doubled"))
    with pytest.raises(InferenceServerException) as refused:
        rest.load_model("broken", config=entry, headers=ACME)
    assert refused.value.status() == "401"
    rest.load_model("broken", config=entry, headers=ADMIN)
    tensor = th.InferInput("INPUT0", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    answer = rest.infer("broken", [tensor], headers=dict(ACME)).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(answer, X * 2)
    for config in ("{not json", "[" * 5000 + "]" * 5000):
        with pytest.raises(InferenceServerException) as bad:
            rest.load_model("broken", config=config, headers=ADMIN)
        assert bad.value.status() == "400"

    rest.unload_model("broken", headers=ADMIN)
    assert "broken" not in {m["name"] for m in rest.get_model_repository_index(headers=ACME)}
    with pytest.raises(InferenceServerException) as gone:
        rest.unload_model("broken", headers=ADMIN)
    assert gone.value.status() == "404"
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.app.rest_port}/v2/repository/index",
        data=b"[1, 2",
        headers=ACME,
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as malformed:
        urllib.request.urlopen(request, timeout=30)
    assert malformed.value.code == 400
    too_deep = urllib.request.Request(
        f"http://127.0.0.1:{server.app.rest_port}/v2/repository/models/echo/load",
        data=b"[" * 5000 + b"]" * 5000,
        headers=dict(ADMIN),
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as deep:
        urllib.request.urlopen(too_deep, timeout=30)
    assert deep.value.code == 400


def test_version_policy_decides_the_versions_served(tmp_path: Path) -> None:
    latest = {"latest": 2}
    versions = [
        {**model("m", factory), "version": version, "version_policy": latest}
        for version, factory in ((1, "doubled"), (2, "doubled"), (3, "tripled"))
    ]
    path = write_config(tmp_path / "mandant.yaml", versions)
    with ServerThread(load_config(path), tmp_path, path) as running:
        client = tc.InferenceServerClient(running.target)
        listed = client.get_model_repository_index(headers=ACME, as_json=True)["models"]
        assert sorted(m["version"] for m in listed) == ["2", "3"]
        np.testing.assert_array_equal(infer(client, "m", ACME), X * 3)  # the newest
        tensor = tc.InferInput("INPUT0", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        pinned = client.infer("m", [tensor], model_version="2", headers=ACME)
        np.testing.assert_array_equal(pinned.as_numpy("OUTPUT0"), X * 2)
        assert code_of(lambda: client.infer("m", [tensor], model_version="1", headers=ACME)) == (
            "StatusCode.NOT_FOUND"
        )
        policy = client.get_model_config("m", headers=ACME).config.version_policy
        assert policy.latest.num_versions == 2

        specific = [{**v, "version_policy": {"specific": [1, 3]}} for v in versions]
        client.load_model("m", config=json.dumps(specific), headers=ADMIN)
        listed = client.get_model_repository_index(headers=ACME, as_json=True)["models"]
        assert sorted(m["version"] for m in listed) == ["1", "3"]
        assert code_of(lambda: client.infer("m", [tensor], model_version="2", headers=ACME)) == (
            "StatusCode.NOT_FOUND"
        )
        policy = client.get_model_config("m", "1", headers=ACME).config.version_policy
        assert list(policy.specific.versions) == [1, 3]


def test_a_failing_warm_up_at_start_fails_that_model_only(tmp_path: Path) -> None:
    failing = {**model("cold", "failing"), "warmup": GATED_WARMUP}
    path = write_config(tmp_path / "mandant.yaml", [ECHO_MODEL, failing])
    with ServerThread(load_config(path), tmp_path, path) as running:
        assert running.app is not None
        client = tc.InferenceServerClient(running.target)
        listed = index(client)
        assert listed["cold"]["state"] == "UNAVAILABLE"
        (cold,) = [m for m in running.app.registry.all() if m.key.name == "cold"]
        assert cold.failure is not None
        assert "warm-up request 0 failed: RuntimeError: this model fails every call" in cold.failure
        assert code_of(lambda: infer(client, "cold", ACME)) == "StatusCode.UNAVAILABLE"
        np.testing.assert_array_equal(infer(client, "echo", ACME), X)
        failures = running.app.metrics.get_sample_value(
            "mandant_model_load_failures_total", {"model": "cold"}
        )
        assert failures == 1
        good = json.dumps({**model("cold", "doubled"), "warmup": GATED_WARMUP})
        control_models.RELEASE.set()
        client.load_model("cold", config=good, headers=ADMIN)  # now it warms up and serves
        np.testing.assert_array_equal(infer(client, "cold", ACME), X * 2)


def test_a_loaded_model_gets_no_traffic_until_its_warm_up_ran(server: ServerThread) -> None:
    client = tc.InferenceServerClient(server.target)
    entry = json.dumps({**model("slow", "gated"), "warmup": GATED_WARMUP})
    loading = threading.Thread(
        target=client.load_model, args=("slow",), kwargs={"config": entry, "headers": ADMIN}
    )
    loading.start()
    try:
        loading.join(1.0)
        assert loading.is_alive()  # the warm-up waits in the model
        assert code_of(lambda: infer(client, "slow", ACME)) == "StatusCode.NOT_FOUND"
        assert "slow" not in index(client)
    finally:
        control_models.RELEASE.set()
        loading.join(30)
    assert not loading.is_alive()
    np.testing.assert_array_equal(infer(client, "slow", ACME), X)
    assert index(client)["slow"]["state"] == "READY"


def test_a_reload_warms_the_new_version_before_the_switch(
    server: ServerThread, tmp_path: Path
) -> None:
    app = server.app
    assert app is not None
    client = tc.InferenceServerClient(server.target)
    v2 = {**model("echo", "gated"), "version": 2, "warmup": GATED_WARMUP}
    path = write_config(tmp_path / "reloaded.yaml", [ECHO_MODEL, v2, model("broken", "broken")])

    async def reload() -> None:
        app.reload(load_config(path))

    server.call(reload())
    changes = app.model_changes
    assert changes is not None
    assert not changes.done()  # version 2 warms up, behind the gate
    np.testing.assert_array_equal(infer(client, "echo", ACME), X)  # version 1 serves
    assert [m["version"] for m in index(client).values() if m["name"] == "echo"] == ["1"]
    control_models.RELEASE.set()

    async def applied() -> list[str]:
        assert changes is not None
        return await changes

    assert "model 'echo' loaded" in server.call(applied())
    listed = client.get_model_repository_index(headers=ACME, as_json=True)["models"]
    assert sorted(m["version"] for m in listed if m["name"] == "echo") == ["1", "2"]
    tensor = tc.InferInput("INPUT0", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    answer = client.infer("echo", [tensor], headers=ACME)
    assert answer.get_response().model_version == "2"  # the newest, warmed up


def test_a_model_added_by_a_reload_gets_its_own_metrics_labels(
    server: ServerThread, tmp_path: Path
) -> None:
    app = server.app
    assert app is not None
    client = tc.InferenceServerClient(server.target)
    path = write_config(tmp_path / "reloaded.yaml", [ECHO_MODEL, model("added", "doubled")])

    assert "model 'added' loaded" in server.call(_reload(app, path))
    np.testing.assert_array_equal(infer(client, "added", ACME), X * 2)
    text = metrics(app.http_port)
    labels = {"tenant": "acme", "model": "added"}
    assert sample(text, "mandant_requests_total", code="OK", **labels) == 1
    assert sample(text, "mandant_request_duration_seconds_count", **labels) == 1
    assert sample(text, "mandant_compute_seconds_total", **labels) > 0
    assert sample(text, "mandant_batch_size_count", model="added", tenant="") == 1


def test_a_reload_loads_again_a_model_that_failed_though_no_entry_changed(
    tmp_path: Path,
) -> None:
    """A model failed to load at start (its weights missing); the operator puts them
    there and sends SIGHUP with the file as it was: the model stayed UNAVAILABLE until
    some other model entry changed (a reviewer's find)."""
    weights = tmp_path / "weights"
    late = {**model("late", "needs_file"), "factory_args": {"path": str(weights)}}
    path = write_config(tmp_path / "mandant.yaml", [ECHO_MODEL, late])
    with ServerThread(load_config(path), tmp_path, path) as running:
        app = running.app
        assert app is not None
        client = tc.InferenceServerClient(running.target)
        assert code_of(lambda: infer(client, "late", ACME)) == "StatusCode.UNAVAILABLE"
        weights.touch()

        async def reload() -> list[str]:
            result = app.reload(load_config(path))
            assert "models: loading again what failed (late)" in result.applied
            assert app.model_changes is not None
            return await app.model_changes

        assert running.call(reload()) == ["model 'late' loaded"]
        np.testing.assert_array_equal(infer(client, "late", ACME), X * 2)
        assert running.call(_no_changes(app, path)) is None


def test_a_reload_loads_again_a_changed_entry_that_failed_though_the_file_did_not_change(
    tmp_path: Path,
) -> None:
    """A reload changes a model's entry and its new version fails to load (its weights
    missing): the old one serves on. The operator puts the weights there and sends
    SIGHUP with the file as it was: nothing was loaded (the registry listed no failed
    version, and the file matched the last one read) until another entry changed."""
    weights = tmp_path / "weights"
    path = write_config(tmp_path / "mandant.yaml", [ECHO_MODEL, model("late", "tripled")])
    with ServerThread(load_config(path), tmp_path, path) as running:
        app = running.app
        assert app is not None
        client = tc.InferenceServerClient(running.target)
        np.testing.assert_array_equal(infer(client, "late", ACME), X * 3)
        changed = {**model("late", "needs_file"), "factory_args": {"path": str(weights)}}
        write_config(path, [ECHO_MODEL, changed])

        [line] = running.call(_reload(app, path))
        assert "weights missing" in line and "the versions serving stay" in line
        np.testing.assert_array_equal(infer(client, "late", ACME), X * 3)
        weights.touch()
        assert running.call(_reload(app, path)) == ["model 'late' loaded"]
        np.testing.assert_array_equal(infer(client, "late", ACME), X * 2)
        assert running.call(_no_changes(app, path)) is None


def test_a_failed_change_undone_in_the_file_is_not_tried_again(tmp_path: Path) -> None:
    """A changed entry fails to load, then the file goes back to the entry serving:
    nothing is pending, and a reload of the unchanged file loads nothing (it loaded
    the serving model again, a second copy beside it, as though it had failed)."""
    serving = model("late", "tripled")
    path = write_config(tmp_path / "mandant.yaml", [ECHO_MODEL, serving])
    with ServerThread(load_config(path), tmp_path, path) as running:
        app = running.app
        assert app is not None
        failing = {**model("late", "needs_file"), "factory_args": {"path": "/nowhere"}}
        write_config(path, [ECHO_MODEL, failing])

        [line] = running.call(_reload(app, path))
        assert "the versions serving stay" in line
        write_config(path, [ECHO_MODEL, serving])
        assert running.call(_reload(app, path)) == []  # as served: nothing to change
        assert running.call(_no_changes(app, path)) is None


async def _reload(app: Any, path: Path) -> list[str]:
    """Reload ``path`` and await its model changes: their lines."""
    app.reload(load_config(path))
    assert app.model_changes is not None
    changes: list[str] = await app.model_changes
    return changes


async def _no_changes(app: Any, path: Path) -> None:
    """A reload with nothing failed and nothing changed loads nothing."""
    before = app.model_changes
    result = app.reload(load_config(path))
    assert not any(line.startswith("models:") for line in result.applied)
    assert app.model_changes is before


def _with_initech(
    tmp_path: Path, initech: dict[str, Any]
) -> tuple[ServerThread, Callable[[dict[str, Any] | None], None]]:
    """A started server of acme and initech (key ``initech-key``, and ``initech``'s
    settings); and its reload to acme and the tenant given (None: acme alone)."""
    data = _config_data([ECHO_MODEL])
    acme = data["tenants"][0]
    first = {"id": "initech", "api_keys": [hash_key("initech-key")], **initech}
    running = ServerThread(parse_config({**data, "tenants": [acme, first]}), tmp_path).start()

    def reload(tenant: dict[str, Any] | None) -> None:
        async def apply() -> None:
            assert running.app is not None
            tenants = [acme] if tenant is None else [acme, tenant]
            running.app.reload(parse_config({**data, "tenants": tenants}))

        running.call(apply())

    return running, reload


def _until_unloaded(app: Any, name: str, failure: str) -> None:
    for _ in range(100):
        if name not in {m.key.name for m in app.registry.all()}:
            return
        time.sleep(0.05)
    pytest.fail(failure)


def test_a_private_model_still_loading_when_its_tenant_is_removed_is_not_installed(
    tmp_path: Path,
) -> None:
    """A reload removed initech while an admin's load of a model private to it was
    still under way: the reload's unload passed it by (not loaded yet), the load then
    installed it, and a tenant added later under the id initech was served it."""
    running, reload = _with_initech(tmp_path, {})
    app = running.app
    assert app is not None
    control_models.LOADED.clear()
    try:
        client = tc.InferenceServerClient(running.target)
        secret = {**model("secret", "slow_to_load"), "tenant": "initech"}
        loading = threading.Thread(
            target=client.load_model, args=("secret",), kwargs={"config": json.dumps(secret),
                                                              "headers": ADMIN},
        )  # fmt: skip
        loading.start()
        time.sleep(0.3)  # its factory is running
        reload(None)
        control_models.LOADED.set()
        loading.join(30)
        _until_unloaded(app, "secret", "the removed tenant's model was installed")
        reload({"id": "initech", "api_keys": [hash_key("new-initech-key")]})
        new = {"authorization": "Bearer new-initech-key"}
        assert code_of(lambda: infer(client, "secret", new)) == "StatusCode.NOT_FOUND"
    finally:
        control_models.LOADED.set()
        running.stop()


def test_a_removed_tenant_s_models_and_statistics_pass_to_no_later_tenant_of_its_id(
    tmp_path: Path,
) -> None:
    """A model loaded for a tenant with a ``config`` entry is in no file, so a reload
    that removed the tenant left it loaded (and its statistics kept): a tenant added
    later under the same id, with its own key, was served the old one's model and read
    its figures: statistics, and (until the nineteenth session) its usage report and
    dashboard row: calls, rows, latencies, SLO windows. Now the reload unloads the
    model and the figures go. Until then, what the removed tenant was billed stays in
    admins' usage reports, marked removed (it vanished from them at once)."""
    slo = {"latency_ms": 50, "percentile": 99, "objective": 0.99}
    running, reload = _with_initech(tmp_path, {"slo": slo})
    app = running.app
    assert app is not None
    try:
        client = tc.InferenceServerClient(running.target)
        secret = {**model("secret", "doubled"), "tenant": "initech"}
        client.load_model("secret", config=json.dumps(secret), headers=ADMIN)
        old = {"authorization": "Bearer initech-key"}
        np.testing.assert_array_equal(infer(client, "secret", old), X * 2)
        infer(client, "echo", old)
        reload(None)
        _until_unloaded(app, "secret", "the removed tenant's model is still loaded")
        status, body = http_get(running, "/usage", "admin-key")
        billed = json.loads(body)["tenants"]["initech"]
        assert status == 200 and billed["removed"] and billed["requests"] == {"OK": 2}
        with grpc.insecure_channel(running.target) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            request = admin_pb2.GetUsageRequest(tenant="initech")
            (named,) = admin.GetUsage(request, metadata=tuple(ADMIN.items())).tenants
        assert named.removed and dict(named.requests) == {"OK": 2}
        reload({"id": "initech", "api_keys": [hash_key("new-initech-key")], "slo": slo})
        new = {"authorization": "Bearer new-initech-key"}
        status, body = http_get(running, "/usage", "new-initech-key")
        usage = json.loads(body)["tenants"]["initech"]
        assert status == 200 and not usage["requests"] and not usage["rows"], usage
        assert not usage["removed"]
        assert not usage["admitted_rows"], usage
        status, body = http_get(running, "/api/dashboard", "new-initech-key")
        row = json.loads(body)["tenants"][0]
        assert status == 200 and row["requests"] == 0 and row["windows"]["5m"]["total"] == 0
        stats = client.get_inference_statistics("echo", headers=new, as_json=True)
        counts = [int(s.get("inference_count", 0)) for s in stats.get("model_stats", [])]
        assert counts == [0] or not counts
        assert code_of(lambda: infer(client, "secret", new)) == "StatusCode.NOT_FOUND"
    finally:
        running.stop()
