"""The clients' multiplexed mode against a real grpc.aio server that keeps Mandant's
``ModelStreamInfer`` contract (tests/unit/fake_kserve.py): many calls of one client on
one stream, answers matched by id in any order, typed errors per message and per
stream, a bounded number in flight, reopening after a failure, each message's time left
for the server, a message over the send limit failing alone, and close()."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import mandant_client
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
    _multiplex,
)
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from mandant_client._requests import MAX_TIMEOUT_S
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


@pytest.mark.parametrize("multiplex", [False, True])
@pytest.mark.parametrize("timeout_s", [1e10, 1e13, float("inf")])
async def test_a_very_long_timeout_is_a_long_deadline(
    server: FakeServer, multiplex: bool, timeout_s: float
) -> None:
    """1e10 s overflowed gRPC's deadline (DEADLINE_EXCEEDED at once), and in the
    multiplexed mode a thread's wait (OverflowError), the v2 ``timeout`` in µs (1e13:
    ValueError) or its rounding (infinity: OverflowError), none a MandantClientError:
    such a timeout is ``MAX_TIMEOUT_S`` (about three years)."""
    async with AsyncClient(server.target, api_key=API_KEY, multiplex=multiplex) as client:
        outputs = await client.infer("echo", rows(3), timeout_s=timeout_s)
    np.testing.assert_array_equal(outputs["X"], rows(3)["X"])
    if multiplex:
        sent = server.servicer.seen_requests[-1].parameters[_multiplex.TIMEOUT_PARAM]
        assert 0 < sent.int64_param <= MAX_TIMEOUT_S * 1e6


@pytest.mark.parametrize("multiplex", [False, True])
async def test_a_very_long_timeout_is_a_long_deadline_for_the_sync_client(
    server: FakeServer, multiplex: bool
) -> None:
    def call() -> dict[str, Any]:
        with Client(
            server.target, api_key=API_KEY, multiplex=multiplex, timeout_s=float("inf")
        ) as client:
            first = client.infer("echo", rows(4))
            assert float(first["X"][0, 0]) == 4
            return client.infer("echo", rows(5), timeout_s=1e10)

    outputs = await asyncio.to_thread(call)
    np.testing.assert_array_equal(outputs["X"], rows(5)["X"])


def test_a_timeout_of_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="not NaN"):
        Client("127.0.0.1:1", timeout_s=float("nan"))


async def test_a_request_with_every_parameter_it_may_have_is_sent_multiplexed(
    server: FakeServer,
) -> None:
    """256 parameters are Mandant's bound; the multiplexed mode added its ``timeout``,
    and the same call that passed unary was refused (257). It sends none then: the
    client still gives up at its deadline."""
    parameters = {f"p{i}": i for i in range(_multiplex.MAX_PARAMETERS)}
    async with AsyncClient(server.target, api_key=API_KEY, multiplex=True) as client:
        await client.infer("echo", rows(5), timeout_s=5, parameters=parameters)
        sent = server.servicer.seen_requests[-1]
        assert len(sent.parameters) == _multiplex.MAX_PARAMETERS
        assert _multiplex.TIMEOUT_PARAM not in sent.parameters
        await client.infer("echo", rows(6), timeout_s=5, parameters={"p": 1})
        assert _multiplex.TIMEOUT_PARAM in server.servicer.seen_requests[-1].parameters


def closed_as_promised(outcomes: list[Any], ids: list[str]) -> bool:
    """Every outcome is Unavailable "the client was closed", with its call's id."""
    return [type(o) for o in outcomes] == [Unavailable] * len(ids) and [
        (o.message, o.request_id) for o in outcomes
    ] == [("the client was closed", i) for i in ids]


@pytest.mark.parametrize("multiplex", [False, True])
async def test_close_fails_pending_and_later_calls_unavailable(
    server: FakeServer, multiplex: bool
) -> None:
    """Calls in flight, calls waiting for a slot (one slot: the first holds it) and calls
    made after close() raise Unavailable, not grpc's errors for a closed channel."""
    client = AsyncClient(server.target, api_key=API_KEY, multiplex=multiplex, max_in_flight=1)
    ids = [f"p{i}" for i in range(3)]
    pending = [asyncio.create_task(client.infer(SLOW, rows(0), request_id=i)) for i in ids]
    arrived = 1 if multiplex else 3
    await asyncio.to_thread(wait_until, lambda: len(server.servicer.seen_requests) == arrived)
    await client.close()
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    assert closed_as_promised(outcomes, ids), outcomes

    later = [client.infer("echo", rows(0), request_id="late"), client.server_live()]
    if multiplex:
        later.append(client.open_stream())
    outcomes = await asyncio.gather(*later, return_exceptions=True)
    assert closed_as_promised(outcomes, ["late", *[""] * (len(later) - 1)]), outcomes


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


def close_with_calls_pending(server: FakeServer, multiplex: bool) -> list[list[Any]]:
    """What three calls pending at close() (one in flight, two waiting for its slot
    when multiplexed) and three calls made after it raised."""
    client = Client(server.target, api_key=API_KEY, multiplex=multiplex, max_in_flight=1)
    with ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(client.infer, SLOW, rows(0), request_id=f"p{i}") for i in range(3)]
        wait_until(lambda: len(server.servicer.seen_requests) == (1 if multiplex else 3))
        client.close()
        outcomes = [p.exception(10) for p in pending]
    later: list[Any] = []
    for call in (
        lambda: client.infer("echo", rows(0), request_id="late"),
        client.server_live,
        client.open_stream if multiplex else client.models,
    ):
        try:
            call()
        except Exception as exc:
            later.append(exc)
    return [outcomes, later]


@pytest.mark.parametrize("multiplex", [False, True])
async def test_sync_close_fails_pending_and_later_calls_unavailable(
    server: FakeServer, multiplex: bool
) -> None:
    outcomes, later = await asyncio.to_thread(close_with_calls_pending, server, multiplex)
    assert closed_as_promised(outcomes, ["p0", "p1", "p2"]), outcomes
    assert closed_as_promised(later, ["late", "", ""]), later


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


# -- what each message tells the server, and what the client refuses to send -------


def sent_timeout(request: pb.ModelInferRequest) -> int | None:
    """The v2 ``timeout`` parameter (µs) a message carried, if any."""
    parameters = request.parameters
    return parameters["timeout"].int64_param if "timeout" in parameters else None


async def test_each_message_tells_the_server_its_time_left(server: FakeServer) -> None:
    """A stream has no deadline per message: each carries its call's time left as the
    v2 ``timeout`` (µs), or the caller's own where that is earlier (0 means none), so
    the server drops a message whose caller gave up instead of running it."""
    five_s = 5_000_000
    calls: list[tuple[float | None, dict[str, Any] | None]] = [
        (None, None),  # no deadline: nothing to tell
        (5, None),
        (5, {"timeout": 1000}),  # the caller's own, earlier: kept
        (5, {"timeout": 60 * five_s}),  # later than the call's: the call's
        (5, {"timeout": 0}),  # none: the call's
        (None, {"timeout": 1000}),
    ]
    async with AsyncClient(server.target, api_key=API_KEY, multiplex=True) as client:
        for timeout_s, parameters in calls:
            await client.infer("echo", rows(0), timeout_s=timeout_s, parameters=parameters)

    def sync_call() -> None:
        with Client(server.target, api_key=API_KEY, multiplex=True, timeout_s=5) as sync:
            sync.infer("echo", rows(0))

    await asyncio.to_thread(sync_call)
    sent = [sent_timeout(r) for r in server.servicer.seen_requests]
    assert sent[0] is None and sent[2] == 1000 and sent[5] == 1000, sent
    # Every deadlined call's own time left; the caller's 0 (sent[4]) replaced, not kept.
    for t in (sent[1], sent[3], sent[4], sent[6]):
        assert t is not None and 0 < t <= five_s, sent
    assert None not in sent[1:], sent


#: A send limit of 1 MiB, and a message just over it.
SMALL_SEND = [("grpc.max_send_message_length", 1 << 20)]
OVER_SMALL_SEND = {"X": np.zeros((1, 1 << 18), np.float32)}
TOO_LARGE = re.compile(r"CLIENT: Sent message larger than max \(\d+ vs\. 1048576\)")


def assert_refused_as_too_large(error: BaseException, unary: BaseException) -> None:
    """``error`` is what the unary call got for the same message: not retryable."""
    assert isinstance(error, InvalidInput) and type(error) is type(unary), (error, unary)
    assert error.code is unary.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert TOO_LARGE.fullmatch(error.message) and TOO_LARGE.fullmatch(unary.message)
    assert error.request_id == "big"


async def test_a_message_over_the_send_limit_fails_alone_as_on_unary(server: FakeServer) -> None:
    """grpc fails the whole stream for it (every call on it): it is refused before
    it is queued, with the unary call's error, and the call in flight is answered."""
    server.servicer.hold = 2
    async with AsyncClient(server.target, api_key=API_KEY, options=SMALL_SEND) as unary:
        with pytest.raises(MandantClientError) as unary_error:
            await unary.infer("echo", OVER_SMALL_SEND, request_id="big")
    async with AsyncClient(
        server.target, api_key=API_KEY, options=SMALL_SEND, multiplex=True
    ) as client:
        first = asyncio.create_task(client.infer(HELD, rows(1)))
        await server.servicer.until_in_flight(1)
        with pytest.raises(MandantClientError) as caught:
            await client.infer("echo", OVER_SMALL_SEND, request_id="big")
        second = await client.infer(HELD, rows(2))
        assert float((await first)["X"][0, 0]) == 1.0 and float(second["X"][0, 0]) == 2.0
    assert_refused_as_too_large(caught.value, unary_error.value)
    assert server.servicer.streams_opened == 1


def too_large_in_threads(server: FakeServer) -> tuple[list[Any], Any]:
    """The sync client's unary and multiplexed errors for a message over its send
    limit, with a call in flight on the stream; and that call's answer."""
    errors: list[Any] = []
    for multiplex in (False, True):
        with (
            Client(server.target, API_KEY, options=SMALL_SEND, multiplex=multiplex) as client,
            ThreadPoolExecutor(1) as pool,
        ):
            first = pool.submit(client.infer, HELD, rows(1)) if multiplex else None
            if first is not None:
                wait_until(lambda: server.servicer.in_flight == 1)
            try:
                client.infer("echo", OVER_SMALL_SEND, request_id="big")
            except MandantClientError as exc:
                errors.append(exc)
            if first is not None:
                client.infer(HELD, rows(2))
                answered = first.result(10)
    return errors, answered


async def test_sync_a_message_over_the_send_limit_fails_alone_as_on_unary(
    server: FakeServer,
) -> None:
    server.servicer.hold = 2
    (unary, streamed), answered = await asyncio.to_thread(too_large_in_threads, server)
    assert_refused_as_too_large(streamed, unary)
    assert float(answered["X"][0, 0]) == 1.0
    assert server.servicer.streams_opened == 1


async def test_the_size_check_does_not_encode_each_message(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """upb computes ``ByteSize()`` by encoding the message, as long as gRPC's own
    encoding (about 70 ms for 64 MiB, on the event loop of the async client): a message
    well under the limit is checked from its lengths, never encoded for it."""
    measured: list[str] = []
    byte_size = pb.ModelInferRequest.ByteSize

    def spy(request: pb.ModelInferRequest) -> int:
        measured.append(request.id)
        return byte_size(request)

    monkeypatch.setattr(pb.ModelInferRequest, "ByteSize", spy)
    under = {"X": np.zeros((1, 1 << 16), np.float32)}
    parameters = {"note": "n" * 1000, "timeout": 0}
    async with AsyncClient(server.target, api_key=API_KEY, multiplex=True) as client:
        await client.infer("echo", under, request_id="a", parameters=parameters, timeout_s=5)

    def sync_call() -> None:
        with Client(server.target, api_key=API_KEY, multiplex=True) as sync:
            sync.infer("echo", under, request_id="s", outputs=["X"])

    await asyncio.to_thread(sync_call)
    assert len(server.servicer.seen_requests) == 2
    assert measured == []


@pytest.mark.parametrize("multiplex", [False, True])
async def test_the_size_check_is_exact_at_the_limit(server: FakeServer, multiplex: bool) -> None:
    """Its cheap bound is only a bound: a message within a few bytes of the limit is
    sent, one over it by its parameters alone is refused, as on a unary call."""
    limit = 1 << 20
    near = {"X": np.zeros((1, limit // 4 - 16), np.float32)}  # 64 bytes under, raw
    over = {"X": np.zeros((1, limit // 8), np.float32)}  # half of it, raw
    async with AsyncClient(
        server.target, api_key=API_KEY, options=SMALL_SEND, multiplex=multiplex
    ) as client:
        answer = await client.infer("echo", near, request_id="n")
        assert answer["X"].shape == near["X"].shape
        with pytest.raises(InvalidInput) as caught:
            await client.infer("echo", over, request_id="big", parameters={"p": "p" * (limit // 2)})
    assert TOO_LARGE.fullmatch(caught.value.message), caught.value


async def test_an_answer_over_the_clients_receive_limit_fails_every_pending_call(
    server: FakeServer,
) -> None:
    """It ends the stream too, but which call it answered cannot be told: every call
    pending on the stream keeps gRPC's InvalidInput (not Unavailable, which a caller
    would retry into the same failure), as documented."""
    server.servicer.hold = 3
    small_receive = [("grpc.max_receive_message_length", 1 << 20)]
    async with AsyncClient(
        server.target, api_key=API_KEY, options=small_receive, multiplex=True
    ) as client:
        calls = [client.infer(HELD, rows(i), request_id=f"s{i}") for i in range(2)]
        calls.append(client.infer(HELD, {"X": np.ones((1, 1 << 19), np.float32)}))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for error in outcomes:
        assert type(error) is InvalidInput, error
        assert "CLIENT: Received message larger than max" in error.message


# -- streams that end under the client's writes, and clients of another loop ---------


class EndsAfterOneMessage(pb_grpc.GRPCInferenceServiceServicer):
    """Ends each stream with status OK, unanswered, after its first message: what a
    draining server does, while the client is still writing."""

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        await context.send_initial_metadata(())
        async for _ in request_iterator:
            return
        yield pb.ModelStreamInferResponse()  # never: makes this an async generator


@asynccontextmanager
async def serve_ending_streams() -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(EndsAfterOneMessage(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_a_stream_ended_under_the_clients_writes_is_unavailable() -> None:
    """grpc.aio reports a write that finds the call over as INTERNAL "Internal error
    from Core" (grpc/grpc#36066), about one stream in two here: the calls pending on
    it are Unavailable (the server ended the stream), which callers retry."""
    outcomes: list[Any] = []
    async with serve_ending_streams() as target:
        for _ in range(10):
            async with AsyncClient(target, multiplex=True, timeout_s=10) as client:
                outcomes += await asyncio.gather(
                    *(client.infer("m", rows(i)) for i in range(32)), return_exceptions=True
                )
    assert {(type(o), o.message) for o in outcomes} == {
        (Unavailable, "the server ended the stream")
    }


#: An AsyncClient made outside any running loop (grpc.aio binds its channel to the
#: thread's loop), then called from asyncio.run's: in a process of its own, since grpc.aio
#: serves one process's loops through one completion queue.
ANOTHER_LOOP = """
import asyncio, sys
import numpy as np
from mandant_client import AsyncClient
asyncio.set_event_loop(asyncio.new_event_loop())
client = AsyncClient("127.0.0.1:1", multiplex=sys.argv[1] == "stream", timeout_s=5)
try:
    asyncio.run(client.infer("m", {"X": np.zeros((1, 4), np.float32)}))
except BaseException as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.parametrize("mode", ["unary", "stream"])
async def test_a_client_used_from_another_event_loop_raises_runtime_error(mode: str) -> None:
    """As on a unary call, not ServerError "the stream failed (RuntimeError)"."""
    ran = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", ANOTHER_LOOP, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(mandant_client.__file__).parents[1])},
    )
    assert ran.stdout.startswith("RuntimeError") and "loop" in ran.stdout, ran


async def test_a_call_given_up_before_its_message_is_written_is_never_sent() -> None:
    """The first write waits for the stream's initial metadata (here 0.5 s: the server
    sends it with its first answer): a call that times out meanwhile is taken out of
    the outbox, and the others carry the time left when they are written."""
    async with (
        serve_fake(early_metadata=False) as plain,
        AsyncClient(plain.target, API_KEY, multiplex=True) as client,
    ):
        late = asyncio.create_task(client.infer("echo", rows(1), timeout_s=5))
        with pytest.raises(DeadlineExceeded):
            await client.infer("echo", rows(2), timeout_s=0.1, request_id="abandoned")
        await late
        seen = plain.servicer.seen_requests
    assert [r.id.split("#")[0] for r in seen] == [""]
    timeout_us = sent_timeout(seen[0])
    assert timeout_us is not None and timeout_us <= 4_600_000  # 5 s less the wait


def _outgoing(order: int) -> _multiplex.Outgoing:
    return _multiplex.Outgoing(pb.ModelInferRequest(id=f"#{order:x}"), None, order)


def test_the_outbox_writes_the_oldest_call_first() -> None:
    """A call sent again on a new stream (order 2) goes ahead of calls begun after it
    that were queued first; one given up on is not written."""
    outbox = _multiplex.Outbox()
    for order in (5, 7, 2, 6):
        outbox.put(f"#{order:x}", _outgoing(order))
    outbox.discard("#6")
    written = []
    while outbox:
        written.append(outbox.pop().order)
    assert written == [2, 5, 7]


def test_the_outbox_sheds_the_places_of_calls_given_up_on() -> None:
    outbox = _multiplex.Outbox()
    outbox.put("#1", _outgoing(1))
    for order in range(2, 1000):
        outbox.put(f"#{order:x}", _outgoing(order))
        outbox.discard(f"#{order:x}")
    assert len(outbox._heap) <= 2 + 64
    assert outbox.pop().order == 1
    assert not outbox


class _ScriptedCall:
    """A ModelStreamInfer call of a fake stub: records the messages the client writes
    (as grpc's thread takes them) and answers what the test tells it to."""

    def __init__(self, requests: Any, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.written: list[pb.ModelInferRequest] = []
        self._metadata = metadata  # its initial metadata (none: a server that says nothing)
        self._answers: queue.Queue[pb.ModelStreamInferResponse | None] = queue.Queue()
        self.writer = threading.Thread(target=self._take, args=(requests,), daemon=True)
        self.writer.start()

    def _take(self, requests: Any) -> None:
        for request in requests:  # ends when the client half-closes
            self.written.append(request)

    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def __iter__(self) -> _ScriptedCall:
        return self

    def __next__(self) -> pb.ModelStreamInferResponse:
        answer = self._answers.get()
        if answer is None:
            raise StopIteration  # ended with OK
        return answer

    def answer(self, message: pb.ModelStreamInferResponse | None) -> None:
        self._answers.put(message)

    def cancel(self) -> None:
        self._answers.put(None)


class _ScriptedStub:
    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.calls: list[_ScriptedCall] = []
        self._metadata = metadata

    def ModelStreamInfer(self, requests: Any, metadata: Any) -> _ScriptedCall:
        call = _ScriptedCall(requests, self._metadata)
        self.calls.append(call)
        return call


def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_new_stream_writes_the_calls_its_predecessor_left_unread_first() -> None:
    """The sync client: a stream ends (end mark) with two calls unread; a newer call
    opens the next stream before the first stream's status comes. grpc's thread took
    the newer call first (the unread ones are queued again only once that status
    comes); now the new stream waits for them, and writes the oldest first."""
    from mandant_client._multiplex_sync import SyncMultiplexer

    stub = _ScriptedStub()
    multiplexer = SyncMultiplexer(stub, (), max_in_flight=8, max_send_bytes=None)
    answered: dict[int, str] = {}

    def call(i: int) -> threading.Thread:
        def run() -> None:
            request = pb.ModelInferRequest(model_name="m", id=f"call-{i}")
            answered[i] = multiplexer.infer(request, 0, 10.0).id

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    callers = [call(1)]
    _until(lambda: len(stub.calls) == 1 and len(stub.calls[0].written) == 1)
    callers.append(call(2))
    first = stub.calls[0]
    _until(lambda: len(first.written) == 2)
    end = pb.ModelStreamInferResponse()
    end.infer_response.parameters[_multiplex.END_MARK].string_param = "connection-age"
    first.answer(end)
    first.writer.join(5)  # the client half-closed
    callers.append(call(3))
    _until(lambda: len(stub.calls) == 2)
    time.sleep(0.1)  # the newer call went out at once here
    first.answer(None)  # ended OK: its two calls were not read
    second = stub.calls[1]
    _until(lambda: len(second.written) == 3)
    assert [r.id.partition("#")[0] for r in second.written] == ["call-1", "call-2", "call-3"]
    for request in second.written:
        second.answer(pb.ModelStreamInferResponse(infer_response={"id": request.id}))
    for caller in callers:
        caller.join(5)
    assert answered == {1: "call-1", 2: "call-2", 3: "call-3"}
    multiplexer.close()


def test_the_sync_client_writes_no_more_than_the_server_serves_at_once() -> None:
    """The server says it serves 2 messages of a stream at once: the client writes a
    third only once one is answered (written, it waited unread on the server; here it
    stays in the outbox, where a call that gives up is withdrawn)."""
    from mandant_client._multiplex_sync import SyncMultiplexer

    stub = _ScriptedStub(((_multiplex.MAX_INFLIGHT_METADATA, "2"),))
    multiplexer = SyncMultiplexer(stub, (), max_in_flight=8, max_send_bytes=None)
    answered: dict[int, str] = {}

    def run(i: int) -> None:
        request = pb.ModelInferRequest(model_name="m", id=f"call-{i}")
        answered[i] = multiplexer.infer(request, 0, 10.0).id

    callers = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for caller in callers:
        caller.start()
    _until(lambda: len(stub.calls) == 1 and len(stub.calls[0].written) == 2)
    call = stub.calls[0]
    time.sleep(0.2)
    assert len(call.written) == 2  # the other two wait for an answer
    for n in range(4):
        call.answer(pb.ModelStreamInferResponse(infer_response={"id": call.written[n].id}))
        _until(lambda n=n: len(call.written) == min(4, n + 3))
    for caller in callers:
        caller.join(5)
    assert sorted(answered.values()) == [f"call-{i}" for i in range(4)]
    multiplexer.close()


#: What a server reading two 1 KB messages at once (not three) says it holds.
TWO_KB_MESSAGES = ((_multiplex.MAX_BYTES_METADATA, "2600"),)


def test_the_window_keeps_to_the_servers_bounds_on_messages_and_bytes() -> None:
    """A message goes while the messages unanswered, and their bytes with its own, stay
    within what the server said it reads at once; alone, any message goes (the server
    reads it then). A server that says nothing (or nonsense) bounds nothing."""
    window = _multiplex.Window()
    window.told(((_multiplex.MAX_INFLIGHT_METADATA, "x"), (_multiplex.MAX_BYTES_METADATA, "0")))
    assert not window.bounded
    for n in range(200):
        window.wrote(f"#{n:x}", 10**6)
    assert window.fits(10**9)
    window = _multiplex.Window()
    window.told(((_multiplex.MAX_INFLIGHT_METADATA, "3"), (_multiplex.MAX_BYTES_METADATA, "1000")))
    assert window.bounded and window.fits(5000)
    window.wrote("#1", 400)
    assert window.fits(600) and not window.fits(601)
    window.wrote("#2", 600)
    assert window.fits(0) and not window.fits(1)
    window.answered("#1")
    assert window.fits(400) and not window.fits(401)
    window.wrote("#3", 100)
    window.wrote("#4", 100)
    assert not window.fits(0)  # three unanswered: the bound on messages
    window.answered("")  # an answer whose id the server could not echo: its place only
    assert window.fits(200) and not window.fits(201)
    window.answered("#3")
    window.answered("#2")  # nothing unanswered: every byte is free again
    assert window.fits(5000) and window.unanswered == 0
    window.told(((_multiplex.MAX_INFLIGHT_METADATA, "2"),))  # a server said no bytes
    window.wrote("#4", 5000)
    assert window.fits(10**9)


def test_a_large_message_held_back_and_given_up_lets_the_next_one_go() -> None:
    """The sync client: a message the server's bytes leave no room for waits in the
    outbox; when its caller gives up, the call behind it, which fits, is written
    without waiting for an answer."""
    from mandant_client._multiplex_sync import SyncMultiplexer

    stub = _ScriptedStub(TWO_KB_MESSAGES)
    multiplexer = SyncMultiplexer(stub, (), max_in_flight=8, max_send_bytes=None)
    outcomes: dict[str, Any] = {}

    def call(name: str, raw_bytes: int, timeout_s: float) -> threading.Thread:
        def run() -> None:
            request = pb.ModelInferRequest(model_name="m", id=name)
            request.raw_input_contents.append(bytes(raw_bytes))
            try:
                outcomes[name] = multiplexer.infer(request, raw_bytes, timeout_s).id
            except MandantClientError as exc:
                outcomes[name] = type(exc)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    callers = [call("first", 1024, 10.0)]
    _until(lambda: len(stub.calls) == 1 and len(stub.calls[0].written) == 1)
    callers.append(call("large", 2048, 0.3))
    time.sleep(0.1)  # (begun before the next: it is written first, when it fits)
    callers.append(call("next", 1024, 10.0))
    written = stub.calls[0].written
    _until(lambda: len(written) == 2)  # once "large" gives up; "first" unanswered
    assert written[1].id.startswith("next#")
    for request in written:
        stub.calls[0].answer(pb.ModelStreamInferResponse(infer_response={"id": request.id}))
    for caller in callers:
        caller.join(5)
    assert outcomes == {"first": "first", "large": DeadlineExceeded, "next": "next"}
    multiplexer.close()


class LateWindow(pb_grpc.GRPCInferenceServiceServicer):
    """Says it reads 2 messages of a stream at once (or what ``metadata`` says), in
    initial metadata sent ``delay_s`` (0.8 s) after the stream opens (a loaded server,
    a long round trip); answers each message after 0.2 s, noting the most it held
    unanswered."""

    def __init__(
        self,
        metadata: tuple[tuple[str, str], ...] = ((_multiplex.MAX_INFLIGHT_METADATA, "2"),),
        delay_s: float = 0.8,
    ) -> None:
        self.held = self.most = 0
        self._metadata, self._delay_s = metadata, delay_s

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        await asyncio.sleep(self._delay_s)
        await context.send_initial_metadata(self._metadata)
        answers: asyncio.Queue[pb.ModelStreamInferResponse] = asyncio.Queue()

        async def answer(request: pb.ModelInferRequest) -> None:
            await asyncio.sleep(0.2)
            self.held -= 1
            await answers.put(pb.ModelStreamInferResponse(infer_response={"id": request.id}))

        pending: set[asyncio.Task[None]] = set()

        async def read() -> None:
            async for request in request_iterator:
                self.held += 1
                self.most = max(self.most, self.held)
                task = asyncio.create_task(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)

        reading = asyncio.create_task(read())
        try:
            while True:
                yield await answers.get()
        finally:
            reading.cancel()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_window_said_late_is_kept_from_then_on(kind: str) -> None:
    """The async client read the window only if it came within its first write's
    wait (0.5 s): later, it wrote every call unanswered for the stream's life."""
    servicer = LateWindow()
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    try:
        if kind == "async":
            async with AsyncClient(target, multiplex=True, timeout_s=20) as client:
                await client.infer("m", rows(0))  # the stream is open, its window said
                servicer.most = 0
                await asyncio.gather(*(client.infer("m", rows(i)) for i in range(8)))
        else:

            def calls() -> None:
                with Client(target, multiplex=True, timeout_s=20) as client:
                    client.infer("m", rows(0))
                    servicer.most = 0
                    with ThreadPoolExecutor(8) as pool:
                        list(pool.map(lambda i: client.infer("m", rows(i)), range(8)))

            await asyncio.to_thread(calls)
    finally:
        await server.stop(0)
    assert servicer.most == 2


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_the_client_writes_no_more_bytes_than_the_server_reads(kind: str) -> None:
    """A Mandant server also stops reading a stream at a bound on bytes: the client
    wrote every message past it (its window was by count only), where they waited
    unread and then ran with their whole time left. A message larger than the bound
    still goes, alone."""
    servicer = LateWindow(TWO_KB_MESSAGES, delay_s=0.0)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    kilobyte = {"X": np.zeros((1, 256), np.float32)}
    large = {"X": np.zeros((1, 1024), np.float32)}
    try:
        if kind == "async":
            async with AsyncClient(target, multiplex=True, timeout_s=20) as client:
                await asyncio.gather(*(client.infer("m", kilobyte) for _ in range(8)))
                await client.infer("m", large)
        else:

            def calls() -> None:
                with Client(target, multiplex=True, timeout_s=20) as client:
                    with ThreadPoolExecutor(8) as pool:
                        list(pool.map(lambda _: client.infer("m", kilobyte), range(8)))
                    client.infer("m", large)

            await asyncio.to_thread(calls)
    finally:
        await server.stop(0)
    assert servicer.most == 2
