"""Fairness at the front door on a real server: tenant a fills its share of the door
with calls stuck in a model, and more of its calls wait at the door, undecoded; tenant
b's call walks past them and is answered while a's are still stuck. Without the door
(slots that never fill) a's calls would all be inside; with a door that ignored
tenants, b would wait behind a's backlog."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from mandant.config import MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from mandant_client._proto import grpc_service_pb2 as pb
from tests.integration import gated_models
from tests.servers import ECHO_MODEL, SERVER_KINDS, ServerThread, serve

INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    gated = {
        **ECHO_MODEL,
        "name": "gated",
        "factory": "tests.integration.gated_models:gated",
        "instances": 4,
    }
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "front_door_slots": 4},
            "tenants": [
                {"id": "a", "api_keys": [hash_key("a-key")]},
                {"id": "b", "api_keys": [hash_key("b-key")]},
            ],
            "models": [ECHO_MODEL, gated],
        },
        "test",
    )
    with _gated(config, tmp_path) as running:
        yield running


@contextmanager
def _gated(config: MandantConfig, tmp_path: Path) -> Iterator[ServerThread]:
    """``config`` served with ``gated_models.GATE`` closed (the ``gated`` model holds
    every call until the test sets it); set again at the end, whatever happened."""
    gated_models.GATE.clear()
    try:
        with ServerThread(config, tmp_path) as running:
            yield running
    finally:
        gated_models.GATE.set()


def _capped(**server: int) -> MandantConfig:
    """Tenants a and b (keys ``a-key``, ``b-key``), ``echo`` and a ``gated`` echo that
    answers once ``gated_models.GATE`` is set, and the ``server`` limits given."""
    return parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, **server},
            "tenants": [
                {"id": "a", "api_keys": [hash_key("a-key")]},
                {"id": "b", "api_keys": [hash_key("b-key")]},
            ],
            "models": [
                ECHO_MODEL,
                {**ECHO_MODEL, "name": "gated", "factory": "tests.integration.gated_models:gated"},
            ],
        },
        "test",
    )


async def _stuck_call(
    server: ServerThread, channel: grpc.aio.Channel, calls: int = 1
) -> asyncio.Future[Any]:
    """Tenant a's call to ``gated``, once it holds its place in the server (it answers
    when the test sets ``gated_models.GATE``), the ``calls``-th in progress."""
    assert server.app is not None
    infer = channel.unary_unary(INFER)
    stuck = asyncio.ensure_future(
        infer(_request("gated"), metadata=(("authorization", "Bearer a-key"),))
    )
    for _ in range(200):
        if server.app.calls.calls == calls:
            break
        await asyncio.sleep(0.01)
    assert server.app.calls.calls == calls
    return stuck


def _request(model: str, request_id: str = "") -> bytes:
    message = pb.ModelInferRequest(model_name=model, id=request_id)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    message.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return message.SerializeToString()


async def test_a_light_tenant_walks_past_a_flood_at_the_door(server: ServerThread) -> None:
    assert server.app is not None
    door = server.app.grpc.door
    async with grpc.aio.insecure_channel(server.target) as channel:
        infer = channel.unary_unary(INFER)
        flood = [
            asyncio.ensure_future(
                infer(_request("gated"), metadata=(("authorization", "Bearer a-key"),))
            )
            for _ in range(10)
        ]
        for _ in range(200):
            if door.busy == 4 and door.waiting == 6:
                break
            await asyncio.sleep(0.01)
        assert (door.busy, door.waiting) == (4, 6)  # a holds every place; 6 wait
        answer = await infer(_request("echo"), metadata=(("authorization", "Bearer b-key"),))
        assert pb.ModelInferResponse.FromString(answer).outputs[0].name == "OUTPUT0"
        assert not any(call.done() for call in flood)  # b went past all of them
        gated_models.GATE.set()
        await asyncio.gather(*flood)
    assert (door.busy, door.waiting) == (0, 0)


async def test_the_call_cap_and_the_door_are_shared_by_grpc_and_rest(tmp_path: Path) -> None:
    """With room for one call in the whole server, a gRPC call stuck in a model leaves
    none for REST: the REST call is refused 429 with Retry-After."""
    config = _capped(max_concurrent_rpcs=1)
    with _gated(config, tmp_path) as server:
        assert server.app is not None
        async with grpc.aio.insecure_channel(server.target) as channel:
            stuck = await _stuck_call(server, channel)
            body = json.dumps(
                {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}
            ).encode()
            url = f"http://127.0.0.1:{server.app.rest_port}/v2/models/echo/infer"
            request = urllib.request.Request(
                url, data=body, headers={"Authorization": "Bearer a-key"}, method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
            assert refused.value.code == 429
            assert "server busy" in refused.value.read().decode()
            gated_models.GATE.set()
            await stuck
        # A rejection like admission's (it was in mandant_requests_total only).
        labels = {"tenant": "a", "reason": "server_busy", "model": ""}
        assert server.app.metrics.get_sample_value("mandant_rejections_total", labels) == 1


async def test_a_call_refused_for_the_full_server_counts_against_its_slo(
    tmp_path: Path,
) -> None:
    """Tenant a's call fills the server (room for one); b's gRPC and REST calls are
    refused RESOURCE_EXHAUSTED (429) for it: on the server's account, not b's limits,
    so they are bad calls of b's SLO (they were left out: b's SLO read 100% while
    its calls were refused, and its alerts could never fire)."""
    slo = {"latency_ms": 60_000, "percentile": 99, "objective": 0.99}
    data = _capped(max_concurrent_rpcs=1).model_dump(exclude_unset=True)
    data["tenants"][1]["slo"] = slo
    with _gated(parse_config(data, "test"), tmp_path) as server:
        assert server.app is not None
        async with grpc.aio.insecure_channel(server.target) as channel:
            stuck = await _stuck_call(server, channel)
            infer = channel.unary_unary(INFER)
            b_key = (("authorization", "Bearer b-key"),)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await infer(_request("echo"), metadata=b_key, timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            body = json.dumps(
                {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}
            ).encode()
            url = f"http://127.0.0.1:{server.app.rest_port}/v2/models/echo/infer"
            request = urllib.request.Request(
                url, data=body, headers={"Authorization": "Bearer b-key"}, method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as busy:
                await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
            assert busy.value.code == 429
            gated_models.GATE.set()
            await stuck
        value = server.app.metrics.get_sample_value
        assert value("mandant_slo_requests_total", {"tenant": "b"}) == 2
        assert value("mandant_slo_good_requests_total", {"tenant": "b"}) in (None, 0)


async def test_a_rest_body_that_never_arrives_holds_no_place(tmp_path: Path) -> None:
    """Tenant a opens more REST calls than the whole server has room for and never
    finishes sending their bodies: they hold their connections only. Tenant b's calls,
    gRPC and REST, are served meanwhile."""
    config = _capped(max_concurrent_rpcs=2)
    with ServerThread(config, tmp_path) as server:
        assert server.app is not None
        port = server.app.rest_port
        stalled = []
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer a-key\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"inputs": ['
            )
            await writer.drain()
            stalled.append(writer)
        try:
            await asyncio.sleep(0.3)
            assert server.app.calls.calls == 0
            async with grpc.aio.insecure_channel(server.target) as channel:
                answer = await channel.unary_unary(INFER)(
                    _request("echo"), metadata=(("authorization", "Bearer b-key"),), timeout=10
                )
            assert pb.ModelInferResponse.FromString(answer).outputs[0].name == "OUTPUT0"
            body = json.dumps(
                {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}
            ).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v2/models/echo/infer",
                data=body,
                headers={"Authorization": "Bearer b-key"},
                method="POST",
            )
            with await asyncio.to_thread(urllib.request.urlopen, request, timeout=10) as reply:
                assert json.loads(reply.read())["outputs"][0]["data"] == [1]
        finally:
            for writer in stalled:
                writer.close()


STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


async def test_open_streams_hold_no_place_and_each_message_takes_one(tmp_path: Path) -> None:
    """With room for one call in the whole server: tenant a's three idle streams leave
    it free for b; a call stuck in a model takes it, and a stream message then gets its
    own RESOURCE_EXHAUSTED answer with pushback while its stream goes on."""
    config = _capped(max_concurrent_rpcs=1)
    with _gated(config, tmp_path) as server:
        assert server.app is not None
        async with grpc.aio.insecure_channel(server.target) as channel:
            open_stream = channel.stream_stream(STREAM)
            idle = [open_stream(metadata=(("authorization", "Bearer a-key"),)) for _ in range(3)]
            for stream in idle:
                await stream.initial_metadata()  # the key is accepted: the streams are open
            assert server.app.calls.calls == 0
            b_key = (("authorization", "Bearer b-key"),)
            answer = await channel.unary_unary(INFER)(_request("echo"), metadata=b_key)
            assert pb.ModelInferResponse.FromString(answer).outputs[0].name == "OUTPUT0"

            stuck = asyncio.ensure_future(
                channel.unary_unary(INFER)(_request("gated"), metadata=b_key)
            )
            for _ in range(200):
                if server.app.calls.calls == 1:
                    break
                await asyncio.sleep(0.01)
            stream = idle[0]
            await stream.write(_request("echo", "m-busy"))
            busy = pb.ModelStreamInferResponse.FromString(await stream.read())
            assert "server busy" in busy.error_message
            # with its id, as every stream answer (a multiplexing client matches it)
            assert busy.infer_response.id == "m-busy"
            assert busy.infer_response.model_name == "echo"
            parameters = busy.infer_response.parameters
            assert parameters["status_code"].string_param == "RESOURCE_EXHAUSTED"
            assert parameters["retry_pushback_ms"].int64_param > 0
            gated_models.GATE.set()
            await stuck
            await stream.write(_request("echo"))
            served = pb.ModelStreamInferResponse.FromString(await stream.read())
            assert not served.error_message
            assert served.infer_response.outputs[0].name == "OUTPUT0"
            for stream in idle:
                await stream.done_writing()


async def test_a_flood_waiting_at_the_door_gives_its_places_to_another_tenant(
    tmp_path: Path,
) -> None:
    """Tenant a fills the whole server's cap (8) with calls to a model that does not
    answer: two inside the door, six waiting behind its share. b's call is served
    anyway, in the place of a's newest waiter, which is answered RESOURCE_EXHAUSTED
    with pushback; a's other calls are served once the model answers."""
    config = _capped(max_concurrent_rpcs=8, front_door_slots=2)
    with _gated(config, tmp_path) as server:
        assert server.app is not None
        async with grpc.aio.insecure_channel(server.target) as channel:
            infer = channel.unary_unary(INFER)
            a_key = (("authorization", "Bearer a-key"),)
            flood = [
                asyncio.ensure_future(infer(_request("gated"), metadata=a_key, timeout=30))
                for _ in range(8)
            ]
            for _ in range(300):
                if server.app.calls.calls == 8:
                    break
                await asyncio.sleep(0.01)
            assert server.app.calls.calls == 8
            b_key = (("authorization", "Bearer b-key"),)
            answer = await infer(_request("echo"), metadata=b_key, timeout=10)
            assert pb.ModelInferResponse.FromString(answer).outputs[0].name == "OUTPUT0"
            gated_models.GATE.set()
            ended = await asyncio.gather(*flood, return_exceptions=True)
            shed = [e for e in ended if isinstance(e, grpc.aio.AioRpcError)]
            assert len(shed) == 1 and len(ended) - len(shed) == 7
            assert shed[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server busy" in str(shed[0].details())
            labels = {"tenant": "a", "reason": "server_busy", "model": ""}
            assert server.app.metrics.get_sample_value("mandant_rejections_total", labels) == 1
            trailers = dict(shed[0].trailing_metadata() or ())
            assert int(trailers["grpc-retry-pushback-ms"]) > 0


async def _until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    """Wait until ``condition()`` holds; fail if it does not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not so after {timeout_s}s"
        await asyncio.sleep(0.01)


async def test_calls_whose_deadline_passes_at_the_door_count_against_the_slo(
    tmp_path: Path,
) -> None:
    """A call that waited at the door until its deadline passed never had its model
    resolved (its message is read only inside): it still counts as a bad call of its
    tenant's SLO, like one whose deadline passed in a queue (it was left out)."""
    slo = {"latency_ms": 60_000, "percentile": 99, "objective": 0.99}
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "front_door_slots": 1},
            "tenants": [{"id": "a", "api_keys": [hash_key("a-key")], "slo": slo}],
            "models": [
                {**ECHO_MODEL, "name": "gated", "factory": "tests.integration.gated_models:gated"},
            ],
        },
        "test",
    )
    key = (("authorization", "Bearer a-key"),)
    with _gated(config, tmp_path) as server:
        assert server.app is not None
        door = server.app.grpc.door
        async with grpc.aio.insecure_channel(server.target) as channel:
            infer = channel.unary_unary(INFER)
            inside = [asyncio.ensure_future(infer(_request("gated"), metadata=key))]
            await _until(lambda: door.busy == 1)  # the one slot is taken
            waiting = [
                asyncio.ensure_future(infer(_request("gated"), metadata=key, timeout=0.5))
                for _ in range(3)
            ]
            ended = await asyncio.gather(*waiting, return_exceptions=True)
            assert all(
                isinstance(e, grpc.aio.AioRpcError)
                and e.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                for e in ended
            ), ended
            gated_models.GATE.set()
            await asyncio.gather(*inside)
        value = server.app.metrics.get_sample_value
        # The last refusals are counted as their handlers end.
        await _until(lambda: (value("mandant_slo_requests_total", {"tenant": "a"}) or 0) >= 4)
        assert value("mandant_slo_requests_total", {"tenant": "a"}) == 4
        assert value("mandant_slo_good_requests_total", {"tenant": "a"}) == 1


async def test_probes_are_answered_when_the_cap_is_full(tmp_path: Path) -> None:
    """Probes take no place under ``max_concurrent_rpcs`` (anyone may send them, no
    key needed): a full server still says it is live and ready, on gRPC and REST, and
    a probe never takes the place of a tenant's call waiting at the door. REST's
    probes took one: refused 429 on a full server, and with a call waiting, that call
    was answered RESOURCE_EXHAUSTED in the probe's stead."""
    config = _capped(max_concurrent_rpcs=2, front_door_slots=1)
    with _gated(config, tmp_path) as server:
        assert server.app is not None
        async with grpc.aio.insecure_channel(server.target) as channel:
            stuck = await _stuck_call(server, channel)  # inside the door
            waiting = await _stuck_call(server, channel, calls=2)  # at the door: cap full
            live = channel.unary_unary(
                "/inference.GRPCInferenceService/ServerLive",
                request_serializer=pb.ServerLiveRequest.SerializeToString,
                response_deserializer=pb.ServerLiveResponse.FromString,
            )
            assert (await live(pb.ServerLiveRequest(), timeout=10)).live
            for path in ("/v2/health/live", "/v2/health/ready", "/v2"):
                url = f"http://127.0.0.1:{server.rest_port}{path}"
                with await asyncio.to_thread(urllib.request.urlopen, url, timeout=10) as answer:
                    assert answer.status == 200
            gated_models.GATE.set()
            await asyncio.gather(stuck, waiting)  # neither shed for a probe


METADATA = "/inference.GRPCInferenceService/ModelMetadata"


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_calls_whose_message_never_comes_hold_no_place(tmp_path: Path, kind: str) -> None:
    """Tenant a opens more ModelMetadata calls than the whole server has room for and
    never sends their messages (the leak hunt held 4,160 open): they took every place
    under the cap before their messages were read, and no call could take them back,
    so b's calls were refused RESOURCE_EXHAUSTED for as long as a liked."""
    never = asyncio.Event()

    async def no_message() -> AsyncIterator[bytes]:
        await never.wait()
        yield b""

    server = serve(kind, _capped(max_concurrent_rpcs=2), tmp_path)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            metadata = channel.stream_unary(METADATA)
            a_key = (("authorization", "Bearer a-key"),)
            held = [metadata(no_message(), metadata=a_key) for _ in range(4)]
            # Their handlers run (one process: counted; workers: 2: time to start).
            app = server.app if isinstance(server, ServerThread) else None
            for _ in range(100):
                await asyncio.sleep(0.01)
                if app is not None and app.grpc.gate.started == len(held):
                    break
            if app is not None:
                assert app.grpc.gate.started == len(held)
                assert app.calls.calls == 0
            b_key = (("authorization", "Bearer b-key"),)
            for _ in range(3):
                answer = await channel.unary_unary(INFER)(
                    _request("echo"), metadata=b_key, timeout=10
                )
                assert pb.ModelInferResponse.FromString(answer).outputs[0].name == "OUTPUT0"
                described = await metadata(
                    iter([pb.ModelMetadataRequest(name="echo").SerializeToString()]),
                    metadata=b_key,
                    timeout=10,
                )
                assert pb.ModelMetadataResponse.FromString(described).name == "echo"
            for call in held:
                call.cancel()
    finally:
        server.stop()


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_a_v2_timeout_counts_the_wait_at_the_door(tmp_path: Path, kind: str) -> None:
    """A call's v2 ``timeout`` (tritonclient's ``infer(timeout=…)``) counted from when
    the data plane took it, after its wait at the door: one that waited there past its
    timeout still ran, and was charged. Now it never runs: DEADLINE_EXCEEDED, as a
    gRPC deadline (with ``workers``, the front end's wait counts in the engine)."""
    sleepy = {**ECHO_MODEL, "name": "sleepy", "factory": "tests.integration.slow_models:sleepy"}
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "front_door_slots": 1},
            "tenants": [{"id": "a", "api_keys": [hash_key("a-key")]}],
            "models": [sleepy],
        },
        "test",
    )
    timed = pb.ModelInferRequest.FromString(_request("sleepy", "timed"))
    timed.parameters["timeout"].int64_param = 200_000  # µs
    key = (("authorization", "Bearer a-key"),)
    server = serve(kind, config, tmp_path)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            infer = channel.unary_unary(INFER)
            inside = asyncio.ensure_future(infer(_request("sleepy"), metadata=key))  # 1 s
            if isinstance(server, ServerThread):
                assert server.app is not None
                door = server.app.grpc.door
                await _until(lambda: door.busy == 1)
            else:
                await asyncio.sleep(0.3)  # the first call is inside, for 0.7 s more
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await infer(timed.SerializeToString(), metadata=key)
            assert refused.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "before the request was queued" in str(refused.value.details())
            await inside
    finally:
        server.stop()
