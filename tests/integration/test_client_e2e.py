"""mandant_client against a real Mandant server (ServerThread, a small configuration
built here): every call of ``Client`` and ``AsyncClient``, the 64 MiB channel limits,
and the typed exception of every status the server gives, with the pushback of
RESOURCE_EXHAUSTED as ``retry_after_s`` — for ``infer`` both unary and multiplexed on
one ``ModelStreamInfer`` stream (``multiplex``). What a real server cannot be made to
answer on demand (INTERNAL, typed contents) is in tests/unit/test_client_wire.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from mandant.config import MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from mandant_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidInput,
    MandantClientError,
    ModelIndexEntry,
    ModelNotFound,
    QuotaExceeded,
    RateLimited,
    TensorMetadata,
    Unauthenticated,
    Unavailable,
)
from tests.servers import (
    ECHO_MODEL,
    SERVER_KINDS,
    ServerThread,
    WorkersServer,
    free_port,
    metric,
    serve,
)

ROWS = np.arange(8, dtype=np.float32).reshape(2, 4)
MODES = ("unary", "stream")
multiplexed = pytest.mark.parametrize("mode", MODES)
ADMIN_KEY = "admin-key"
#: The server's receive limit, under the client's 64 MiB send limit.
SERVER_MAX_MESSAGE_BYTES = 32 * 1024 * 1024


def client_config() -> MandantConfig:
    def tenant(name: str, **limits: object) -> dict[str, object]:
        return {"id": name, "api_keys": [hash_key(f"{name}-key")], **limits}

    private = {**ECHO_MODEL, "name": "secret", "tenant": "acme"}
    sleepy = {
        **ECHO_MODEL,
        "name": "sleepy",
        "factory": "tests.integration.slow_models:sleepy",
        "factory_args": {"seconds": 1.0},
    }
    return parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "rest_port": 0,
                "admin_keys": [hash_key(ADMIN_KEY)],
                "max_message_bytes": SERVER_MAX_MESSAGE_BYTES,
            },
            "tenants": [
                tenant("acme"),
                tenant("globex"),
                tenant("patient"),
                *(
                    tenant(f"limited-{mode}", rate_limit={"requests_per_s": 0.5, "burst": 1})
                    for mode in MODES
                ),
                *(tenant(f"budget-{mode}", quota={"rows_per_day": 2}) for mode in MODES),
            ],
            "models": [ECHO_MODEL, private, sleepy],
        }
    )


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread | WorkersServer]:
    running = serve(request.param, client_config(), tmp_path_factory.mktemp("client"))
    yield running
    running.stop()


def test_sync_client_every_call(server: ServerThread) -> None:
    with Client(server.target, api_key="acme-key", timeout_s=10) as client:
        assert client.server_live() and client.server_ready()
        assert client.server_metadata().name == "mandant"
        assert client.model_ready("echo") and client.model_ready("secret", version=1)
        assert not client.model_ready("nope")  # as Triton answers: not ready
        meta = client.model_metadata("echo", version=1)
        assert meta.name == "echo"
        assert meta.inputs == [TensorMetadata("INPUT0", "FP32", [-1, -1])]
        assert meta.outputs == [TensorMetadata("OUTPUT0", "FP32", [-1, -1])]
        assert sorted(m.name for m in client.models()) == ["echo", "secret", "sleepy"]
        assert all(isinstance(m, ModelIndexEntry) and m.state for m in client.models())
        outputs = client.infer(
            "echo", {"INPUT0": ROWS}, version=1, outputs=["OUTPUT0"], request_id="req-1"
        )
    np.testing.assert_array_equal(outputs["OUTPUT0"], ROWS)
    assert not outputs["OUTPUT0"].flags.writeable  # a view on the response, no copy


async def test_async_client_every_call(server: ServerThread) -> None:
    async with AsyncClient(server.target, api_key="acme-key", timeout_s=10) as client:
        assert await client.server_live() and await client.server_ready()
        assert (await client.server_metadata()).name == "mandant"
        assert await client.model_ready("secret", version=1)
        assert (await client.model_metadata("secret")).name == "secret"
        assert sorted(m.name for m in await client.models()) == ["echo", "secret", "sleepy"]
        outputs = await client.infer("secret", {"INPUT0": ROWS}, version=1)
    np.testing.assert_array_equal(outputs["OUTPUT0"], ROWS)


async def test_a_key_read_from_a_file_with_its_newline_is_sent_without_it(
    server: ServerThread,
) -> None:
    """``api_key=open(path).read()``: gRPC refused the header with its newline on every
    call (the sync client said ServerError, the async one raised grpc's own
    ExecuteBatchError, no MandantClientError). A key gRPC cannot send at all is a
    ValueError as the client is made, without the key."""
    with Client(server.target, api_key="acme-key\n", timeout_s=10) as client:
        np.testing.assert_array_equal(client.infer("echo", {"INPUT0": ROWS})["OUTPUT0"], ROWS)
    async with AsyncClient(server.target, api_key=" acme-key\r\n", timeout_s=10) as aclient:
        out = await aclient.infer("echo", {"INPUT0": ROWS})
    np.testing.assert_array_equal(out["OUTPUT0"], ROWS)
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match="api_key holds") as refused:
            make(server.target, api_key="acme-kéy")
        assert "acme" not in str(refused.value)


def test_health_needs_no_key_and_the_rest_does(server: ServerThread) -> None:
    with Client(server.target) as client:
        assert client.server_live() and client.server_ready()
        with pytest.raises(Unauthenticated):
            client.models()
        with pytest.raises(Unauthenticated):
            client.infer("echo", {"INPUT0": ROWS})
    with (
        Client(server.target, api_key="wrong-key") as client,
        pytest.raises(Unauthenticated) as caught,
    ):
        client.infer("echo", {"INPUT0": ROWS})
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert isinstance(caught.value.__cause__, grpc.RpcError)


@multiplexed
def test_another_tenants_private_model_is_not_found(server: ServerThread, mode: str) -> None:
    with Client(server.target, api_key="globex-key", multiplex=mode == "stream") as client:
        for call in (
            lambda: client.infer("secret", {"INPUT0": ROWS}, request_id="mine"),
            lambda: client.model_metadata("secret"),
            lambda: client.infer("unknown", {"INPUT0": ROWS}, request_id="mine"),
        ):
            with pytest.raises(ModelNotFound) as caught:
                call()
            assert caught.value.code is grpc.StatusCode.NOT_FOUND
        assert caught.value.request_id == "mine"
        assert not client.model_ready("secret")  # as for an unknown model, as Triton
        assert "secret" not in {m.name for m in client.models()}


@multiplexed
async def test_bad_tensors_are_invalid_input(server: ServerThread, mode: str) -> None:
    async with AsyncClient(server.target, api_key="acme-key", multiplex=mode == "stream") as client:
        bad: list[dict[str, Any]] = [
            {"INPUT0": ROWS.astype(np.float64)},  # wrong datatype
            {"WRONG": ROWS},  # wrong name
            {"INPUT0": np.zeros(4, np.float32)},  # wrong rank
        ]
        for inputs in bad:
            with pytest.raises(InvalidInput) as caught:
                await client.infer("echo", inputs)
            assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(InvalidInput):  # refused before sending: no v2 datatype
            await client.infer("echo", {"INPUT0": np.zeros((1, 4), np.complex64)})


@multiplexed
def test_rate_limit_is_rate_limited_with_pushback(server: ServerThread, mode: str) -> None:
    with Client(server.target, api_key=f"limited-{mode}-key", multiplex=mode == "stream") as client:
        client.infer("echo", {"INPUT0": ROWS})
        with pytest.raises(RateLimited) as caught:
            client.infer("echo", {"INPUT0": ROWS})
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.retry_after_s is not None and 0 < caught.value.retry_after_s <= 2.0


@multiplexed
async def test_quota_is_quota_exceeded_with_pushback(server: ServerThread, mode: str) -> None:
    key = f"budget-{mode}-key"
    async with AsyncClient(server.target, api_key=key, multiplex=mode == "stream") as client:
        await client.infer("echo", {"INPUT0": ROWS})  # both rows of the day
        with pytest.raises(QuotaExceeded) as caught:
            await client.infer("echo", {"INPUT0": ROWS[:1]})
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0


@multiplexed
def test_deadline_is_deadline_exceeded(server: ServerThread, mode: str) -> None:
    with (
        Client(server.target, api_key="acme-key", multiplex=mode == "stream") as client,
        pytest.raises(DeadlineExceeded) as caught,
    ):
        client.infer("sleepy", {"INPUT0": ROWS}, timeout_s=0.2)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_no_server_is_unavailable() -> None:
    target = f"127.0.0.1:{free_port()}"
    with Client(target, api_key="acme-key", timeout_s=5) as client, pytest.raises(Unavailable):
        client.infer("echo", {"INPUT0": ROWS})
    async with AsyncClient(target, api_key="acme-key", timeout_s=5) as aclient:
        with pytest.raises(Unavailable):
            await aclient.server_live()


@multiplexed
async def test_messages_above_grpc_default_4mib_pass(server: ServerThread, mode: str) -> None:
    big = np.ones((5 * 1024, 1024), dtype=np.float32)  # 20 MiB each way
    multiplex = mode == "stream"
    async with AsyncClient(
        server.target, api_key="acme-key", timeout_s=30, multiplex=multiplex
    ) as client:
        outputs = await client.infer("echo", {"INPUT0": big})
    np.testing.assert_array_equal(outputs["OUTPUT0"], big)


@multiplexed
async def test_a_message_over_the_servers_limit_is_invalid_input(
    server: ServerThread, mode: str
) -> None:
    """Not RateLimited: the same call fails the same way every time, retried or not."""
    over = np.zeros((SERVER_MAX_MESSAGE_BYTES // 4096 + 1, 1024), np.float32)
    async with AsyncClient(
        server.target, api_key="acme-key", timeout_s=30, multiplex=mode == "stream"
    ) as client:
        with pytest.raises(MandantClientError) as caught:
            await client.infer("echo", {"INPUT0": over}, request_id="big")
    assert type(caught.value) is InvalidInput, caught.value
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.message


def deadline_exceeded_counted(server: ServerThread, calls: int, timeout_s: float = 30) -> float:
    """How many of tenant patient's sleepy calls the server counts DEADLINE_EXCEEDED,
    once it counts ``calls`` (workers: a front end reports just after answering)."""
    labels = {"tenant": "patient", "model": "sleepy", "code": "DEADLINE_EXCEEDED"}
    deadline = time.monotonic() + timeout_s
    while (counted := metric(server, ADMIN_KEY, "mandant_requests_total", **labels) or 0) < calls:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return counted


async def test_a_multiplexed_calls_timeout_reaches_the_server(server: ServerThread) -> None:
    """Each message carries its time left (the v2 ``timeout``): the server drops those
    whose callers gave up (DEADLINE_EXCEEDED) instead of running them, a second of
    model each, ahead of the next call (about two seconds here, nine before)."""
    late = 8
    async with AsyncClient(server.target, api_key="patient-key", multiplex=True) as client:
        outcomes = await asyncio.gather(
            *(client.infer("sleepy", {"INPUT0": ROWS}, timeout_s=0.2) for _ in range(late)),
            return_exceptions=True,
        )
        assert all(type(o) is DeadlineExceeded for o in outcomes), outcomes
        outputs = await client.infer("sleepy", {"INPUT0": ROWS}, timeout_s=late - 2)
    np.testing.assert_array_equal(outputs["OUTPUT0"], ROWS * 2)
    # the one already running when its deadline passed too: its caller saw that (it
    # was counted OK, as answered)
    assert await asyncio.to_thread(deadline_exceeded_counted, server, late) >= late
