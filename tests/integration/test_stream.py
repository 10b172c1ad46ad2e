"""ModelStreamInfer against a real Mandant server, through tritonclient's stream APIs
(sync ``start_stream``/``async_stream_infer`` and ``grpc.aio``'s ``stream_infer``) and
raw gRPC: ids and outputs per message, per-message errors while the stream goes on,
the key checked when the stream opens, limits per message, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import queue
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

from mandant.config import parse_config
from mandant_client import AsyncClient, MandantClientError
from mandant_client._proto import grpc_service_pb2 as pb
from tests.servers import DEMO_KEYS, ECHO_MODEL, SERVER_KINDS, Server, auth, metric, serve

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def echo_input(value: float, rows: int = 1, width: int = 4) -> grpcclient.InferInput:
    data = np.full((rows, width), value, dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT0", [rows, width], "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def test_sync_stream_answers_every_message_with_its_id_and_own_rows(
    demo: Server,
) -> None:
    client = grpcclient.InferenceServerClient(demo.target)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)), headers=auth("acme")
    )
    try:
        for i in range(200):
            client.async_stream_infer(
                "echo", [echo_input(float(i), rows=1 + i % 3)], request_id=f"m{i}"
            )
        seen = {}
        for _ in range(200):
            result, error = answers.get(timeout=30)
            assert error is None, error
            seen[result.get_response().id] = result.as_numpy("OUTPUT0")
    finally:
        client.stop_stream()
        client.close()
    assert sorted(seen) == sorted(f"m{i}" for i in range(200))
    for i in range(200):
        out = seen[f"m{i}"]
        assert out.shape == (1 + i % 3, 4)
        assert np.all(out == float(i))


def test_a_bad_message_gets_its_own_error_and_the_stream_goes_on(
    demo: Server,
) -> None:
    client = grpcclient.InferenceServerClient(demo.target)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)), headers=auth("globex")
    )
    try:
        client.async_stream_infer("echo", [echo_input(1.0)], request_id="good-1")
        wrong = grpcclient.InferInput("NOPE", [1, 4], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 4), np.float32))
        client.async_stream_infer("echo", [wrong], request_id="bad")
        # acme's private model does not exist for globex, on a stream as anywhere else.
        fraud = grpcclient.InferInput("INPUT0", [1, 32], "FP32")
        fraud.set_data_from_numpy(np.zeros((1, 32), np.float32))
        client.async_stream_infer("fraud", [fraud], request_id="private")
        client.async_stream_infer("echo", [echo_input(2.0)], request_id="good-2")
        results = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
        client.close()
    ok = {r.get_response().id for r, e in results if e is None}
    errors = sorted(str(e) for r, e in results if e is not None)
    assert ok == {"good-1", "good-2"}
    assert len(errors) == 2
    assert any("unexpected input 'NOPE'" in e for e in errors)
    assert any("model 'fraud' not found" in e for e in errors)


async def test_aio_stream_infer_works_unchanged(demo: Server) -> None:
    async with aioclient.InferenceServerClient(demo.target) as client:

        async def requests() -> AsyncIterator[dict[str, Any]]:
            for i in range(50):
                tensor = aioclient.InferInput("INPUT0", [1, 4], "FP32")
                tensor.set_data_from_numpy(np.full((1, 4), i, np.float32))
                yield {"model_name": "echo", "inputs": [tensor], "request_id": str(i)}

        got = {}
        async for result, error in client.stream_infer(requests(), headers=auth("initech")):
            assert error is None, error
            got[result.get_response().id] = float(result.as_numpy("OUTPUT0")[0, 0])
            if len(got) == 50:
                break
    assert got == {str(i): float(i) for i in range(50)}


def test_every_answer_is_marked_final_as_triton_marks_it(demo: Server) -> None:
    """Clients written for Triton read a request's answers until one carries
    ``triton_final_response: true`` (decoupled models send several): each message's
    one answer carries it (an error's too: below), so such a loop ends instead of
    waiting for ever."""
    client = grpcclient.InferenceServerClient(demo.target)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)), headers=auth("acme")
    )
    try:
        for i in range(3):
            client.async_stream_infer(
                "echo", [echo_input(float(i))], request_id=f"m{i}", enable_empty_final_response=True
            )
        for _ in range(3):
            result, error = answers.get(timeout=30)
            assert error is None, error
            assert result.get_response().parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream()
        client.close()


def _request(model: str = "echo", request_id: str = "r", value: float = 1.0) -> bytes:
    message = pb.ModelInferRequest(model_name=model, id=request_id)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    message.raw_input_contents.append(np.full((1, 4), value, np.float32).tobytes())
    return message.SerializeToString()


async def _raw_stream(
    target: str, messages: list[bytes], metadata: tuple[tuple[str, str], ...]
) -> list[pb.ModelStreamInferResponse]:
    async with grpc.aio.insecure_channel(target) as channel:
        method = channel.stream_stream(
            STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        call = method(iter(messages), metadata=metadata)
        return [response async for response in call]


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-key"),)])
async def test_the_key_is_checked_when_the_stream_opens(
    demo: Server, metadata: tuple[tuple[str, str], ...]
) -> None:
    async with grpc.aio.insecure_channel(demo.target) as channel:
        method = channel.stream_stream(
            STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        refused = {"code": "UNAUTHENTICATED", "tenant": "", "model": ""}
        before = await asyncio.to_thread(refusals, demo, refused)
        call = method(metadata=metadata)
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await call.details() == "missing or invalid API key"
    # Counted like a unary call refused at the gate (``workers``: once the front end's
    # report reached the engine).
    deadline = asyncio.get_running_loop().time() + 5
    while await asyncio.to_thread(refusals, demo, refused) == before:
        assert asyncio.get_running_loop().time() < deadline, "the refused stream was not counted"
        await asyncio.sleep(0.02)


def refusals(server: Server, labels: dict[str, str]) -> float:
    found = metric(server, "admin-demo-key", "mandant_requests_total", **labels)
    return found or 0.0


async def test_errors_carry_the_id_and_the_status_code(demo: Server) -> None:
    responses = await _raw_stream(
        demo.target,
        [_request("fraud", "f1"), b"\xff\xff not a message", _request("echo", "e1")],
        (("authorization", f"Bearer {DEMO_KEYS['globex']}"),),
    )
    by_id = {r.infer_response.id: r for r in responses}
    assert by_id["f1"].infer_response.parameters["status_code"].string_param == "NOT_FOUND"
    assert by_id["e1"].error_message == ""
    malformed = by_id[""]
    assert malformed.infer_response.parameters["status_code"].string_param == "INVALID_ARGUMENT"
    assert "DecodeError" not in malformed.error_message
    assert all(r.infer_response.parameters["triton_final_response"].bool_param for r in responses)


ADMIN_KEY = "stream-admin-key"


@pytest.fixture(scope="module", params=SERVER_KINDS)
def limited_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """echo; a slow model whose queue holds two requests (``slow``: two that arrive
    together, as they may in one message to the engine, both fit) and a quick one run
    one request at a time (``quick``); at most two messages of a stream in flight.
    Tenant ``t`` may run 2 calls at once, ``u`` may send 5 rows a day, ``v`` may run
    10 calls at once."""
    slow = {
        **ECHO_MODEL,
        "name": "slow",
        "factory": "tests.integration.slow_models:sleepy",
        "factory_args": {"seconds": 1.0},
        "batching": {"max_batch_size": 1, "max_queue_rows": 2},
    }
    quick = {
        **ECHO_MODEL,
        "name": "quick",
        "factory": "tests.integration.slow_models:sleepy",
        "factory_args": {"seconds": 0.05},
        "batching": {"max_batch_size": 1},
    }
    config = parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "rest_port": 0,
                "max_stream_inflight": 2,
                "admin_keys": ["sha256:" + _sha(ADMIN_KEY)],
            },
            "tenants": [
                {
                    "id": "t",
                    "api_keys": ["sha256:" + _sha("t-key")],
                    "max_concurrency": 2,
                },
                {"id": "u", "api_keys": ["sha256:" + _sha("u-key")], "quota": {"rows_per_day": 5}},
                {"id": "v", "api_keys": ["sha256:" + _sha("v-key")], "max_concurrency": 10},
            ],
            "models": [ECHO_MODEL, slow, quick],
        },
        "test",
    )
    server = serve(request.param, config, tmp_path_factory.mktemp("stream"))
    yield server
    server.stop()


async def inflight(server: Server, tenant: str) -> float:
    """The tenant's calls being served now, from the server's /metrics."""
    value = await asyncio.to_thread(
        metric, server, ADMIN_KEY, "mandant_inflight_requests", tenant=tenant
    )
    return value or 0.0


def _sha(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


async def test_quotas_apply_per_message(limited_server: Server) -> None:
    responses = await _raw_stream(
        limited_server.target,
        [_request("echo", f"q{i}") for i in range(8)],
        (("authorization", "Bearer u-key"),),
    )
    codes = sorted(
        r.infer_response.parameters["status_code"].string_param or "OK" for r in responses
    )
    assert codes.count("OK") == 5
    assert codes.count("RESOURCE_EXHAUSTED") == 3
    exhausted = [r for r in responses if r.error_message]
    assert all(r.infer_response.parameters["retry_pushback_ms"].int64_param > 0 for r in exhausted)


async def test_leaving_a_stream_frees_its_queue_places_and_concurrency(
    limited_server: Server,
) -> None:
    """Two messages of a stream occupy tenant t's two concurrency slots on the slow
    model (one running for a second, one queued); when the client leaves, both are
    cancelled (and counted so: they were once counted OK): the queued one's slot is
    free at once, the running one's when its forward pass ends (it ran: charged), and t
    can call again. (It waited 0.5 s for both, about what was left of the second on a
    quiet machine: under load it failed.)"""
    cancelled = {"tenant": "t", "model": "slow", "code": "CANCELLED"}
    before = await _counted(limited_server, cancelled)
    async with grpc.aio.insecure_channel(limited_server.target) as channel:
        method = channel.stream_stream(
            STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        call = method(metadata=(("authorization", "Bearer t-key"),))
        await call.write(_request("slow", "s1"))
        await call.write(_request("slow", "s2"))
        for _ in range(100):
            if await inflight(limited_server, "t") == 2:
                break
            await asyncio.sleep(0.01)
        assert await inflight(limited_server, "t") == 2
        call.cancel()
    for _ in range(50):  # well before the first message's second of compute ends
        if await inflight(limited_server, "t") <= 1:
            break
        await asyncio.sleep(0.01)
    assert await inflight(limited_server, "t") <= 1
    for _ in range(500):
        if await inflight(limited_server, "t") == 0:
            break
        await asyncio.sleep(0.01)
    assert await inflight(limited_server, "t") == 0
    await _until_counted(limited_server, cancelled, before + 2)
    async with grpc.aio.insecure_channel(limited_server.target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        answer = await infer(
            _request("slow", "after"), metadata=(("authorization", "Bearer t-key"),)
        )
        assert answer.id == "after"


async def test_a_message_past_the_stream_s_deadline_is_counted_so(
    limited_server: Server,
) -> None:
    """The client saw DEADLINE_EXCEEDED: the message is counted DEADLINE_EXCEEDED (as a
    unary call is: SLOs count it bad), not OK."""
    expired = {"tenant": "v", "model": "slow", "code": "DEADLINE_EXCEEDED"}
    before = await _counted(limited_server, expired)
    async with grpc.aio.insecure_channel(limited_server.target) as channel:
        method = channel.stream_stream(
            STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        call = method(metadata=(("authorization", "Bearer v-key"),), timeout=0.3)
        await call.write(_request("slow", "late"))
        assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _until_counted(limited_server, expired, before + 1)


async def _counted(server: Server, labels: dict[str, str]) -> float:
    found = await asyncio.to_thread(metric, server, ADMIN_KEY, "mandant_requests_total", **labels)
    return found or 0.0


async def _until_counted(server: Server, labels: dict[str, str], count: float) -> None:
    """Wait until ``mandant_requests_total`` with ``labels`` reaches ``count`` (a front
    end reports its calls to the engine just after them); it must not pass it."""
    for _ in range(250):
        counted = await _counted(server, labels)
        if counted >= count:
            assert counted == count, (labels, counted, count)
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{labels}: {await _counted(server, labels)} counted, not {count}")


async def test_in_flight_messages_per_stream_are_capped(limited_server: Server) -> None:
    """With max_stream_inflight=2, a stream of slow messages has at most two being
    served at once (the rest are not read yet): concurrency never passes 2 though the
    tenant may run 10."""
    for _ in range(500):  # a message given up while its batch runs holds its place until
        if not await inflight(limited_server, "v"):  # the batch ends (an earlier test's)
            break
        await asyncio.sleep(0.01)
    peak = 0.0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, await inflight(limited_server, "v"))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    responses = await _raw_stream(
        limited_server.target,
        [_request("quick", f"s{i}") for i in range(8)],
        (("authorization", "Bearer v-key"),),
    )
    watcher.cancel()
    assert len(responses) == 8
    assert all(not r.error_message for r in responses)
    assert peak == 2


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_an_open_stream_ends_when_the_server_stops(tmp_path: Path, kind: str) -> None:
    """A stream held open between calls ends when the server stops, its message in
    flight answered first: it once stayed open for the whole grace period, every
    message on it refused UNAVAILABLE, and its client never opened a new one elsewhere.
    A client that does not send its unread messages again (tritonclient) is told
    UNAVAILABLE: a stream that ended OK was "active" to tritonclient for ever, and the
    messages its application wrote next were never answered nor failed. A client that
    had half-closed has nothing left unanswered: its stream ends OK."""
    slow = {
        **ECHO_MODEL,
        "name": "slow",
        "factory": "tests.integration.slow_models:sleepy",
        "factory_args": {"seconds": 0.5},
    }
    config = parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "rest_port": 0,
                "grace_s": 20,
                "admin_keys": ["sha256:" + _sha("admin-key")],
            },
            "tenants": [{"id": "t", "api_keys": ["sha256:" + _sha("t-key")]}],
            "models": [ECHO_MODEL, slow],
        },
        "test",
    )
    server = serve(kind, config, tmp_path)

    def in_flight() -> float | None:
        return metric(server, "admin-key", "mandant_inflight_requests", tenant="t")

    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            method = channel.stream_stream(
                STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString
            )
            stream = method(metadata=(("authorization", "Bearer t-key"),))
            await stream.write(_request("echo", "first"))
            assert (await stream.read()).infer_response.id == "first"
            await stream.write(_request("slow", "in-flight"))
            # A client that has sent all it will: it misses nothing, its stream ends OK.
            done = method(metadata=(("authorization", "Bearer t-key"),))
            await done.write(_request("slow", "last"))
            await done.done_writing()
            deadline = time.monotonic() + 30
            while await asyncio.to_thread(in_flight) != 2:  # the messages are in the model
                assert time.monotonic() < deadline, "the messages never reached the model"
                await asyncio.sleep(0.01)
            stopping = asyncio.create_task(asyncio.to_thread(server.stop, 20))
            answer = await stream.read()
            assert answer.infer_response.id == "in-flight" and not answer.error_message
            assert await stream.code() == grpc.StatusCode.UNAVAILABLE
            assert await stream.details() == "server is shutting down: this stream has ended"
            answer = await done.read()
            assert answer.infer_response.id == "last" and not answer.error_message
            assert await done.code() == grpc.StatusCode.OK
    finally:
        if stopping is None:
            server.stop()
        else:
            await stopping


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_a_multiplexing_client_calling_on_does_not_hold_a_stop(
    tmp_path: Path, kind: str
) -> None:
    """A multiplexed client calling without pause while the server stops: its stream
    ends, and the next one it opens (the server still takes calls for a moment) is
    refused UNAVAILABLE, as a unary call is. That one once stayed open, never ended:
    the stop took its whole grace (8 s of 8), every call on it refused."""
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "grace_s": 8},
            "tenants": [{"id": "t", "api_keys": ["sha256:" + _sha("t-key")]}],
            "models": [ECHO_MODEL],
        },
        "test",
    )
    server = serve(kind, config, tmp_path)
    answered = 0
    warm, stopped = asyncio.Event(), asyncio.Event()
    failures: set[str] = set()
    took_s = None
    try:
        async with AsyncClient(
            server.target, api_key="t-key", multiplex=True, timeout_s=30
        ) as client:

            async def worker() -> None:
                nonlocal answered
                while not stopped.is_set():
                    try:
                        await client.infer("echo", {"INPUT0": np.ones((1, 4), np.float32)})
                        answered += 1
                        if answered >= 100:
                            warm.set()
                    except MandantClientError as exc:
                        failures.add(f"{exc.code.name}: {exc.message}")
                        await asyncio.sleep(0.05)

            workers = [asyncio.create_task(worker()) for _ in range(4)]
            await asyncio.wait_for(warm.wait(), 30)
            start = time.monotonic()
            await asyncio.to_thread(server.stop, 8)
            took_s = time.monotonic() - start
            stopped.set()
            await asyncio.gather(*workers)
    finally:
        stopped.set()
        if took_s is None:
            server.stop()
    assert took_s < 4, f"the stop took {took_s:.1f} s of its 8 s grace"
    # Refused, or the server gone; a call gRPC had received but not handed over as it
    # stopped is CANCELLED by gRPC (calling again at once kept the server from going
    # quiet first: ``GrpcServer.stop``).
    assert {failure.split(":")[0] for failure in failures} <= {"UNAVAILABLE", "CANCELLED"}


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_a_stream_that_is_not_read_holds_at_most_its_bytes(tmp_path: Path, kind: str) -> None:
    """A client writing large messages without reading the answers: the stream stops
    being read once its messages and unwritten answers reach twice
    ``max_message_bytes`` (by count alone, 128 messages of 64 MiB held 21 GiB)."""
    config = parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "rest_port": 0,
                "max_message_bytes": 1 << 20,
                "admin_keys": ["sha256:" + _sha(ADMIN_KEY)],
            },
            "tenants": [{"id": "w", "api_keys": ["sha256:" + _sha("w-key")]}],
            "models": [ECHO_MODEL],
        },
        "test",
    )
    server = serve(kind, config, tmp_path)
    try:
        message = pb.ModelInferRequest(model_name="echo")
        message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 230_000])  # 0.9 MiB
        message.raw_input_contents.append(bytes(920_000))
        raw = message.SerializeToString()
        # No BDP probing: the client's receive window stays at HTTP/2's 64 KiB (probed,
        # it grew on a loaded machine until 21 answers had been written into it).
        options = [("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(server.target, options=options) as channel:
            method = channel.stream_stream(STREAM)
            call = method(metadata=(("authorization", "Bearer w-key"),))
            writes = asyncio.ensure_future(_write_all(call, [raw] * 30))
            await asyncio.sleep(2)  # the server reads what it will; the answers wait
            answered = await _counted(server, {"tenant": "w", "model": "echo", "code": "OK"})
            # Three at most held here; those written wait in gRPC's buffers (bounded
            # by HTTP/2 flow control).
            assert 1 <= answered <= 12, answered
            call.cancel()
            writes.cancel()
    finally:
        server.stop()


async def _write_all(call: Any, messages: list[bytes]) -> None:
    for message in messages:
        await call.write(message)


async def test_streams_whose_deadline_passes_as_they_open_log_no_error(
    demo_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream whose deadline passes while the server opens it (its initial metadata
    then fails in gRPC's core) ends as DEADLINE_EXCEEDED quietly, as unary calls do:
    it was logged as an internal error with a traceback, twice (a few in a thousand)."""

    acme = (("authorization", f"Bearer {DEMO_KEYS['acme']}"),)

    async def one(channel: grpc.aio.Channel, timeout_s: float) -> None:
        call = channel.stream_stream(STREAM)(metadata=acme, timeout=timeout_s)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(call.write(_request()), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(call.code(), 5)

    with caplog.at_level(logging.ERROR):
        async with grpc.aio.insecure_channel(demo_server.target) as channel:
            for round_ in range(10):
                timeouts = [0.0002 + 0.0002 * ((round_ * 40 + i) % 25) for i in range(40)]
                await asyncio.gather(*(one(channel, t) for t in timeouts))
        await asyncio.sleep(0.5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors[:3]]


async def test_a_stream_cancelled_while_its_answers_wait_logs_no_error(
    demo_server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that cancels its stream while answers wait to be written (it read none
    of them): each waiting write fails, which ends that message quietly. It was an
    ERROR with a traceback ("Task exception was never retrieved") per message, so any
    client could fill the log with its ordinary cancellations."""
    message = pb.ModelInferRequest(model_name="echo")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 250_000])  # 1 MB
    message.raw_input_contents.append(bytes(1_000_000))
    raw = message.SerializeToString()
    acme = (("authorization", f"Bearer {DEMO_KEYS['acme']}"),)
    slow_reader = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            async with grpc.aio.insecure_channel(demo_server.target, options=slow_reader) as ch:
                call = ch.stream_stream(STREAM)(metadata=acme)
                for _ in range(6):
                    await call.write(raw)
                await asyncio.sleep(0.5)  # answered; the answers wait for a reader
                call.cancel()
            await asyncio.sleep(0.5)
        gc.collect()  # a failed task's exception is reported when the task is collected
        await asyncio.sleep(0.2)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors[:3]]


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_a_message_whose_stream_ends_mid_forward_keeps_its_model_busy(
    tmp_path: Path, kind: str
) -> None:
    """A stream's deadline passed while its message ran on a model without batching:
    the message's call ended at once and gave the model's slot back, so the next call
    went straight to the busy model's thread and ran after it (OK after 1.5 s) instead
    of waiting for a slot in the fair queue, where its v2 timeout ends it. The message
    now ends with its forward pass (and the stream's reader cancels it once: a second
    cancellation would end that wait)."""
    sleepy = {
        **ECHO_MODEL,
        "name": "sleepy",
        "factory": "tests.integration.slow_models:sleepy",
        "factory_args": {"seconds": 1.0},
    }
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0},
            "tenants": [{"id": "t", "api_keys": ["sha256:" + _sha("t-key")]}],
            "models": [sleepy],
        },
        "test",
    )
    key = (("authorization", "Bearer t-key"),)
    server = serve(kind, config, tmp_path)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            method = channel.stream_stream(
                STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString
            )
            call = method(metadata=key, timeout=0.3)
            await call.write(_request("sleepy", "running"))
            await call.done_writing()  # the reader waits for the message's answer
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            timed = pb.ModelInferRequest.FromString(_request("sleepy", "next"))
            timed.parameters["timeout"].int64_param = 200_000  # µs
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await infer(timed.SerializeToString(), metadata=key, timeout=10)
            assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "while queued" in str(refused.value.details())
    finally:
        server.stop()
