"""FailureLog with a fake clock: the first failure of a kind in full, the next ones
counted and their count logged once per window; and Triton's model failures through it."""

from __future__ import annotations

import contextvars
import json
import logging

import grpc
import pytest

from mandant.backends.triton_answers import Fault, TritonAnswers
from mandant.config import TritonModelConfig
from mandant.context import current_request_id
from mandant.errors import Unavailable
from mandant.observability.log_limits import WINDOW_S, FailureLog
from mandant.observability.logs import JsonFormatter
from tests.fakes import FakeClock

LOGGER = "tests.log_limits"


def _raise(message: str) -> ValueError:
    try:
        raise ValueError(message)
    except ValueError as exc:
        return exc


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the log shows above DEBUG."""
    return [r for r in caplog.records if r.name == LOGGER and r.levelno > logging.DEBUG]


@pytest.fixture
def failures(caplog: pytest.LogCaptureFixture) -> tuple[FailureLog, FakeClock]:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    clock = FakeClock()
    return FailureLog(logging.getLogger(LOGGER), "failures_total", clock=clock), clock


def test_the_first_failure_of_a_kind_is_logged_in_full_the_next_ones_counted(
    failures: tuple[FailureLog, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    log, clock = failures
    for n in range(300):
        log.failed("model m (ValueError)", "m failed on request %s", f"r{n}", exc=_raise("bad"))
        clock.advance(0.1)  # 30 s in all: one window
    (first,) = _records(caplog)
    assert first.getMessage() == "m failed on request r0"
    assert first.levelno == logging.ERROR and first.exc_info is not None
    assert clock.armed == 1  # one timer for the window, not one per failure
    clock.advance(WINDOW_S)
    first, summary = _records(caplog)
    assert summary.levelno == logging.ERROR and summary.exc_info is None
    message = summary.getMessage()
    assert message.startswith("model m (ValueError): 299 more failure(s)")
    assert "counted in failures_total" in message and "r1" not in message


def test_each_kind_has_its_own_window_and_level(
    failures: tuple[FailureLog, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    log, clock = failures
    for _ in range(3):
        log.failed("a", "a failed", exc=_raise("a"))
        log.failed("b", "b failed", level=logging.WARNING)
    assert [(r.getMessage(), r.levelno) for r in _records(caplog)] == [
        ("a failed", logging.ERROR),
        ("b failed", logging.WARNING),
    ]
    clock.advance(WINDOW_S)
    summaries = {r.getMessage()[0]: r.levelno for r in _records(caplog)[2:]}
    assert summaries == {"a": logging.ERROR, "b": logging.WARNING}
    assert all("2 more failure(s)" in r.getMessage() for r in _records(caplog)[2:])


def test_a_kind_that_goes_on_failing_is_counted_once_per_window(
    failures: tuple[FailureLog, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    log, clock = failures
    log.failed("k", "k failed", exc=_raise("k"))
    for count in (5, 7):
        for _ in range(count):
            log.failed("k", "k failed", exc=_raise("k"))
        clock.advance(WINDOW_S)
    messages = [r.getMessage() for r in _records(caplog)]
    assert messages[0] == "k failed"
    assert [m.split(": ", 1)[1].split(" more")[0] for m in messages[1:]] == ["5", "7"]
    assert all(r.exc_info is None for r in _records(caplog)[1:])


def test_a_kind_quiet_for_a_window_is_logged_in_full_again(
    failures: tuple[FailureLog, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    log, clock = failures
    log.failed("k", "k failed %d", 1, exc=_raise("k"))
    clock.advance(WINDOW_S)  # nothing to count: no summary
    log.failed("k", "k failed %d", 2, exc=_raise("k"))
    assert [r.getMessage() for r in _records(caplog)] == ["k failed 1", "k failed 2"]
    assert all(r.exc_info is not None for r in _records(caplog))
    assert clock.armed == 0


def test_flush_logs_the_counts_of_open_windows_and_disarms_them(
    failures: tuple[FailureLog, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    log, clock = failures
    for _ in range(4):
        log.failed("k", "k failed", exc=_raise("k"))
    log.flush()
    assert "k: 3 more failure(s)" in _records(caplog)[-1].getMessage()
    assert clock.armed == 0
    clock.advance(WINDOW_S)
    assert len(_records(caplog)) == 2


def test_triton_s_model_failures_are_logged_once_then_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each call Triton's model failed on (INTERNAL) was a WARNING with Triton's message."""
    caplog.set_level(logging.WARNING, logger="mandant.backends.triton_answers")
    clock = FakeClock()
    answers = TritonAnswers("m", TritonModelConfig(url="127.0.0.1:1", model="t"), clock)
    for n in range(50):
        failure = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, details=f"bad value {n}")
        answers.error(failure, Fault.MODEL, False, True, joined_by_triton=False)
    logged = [r for r in caplog.records if r.name == "mandant.backends.triton_answers"]
    assert [r.getMessage() for r in logged] == [
        "model m: Triton's model 't' failed on a call's inputs: INTERNAL bad value 0"
    ]
    clock.advance(WINDOW_S)
    logged = [r for r in caplog.records if r.name == "mandant.backends.triton_answers"]
    assert len(logged) == 2 and logged[1].levelno == logging.WARNING
    assert "49 more failure(s)" in logged[1].getMessage()
    assert "mandant_requests_total" in logged[1].getMessage()


@pytest.mark.parametrize(
    ("code", "first"),
    [
        (grpc.StatusCode.NOT_FOUND, "model m: Triton at 127.0.0.1:1 has no model 't'"),
        (grpc.StatusCode.ABORTED, "model m: Triton at 127.0.0.1:1 failed: ABORTED"),
    ],
)
def test_triton_s_backend_errors_are_logged_once_then_counted(
    caplog: pytest.LogCaptureFixture, code: grpc.StatusCode, first: str
) -> None:
    """A model unloaded on Triton's side (NOT_FOUND), or any error of Triton's not in
    the table: every call until the next readiness poll logged a line (352 in 0.3 s)."""
    caplog.set_level(logging.WARNING, logger="mandant.backends.triton_answers")
    clock = FakeClock()
    answers = TritonAnswers("m", TritonModelConfig(url="127.0.0.1:1", model="t"), clock)
    for _ in range(50):
        failure = grpc.aio.AioRpcError(code, details="gone")
        error = answers.error(failure, Fault.BACKEND, False, True, joined_by_triton=False)
        assert isinstance(error, Unavailable)
    logged = [r for r in caplog.records if r.name == "mandant.backends.triton_answers"]
    assert len(logged) == 1 and logged[0].getMessage().startswith(first)
    clock.advance(WINDOW_S)
    logged = [r for r in caplog.records if r.name == "mandant.backends.triton_answers"]
    assert len(logged) == 2 and "49 more failure(s)" in logged[1].getMessage()


def test_a_count_is_logged_without_the_request_that_armed_its_timer(
    failures: tuple[FailureLog, FakeClock],
) -> None:
    """The count's line is not one request's: it carries no tenant and no request id
    (the context of the failure that armed its timer, as the loop's timers keep it)."""
    log, clock = failures
    lines: list[str] = []

    class Formatted(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno > logging.DEBUG:  # the counted one's own line aside
                lines.append(JsonFormatter().format(record))  # reads the context now

    def two_failures_and_a_window() -> None:
        for n in range(2):
            current_request_id.set(f"client-id-{n}")
            log.failed("k", "k failed", exc=_raise("k"))
        clock.advance(WINDOW_S)  # in this context, as a timer armed by the second one

    handler = Formatted()
    logging.getLogger(LOGGER).addHandler(handler)
    try:
        contextvars.copy_context().run(two_failures_and_a_window)  # the ids stay there
    finally:
        logging.getLogger(LOGGER).removeHandler(handler)
    first, count = (json.loads(line) for line in lines)
    assert first["request_id"] == "client-id-0"
    assert "1 more failure(s)" in count["msg"]
    assert "request_id" not in count and "client-id" not in lines[1]


def test_every_failure_counted_is_logged_at_debug_without_its_traceback(
    failures: tuple[FailureLog, FakeClock], caplog: pytest.LogCaptureFixture
) -> None:
    """A counted failure's answer quotes its request id: an operator looking for it at
    DEBUG finds it."""
    log, _ = failures
    for n in range(3):
        log.failed("model m (ValueError)", "m failed on request %s", f"r{n}", exc=_raise("bad"))
    debug = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.DEBUG]
    assert [r.getMessage() for r in debug] == ["m failed on request r1", "m failed on request r2"]
    assert all(r.exc_info is None for r in debug)


def test_an_answer_its_client_left_before_is_logged_at_debug_without_a_traceback() -> None:
    """grpc.aio logged every answer whose call ended while it was written as an ERROR
    with a traceback: any client could fill the error log. Such a record is DEBUG,
    without the traceback; gRPC's other errors stay ERRORs."""
    from grpc._cython import cygrpc

    from mandant.transport.grpc.server import CLIENT_NOISE, GRPC_CORE_LOGGER

    core = logging.getLogger(GRPC_CORE_LOGGER)

    def record(exc: BaseException) -> logging.LogRecord:
        return core.makeRecord(
            core.name, logging.ERROR, __file__, 1, "raised in core", (), (type(exc), exc, None)
        )

    gone = record(cygrpc.ExecuteBatchError("Failed 'execute_batch': (<...>,)"))
    assert not CLIENT_NOISE.filter(gone)  # DEBUG is off: dropped
    assert gone.levelno == logging.DEBUG and gone.exc_info is None
    other = record(RuntimeError("a real fault"))
    assert CLIENT_NOISE.filter(other)
    assert other.levelno == logging.ERROR and other.exc_info is not None


def test_a_metadata_value_that_is_not_utf8_is_logged_at_debug_without_its_value() -> None:
    """grpcio logged each such value (any client's, even a probe's) as an ERROR with a
    traceback and the value verbatim: one client wrote 250 KB/s of log, and an
    authorization header with one stray byte logged its key."""
    from mandant.transport.grpc.server import CLIENT_NOISE, GRPC_CORE_LOGGER, UNDECODABLE

    core = logging.getLogger(GRPC_CORE_LOGGER)
    try:
        b"Bearer secret-key\xff".decode()
    except UnicodeDecodeError as exc:
        info = (type(exc), exc, exc.__traceback__)
    record = core.makeRecord(
        core.name, logging.ERROR, __file__, 1, UNDECODABLE, (b"Bearer secret-key\xff",), info
    )
    assert not CLIENT_NOISE.filter(record)  # DEBUG is off: dropped
    assert record.levelno == logging.DEBUG and record.exc_info is None
    assert "secret" not in record.getMessage()


def test_handlers_cancelled_as_the_server_stops_are_told_once() -> None:
    """At a stop whose grace ran out, grpc.aio logged an ERROR with a traceback for each
    call still in progress (110 at one stop under load): the first is a WARNING saying
    what happened, the others DEBUG."""
    import asyncio

    from mandant.transport.grpc.server import GRPC_CORE_LOGGER, _ClientNoise

    noise, core = _ClientNoise(), logging.getLogger(GRPC_CORE_LOGGER)
    records = [
        core.makeRecord(
            core.name,
            logging.ERROR,
            __file__,
            1,
            "Exception not handled by _handle_exceptions in servicer method [%s]",
            ("/inference.GRPCInferenceService/ModelInfer",),
            (asyncio.CancelledError, asyncio.CancelledError(), None),
        )
        for _ in range(3)
    ]
    assert [noise.filter(record) for record in records] == [True, False, False]
    assert records[0].levelno == logging.WARNING and records[0].exc_info is None
    assert "gRPC cancelled calls in progress (as the server stops" in records[0].getMessage()
    assert all(r.levelno == logging.DEBUG for r in records[1:])
    noise.stopping()  # the next stop's first is told again
    again = core.makeRecord(
        core.name, logging.ERROR, __file__, 1, "raised", (),
        (asyncio.CancelledError, asyncio.CancelledError(), None),
    )  # fmt: skip
    assert noise.filter(again) and again.levelno == logging.WARNING
