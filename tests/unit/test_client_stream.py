"""The clients' multiplexed mode against a real grpc.aio server that keeps Mandant's
``ModelStreamInfer`` contract (tests/unit/fake_kserve.py): many calls of one client on
one stream, answers matched by id in any order, typed errors per message and per
stream, a bounded number in flight, reopening after a failure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from mandant_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    MandantClientError,
    ModelNotFound,
    QuotaExceeded,
    RateLimited,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from tests.unit.fake_kserve import API_KEY, DIE, HELD, PLAIN_ERROR, SLOW, FakeServer, serve_fake


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    async with serve_fake(hold=8) as fake:
        yield fake


def rows(i: int) -> dict[str, np.ndarray]:
    return {"X": np.full((1, 4), i, np.float32)}


async def test_a_server_that_sends_its_metadata_with_the_first_answer_is_served() -> None:
    """Triton (and a plain grpc.aio servicer) send a stream's initial metadata with the
    first answer: the client must not wait for it before writing the first message."""
    async with (
        serve_fake(early_metadata=False) as plain,
        AsyncClient(plain.target, API_KEY, multiplex=True, timeout_s=10) as client,
    ):
        answers = await asyncio.gather(*(client.infer("m", rows(i)) for i in range(4)))
    for i, answer in enumerate(answers):
        np.testing.assert_array_equal(answer["X"], rows(i)["X"])


async def test_concurrent_calls_share_one_stream_and_match_out_of_order(
    server: FakeServer,
) -> None:
    async with AsyncClient(server.target, api_key=API_KEY, multiplex=True) as client:
        results = await asyncio.gather(
            *(client.infer(HELD, rows(i), request_id=f"call-{i}") for i in range(8))
        )

    for i, outputs in enumerate(results):
        np.testing.assert_array_equal(outputs["X"], rows(i)["X"])
    assert server.servicer.streams_opened == 1
    sent = [r.id for r in server.servicer.seen_requests]
    assert len(set(sent)) == 8
    assert sorted(i.rpartition("#")[0] for i in sent) == sorted(f"call-{i}" for i in range(8))
    # the key travels once, when the stream opens
    assert [m["authorization"] for m in server.servicer.seen_metadata] == [f"Bearer {API_KEY}"]


async def test_same_caller_id_twice_in_flight_is_told_apart(server: FakeServer) -> None:
    async with AsyncClient(server.target, api_key=API_KEY, multiplex=True) as client:
        results = await asyncio.gather(
            *(client.infer(HELD, rows(i), request_id="same") for i in range(8))
        )
    assert [float(r["X"][0, 0]) for r in results] == [float(i) for i in range(8)]


ERRORS: list[tuple[str, type[MandantClientError], grpc.StatusCode, float | None]] = [
    ("missing", ModelNotFound, grpc.StatusCode.NOT_FOUND, None),
    ("bad", InvalidInput, grpc.StatusCode.INVALID_ARGUMENT, None),
    ("never", FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, None),
    ("limited", RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED, 1.5),
    ("quota", QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, 60.0),
    ("late", DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, None),
    ("down", Unavailable, grpc.StatusCode.UNAVAILABLE, None),
    ("broken", ServerError, grpc.StatusCode.INTERNAL, None),
    (PLAIN_ERROR, ServerError, grpc.StatusCode.UNKNOWN, None),
]


async def test_each_message_gets_its_own_typed_error_and_the_stream_goes_on(
    server: FakeServer,
) -> None:
    async with AsyncClient(server.target, api_key=API_KEY, multiplex=True) as client:
        for model, cls, code, retry_after_s in ERRORS:
            with pytest.raises(cls) as caught:
                await client.infer(model, rows(0), request_id=f"mine-{model}")
            assert type(caught.value) is cls
            assert caught.value.code is code
            assert caught.value.request_id == f"mine-{model}"
            assert getattr(caught.value, "retry_after_s", None) == retry_after_s
        outputs = await client.infer("echo", rows(3))
    np.testing.assert_array_equal(outputs["X"], rows(3)["X"])
    assert server.servicer.streams_opened == 1


@pytest.mark.parametrize(("model", "cls", "code", "retry_after_s"), ERRORS[:-1])
async def test_stream_and_unary_raise_the_same_error(
    server: FakeServer,
    model: str,
    cls: type[MandantClientError],
    code: grpc.StatusCode,
    retry_after_s: float | None,
) -> None:
    raised: list[MandantClientError] = []
    for multiplex in (False, True):
        async with AsyncClient(server.target, api_key=API_KEY, multiplex=multiplex) as client:
            with pytest.raises(MandantClientError) as caught:
                await client.infer(model, rows(0), request_id="r")
            raised.append(caught.value)
    unary, streamed = raised
    assert type(unary) is type(streamed) is cls
    assert (unary.code, unary.message, unary.request_id) == (
        streamed.code,
        streamed.message,
        streamed.request_id,
    )
    assert getattr(unary, "retry_after_s", None) == getattr(streamed, "retry_after_s", None)


async def test_bad_key_fails_every_pending_call_unauthenticated(server: FakeServer) -> None:
    for key in ("wrong", None):
        async with AsyncClient(server.target, api_key=key, multiplex=True) as client:
            outcomes = await asyncio.gather(
                *(client.infer("echo", rows(i), request_id=f"c{i}") for i in range(5)),
                return_exceptions=True,
            )
        assert all(isinstance(o, Unauthenticated) for o in outcomes), outcomes
        assert sorted(o.request_id for o in outcomes if isinstance(o, Unauthenticated)) == [
            f"c{i}" for i in range(5)
        ]


async def test_server_going_away_fails_pending_calls_unavailable_then_reopens(
    server: FakeServer,
) -> None:
    async with AsyncClient(server.target, api_key=API_KEY, multiplex=True) as client:
        await client.open_stream()
        pending = [asyncio.create_task(client.infer(SLOW, rows(i))) for i in range(3)]
        await server.servicer.until_in_flight(3)
        with pytest.raises(Unavailable, match="server going away"):
            await client.infer(DIE, rows(0))
        for task in pending:
            with pytest.raises(Unavailable):
                await task

        outputs = await client.infer("echo", rows(7))
    np.testing.assert_array_equal(outputs["X"], rows(7)["X"])
    assert server.servicer.streams_opened == 2


async def test_in_flight_is_bounded_by_the_client(server: FakeServer) -> None:
    server.servicer.hold = 4
    async with AsyncClient(server.target, api_key=API_KEY, multiplex=True, max_in_flight=4) as c:
        results = await asyncio.gather(*(c.infer(HELD, rows(i)) for i in range(20)))
    assert [float(r["X"][0, 0]) for r in results] == [float(i) for i in range(20)]
    assert server.servicer.max_in_flight == 4
    assert server.servicer.streams_opened == 1


async def test_timeout_fails_that_call_only(server: FakeServer) -> None:
    async with AsyncClient(server.target, api_key=API_KEY, multiplex=True) as client:
        with pytest.raises(DeadlineExceeded) as caught:
            await client.infer(SLOW, rows(0), timeout_s=0.05, request_id="late-one")
        assert caught.value.request_id == "late-one"
        outputs = await client.infer("echo", rows(2), timeout_s=5)
    np.testing.assert_array_equal(outputs["X"], rows(2)["X"])
    assert server.servicer.streams_opened == 1


async def test_close_fails_pending_calls_unavailable(server: FakeServer) -> None:
    client = AsyncClient(server.target, api_key=API_KEY, multiplex=True)
    pending = asyncio.create_task(client.infer(SLOW, rows(0)))
    await server.servicer.until_in_flight(1)
    await client.close()
    with pytest.raises(Unavailable, match="closed"):
        await pending


async def test_open_stream_needs_multiplex(server: FakeServer) -> None:
    async with AsyncClient(server.target, api_key=API_KEY) as client:
        with pytest.raises(RuntimeError):
            await client.open_stream()


async def test_no_server_is_unavailable() -> None:
    async with AsyncClient("127.0.0.1:1", api_key=API_KEY, multiplex=True) as client:
        with pytest.raises(Unavailable):
            await client.infer("echo", rows(0), timeout_s=5)


# -- the sync client, its calls from many threads ---------------------------------


def in_threads(target: str, calls: list[Callable[[Client], Any]], **kwargs: Any) -> list[Any]:
    """Run every call concurrently on one multiplexed Client; results or exceptions."""

    def attempt(call: Callable[[Client], Any], client: Client) -> Any:
        try:
            return call(client)
        except MandantClientError as exc:
            return exc

    with Client(target, multiplex=True, **kwargs) as client, ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(attempt, calls, [client] * len(calls)))


def infer_call(model: str, i: int, **kwargs: Any) -> Callable[[Client], Any]:
    return lambda client: client.infer(model, rows(i), request_id=f"t{i}", **kwargs)


async def test_sync_client_threads_share_one_stream(server: FakeServer) -> None:
    calls = [infer_call(HELD, i) for i in range(8)]
    results = await asyncio.to_thread(in_threads, server.target, calls, api_key=API_KEY)

    assert [float(r["X"][0, 0]) for r in results] == [float(i) for i in range(8)]
    assert server.servicer.streams_opened == 1


async def test_sync_client_typed_errors_per_message(server: FakeServer) -> None:
    calls = [infer_call(model, i) for i, (model, *_) in enumerate(ERRORS)]
    calls.append(infer_call("echo", 99))
    results = await asyncio.to_thread(in_threads, server.target, calls, api_key=API_KEY)

    for i, ((_, cls, code, retry_after_s), error) in enumerate(zip(ERRORS, results, strict=False)):
        assert type(error) is cls
        assert error.code is code and error.request_id == f"t{i}"
        assert getattr(error, "retry_after_s", None) == retry_after_s
    np.testing.assert_array_equal(results[-1]["X"], rows(99)["X"])
    assert server.servicer.streams_opened == 1


async def test_sync_client_bounds_in_flight(server: FakeServer) -> None:
    server.servicer.hold = 4
    calls = [infer_call(HELD, i) for i in range(20)]
    results = await asyncio.to_thread(
        in_threads, server.target, calls, api_key=API_KEY, max_in_flight=4
    )
    assert [float(r["X"][0, 0]) for r in results] == [float(i) for i in range(20)]
    assert server.servicer.max_in_flight == 4


async def test_sync_client_bad_key_and_timeout(server: FakeServer) -> None:
    calls = [infer_call("echo", i) for i in range(4)]
    results = await asyncio.to_thread(in_threads, server.target, calls, api_key="wrong")
    assert all(isinstance(r, Unauthenticated) for r in results), results

    late = await asyncio.to_thread(
        in_threads, server.target, [infer_call(SLOW, 0, timeout_s=0.05)], api_key=API_KEY
    )
    assert isinstance(late[0], DeadlineExceeded) and late[0].request_id == "t0"


def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        time.sleep(0.01)


def die_then_echo(server: FakeServer) -> tuple[list[Any], Any]:
    with Client(server.target, api_key=API_KEY, multiplex=True) as client:
        client.open_stream()
        with ThreadPoolExecutor(3) as pool:
            slow = [pool.submit(client.infer, SLOW, rows(i)) for i in range(3)]
            wait_until(lambda: server.servicer.in_flight == 3)
            outcomes: list[Any] = []
            try:
                client.infer(DIE, rows(0))
            except Unavailable as exc:
                outcomes.append(exc)
            outcomes += [f.exception(10) for f in slow]
        return outcomes, client.infer("echo", rows(5))


async def test_sync_client_reopens_after_the_server_ends_the_stream(server: FakeServer) -> None:
    outcomes, outputs = await asyncio.to_thread(die_then_echo, server)
    assert len(outcomes) == 4 and all(isinstance(o, Unavailable) for o in outcomes), outcomes
    np.testing.assert_array_equal(outputs["X"], rows(5)["X"])
    assert server.servicer.streams_opened == 2


def close_with_a_call_pending(server: FakeServer) -> BaseException | None:
    client = Client(server.target, api_key=API_KEY, multiplex=True)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.infer, SLOW, rows(0))
        wait_until(lambda: server.servicer.in_flight == 1)
        client.close()
        return pending.exception(10)


async def test_sync_close_fails_pending_calls_unavailable(server: FakeServer) -> None:
    error = await asyncio.to_thread(close_with_a_call_pending, server)
    assert isinstance(error, Unavailable) and "closed" in error.message


async def test_long_caller_ids_keep_the_wire_id_short(server: FakeServer) -> None:
    long_id = "é" * 200  # 400 bytes: Mandant would refuse it and could not echo it
    async with AsyncClient(server.target, api_key=API_KEY, multiplex=True) as client:
        with pytest.raises(ModelNotFound) as caught:
            await client.infer("missing", rows(0), request_id=long_id)
        await client.infer("echo", rows(0), request_id="é" * 126)
    assert caught.value.request_id == long_id
    sent = [r.id for r in server.servicer.seen_requests]
    assert sent[0] == "#1" and sent[1] == "é" * 126 + "#2"
    assert all(len(i.encode()) <= 256 for i in sent)
