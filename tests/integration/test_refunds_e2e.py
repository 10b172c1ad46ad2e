"""Refused work is not charged, over real gRPC (local store): a call admitted and then
refused — queue full, deadline passed in the queue, v2 ``timeout`` already past,
undecodable tensors, its model shutting down, its client cancelling — gives back its
quota rows, its tokens and its concurrency slot; a call larger than a whole quota is
FAILED_PRECONDITION without a pushback. Models wait on ``gated_models.GATE`` so that
calls sit in the batcher's queue exactly as each test arranges them; the gate is an
event of the test's own process, so those tests run against one process only (the
rest run against ``workers: 2`` too)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from mandant.config import MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from mandant.types import Tenant
from mandant_client._proto import admin_pb2, admin_pb2_grpc
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.integration.gated_models import GATE, POISON_GATE, POISONED
from tests.servers import (
    ECHO_MODEL,
    SERVER_KINDS,
    Server,
    ServerThread,
    metric,
    metric_sum,
    serve,
)

ADMIN_KEY = "refunds-admin-key"
REQUESTS = "mandant_requests_total"
QUOTA = 60
MAX_CONCURRENCY = 3
MAX_BATCH = MAX_QUEUE_ROWS = 4
TENANTS = (
    "queue", "expiry", "late", "garbled", "drain", "cancel", "repro", "blocker", "ran",
    "poisoner", "left",
)  # fmt: skip
GATED = {
    **ECHO_MODEL,
    "factory": "tests.integration.gated_models:gated",
    "device": "cpu",
    "instances": 1,
    "batching": {
        "max_batch_size": MAX_BATCH,
        "max_queue_rows": MAX_QUEUE_ROWS,
        "max_queue_delay_ms": 0,
    },
}


def refunds_config() -> MandantConfig:
    def tenant(name: str, **limits: object) -> dict[str, object]:
        return {"id": name, "api_keys": [hash_key(f"{name}-key")], **limits}

    return parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "rest_port": 0,
                "grace_s": 0,
                "admin_keys": [hash_key(ADMIN_KEY)],
            },
            "tenants": [
                *(
                    tenant(
                        name,
                        quota={"rows_per_day": QUOTA},
                        max_concurrency=MAX_CONCURRENCY,
                        rate_limit={"requests_per_s": 0.001, "burst": 20},
                    )
                    for name in TENANTS
                ),
                tenant("small", quota={"rows_per_day": 5}),
                tenant("narrow", rate_limit={"rows_per_s": 100, "rows_burst": 4}),
                tenant("free"),  # no quota: /usage counts its rows all the same
            ],
            "models": [
                ECHO_MODEL,
                {**GATED, "name": "gated"},
                {**GATED, "name": "closing"},
                {**GATED, "name": "poisoned", "factory": "tests.integration.gated_models:poisoned"},
            ],
        }
    )


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    GATE.set()
    running = serve(request.param, refunds_config(), tmp_path_factory.mktemp("refunds"))
    yield running
    running.stop()
    GATE.set()


def gated(server: Server) -> ServerThread:
    """The server, for a test that holds the model at ``GATE`` (one process only)."""
    if not isinstance(server, ServerThread):
        pytest.skip("GATE is an event of the test's process; the engine runs the model apart")
    return server


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    GATE.clear()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        GATE.set()


def request(model: str, rows: int, timeout_us: int | None = None) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 2])
    message.raw_input_contents.append(bytes(rows * 8))
    if timeout_us is not None:
        message.parameters["timeout"].int64_param = timeout_us
    return message


def garbled(rows: int) -> pb.ModelInferRequest:
    """Framing that passes the cheap checks before admission; the values do not fit
    the shape, which only decoding finds out."""
    message = pb.ModelInferRequest(model_name="echo")
    tensor = message.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 2])
    tensor.contents.fp32_contents.extend([0.0] * (rows * 2 + 1))
    return message


def key(tenant: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {tenant}-key"),)


def used(server: Server, tenant: str) -> int:
    """The rows counted against the tenant's quota today (AdminService.GetUsage)."""
    with grpc.insecure_channel(server.target) as channel:
        reply = admin_pb2_grpc.AdminServiceStub(channel).GetUsage(
            admin_pb2.GetUsageRequest(tenant=tenant),
            metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
        )
    (usage,) = reply.tenants
    return int(usage.rows_today)


def inflight(server: Server, tenant: str) -> int:
    value = metric(server, ADMIN_KEY, "mandant_inflight_requests", tenant=tenant)
    return int(value or 0)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    """Wait for the server to reach a state (no timing is asserted)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_a_call_refused_for_a_full_queue_is_not_charged(
    server: Server, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    server = gated(server)
    running = stub.ModelInfer(request("gated", 4), metadata=key("queue"))
    queued = stub.ModelInfer(request("gated", 4), metadata=key("queue"))
    await until(lambda: inflight(server, "queue") == 2, "two calls in the model")
    error = await refused(stub.ModelInfer(request("gated", 3), metadata=key("queue")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue of model 'gated' is full" in (error.details() or "")
    GATE.set()
    await running
    await queued
    assert used(server, "queue") == 8


async def test_a_call_whose_deadline_passes_in_the_queue_is_not_charged(
    server: Server, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    server = gated(server)
    running = stub.ModelInfer(request("gated", 4), metadata=key("expiry"))
    await until(lambda: inflight(server, "expiry") == 1, "a call in the model")
    error = await refused(
        stub.ModelInfer(request("gated", 3, timeout_us=200_000), metadata=key("expiry"))
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert inflight(server, "expiry") == 1
    GATE.set()
    await running
    assert used(server, "expiry") == 4


async def test_a_call_whose_client_gives_up_while_the_model_runs_it_stays_charged(
    server: Server, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """The model computes its rows whatever the caller does: they stay counted (they
    were refunded, so a deadline shorter than the model's time ran it past the quota
    for free)."""
    server = gated(server)
    running = stub.ModelInfer(request("gated", 3), metadata=key("ran"), timeout=1.0)
    await until(lambda: inflight(server, "ran") == 1, "the call in the model")
    error = await refused(running)  # the model waits at GATE past the client's deadline
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    GATE.set()
    await until(lambda: inflight(server, "ran") == 0, "the call done")
    assert used(server, "ran") == 3


async def test_a_call_given_up_in_a_batch_that_fails_is_not_charged(
    server: Server, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """Another tenant's poisoned rows fail the batch while this tenant's caller has
    left: the batch is retried in parts and the part of a caller who left is not, so
    the model never ran on its rows: refunded, when the batch has failed (its caller
    left while the batch ran, when the charge could not be known yet: it was kept)."""
    server = gated(server)
    POISON_GATE.clear()
    POISONED.clear()
    try:
        blocker = stub.ModelInfer(request("poisoned", 1), metadata=key("blocker"))
        await until(lambda: inflight(server, "blocker") == 1, "the model busy")
        poison = request("poisoned", 1)
        poison.raw_input_contents[0] = np.full(2, -1, np.float32).tobytes()
        failing = stub.ModelInfer(poison, metadata=key("poisoner"))
        leaving = stub.ModelInfer(request("poisoned", 1), metadata=key("left"))
        await until(lambda: inflight(server, "left") == 1, "both queued behind the blocker")
        GATE.set()  # the blocker ends; the poisoned batch of both waits at POISON_GATE
        await until(POISONED.is_set, "the poisoned batch running")
        assert leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await until(
            lambda: metric_sum(server, ADMIN_KEY, REQUESTS, tenant="left", code="CANCELLED") == 1,
            "the server saw the caller leave",
        )
        POISON_GATE.set()
        assert (await refused(failing)).code() == grpc.StatusCode.INVALID_ARGUMENT  # ModelFailed
        await blocker
    finally:
        POISON_GATE.set()
    await until(lambda: inflight(server, "left") == 0, "the batch settled the call")
    assert used(server, "left") == 0
    assert used(server, "poisoner") == 1  # its own part failed alone: charged


async def test_a_v2_timeout_already_past_and_undecodable_tensors_are_not_charged(
    server: Server, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    GATE.set()
    late = await refused(stub.ModelInfer(request("echo", 5, timeout_us=1), metadata=key("late")))
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    bad = await refused(stub.ModelInfer(garbled(5), metadata=key("garbled")))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert used(server, "late") == used(server, "garbled") == 0


async def test_a_tenant_without_a_quota_is_shown_its_rows_net_of_refunds(
    server: Server, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    GATE.set()
    await stub.ModelInfer(request("echo", 2), metadata=key("free"))
    late = await refused(stub.ModelInfer(request("echo", 5, timeout_us=1), metadata=key("free")))
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert used(server, "free") == 2  # the 5 rows refunded are not counted (it said 7)


async def test_calls_refused_by_a_model_shutting_down_are_not_charged(
    server: Server, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """The backend's scheduler goes away under queued calls (as at shutdown): they and
    any call after them are UNAVAILABLE, after admission, and none is charged."""
    server = gated(server)
    assert server.app is not None
    scheduler = server.app.registry.resolve(Tenant("drain"), "closing").scheduler
    running = stub.ModelInfer(request("closing", 4), metadata=key("drain"))
    await until(lambda: inflight(server, "drain") == 1, "a call in the model")
    queued = stub.ModelInfer(request("closing", 2), metadata=key("drain"))
    await until(lambda: inflight(server, "drain") == 2, "two calls in the model")

    async def close() -> asyncio.Task[None]:
        return asyncio.create_task(scheduler.aclose())

    async def closed(task: asyncio.Task[None]) -> None:
        await task

    closing = server.call(close())
    assert (await refused(queued)).code() == grpc.StatusCode.UNAVAILABLE
    after = await refused(stub.ModelInfer(request("closing", 1), metadata=key("drain")))
    assert after.code() == grpc.StatusCode.UNAVAILABLE
    GATE.set()
    await running  # it ran: charged
    server.call(closed(closing))
    assert used(server, "drain") == 4


async def test_client_cancellations_free_queue_rows_and_concurrency_and_are_not_charged(
    server: Server, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """Real gRPC cancellations while calls wait in a stuck model's queue: afterwards
    the tenant runs ``max_concurrency`` calls that fill its whole queue again."""
    server = gated(server)
    blocker = stub.ModelInfer(request("gated", 1), metadata=key("blocker"))
    await until(lambda: inflight(server, "blocker") == 1, "the model busy")
    waiting = [stub.ModelInfer(request("gated", 1), metadata=key("cancel")) for _ in range(2)]
    expiring = stub.ModelInfer(request("gated", 1), metadata=key("cancel"), timeout=0.5)
    await until(lambda: inflight(server, "cancel") == MAX_CONCURRENCY, "three calls queued")
    over = await refused(stub.ModelInfer(request("gated", 1), metadata=key("cancel")))
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrency=3" in (over.details() or "")
    for call in waiting:
        assert call.cancel()
    for call in waiting:
        with pytest.raises(asyncio.CancelledError):
            await call
    assert (await refused(expiring)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: inflight(server, "cancel") == 0, "the server saw the cancellations")
    assert used(server, "cancel") == 0
    # The whole queue (4 rows) and every concurrency slot are the tenant's again.
    refill = [stub.ModelInfer(request("gated", rows), metadata=key("cancel")) for rows in (2, 1, 1)]
    await until(lambda: inflight(server, "cancel") == MAX_CONCURRENCY, "three calls again")
    GATE.set()
    for call in refill:
        await call
    await blocker
    assert used(server, "cancel") == MAX_QUEUE_ROWS


async def test_fourteen_refused_calls_leave_the_whole_quota(
    server: Server, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """The issue's reproduction: 14 refused calls (47 rows) used to take 47 of a
    60-row daily quota; now they take nothing and a 60-row call still fits."""
    GATE.set()
    for rows in (3, 4, 2, 5, 3, 4, 2):
        error = await refused(stub.ModelInfer(garbled(rows), metadata=key("repro")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    for rows in (4, 3, 5, 2, 3, 4, 3):
        error = await refused(
            stub.ModelInfer(request("echo", rows, timeout_us=1), metadata=key("repro"))
        )
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert used(server, "repro") == 0
    refunded = metric(
        server, ADMIN_KEY, "mandant_refunded_rows_total", tenant="repro", model="echo"
    )
    assert refunded == 47  # and the metrics say so
    await stub.ModelInfer(request("echo", QUOTA), metadata=key("repro"))
    assert used(server, "repro") == QUOTA


async def test_more_rows_than_a_whole_quota_is_failed_precondition_without_pushback(
    server: Server, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    GATE.set()
    error = await refused(stub.ModelInfer(request("echo", 6), metadata=key("small")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "exceeds the whole quota rows_per_day=5 for tenant small" in (error.details() or "")
    trailers = dict(error.trailing_metadata() or ())
    assert "grpc-retry-pushback-ms" not in trailers
    await stub.ModelInfer(request("echo", 5), metadata=key("small"))


async def test_more_rows_than_the_rows_burst_is_invalid_without_pushback(
    server: Server, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    GATE.set()
    error = await refused(stub.ModelInfer(request("echo", 5), metadata=key("narrow")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds rows_burst=4 for tenant narrow" in (error.details() or "")
    assert "grpc-retry-pushback-ms" not in dict(error.trailing_metadata() or ())
    await stub.ModelInfer(request("echo", 4), metadata=key("narrow"))
