"""Configuration reload: ``App.reload`` in process, and SIGHUP on ``mandant serve``
(one process, and ``workers: 2``, whose supervisor hands SIGHUP to every child).
Tenants, keys, limits and models change live; a broken file is refused and the server
keeps what it runs."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mandant.app import App
from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant_client import AsyncClient, Client, RateLimited, Unauthenticated
from mandant_client._proto import admin_pb2, admin_pb2_grpc
from mandant_client._proto import grpc_service_pb2 as pb
from tests.integration import gated_models
from tests.servers import ECHO_MODEL, SERVER_KINDS, free_port, mandant_serve, wait_for

X = {"INPUT0": np.ones((1, 2), np.float32)}
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


def _echo_message(model: str, request_id: str | None = None) -> bytes:
    """A request of one row to ``model`` (an identity), its id ``request_id``, else the
    model's name."""
    message = pb.ModelInferRequest(model_name=model, id=request_id or model)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    message.raw_input_contents.append(np.ones((1, 2), np.float32).tobytes())
    return message.SerializeToString()


def _config(port: int = 0, **tenants: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"grpc_port": port, "http_port": 0, "rest_port": 0},
        "tenants": [{"id": tenant, **settings} for tenant, settings in tenants.items()],
        "models": [ECHO_MODEL],
    }


async def test_reload_applies_keys_limits_and_models(tmp_path: Path) -> None:
    first = _config(a={"api_keys": [hash_key("key-a")]})
    async with App(parse_config(first), tmp_path) as app:
        target = f"127.0.0.1:{app.grpc_port}"
        async with AsyncClient(target, api_key="key-b") as b:
            with pytest.raises(Unauthenticated):
                await b.infer("echo", X)
            second = _config(
                a={"api_keys": [hash_key("key-a2")]},
                b={
                    "api_keys": [hash_key("key-b")],
                    "rate_limit": {"requests_per_s": 1, "burst": 1},
                },
            )
            second["models"] = [ECHO_MODEL, {**ECHO_MODEL, "name": "echo2"}]
            result = app.reload(parse_config(second))
            assert not result.deferred
            assert "tenants added: b" in result.applied
            assert "API keys changed: a (1 added, 1 revoked)" in result.applied
            await b.infer("echo", X)  # b exists now ...
            with pytest.raises(RateLimited):  # ... with its limit
                await b.infer("echo", X)
            assert app.model_changes is not None
            assert await app.model_changes == ["model 'echo2' loaded"]
            assert [m.name for m in await b.models()] == ["echo", "echo2"]
            # The dashboard draws a card for a model the reload brought before its
            # first batch, as for one configured at start (it had none until then).
            second["server"]["admin_keys"] = [hash_key("admin")]
            app.reload(parse_config(second))
            dashboard = (await _http(app, "/api/dashboard", "admin"))[1]
            cards = {m["name"]: m["batch_sizes"] for m in dashboard["models"]}
            assert cards["echo2"] == {}, dashboard["models"]
        async with (
            AsyncClient(target, api_key="key-a") as old,
            AsyncClient(target, api_key="key-a2") as new,
        ):
            with pytest.raises(Unauthenticated):  # the rotated-out key is revoked
                await old.infer("echo", X)
            await new.infer("echo", X)


async def _http(app: App, path: str, key: str | None) -> tuple[int, Any]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.http_port}{path}", headers=headers) as response,
    ):
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def _admin_usage(app: App, key: str) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        reply = await admin_pb2_grpc.AdminServiceStub(channel).GetUsage(
            admin_pb2.GetUsageRequest(), metadata=(("authorization", f"Bearer {key}"),)
        )
    return [t.tenant for t in reply.tenants]


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def test_reload_reaches_every_component(tmp_path: Path) -> None:
    """After a reload adding a tenant (with an SLO), changing an SLO and a quota and
    rotating the admin key: the new tenant has its own metrics label, /usage and the dashboard
    list it, the new SLO judges calls, the quotas shown are the new ones, the old
    admin key is refused on HTTP and gRPC and the new one works."""
    first = _config(
        a={
            "api_keys": [hash_key("key-a")],
            "slo": {"latency_ms": 10_000},
            "quota": {"rows_per_day": 100},
        }
    )
    first["server"]["admin_keys"] = [hash_key("admin-1")]
    second = _config(
        a={
            "api_keys": [hash_key("key-a")],
            "slo": {"latency_ms": 0.001},  # nothing is this fast: every call is bad
            "quota": {"rows_per_day": 200},
        },
        b={
            "api_keys": [hash_key("key-b")],
            "quota": {"rows_per_day": 7},
            "slo": {"latency_ms": 0.001},
        },
    )
    second["server"]["admin_keys"] = [hash_key("admin-2")]
    async with App(parse_config(first), tmp_path) as app:
        assert await _admin_usage(app, "admin-1") == ["a"]
        result = app.reload(parse_config(second))
        assert result.deferred == ()
        notes = "; ".join(result.applied)
        assert "tenants added: b" in notes
        assert "tenants changed: a (quota, slo)" in notes
        assert "admin keys changed (1 added, 1 revoked)" in notes
        assert "sha256" not in notes and "admin-2" not in notes  # never key material
        target = f"127.0.0.1:{app.grpc_port}"
        async with AsyncClient(target, api_key="key-b") as b:
            await b.infer("echo", X)
        async with AsyncClient(target, api_key="key-a") as a:
            await a.infer("echo", X)

        assert (await _http(app, "/metrics", "admin-1"))[0] == 401
        status, metrics = await _http(app, "/metrics", "admin-2")
        assert status == 200
        ok = "mandant_requests_total"
        assert _sample(metrics, ok, tenant="b", model="echo", code="OK") == 1
        assert _sample(metrics, ok, tenant="", model="echo", code="OK") is None
        assert _sample(metrics, "mandant_slo_latency_seconds", tenant="a") == 0.000001
        assert _sample(metrics, "mandant_slo_requests_total", tenant="a") == 1
        assert _sample(metrics, "mandant_slo_good_requests_total", tenant="a") == 0
        # A tenant given its SLO by the reload, none of whose calls was good: its good
        # calls at 0, not absent (the alerts' ratio gave nothing: it never paged).
        assert _sample(metrics, "mandant_slo_requests_total", tenant="b") == 1
        assert _sample(metrics, "mandant_slo_good_requests_total", tenant="b") == 0

        status, usage = await _http(app, "/usage", "admin-2")
        assert status == 200
        assert usage["tenants"]["b"]["quota"]["limits"] == {"rows_per_day": 7}
        assert usage["tenants"]["a"]["quota"]["limits"] == {"rows_per_day": 200}
        assert usage["tenants"]["b"]["requests"] == {"OK": 1}
        status, dashboard = await _http(app, "/api/dashboard", "admin-2")
        tenants = {t["id"]: t for t in dashboard["tenants"]}
        assert set(tenants) == {"a", "b"} and tenants["b"]["requests"] == 1
        assert (tenants["a"]["windows"]["5m"]["good"], tenants["a"]["windows"]["5m"]["total"]) == (
            0,
            1,
        )
        assert (await _http(app, "/usage", "key-b"))[1]["tenants"].keys() == {"b"}

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _admin_usage(app, "admin-1")
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await _admin_usage(app, "admin-2") == ["a", "b"]


async def test_a_removed_tenant_leaves_metrics_and_its_usage_stays_reported(
    tmp_path: Path,
) -> None:
    """A reload removing a tenant takes its series out of ``/metrics`` (they stayed
    until its id came back: a SaaS adding and removing tenants grew every scrape for
    the life of the process), while ``/usage`` still counts its calls (``removed``);
    added back, it starts from nothing."""
    both = _config(a={"api_keys": [hash_key("key-a")]}, b={"api_keys": [hash_key("key-b")]})
    both["server"]["admin_keys"] = [hash_key("admin")]
    only_a = _config(a={"api_keys": [hash_key("key-a")]})
    only_a["server"]["admin_keys"] = [hash_key("admin")]
    async with App(parse_config(both), tmp_path) as app:
        async with AsyncClient(f"127.0.0.1:{app.grpc_port}", api_key="key-b") as b:
            await b.infer("echo", X)
            await b.infer("echo", X)
        assert ',tenant="b"' in (await _http(app, "/metrics", "admin"))[1]
        app.reload(parse_config(only_a))
        metrics = (await _http(app, "/metrics", "admin"))[1]
        assert 'tenant="b"' not in metrics, metrics
        usage = (await _http(app, "/usage", "admin"))[1]["tenants"]["b"]
        assert usage["removed"] is True
        assert usage["requests"] == {"OK": 2} and usage["rows"] == {"echo": 2}
        app.reload(parse_config(both))
        usage = (await _http(app, "/usage", "admin"))[1]["tenants"]["b"]
        assert usage["requests"] == {} and usage["rows_total"] == 0


async def test_a_call_that_ends_after_its_tenant_was_removed_counts_for_no_later_tenant(
    tmp_path: Path,
) -> None:
    """A removed tenant's call still running ends after the reload: its figures went
    with the reload, and that call's events brought them back (its series in
    ``/metrics`` until the id came back; its statistics read, once the id was added
    back, by the new tenant as its own). Now the call counts in the removed tenant's
    usage report only."""
    gated = {**ECHO_MODEL, "name": "gated", "factory": "tests.integration.gated_models:gated"}
    both = _config(a={"api_keys": [hash_key("key-a")]}, b={"api_keys": [hash_key("key-b")]})
    only_a = _config(a={"api_keys": [hash_key("key-a")]})
    for config in (both, only_a):
        config["server"]["admin_keys"] = [hash_key("admin")]
        config["models"].append(gated)
    gated_models.GATE.clear()
    try:
        async with App(parse_config(both), tmp_path) as app:
            target = f"127.0.0.1:{app.grpc_port}"
            async with AsyncClient(target, api_key="key-b") as b:
                running = asyncio.ensure_future(b.infer("gated", X))
                for _ in range(500):
                    if app.admission.inflight("b"):
                        break
                    await asyncio.sleep(0.01)
                assert app.admission.inflight("b") == 1
                app.reload(parse_config(only_a))
                gated_models.GATE.set()
                assert (await running)["OUTPUT0"].sum() == 2  # admitted: it is served
            metrics = (await _http(app, "/metrics", "admin"))[1]
            assert 'tenant="b"' not in metrics, metrics
            usage = (await _http(app, "/usage", "admin"))[1]["tenants"]["b"]
            assert usage["removed"] and usage["requests"] == {"OK": 1}, usage
            assert usage["rows"] == {"gated": 1}, usage
            both["tenants"][1]["api_keys"] = [hash_key("new-key-b")]
            app.reload(parse_config(both))
            async with grpc.aio.insecure_channel(target) as channel:
                statistics = channel.unary_unary(
                    "/inference.GRPCInferenceService/ModelStatistics",
                    response_deserializer=pb.ModelStatisticsResponse.FromString,
                )
                reply = await statistics(
                    pb.ModelStatisticsRequest(name="gated").SerializeToString(),
                    metadata=(("authorization", "Bearer new-key-b"),),
                )
            (figures,) = reply.model_stats
            assert figures.inference_count == 0 and figures.execution_count == 0, figures
            assert figures.inference_stats.success.count == 0, figures
            assert figures.last_inference == 0, figures
    finally:
        gated_models.GATE.set()


#: What each process of a server of each kind logs once it has reloaded.
RELOADED = {
    SERVER_KINDS[0]: ["configuration reloaded"],
    SERVER_KINDS[1]: ["engine reloaded", "front end reloaded", "front end reloaded"],
}


def _reloads(proc: Any, kind: str, text: str | None = None) -> tuple[list[str], str]:
    """Wait until every process of the server logged ``text`` (default: that it
    reloaded; a refusal: the process that refused it, which for ``workers`` is the
    supervisor, for all): their lines saying so, and all that was logged meanwhile."""
    expected = [text] if text else list(RELOADED[kind])
    lines, log = [], ""
    while expected:
        read = wait_for(proc, "reload")
        log += read
        line = read.splitlines()[-1]
        for wanted in expected:
            if wanted in line:
                expected.remove(wanted)
                lines.append(line)
                break
    return lines, log


def _writer(path: Path, port: int, kind: str) -> Callable[..., None]:
    """Writes a configuration of these tenants to ``path`` for a server of ``kind``."""

    def write(**tenants: dict[str, Any]) -> None:
        config = _config(port, **tenants)
        if kind != SERVER_KINDS[0]:
            config["server"]["workers"] = 2
        path.write_text(yaml.safe_dump(config))

    return write


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_sighup_reloads_and_refuses_a_broken_file(tmp_path: Path, kind: str) -> None:
    port = free_port()
    path = tmp_path / "mandant.yaml"
    write = _writer(path, port, kind)

    write(a={"api_keys": [hash_key("key-a")]})
    with mandant_serve(path) as proc:
        path.write_text("tenants: [{id: a, api_keys: [not-a-hash]}]")
        proc.send_signal(signal.SIGHUP)
        _reloads(proc, kind, "configuration reload refused")
        with Client(f"127.0.0.1:{port}", api_key="key-a") as client:
            client.infer("echo", X)  # still the old configuration
        write(a={"api_keys": [hash_key("key-new")]})
        proc.send_signal(signal.SIGHUP)
        lines, log = _reloads(proc, kind)
        assert all("API keys changed: a (1 added, 1 revoked)" in line for line in lines)
        assert "key-new" not in log and hash_key("key-new") not in log
        with Client(f"127.0.0.1:{port}", api_key="key-new") as client:
            client.infer("echo", X)
        with Client(f"127.0.0.1:{port}", api_key="key-a") as client, pytest.raises(Unauthenticated):
            client.infer("echo", X)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_a_reload_reaches_streams_already_open(tmp_path: Path, kind: str) -> None:
    """An open stream's key is checked again after a reload: a revoked key, or a
    removed tenant, is refused on the stream it holds as on a new call (before, its
    stream went on serving it, a removed tenant's with no limits at all)."""
    port = free_port()
    path = tmp_path / "mandant.yaml"
    write = _writer(path, port, kind)

    limited = {"api_keys": [hash_key("key-b")], "rate_limit": {"requests_per_s": 100}}
    write(a={"api_keys": [hash_key("key-a")]}, b=limited, c={"api_keys": [hash_key("key-c")]})
    target = f"127.0.0.1:{port}"
    with (
        mandant_serve(path) as proc,
        Client(target, api_key="key-a", multiplex=True) as a,
        Client(target, api_key="key-b", multiplex=True) as b,
        Client(target, api_key="key-c", multiplex=True) as c,
    ):
        for client in (a, b, c):
            client.infer("echo", X)  # each opens its stream
        write(a={"api_keys": [hash_key("key-new")]}, c={"api_keys": [hash_key("key-c")]})
        proc.send_signal(signal.SIGHUP)
        _reloads(proc, kind)
        for revoked in (a, b):
            with pytest.raises(Unauthenticated):
                revoked.infer("echo", X)
        c.infer("echo", X)  # its key stands: its stream goes on
        with Client(target, api_key="key-new", multiplex=True) as renewed:
            renewed.infer("echo", X)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_a_key_given_to_another_tenant_ends_its_stream_and_frees_the_place(
    tmp_path: Path, kind: str
) -> None:
    """A key a reload gave to another tenant: its open stream went on, served as the
    other tenant, holding its first tenant's place under ``server.max_tenant_streams``
    (that tenant's new key could open no stream: RESOURCE_EXHAUSTED) and one more of
    the other's. It ends as a revoked key's does; the key then opens its stream as the
    tenant it now is."""
    port = free_port()
    path = tmp_path / "mandant.yaml"
    write = _writer(path, port, kind)

    def write_one_stream(**tenants: dict[str, Any]) -> None:
        write(**tenants)
        config = yaml.safe_load(path.read_text())
        config["server"]["max_tenant_streams"] = 1
        path.write_text(yaml.safe_dump(config))

    write_one_stream(a={"api_keys": [hash_key("key-a")]}, b={"api_keys": [hash_key("key-b")]})
    target = f"127.0.0.1:{port}"
    with mandant_serve(path) as proc, Client(target, api_key="key-a", multiplex=True) as moved:
        moved.infer("echo", X)  # its stream open, a's one place taken
        write_one_stream(a={"api_keys": [hash_key("key-a2")]}, b={"api_keys": [hash_key("key-b")]})
        config = yaml.safe_load(path.read_text())
        config["tenants"][1]["api_keys"].append(hash_key("key-a"))
        path.write_text(yaml.safe_dump(config))
        proc.send_signal(signal.SIGHUP)
        _reloads(proc, kind)
        deadline = time.monotonic() + 20
        with Client(target, api_key="key-a2", multiplex=True) as renewed:
            while True:  # the moved key's stream ends a moment after the reload
                try:
                    renewed.infer("echo", X)
                    break
                except RateLimited:
                    assert time.monotonic() < deadline, "a's place still held"
                    time.sleep(0.1)
        moved.infer("echo", X)  # on a stream of b's now
        with (
            Client(target, api_key="key-b", multiplex=True) as other,
            pytest.raises(RateLimited, match="streams of this tenant are open"),
        ):
            other.infer("echo", X)  # b's one place is the moved key's
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_a_revoked_keys_idle_stream_ends_and_gives_back_its_place(
    tmp_path: Path, kind: str
) -> None:
    """A revoked key's open streams were answered UNAUTHENTICATED message by message but
    stayed open: idle, they held the tenant's places under ``server.max_tenant_streams``
    for as long as their holder liked, and the tenant's new key could open no stream."""
    port = free_port()
    path = tmp_path / "mandant.yaml"
    write = _writer(path, port, kind)

    def write_limited(key: str) -> None:
        write(a={"api_keys": [hash_key(key)]})
        config = yaml.safe_load(path.read_text())
        config["server"]["max_tenant_streams"] = 2
        slow = {**ECHO_MODEL, "name": "slow", "factory": "tests.integration.slow_models:sleepy"}
        config["models"].append({**slow, "factory_args": {"seconds": 8.0}})
        path.write_text(yaml.safe_dump(config))

    write_limited("key-a")
    target = f"127.0.0.1:{port}"
    with mandant_serve(path) as proc:
        async with grpc.aio.insecure_channel(target) as channel:
            method = channel.stream_stream(
                STREAM_METHOD, response_deserializer=pb.ModelStreamInferResponse.FromString
            )
            idle = method(metadata=(("authorization", "Bearer key-a"),))
            await idle.write(_echo_message("echo", "first"))
            assert (await idle.read()).infer_response.id == "first"  # open, then idle
            busy = method(metadata=(("authorization", "Bearer key-a"),))
            await busy.write(_echo_message("slow", "in-flight"))  # 8 s in the model
            write_limited("key-new")
            proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(_reloads, proc, kind)
            assert await asyncio.wait_for(idle.code(), 30) == grpc.StatusCode.UNAUTHENTICATED
            # A message read while the revoked stream answers the one in flight is
            # answered too (it was read and dropped), refused; then the stream ends.
            await busy.write(_echo_message("echo", "after"))
            answers = {}
            for _ in range(2):
                answer = await busy.read()
                answers[answer.infer_response.id] = answer.error_message
            assert answers == {"after": "missing or invalid API key", "in-flight": ""}
            assert await asyncio.wait_for(busy.code(), 30) == grpc.StatusCode.UNAUTHENTICATED
            renewed = method(metadata=(("authorization", "Bearer key-new"),))
            await renewed.write(_echo_message("echo", "second"))
            answer = await renewed.read()
            assert answer.infer_response.id == "second" and not answer.error_message
            await renewed.done_writing()
            assert await renewed.code() == grpc.StatusCode.OK
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def _config_map(folder: Path, text: str, version: int) -> Path:
    """``text`` as the kubelet writes a mounted ConfigMap: a folder of its own per
    version, ``..data`` switched to it at once, the old version's folder removed, and
    ``mandant.yaml`` a symlink to ``..data/mandant.yaml``; that symlink."""
    data, new = folder / "..data", folder / f"..v{version}"
    old = data.resolve() if data.exists() else None
    new.mkdir(parents=True)
    (new / "mandant.yaml").write_text(text)
    (folder / "..data_tmp").symlink_to(new.name)
    (folder / "..data_tmp").replace(data)
    path = folder / "mandant.yaml"
    if not path.is_symlink():
        path.symlink_to("..data/mandant.yaml")
    if old is not None:
        for leftover in old.iterdir():
            leftover.unlink()
        old.rmdir()
    return path


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_a_config_map_edited_then_signalled_is_applied(tmp_path: Path, kind: str) -> None:
    """The server resolved the file's symlinks once, at start: every SIGHUP after an
    edit of a mounted ConfigMap read the removed version's folder and was refused, so
    a key revoked so (README, "Reload") went on working."""
    port = free_port()
    scratch = tmp_path / "rendered.yaml"
    write = _writer(scratch, port, kind)
    write(a={"api_keys": [hash_key("key-a")]})
    path = _config_map(tmp_path / "config", scratch.read_text(), 1)
    with mandant_serve(path) as proc:
        write(a={"api_keys": [hash_key("key-new")]})
        _config_map(tmp_path / "config", scratch.read_text(), 2)
        proc.send_signal(signal.SIGHUP)
        lines, _ = _reloads(proc, kind)
        assert all("API keys changed: a (1 added, 1 revoked)" in line for line in lines)
        with Client(f"127.0.0.1:{port}", api_key="key-a") as client, pytest.raises(Unauthenticated):
            client.infer("echo", X)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
