"""gRPC health checking and server reflection stay open (no key) but bounded: an
over-long health request or an over-size reflection request is refused before it is
parsed (it was kept for as long as a Watch stream stayed open, or repeated in every
reflection answer), Watch streams open at once are capped server-wide, and so are
their messages read at once, each for a bounded time: a call that sends part of its
message and stops ends DEADLINE_EXCEEDED (unbounded, four health checks sending 30 of
40 MiB each held 125 MB for as long as their connection lived)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from mandant.transport.grpc import reads as reads_module
from mandant.transport.grpc.probes import (
    HEALTH_REQUEST_MAX_BYTES,
    REFLECTION_REQUEST_MAX_BYTES,
    add_health,
    add_reflection,
)
from mandant.transport.grpc.reads import PEER_OPEN_READS_MAX, MessageReads
from tests.integration.stalled_calls import StalledCalls
from tests.servers import Server

SERVING = health_pb2.HealthCheckResponse.SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
#: A one-string message's framing: the field's tag and a two-byte length.
FRAMING_BYTES = 3
LONGEST_NAME = "s" * (HEALTH_REQUEST_MAX_BYTES - FRAMING_BYTES)
OVER_LONG_NAME = LONGEST_NAME + "s"


def test_health_check_answers_probes_without_a_key(demo: Server) -> None:
    with grpc.insecure_channel(demo.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == SERVING
        # The stock semantics for a name within the bound: an unknown service.
        longest = health_pb2.HealthCheckRequest(service=LONGEST_NAME).ByteSize()
        assert longest == HEALTH_REQUEST_MAX_BYTES
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service=LONGEST_NAME), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_check_refuses_an_over_long_name(demo: Server) -> None:
    with grpc.insecure_channel(demo.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in (OVER_LONG_NAME, "x" * (1 << 20)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 256 bytes" in (err.value.details() or "")
            assert service not in (err.value.details() or "")


def test_health_watch_refuses_an_over_long_name(demo: Server) -> None:
    with grpc.insecure_channel(demo.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=OVER_LONG_NAME), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(watch)  # unbounded: SERVICE_UNKNOWN, and the name kept while it waits
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Within the bound, the stock semantics: SERVICE_UNKNOWN, and the stream waits.
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=LONGEST_NAME), timeout=10)
        assert next(watch).status == SERVICE_UNKNOWN
        watch.cancel()
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == SERVING
        watch.cancel()


#: How long the probes served by :func:`capped_health` wait for a message.
OPEN_READ_TIMEOUT_S = 2.0  # the stalled calls outlast a loaded box's refusal


@pytest.fixture
async def capped_health() -> AsyncIterator[str]:
    """A real gRPC server on a free port serving health and reflection as Mandant
    does, with room for two Watch streams and :data:`OPEN_READ_TIMEOUT_S` for a
    message; yields its address."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    reads = MessageReads(OPEN_READ_TIMEOUT_S, open_timeout_s=OPEN_READ_TIMEOUT_S)
    add_health(server, servicer, reads, max_watch_streams=2)
    add_reflection(server, reflection.aio.ReflectionServicer(["grpc.health.v1.Health"]), reads)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_watch_streams_open_at_once_are_capped(capped_health: str) -> None:
    async with grpc.aio.insecure_channel(capped_health) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        first, second = stub.Watch(request, timeout=30), stub.Watch(request, timeout=30)
        assert (await first.read()).status == SERVING
        assert (await second.read()).status == SERVING
        third = stub.Watch(request, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await third.read()
        # Not RESOURCE_EXHAUSTED, which failed every call of a health-checked channel:
        # UNIMPLEMENTED turns its health checking off, and it serves on.
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        checked = json.dumps(
            {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
        )
        options = [("grpc.service_config", checked), ("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(capped_health, options=options) as health_checked:
            health_checked_stub = health_pb2_grpc.HealthStub(health_checked)
            assert (await health_checked_stub.Check(request, timeout=10)).status == SERVING
        # A Check is not a Watch: still answered.
        assert (await stub.Check(request, timeout=10)).status == SERVING
        first.cancel()
        # The closed stream's place is given back (once the server has seen it go).
        for _ in range(200):
            again = stub.Watch(request, timeout=30)
            try:
                assert (await again.read()).status == SERVING
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
        else:
            pytest.fail("the cancelled Watch stream's place was never given back")
        again.cancel()
        second.cancel()


def _reflect(
    target: str, requests: list[reflection_pb2.ServerReflectionRequest]
) -> list[reflection_pb2.ServerReflectionResponse]:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        return list(stub.ServerReflectionInfo(iter(requests), timeout=10))


def test_reflection_answers_without_a_key(demo: Server) -> None:
    name = "inference.GRPCInferenceService"
    listed, described = _reflect(
        demo.target,
        [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=name),
        ],
    )
    assert {name, "grpc.health.v1.Health", reflection.SERVICE_NAME} <= {
        s.name for s in listed.list_services_response.service
    }
    assert described.file_descriptor_response.file_descriptor_proto
    # A request within the bound: the stock answer, an error that repeats it.
    longest = "s" * (REFLECTION_REQUEST_MAX_BYTES - FRAMING_BYTES)
    (unknown,) = _reflect(
        demo.target, [reflection_pb2.ServerReflectionRequest(file_containing_symbol=longest)]
    )
    assert unknown.original_request.ByteSize() == REFLECTION_REQUEST_MAX_BYTES
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_reflection_refuses_an_over_size_request(demo: Server) -> None:
    over = "s" * REFLECTION_REQUEST_MAX_BYTES
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=over),
    ]
    with grpc.insecure_channel(demo.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(iter(requests), timeout=10)
        assert next(answers).list_services_response.service  # the first is answered
        with pytest.raises(grpc.RpcError) as err:
            next(answers)  # unbounded: an error answer that repeats the whole request
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert over not in (err.value.details() or "")


@pytest.mark.parametrize(
    "path",
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ],
)
async def test_probes_read_a_bounded_number_of_messages_for_a_bounded_time(
    capped_health: str, path: str
) -> None:
    """Calls without a key that send part of their message (or nothing of it) end
    DEADLINE_EXCEEDED; beyond ``PEER_OPEN_READS_MAX`` from one address the next is
    refused before its message is read. Counted server-wide alone, one client holding
    32 header-only health checks made every probe fail, a kubelet's with them: a probe
    from another address is answered, and so is one from the same address while its
    reflection streams wait (health checks and reflection are counted apart)."""
    port = int(capped_health.rsplit(":", 1)[1])
    service = "reflection" if "Reflection" in path else "health"
    calls = StalledCalls(port, path, calls=PEER_OPEN_READS_MAX + 1, declared=1 << 20)
    try:
        # The refusal comes at once, the stalled calls' ends after OPEN_READ_TIMEOUT_S
        # (0.3 s of it was too short on a loaded two-core box).
        refused = await asyncio.to_thread(calls.statuses, OPEN_READ_TIMEOUT_S * 0.75)
        assert refused == [
            (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{PEER_OPEN_READS_MAX} {service} calls from this address are sending their "
                f"messages (at most {PEER_OPEN_READS_MAX}): retry once they have",
            )
        ]
        assert await asyncio.to_thread(_check_from, port, "127.0.0.2") == grpc.StatusCode.OK
        if service == "reflection":
            assert await asyncio.to_thread(_check_from, port, "127.0.0.1") == grpc.StatusCode.OK
        statuses = await asyncio.to_thread(calls.statuses, 10)
    finally:
        calls.close()
    assert Counter(code for code, _ in statuses) == {
        grpc.StatusCode.DEADLINE_EXCEEDED: PEER_OPEN_READS_MAX,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 1,
    }
    # Every read given back: the next probes are answered.
    assert await asyncio.to_thread(_check_from, port, "127.0.0.1") == grpc.StatusCode.OK


def _check_from(port: int, source: str) -> grpc.StatusCode:
    """A whole health Check (an empty message: any service) from ``source``."""
    check = StalledCalls(port, "/grpc.health.v1.Health/Check", declared=0, sent=0, source=source)
    try:
        ((code, _),) = check.statuses(10)
        return code
    finally:
        check.close()


async def test_a_full_keyless_pool_sheds_the_address_holding_the_most(
    capped_health: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each address within its share (8), enough of them held every keyless health
    read the server allows (16 here, 128 served) and a kubelet's probe from another
    address was refused. It takes the place of the oldest read of the address holding
    the most, which is answered RESOURCE_EXHAUSTED (with pushback)."""
    monkeypatch.setattr(reads_module, "OPEN_READS_MAX", 2 * PEER_OPEN_READS_MAX)
    port = int(capped_health.rsplit(":", 1)[1])
    holders = [
        StalledCalls(port, "/grpc.health.v1.Health/Check", calls=PEER_OPEN_READS_MAX, source=source)
        for source in ("127.0.0.1", "127.0.0.2")
    ]
    try:
        await asyncio.sleep(0.1)  # every stalled read counted
        assert await asyncio.to_thread(_check_from, port, "127.0.0.3") == grpc.StatusCode.OK
        statuses = [s for calls in holders for s in await asyncio.to_thread(calls.statuses, 10)]
    finally:
        for calls in holders:
            calls.close()
    shed = [message for code, message in statuses if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(shed) == 1 and "place went to another client's" in shed[0], statuses
    assert len(statuses) == 2 * PEER_OPEN_READS_MAX
