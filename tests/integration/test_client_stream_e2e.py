"""mandant_client's multiplexed mode against the real Mandant server (the demo
configuration): concurrent calls of one client share one ``ModelStreamInfer`` stream,
each gets its own outputs, a bad message gets its own typed error while the others go
on, a bad key fails the stream UNAUTHENTICATED, and a server that goes away fails the
pending calls UNAVAILABLE."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mandant.config import MandantConfig, parse_config
from mandant_client import (
    AsyncClient,
    Client,
    InvalidInput,
    MandantClientError,
    ModelNotFound,
    Unauthenticated,
    Unavailable,
)
from tests.servers import DEMO_CONFIG, ECHO_MODEL, Server, ServerThread, demo_config, metric

FRAUD_ROWS = np.zeros((1, 32), np.float32)  # acme's private model's input
BAD_ROWS = np.zeros((1, 3), np.float32)  # the classifier wants 256 columns


def echo_rows(i: int) -> np.ndarray:
    return np.full((1 + i % 3, 5), i, np.float32)


async def settle(calls: list[Any]) -> list[Any]:
    return await asyncio.gather(*calls, return_exceptions=True)


async def test_concurrent_calls_of_one_client_get_their_own_outputs(
    demo: Server,
) -> None:
    async with AsyncClient(demo.target, api_key="acme-demo-key", multiplex=True) as c:
        outputs = await settle(
            [c.infer("echo", {"INPUT0": echo_rows(i)}, request_id=f"r{i}") for i in range(200)]
        )
        fraud = await c.infer("fraud", {"INPUT0": FRAUD_ROWS})
    for i, out in enumerate(outputs):
        np.testing.assert_array_equal(out["OUTPUT0"], echo_rows(i))
    assert fraud["SCORE"].shape == (1, 1)


async def test_bad_messages_get_their_own_typed_errors_and_the_stream_goes_on(
    demo: Server,
) -> None:
    key = "globex-demo-key"
    async with AsyncClient(demo.target, api_key=key, multiplex=True) as client:
        calls: list[Any] = []
        expected: list[type[MandantClientError] | np.ndarray] = []
        for i in range(30):
            if i % 3 == 1:
                calls.append(client.infer("fraud", {"INPUT0": FRAUD_ROWS}, request_id=f"r{i}"))
                expected.append(ModelNotFound)
            elif i % 3 == 2:
                calls.append(client.infer("classifier", {"INPUT0": BAD_ROWS}, request_id=f"r{i}"))
                expected.append(InvalidInput)
            else:
                calls.append(client.infer("echo", {"INPUT0": echo_rows(i)}, request_id=f"r{i}"))
                expected.append(echo_rows(i))
        outcomes = await settle(calls)
        after = await client.infer("echo", {"INPUT0": echo_rows(7)})

    for i, (outcome, want) in enumerate(zip(outcomes, expected, strict=True)):
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(outcome["OUTPUT0"], want)
        else:
            assert type(outcome) is want, outcome
            assert outcome.request_id == f"r{i}"
    assert "fraud" in str(outcomes[1]) and "expected shape" in str(outcomes[2])
    np.testing.assert_array_equal(after["OUTPUT0"], echo_rows(7))


@pytest.mark.parametrize("key", ["wrong-key", None])
async def test_a_bad_key_fails_the_stream_unauthenticated(demo: Server, key: str | None) -> None:
    async with AsyncClient(demo.target, api_key=key, multiplex=True) as client:
        outcomes = await settle(
            [client.infer("echo", {"INPUT0": echo_rows(i)}, request_id=f"r{i}") for i in range(8)]
        )
    assert all(type(o) is Unauthenticated for o in outcomes), outcomes
    assert sorted(o.request_id for o in outcomes) == sorted(f"r{i}" for i in range(8))


def threaded_calls(target: str, key: str, calls: list[Callable[[Client], Any]]) -> list[Any]:
    def attempt(call: Callable[[Client], Any], client: Client) -> Any:
        try:
            return call(client)
        except MandantClientError as exc:
            return exc

    with Client(target, api_key=key, multiplex=True) as client, ThreadPoolExecutor(16) as pool:
        return list(pool.map(attempt, calls, [client] * len(calls)))


async def test_sync_client_threads_share_a_stream(demo: Server) -> None:
    def echo(i: int) -> Callable[[Client], Any]:
        return lambda client: client.infer("echo", {"INPUT0": echo_rows(i)})

    calls = [echo(i) for i in range(64)]
    calls.append(lambda client: client.infer("fraud", {"INPUT0": FRAUD_ROWS}))
    calls.append(lambda client: client.infer("classifier", {"INPUT0": BAD_ROWS}))
    outcomes = await asyncio.to_thread(threaded_calls, demo.target, "initech-demo-key", calls)
    for i, out in enumerate(outcomes[:64]):
        np.testing.assert_array_equal(out["OUTPUT0"], echo_rows(i))
    assert type(outcomes[64]) is ModelNotFound and type(outcomes[65]) is InvalidInput


def with_sleepy_model(seconds: float = 0.5, **server: Any) -> MandantConfig:
    """The demo plus a model that takes ``seconds`` per batch; ``server``: settings."""
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], "grpc_port": 0, "http_port": 0, "rest_port": 0, **server}
    sleepy = {
        **ECHO_MODEL,
        "name": "sleepy",
        "factory": "tests.integration.slow_models:sleepy",
        "factory_args": {"seconds": seconds},
    }
    data["models"].append(sleepy)
    return parse_config(data, str(DEMO_CONFIG))


async def test_a_server_going_away_fails_pending_calls_unavailable(tmp_path: Path) -> None:
    with ServerThread(with_sleepy_model(), tmp_path) as server:
        async with AsyncClient(server.target, api_key="acme-demo-key", multiplex=True) as client:
            await client.infer("echo", {"INPUT0": echo_rows(0)})
            pending = [
                asyncio.create_task(client.infer("sleepy", {"INPUT0": echo_rows(i)}))
                for i in range(3)
            ]
            await asyncio.sleep(0.1)  # the messages reach the server (pending either way)
            await asyncio.to_thread(server.call, server.app.aclose(0))  # type: ignore[union-attr]
            for task in pending:
                with pytest.raises(Unavailable):
                    await task


def _sleepy_then_echo(
    client: Any, calls: int, timeout_s: float, rows: Callable[[int], np.ndarray] = echo_rows
) -> tuple[int, float]:
    """``calls`` sleepy calls at once (of ``rows(i)``) that give up after ``timeout_s``,
    then one echo call: how many sleepy calls were answered, and how long the echo call
    took."""

    def sleepy(i: int) -> bool:
        try:
            client.infer("sleepy", {"INPUT0": rows(i)}, timeout_s=timeout_s)
        except MandantClientError:
            return False
        return True

    with ThreadPoolExecutor(calls) as pool:
        answered = sum(pool.map(sleepy, range(calls)))
    start = time.monotonic()
    client.infer("echo", {"INPUT0": echo_rows(0)}, timeout_s=30)
    return answered, time.monotonic() - start


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_calls_given_up_are_withdrawn_not_left_unread_on_the_server(
    tmp_path: Path, kind: str
) -> None:
    """The server reads ``max_stream_inflight`` messages of a stream at a time. The
    client wrote all its calls' messages (64 in flight): those past the bound waited
    unread on the server, then ran one after another, each with its whole time left
    counted afresh from when it was read, long after its caller gave up, and every
    call behind them on the stream waited for them (an echo call 10 s). The server
    now says its bound as the stream opens, and the client writes no more than that
    unanswered: the rest stay in its outbox, where a call that gives up is withdrawn."""
    config = with_sleepy_model(0.5, max_stream_inflight=2)
    with ServerThread(config, tmp_path) as server:
        if kind == "sync":
            with Client(server.target, api_key="acme-demo-key", multiplex=True) as client:
                answered, echo_s = await asyncio.to_thread(_sleepy_then_echo, client, 24, 1.2)
        else:
            async with AsyncClient(
                server.target, api_key="acme-demo-key", multiplex=True
            ) as aclient:
                outcomes = await settle(
                    [
                        aclient.infer("sleepy", {"INPUT0": echo_rows(i)}, timeout_s=1.2)
                        for i in range(24)
                    ]
                )
                answered = sum(isinstance(o, dict) for o in outcomes)
                start = time.monotonic()
                await aclient.infer("echo", {"INPUT0": echo_rows(0)}, timeout_s=30)
                echo_s = time.monotonic() - start
    assert answered <= 3
    # At most the two messages read when the sleepy calls gave up still ran (1 s).
    assert echo_s < 4, echo_s


async def _async_sleepy_then_echo(
    target: str, calls: int, timeout_s: float, rows: Callable[[int], np.ndarray]
) -> tuple[int, float]:
    """:func:`_sleepy_then_echo` for the AsyncClient."""
    async with AsyncClient(target, api_key="acme-demo-key", multiplex=True) as client:
        outcomes = await settle(
            [client.infer("sleepy", {"INPUT0": rows(i)}, timeout_s=timeout_s) for i in range(calls)]
        )
        start = time.monotonic()
        await client.infer("echo", {"INPUT0": echo_rows(0)}, timeout_s=30)
        return sum(isinstance(o, dict) for o in outcomes), time.monotonic() - start


#: A server receive limit, and messages near it (48 KB): the server holds two limits'
#: worth of a stream's messages at once (``STREAM_BYTES``), i.e. reads three of them.
NEAR_LIMIT = 1 << 16


def near_limit_rows(i: int) -> np.ndarray:
    return np.full((1, 12_000), i, np.float32)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_large_calls_given_up_are_withdrawn_not_run_late(tmp_path: Path, kind: str) -> None:
    """The server also stops reading a stream at ``2 × max_message_bytes`` held. The
    client kept to its bound on messages only (128): it wrote every call's message,
    those past the bytes waited unread in flow control, then each ran as it was read,
    its v2 timeout counted afresh from then: of 40 calls that gave up after 1.2 s (2
    answered), 38 ran and were charged, and an echo call behind them waited 18 s. The
    server now says its bytes too, and the client writes no more unanswered: the rest
    stay in its outbox, where a call that gives up is withdrawn, never run."""
    config = with_sleepy_model(0.5, max_message_bytes=NEAR_LIMIT)
    with ServerThread(config, tmp_path) as server:
        if kind == "sync":
            with Client(server.target, api_key="acme-demo-key", multiplex=True) as client:
                answered, echo_s = await asyncio.to_thread(
                    _sleepy_then_echo, client, 40, 1.2, near_limit_rows
                )
        else:
            answered, echo_s = await _async_sleepy_then_echo(
                server.target, 40, 1.2, near_limit_rows
            )
        sleepy = {"tenant": "acme", "model": "sleepy"}
        ran = metric(server, "admin-demo-key", "mandant_rows_total", **sleepy) or 0
        ok = metric(server, "admin-demo-key", "mandant_requests_total", code="OK", **sleepy) or 0
    # Run beyond the calls answered: at most the two messages unanswered (the client's
    # window) as the calls gave up, and a message answered as its caller gave up.
    assert ran <= answered + 4, (ran, answered)
    assert ok <= answered + 2, (ok, answered)
    assert echo_s < 4, echo_s


#: The server's receive limit in the next tests, and a message over it.
SERVER_LIMIT = 1 << 16
OVER_SERVER_LIMIT = np.ones((1, SERVER_LIMIT // 4), np.float32)


def assert_only_the_large_call_is_invalid(outcomes: list[Any]) -> None:
    """The calls ``s0``..``s2`` were pending on the stream when the server ended it for
    ``big``, over its receive limit: ``big`` fails InvalidInput as on a unary call, the
    others Unavailable (the stream ended; a retry succeeds)."""
    *small, big = outcomes
    assert type(big) is InvalidInput and big.request_id == "big", big
    assert re.search(rf"larger than max \(\d+ vs\. {SERVER_LIMIT}\)", big.message), big
    for i, error in enumerate(small):
        assert type(error) is Unavailable and error.request_id == f"s{i}", error
        assert "larger than max" in error.message, error


async def test_a_message_over_the_server_limit_fails_alone_the_others_retry(
    tmp_path: Path,
) -> None:
    config = with_sleepy_model(seconds=2, max_message_bytes=SERVER_LIMIT)
    with ServerThread(config, tmp_path) as server:
        async with AsyncClient(server.target, api_key="acme-demo-key", multiplex=True) as c:
            calls = [
                c.infer("sleepy", {"INPUT0": echo_rows(0)}, request_id=f"s{i}") for i in range(3)
            ]
            calls.append(c.infer("sleepy", {"INPUT0": OVER_SERVER_LIMIT}, request_id="big"))
            outcomes = await settle(calls)
            assert_only_the_large_call_is_invalid(outcomes)
            retried = await c.infer("echo", {"INPUT0": echo_rows(1)})  # a new stream
            np.testing.assert_array_equal(retried["OUTPUT0"], echo_rows(1))


def sync_calls_with_one_too_large(target: str) -> list[Any]:
    """Three calls from threads, then (once they wait on the stream) one too large."""

    def attempt(rows: np.ndarray, request_id: str) -> Any:
        try:
            return client.infer("sleepy", {"INPUT0": rows}, request_id=request_id)
        except MandantClientError as exc:
            return exc

    with (
        Client(target, api_key="acme-demo-key", multiplex=True) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        small = [pool.submit(attempt, echo_rows(0), f"s{i}") for i in range(3)]
        time.sleep(1)  # they are sent; the model holds them 3 s
        big = pool.submit(attempt, OVER_SERVER_LIMIT, "big")
        outcomes = [f.result(30) for f in (*small, big)]
        retried = client.infer("echo", {"INPUT0": echo_rows(1)})  # a new stream
    np.testing.assert_array_equal(retried["OUTPUT0"], echo_rows(1))
    return outcomes


async def test_sync_a_message_over_the_server_limit_fails_alone(tmp_path: Path) -> None:
    config = with_sleepy_model(seconds=3, max_message_bytes=SERVER_LIMIT)
    with ServerThread(config, tmp_path) as server:
        outcomes = await asyncio.to_thread(sync_calls_with_one_too_large, server.target)
    assert_only_the_large_call_is_invalid(outcomes)


async def test_a_multiplexed_async_client_never_closed_lets_go_of_its_stream(
    tmp_path: Path,
) -> None:
    """An AsyncClient dropped without close(): its stream's tasks kept the stream open,
    a place among the tenant's streams on the server, for as long as the loop ran:
    with two allowed, the third dropped client's call was refused RESOURCE_EXHAUSTED.
    Collected, its stream is cancelled."""
    import gc

    async def dropped(target: str) -> None:
        client = AsyncClient(target, api_key="initech-demo-key", multiplex=True, timeout_s=10)
        answer = await client.infer("echo", {"INPUT0": echo_rows(1)})
        np.testing.assert_array_equal(answer["OUTPUT0"], echo_rows(1))

    with ServerThread(demo_config(max_tenant_streams=2), tmp_path) as server:
        for _ in range(5):
            await dropped(server.target)
            gc.collect()
            await asyncio.sleep(0.05)  # the server sees the stream cancelled


def test_a_multiplexed_client_never_closed_lets_go_of_its_stream(demo: Server) -> None:
    """A multiplexed Client dropped without close(): its stream's threads kept it, its
    stream and its channel alive (50 dropped clients held 151 threads, and their open
    streams took the connection's share of the server's, so that other clients' calls
    timed out). Collected, it closes as close() does."""
    import gc
    import threading

    def dropped() -> None:
        client = Client(demo.target, api_key="initech-demo-key", multiplex=True)
        np.testing.assert_array_equal(client.infer("echo", {"INPUT0": echo_rows(1)})["OUTPUT0"],
                                      echo_rows(1))  # fmt: skip

    before = threading.active_count()
    for _ in range(5):
        dropped()
    gc.collect()
    for _ in range(100):
        if threading.active_count() <= before + 1:  # gRPC may keep a poller of its own
            break
        time.sleep(0.05)
    assert threading.active_count() <= before + 1, threading.enumerate()
