"""The gate counts a call before its client can see the answer: grpc's ``abort`` sends
a refusal at once, so a call refused is reported, and its places given back, before
the gate aborts (else a client that reads ``/metrics`` right after its refusal can miss
it, and a retry can find the place still taken)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from mandant.errors import InvalidInput, RateLimited, Unauthenticated
from mandant.scheduling.door import CallCap
from mandant.transport.grpc.gateway import Access, Gate
from mandant.types import Call, Tenant
from mandant_client._proto import grpc_service_pb2 as pb
from tests.fakes import RecordingObserver

KEY = "key-a"
TENANT = Tenant("a")


class _Context:
    """What the gate asks of a grpc.aio servicer context; ``abort`` notes what was
    counted when the client would have seen the status, then raises as grpc's does."""

    def __init__(
        self,
        key: str | None,
        observer: RecordingObserver,
        cap: CallCap,
        message: bytes = b"",
        remaining_s: float | None = None,
    ) -> None:
        self._key = key
        self._remaining_s = remaining_s
        self.read_at_all = False
        self._message = message
        self.read_before_key = False
        self._observer = observer
        self._cap = cap
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.counted_at_abort: list[tuple[str, str, str, str]] = []
        self.calls_at_abort = -1

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", self._key),) if self._key else ()

    def time_remaining(self) -> float | None:
        return self._remaining_s

    async def read(self) -> bytes:
        """The call's one message (the gate reads it once the key is accepted)."""
        self.read_at_all = True
        self.read_before_key = self._key != KEY
        return self._message

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = tuple(trailers)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        self.counted_at_abort = list(self._observer.finished)
        self.calls_at_abort = self._cap.calls
        raise grpc.aio.AbortError()


def _authenticate(key: str | None) -> Tenant:
    if key != KEY:
        raise Unauthenticated()
    return TENANT


def _refuse_admin(key: str | None) -> None:
    raise Unauthenticated()


def _serve(
    behavior: Any, key: str | None = KEY, remaining_s: float | None = None
) -> tuple[_Context, RecordingObserver, Any]:
    """One ModelInfer call through a gate to ``behavior``: the context, the observer
    and what the handler returned (or the exception it raised; ``remaining_s``: what
    is left of its deadline)."""
    observer, cap = RecordingObserver(), CallCap(4)
    gate = Gate(_authenticate, _refuse_admin, observer, cap)
    handler = gate.unary(
        "/inference.GRPCInferenceService/ModelInfer",
        Access.TENANT,
        pb.ModelInferRequest,
        behavior,
        pb.ModelInferResponse.SerializeToString,
    )
    raw = pb.ModelInferRequest(model_name="m", id="r1").SerializeToString()
    context = _Context(key, observer, cap, raw, remaining_s)

    async def call() -> Any:
        try:
            return await handler.stream_unary(None, context)
        except (grpc.aio.AbortError, asyncio.CancelledError) as exc:
            return exc

    return context, observer, asyncio.run(call())


def _refusing(error: Exception) -> Any:
    async def behavior(request: Any, call: Call, context: Any) -> Any:
        call.model, call.version = "m", "1"
        raise error

    return behavior


def test_a_call_over_before_it_was_handed_over_is_counted_and_nothing_more() -> None:
    """Its deadline passed while it waited in gRPC's queue (a flood of calls with
    short deadlines fills it): counted DEADLINE_EXCEEDED for its tenant, ended as a
    cancelled handler ends, its message not read, no place taken, nothing run."""
    context, observer, ended = _serve(_refusing(AssertionError("never run")), remaining_s=-0.01)
    assert isinstance(ended, asyncio.CancelledError)
    assert observer.finished == [("a", "", "", "DEADLINE_EXCEEDED")]
    assert not context.read_at_all and context.aborted is None


def test_a_refused_key_is_counted_before_the_client_sees_it() -> None:
    context, observer, _ = _serve(_refusing(AssertionError("never called")), key="wrong")
    assert context.aborted is not None and context.aborted[0] is grpc.StatusCode.UNAUTHENTICATED
    assert context.counted_at_abort == [("", "", "", "UNAUTHENTICATED")] == observer.finished
    assert not context.read_before_key  # nothing of the message was read
    assert context.calls_at_abort == 0


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("bad shape"), grpc.StatusCode.INVALID_ARGUMENT),
        (RateLimited("slow down", retry_after_s=0.25), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_a_refusal_is_counted_and_its_place_free_before_it_is_sent(
    error: Exception, code: grpc.StatusCode
) -> None:
    context, observer, _ = _serve(_refusing(error))
    assert context.aborted == (code, str(error))
    assert context.counted_at_abort == [("a", "m", "1", code.name)]
    assert context.calls_at_abort == 0
    assert observer.finished == context.counted_at_abort  # reported once


def test_a_refusal_keeps_its_pushback() -> None:
    context, _, _ = _serve(_refusing(RateLimited("slow down", retry_after_s=0.25)))
    assert ("grpc-retry-pushback-ms", "250") in context.trailers


def test_an_internal_error_is_counted_before_it_is_sent_and_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="mandant.transport.grpc.gateway"):
        context, _, _ = _serve(_refusing(RuntimeError("boom")))
    assert context.aborted is not None
    code, details = context.aborted
    assert code is grpc.StatusCode.INTERNAL and "boom" not in details
    assert context.counted_at_abort == [("a", "m", "1", "INTERNAL")]
    assert context.calls_at_abort == 0
    [record] = caplog.records
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert "request id r1" in record.getMessage()


def test_an_answer_is_counted_once_and_returned() -> None:
    answer = pb.ModelInferResponse(id="r1")

    async def serve(request: Any, call: Call, context: Any) -> Any:
        call.model, call.version = "m", "1"
        return answer

    context, observer, returned = _serve(serve)
    assert returned is answer and context.aborted is None
    assert observer.finished == [("a", "m", "1", "OK")]


def _forward(
    key: str | None, cap: CallCap | None = None
) -> tuple[_Context, RecordingObserver, Any]:
    """One call a front end of ``workers: N`` forwards to the engine, through its gate:
    the context, the observer and what the handler returned (or raised); the engine
    answers with the message's bytes reversed."""
    observer, cap = RecordingObserver(), cap or CallCap(4)
    gate = Gate(_authenticate, _refuse_admin, observer, cap)
    forwarded: list[bytes] = []

    async def engine(raw: bytes, context: Any) -> bytes:
        forwarded.append(raw)
        return raw[::-1]

    handler = gate.forwarded(Access.TENANT, engine)
    context = _Context(key, observer, cap, b"metadata request")

    async def call() -> Any:
        try:
            return await handler.stream_unary(None, context)
        except grpc.aio.AbortError as exc:
            return exc

    returned = asyncio.run(call())
    assert forwarded == ([] if context.aborted else [b"metadata request"])
    return context, observer, returned


def test_a_forwarded_call_is_refused_before_its_message_is_read() -> None:
    """A front end reads a forwarded call's message (up to ``max_message_bytes``) only
    once its key is accepted: the engine checks the key again, but a call without one
    must not make the front end hold its message first."""
    context, observer, _ = _forward(key=None)
    assert context.aborted is not None and context.aborted[0] is grpc.StatusCode.UNAUTHENTICATED
    assert not context.read_before_key
    assert context.counted_at_abort == [("", "", "", "UNAUTHENTICATED")] == observer.finished
    assert context.calls_at_abort == 0


def test_a_forwarded_call_is_counted_by_the_engine_only() -> None:
    context, observer, returned = _forward(key=KEY)
    assert returned == b"tseuqer atadatem" and context.aborted is None
    assert observer.finished == []  # the engine's gate counts it


def test_a_forwarded_call_over_the_cap_is_refused_before_its_message_is_read() -> None:
    cap = CallCap(1)
    cap.enter(None, "b")
    context, observer, _ = _forward(key=KEY, cap=cap)
    assert context.aborted is not None
    assert context.aborted[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert observer.finished == [("a", "", "", "RESOURCE_EXHAUSTED")]
    assert observer.rejections == [("a", "server_busy", "")]


def test_a_probe_is_answered_without_reading_its_message_or_taking_a_place() -> None:
    """Probes are open: a client without a key must not make the server hold their
    messages (60 MiB each, four held a quarter of a gigabyte), nor fill the cap every
    tenant's calls share with them."""
    observer, cap = RecordingObserver(), CallCap(1)
    cap.enter(None, "b")  # the server is full
    gate = Gate(_authenticate, _refuse_admin, observer, cap)

    async def live(request: Any, call: Call, context: Any) -> Any:
        assert request == pb.ServerLiveRequest()
        return pb.ServerLiveResponse(live=True)

    handler = gate.unary(
        "/inference.GRPCInferenceService/ServerLive",
        Access.OPEN,
        pb.ServerLiveRequest,
        live,
        pb.ServerLiveResponse.SerializeToString,
    )
    context = _Context(None, observer, cap, b"\x00" * 1024)
    read: list[bool] = []

    async def never(*_: Any) -> bytes:
        read.append(True)
        raise AssertionError("the probe's message was read")

    context.read = never  # type: ignore[method-assign]
    answer = asyncio.run(handler.stream_unary(None, context))
    assert answer == pb.ServerLiveResponse(live=True) and not read
    assert cap.calls == 1 and observer.finished == [("", "", "", "OK")]
