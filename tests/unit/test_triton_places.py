"""A call to Triton keeps its place (``max_in_flight``) until Triton answers it, its
caller there or not (``backends/triton.py``, ``TritonBackend._infer``): Triton runs a
call it holds whatever its caller does. Against a stand-in for Triton's stub that holds
every call until told to answer (the real Triton's side is in ``test_triton.py``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc.aio import AioRpcError, Metadata
from tritonclient.grpc import service_pb2 as pb

from mandant.backends.channels import ChannelPool
from mandant.backends.circuit import CircuitBreaker, CircuitState
from mandant.backends.triton import TritonBackend
from mandant.config import parse_config
from mandant.errors import DeadlineExceeded, DeadlinePassedWhileRunning

X = {"INPUT0": np.zeros((1, 4), np.float32)}


class HeldTriton:
    """Triton's stub: holds each call until :attr:`answer` is set; counts what it has."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.holding = 0
        self.most = 0
        self.received = 0
        self.answering: Callable[[], object] | None = None  # called as it answers

    async def ModelInfer(self, request: pb.ModelInferRequest, **options: Any) -> Any:
        self.received += 1
        self.holding += 1
        self.most = max(self.most, self.holding)
        try:
            await self.answer.wait()
        finally:
            self.holding -= 1
        if self.answering is not None:
            self.answering()
        response = pb.ModelInferResponse(model_name="m")
        response.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 4])
        response.raw_output_contents.append(bytes(16))
        return response


def backend(stub: Any, breaker: CircuitBreaker | None = None, **clock: Any) -> TritonBackend:
    tensor = {"datatype": "FP32", "shape": [-1, 4]}
    model = {
        "name": "m",
        "backend": "triton",
        "triton": {"url": "127.0.0.1:1", "model": "m", "max_in_flight": 1},
        "inputs": [{"name": "INPUT0", **tensor}],
        "outputs": [{"name": "OUTPUT0", **tensor}],
    }
    [spec] = parse_config({"models": [model]}).model_specs(Path("."))
    made = TritonBackend(spec, ChannelPool(), breaker=breaker, **clock)
    made._stub = stub  # as start() makes it, without a Triton to connect to
    return made


def soon(seconds: float) -> float:
    return time.monotonic() + seconds


async def test_a_call_given_up_keeps_its_place_until_triton_answers() -> None:
    triton = HeldTriton()
    model = backend(triton)
    with pytest.raises(DeadlinePassedWhileRunning):
        await model.infer(X, deadline=soon(0.05))
    waiting = asyncio.create_task(model.infer(X, deadline=soon(5)))
    await asyncio.sleep(0.1)
    assert (triton.received, waiting.done()) == (1, False)  # not sent beside the first
    triton.answer.set()
    assert (await waiting)["OUTPUT0"].shape == (1, 4)
    assert triton.most == 1


async def test_a_call_whose_deadline_passes_waiting_for_a_place_is_never_sent() -> None:
    triton = HeldTriton()
    model = backend(triton)
    first = asyncio.create_task(model.infer(X))
    await asyncio.sleep(0.01)
    with pytest.raises(DeadlineExceeded, match="while queued"):
        await model.infer(X, deadline=soon(0.05))
    triton.answer.set()
    await first
    assert triton.received == 1


async def test_a_half_open_probe_given_up_waiting_for_a_place_gives_its_turn_back() -> None:
    """The probe took the breaker's one turn and never told its outcome: the model
    refused every call until it was loaded again."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=0.1)
    triton = HeldTriton()
    model = backend(triton, breaker)
    with pytest.raises(DeadlinePassedWhileRunning):
        await model.infer(X, deadline=soon(0.05))  # keeps the one place
    breaker.record_failure()  # Triton silent: open
    await asyncio.sleep(0.15)  # half open: one probe may go
    with pytest.raises(DeadlineExceeded, match="while queued"):
        await model.infer(X, deadline=soon(0.1))
    triton.answer.set()
    await asyncio.sleep(0.01)
    assert breaker.state is CircuitState.HALF_OPEN
    assert (await model.infer(X, deadline=soon(1)))["OUTPUT0"].shape == (1, 4)
    assert breaker.state is CircuitState.CLOSED


async def test_a_caller_leaving_as_its_place_is_handed_over_is_cancelled() -> None:
    """Its place's future, cancelled, was dropped from the queue by the call leaving:
    removing it again raised ValueError (an INTERNAL) instead of the cancellation."""
    triton = HeldTriton()
    model = backend(triton)
    first = asyncio.create_task(model.infer(X))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(model.infer(X))
    await asyncio.sleep(0.01)
    triton.answering = lambda: asyncio.get_running_loop().call_soon(second.cancel)
    triton.answer.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await second
    assert triton.received == 1
    assert (await model.infer(X, deadline=soon(1)))["OUTPUT0"].shape == (1, 4)


async def test_a_call_ending_as_its_caller_leaves_counts_once() -> None:
    """Triton silent past ``timeout_s``: the call's end told the breaker, and its
    caller leaving in the same turn told it again."""
    now = [1000.0]
    breaker = CircuitBreaker(failure_threshold=5, clock=lambda: now[0])
    caller: asyncio.Task[Any] | None = None

    class SilentTriton:
        async def ModelInfer(self, request: pb.ModelInferRequest, **options: Any) -> Any:
            await asyncio.sleep(0.01)
            now[0] += 31  # past timeout_s (30)
            assert caller is not None
            asyncio.get_running_loop().call_soon(caller.cancel)
            raise AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, Metadata(), Metadata(), "late")

    model = backend(SilentTriton(), breaker, clock=lambda: now[0])
    caller = asyncio.create_task(model.infer(X))
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0.02)
    for _ in range(3):  # four failures in all open it at the fifth
        breaker.record_failure()
    assert breaker.state is CircuitState.CLOSED


async def test_the_circuit_reads_open_until_a_probe_closes_it() -> None:
    """Open alone, it read closed two seconds after each failure, every call still
    refused behind a probe that hung."""
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=0.05)
    triton = HeldTriton()
    model = backend(triton, breaker)
    assert not model.circuit_open
    breaker.record_failure()
    assert model.circuit_open
    await asyncio.sleep(0.1)  # half open: one probe may go
    probe = asyncio.create_task(model.infer(X, deadline=soon(5)))
    await asyncio.sleep(0.01)
    assert model.circuit_open  # the probe hangs, the other calls are refused
    triton.answer.set()
    await probe
    assert not model.circuit_open
