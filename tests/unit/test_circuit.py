"""The circuit breaker of remote backends, on a fake clock, and which of Triton's
answers may open it."""

from __future__ import annotations

import grpc
import pytest

from mandant.backends.circuit import CallOutcome, CircuitBreaker, CircuitState
from mandant.backends.triton_answers import Fault, translate


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def breaker(clock: FakeClock, **kwargs: float) -> CircuitBreaker:
    settings = {"failure_threshold": 3, "reset_timeout_s": 2.0, **kwargs}
    return CircuitBreaker(clock=clock, **settings)  # type: ignore[arg-type]


def fail(circuit: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert circuit.allow()
        circuit.record_failure()


def test_closed_lets_everything_through(clock: FakeClock) -> None:
    circuit = breaker(clock)
    assert circuit.state is CircuitState.CLOSED
    assert all(circuit.allow() for _ in range(100))
    assert circuit.retry_after_s == 0


def test_opens_after_threshold_consecutive_failures(clock: FakeClock) -> None:
    circuit = breaker(clock)
    fail(circuit, 2)
    assert circuit.state is CircuitState.CLOSED
    fail(circuit, 1)
    assert circuit.state is CircuitState.OPEN
    assert not circuit.allow()
    assert circuit.retry_after_s == pytest.approx(2.0)


def test_a_success_resets_the_failure_count(clock: FakeClock) -> None:
    circuit = breaker(clock)
    fail(circuit, 2)
    circuit.record_success()
    fail(circuit, 2)
    assert circuit.state is CircuitState.CLOSED


def test_half_opens_after_reset_timeout_and_lets_one_probe_through(clock: FakeClock) -> None:
    circuit = breaker(clock)
    fail(circuit, 3)
    clock.now += 1.999
    assert not circuit.allow()
    assert circuit.retry_after_s == pytest.approx(0.001)
    clock.now += 0.001
    assert circuit.state is CircuitState.HALF_OPEN
    assert circuit.allow()  # the probe
    assert not circuit.allow()  # everyone else waits for its outcome
    assert not circuit.allow()


def test_successful_probe_closes(clock: FakeClock) -> None:
    circuit = breaker(clock)
    fail(circuit, 3)
    clock.now += 2
    assert circuit.allow()
    circuit.record_success()
    assert circuit.state is CircuitState.CLOSED
    assert all(circuit.allow() for _ in range(10))


def test_failed_probe_opens_again_for_a_full_reset_timeout(clock: FakeClock) -> None:
    circuit = breaker(clock)
    fail(circuit, 3)
    clock.now += 5
    assert circuit.allow()
    circuit.record_failure()  # one failure is enough while half-open
    assert circuit.state is CircuitState.OPEN
    assert not circuit.allow()
    clock.now += 1.5
    assert not circuit.allow()
    clock.now += 0.5
    assert circuit.allow()


def test_abandoned_probe_frees_its_slot(clock: FakeClock) -> None:
    circuit = breaker(clock)
    fail(circuit, 3)
    clock.now += 2
    assert circuit.allow()
    assert not circuit.allow()
    circuit.record_abandoned()  # the caller gave up: says nothing about the server
    assert circuit.state is CircuitState.HALF_OPEN
    assert circuit.allow()


def test_several_probes_when_configured(clock: FakeClock) -> None:
    circuit = breaker(clock, half_open_probes=2)
    fail(circuit, 3)
    clock.now += 2
    assert circuit.allow()
    assert circuit.allow()
    assert not circuit.allow()


def test_failures_of_calls_in_flight_when_it_opened_change_nothing(clock: FakeClock) -> None:
    circuit = breaker(clock)
    fail(circuit, 3)
    for _ in range(10):
        circuit.record_failure()  # late answers of calls let through before it opened
    clock.now += 2
    assert circuit.allow()


def test_rejects_nonsense_settings(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0, clock=clock)
    with pytest.raises(ValueError):
        CircuitBreaker(half_open_probes=0, clock=clock)
    with pytest.raises(ValueError):
        CircuitBreaker(reset_timeout_s=-1, clock=clock)


# -- what counts against the breaker: the Triton backend's translation table ----------

#: The only outcomes that may open the breaker every tenant shares: Triton unreachable,
#: or no answer within the backend's own timeout.
TRANSPORT_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_only_transport_failures_and_timeouts_count_against_the_breaker(
    code: grpc.StatusCode,
) -> None:
    outcome = translate(code)[1]
    assert (outcome is CallOutcome.FAILED) == (code in TRANSPORT_FAILURES)
    if code is not grpc.StatusCode.OK and code not in TRANSPORT_FAILURES:
        assert outcome is CallOutcome.ANSWERED  # Triton answered: it is up


def test_model_and_input_errors_are_the_callers() -> None:
    assert translate(grpc.StatusCode.INTERNAL) == (Fault.MODEL, CallOutcome.ANSWERED)
    assert translate(grpc.StatusCode.INVALID_ARGUMENT) == (Fault.INPUT, CallOutcome.ANSWERED)
    assert translate(grpc.StatusCode.RESOURCE_EXHAUSTED) == (Fault.BUSY, CallOutcome.ANSWERED)
    assert translate(grpc.StatusCode.UNAVAILABLE) == (Fault.BACKEND, CallOutcome.FAILED)


def test_the_callers_own_deadline_says_nothing_about_the_backend() -> None:
    assert translate(grpc.StatusCode.DEADLINE_EXCEEDED, by_client_deadline=True) == (
        Fault.BACKEND,
        CallOutcome.ABANDONED,
    )
    assert translate(grpc.StatusCode.DEADLINE_EXCEEDED)[1] is CallOutcome.FAILED


def test_one_tenants_model_errors_never_open_the_breaker(clock: FakeClock) -> None:
    """The reproduced outage: acme's bad calls (Triton INTERNAL) must leave the breaker
    closed for globex; transport failures still open it."""
    circuit = breaker(clock)
    for _ in range(50):
        assert circuit.allow()
        circuit.record(translate(grpc.StatusCode.INTERNAL)[1])
    assert circuit.state is CircuitState.CLOSED
    for _ in range(3):
        assert circuit.allow()
        circuit.record(translate(grpc.StatusCode.UNAVAILABLE)[1])
    assert circuit.state is CircuitState.OPEN


def test_an_answered_error_from_a_probe_closes_the_breaker(clock: FakeClock) -> None:
    circuit = breaker(clock)
    fail(circuit, 3)
    clock.now += 2
    assert circuit.allow()
    circuit.record(translate(grpc.StatusCode.INVALID_ARGUMENT)[1])  # Triton is back
    assert circuit.state is CircuitState.CLOSED


def test_late_successes_of_calls_sent_before_it_opened_do_not_close_it(clock: FakeClock) -> None:
    """Calls in flight when it opened that answer late (a slow Triton catching up) said
    nothing about the server now: they closed it at once, letting everyone through."""
    circuit = breaker(clock)
    assert circuit.allow()
    before = circuit.generation
    fail(circuit, 3)
    assert circuit.state is CircuitState.OPEN
    circuit.record_success(before)
    circuit.record(CallOutcome.ANSWERED, before)
    assert circuit.state is CircuitState.OPEN and not circuit.allow()
    clock.now += 2
    assert circuit.allow()  # the probe
    probe = circuit.generation
    circuit.record_success(before)  # still stale while the probe runs
    assert circuit.state is CircuitState.HALF_OPEN and not circuit.allow()
    circuit.record_failure(before)  # nor does a late failure reopen it
    assert circuit.state is CircuitState.HALF_OPEN
    circuit.record_success(probe)
    assert circuit.state is CircuitState.CLOSED


def test_a_probe_of_an_earlier_opening_frees_no_slot_of_this_one(clock: FakeClock) -> None:
    circuit = breaker(clock)
    fail(circuit, 3)
    clock.now += 2
    assert circuit.allow()
    first = circuit.generation
    circuit.record_failure(first)  # opens again: a new generation
    clock.now += 2
    assert circuit.allow()
    assert not circuit.allow()
    circuit.record_abandoned(first)
    assert not circuit.allow()


@pytest.mark.parametrize(
    "details",
    [
        "Exceeds maximum queue size",
        "[request id: 3] exceeds maximum queue size",
        "Request timeout expired",
    ],
)
def test_triton_s_queue_refusals_are_busy_not_down(details: str) -> None:
    """Triton's own queue policy answers UNAVAILABLE: a busy model, not a dead Triton;
    but not an answer of the model either (a wedged model's full queue refuses at
    once, and as answers those refusals kept it from ever opening the breaker)."""
    assert translate(grpc.StatusCode.UNAVAILABLE, details=details) == (
        Fault.BUSY,
        CallOutcome.ABANDONED,
    )
    assert translate(grpc.StatusCode.UNAVAILABLE, details="Socket closed")[1] is (
        CallOutcome.FAILED
    )


def test_a_triton_model_process_gone_is_the_backend_s_fault() -> None:
    """Triton's Python backend answers every call INTERNAL "Stub process '<instance>'
    is not healthy." once its model's process is gone (the model still reported
    ready): every tenant's calls were answered INVALID_ARGUMENT as their inputs'
    fault, charged, and the breaker never opened."""
    details = "Stub process 'wrongdtype_0_0' is not healthy."
    assert translate(grpc.StatusCode.INTERNAL, details=details) == (
        Fault.BACKEND,
        CallOutcome.FAILED,
    )
    assert translate(grpc.StatusCode.INTERNAL, details="bad value")[0] is Fault.MODEL


@pytest.mark.parametrize(
    "details",
    [
        "ValueError: unknown label 'is not healthy'",
        "unknown label \"Stub process 'x' is not healthy.\"",
    ],
)
def test_a_model_s_message_quoting_its_input_is_the_model_s_failure(details: str) -> None:
    """A model's message may quote its caller's input: a label "is not healthy" made
    the calls a backend failure, and five of them opened the breaker for every
    tenant."""
    assert translate(grpc.StatusCode.INTERNAL, details=details) == (
        Fault.MODEL,
        CallOutcome.ANSWERED,
    )
