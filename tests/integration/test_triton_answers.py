"""The Triton backend against answers a real Triton cannot be made to give on demand: a
fake KServe v2 server on loopback port 0 (a real ``grpc.aio`` server, Triton's stubs)
whose behaviour depends on the model name, with Mandant in process on port 0.

* Triton's INVALID_ARGUMENT about a Mandant batch, whose message holds one tenant's
  values: only that tenant's request fails, and only it sees the message.
* Answers that do not match the model's declared outputs (datatype, rank, rows, byte
  size, an output twice): UNAVAILABLE, the backend's fault, logged once.
* One tenant's calls slower than ``timeout_s`` (or than its own short deadlines) on a
  Triton that answers everything else leave the shared breaker closed; a Triton that
  answers nothing opens it, whoever's deadline its calls ran out of.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from mandant import errors
from mandant.app import App
from mandant.backends import triton as triton_backend
from mandant.backends.triton import TritonBackend
from mandant.config import MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from mandant.types import Tenant
from mandant_client import (
    AsyncClient,
    DeadlineExceeded,
    InvalidInput,
    MandantClientError,
    Unavailable,
)

KEYS = {"acme": "acme-answers-key", "globex": "globex-answers-key"}
IO = {
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 3]}],
}
Answer = Callable[[np.ndarray], tuple[str, tuple[int, ...], bytes]]


def good(x: np.ndarray) -> np.ndarray:
    return np.tanh(x[:, :3]).astype(np.float32)


def _bytes_of(x: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    element = b"\x01\x00\x00\x00x"  # one length-prefixed BYTES element
    return "BYTES", (len(x), 3), element * (len(x) * 3)


#: Model name -> (datatype, shape, raw bytes) of its OUTPUT0 for the inputs ``x``.
ANSWERS: dict[str, Answer] = {
    "good": lambda x: ("FP32", good(x).shape, good(x).tobytes()),
    "fp16": lambda x: ("FP16", good(x).shape, good(x).astype(np.float16).tobytes()),
    "int64": lambda x: ("INT64", good(x).shape, (good(x) * 1000).astype(np.int64).tobytes()),
    "bytes": _bytes_of,
    "weird": lambda x: ("FOO", good(x).shape, good(x).tobytes()),
    "onerow": lambda x: ("FP32", (1, 3), good(x)[:1].tobytes()),
    "flat": lambda x: ("FP32", (good(x).size,), good(x).tobytes()),
    "wide": lambda x: ("FP32", (len(x), 4), x.tobytes()),
    "short": lambda x: ("FP32", good(x).shape, good(x).tobytes()[:-4]),
}
MISMATCHED = [*sorted(set(ANSWERS) - {"good"}), "twice"]
#: Triton's words about a call's inputs that name its internals (``chatty``'s).
CHATTY = (
    "[request id: 7] bad input for model chatty v7 at /opt/tritonserver/models/chatty/1 "
    "(host gpu-7.internal:8001); see chatty_0_cpu at 10.3.4.5, " + "x" * 200 + " 'chatty'"
)


@dataclass
class FakeTriton(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Every model ready, INPUT0 FP32 [-1, 4] -> OUTPUT0 FP32 [-1, 3], max_batch_size
    64. ``picky`` refuses any negative value, naming it, as INVALID_ARGUMENT;
    ``sleepy`` sleeps INPUT0[0, 0] seconds; once ``hung``, nothing is answered;
    ModelConfig fails with ``config_fails`` where it is set; ModelMetadata reports
    INPUT0 as ``input_datatype``; a model named in ``gone`` answers ModelInfer
    NOT_FOUND, as Triton does once it is unloaded; ``infers`` counts ModelInfer calls;
    the next ModelReady takes ``first_ready_s`` (as a busy host's first one)."""

    hung: bool = False
    first_ready_s: float = 0.0
    config_fails: grpc.StatusCode | None = None
    input_datatype: str = "FP32"
    gone: frozenset[str] = frozenset()
    infers: int = 0

    async def _hang_if_hung(self) -> None:
        if self.hung:
            await asyncio.sleep(3600)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        await self._hang_if_hung()
        delay_s, self.first_ready_s = self.first_ready_s, 0.0
        await asyncio.sleep(delay_s)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform="fake",
            inputs=[tensor(name="INPUT0", datatype=self.input_datatype, shape=[-1, 4])],
            outputs=[tensor(name="OUTPUT0", datatype="FP32", shape=[-1, 3])],
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        if self.config_fails is not None:
            await context.abort(self.config_fails, "no config now")
        config = pb.ModelConfigResponse()
        config.config.name = request.name
        config.config.max_batch_size = 64
        return config

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        await self._hang_if_hung()
        self.infers += 1
        name = request.model_name
        if name in self.gone:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}'")
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(-1, 4)
        if name == "picky" and (x < 0).any():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"[request id: 7] value out of range: {x.min()} in batch of {len(x)}",
            )
        if name == "sleepy":
            await asyncio.sleep(float(x[0, 0]))
        if name == "chatty":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, CHATTY)
        out = pb.ModelInferResponse.InferOutputTensor
        if name == "twice":
            y = good(x)
            return pb.ModelInferResponse(
                model_name=name,
                outputs=[out(name="OUTPUT0", datatype="FP32", shape=y.shape)] * 2,
                raw_output_contents=[y.tobytes()] * 2,
            )
        datatype, shape, raw = ANSWERS.get(name, ANSWERS["good"])(x)
        return pb.ModelInferResponse(
            model_name=name,
            outputs=[out(name="OUTPUT0", datatype=datatype, shape=shape)],
            raw_output_contents=[raw],
        )


@asynccontextmanager
async def fake_triton() -> AsyncIterator[tuple[str, FakeTriton]]:
    servicer = FakeTriton()
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


def config(url: str, *models: dict[str, Any]) -> MandantConfig:
    return parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "grace_s": 0},
            "tenants": [{"id": t, "api_keys": [hash_key(k)]} for t, k in KEYS.items()],
            "models": list(models),
        }
    )


def model(url: str, name: str, **extra: Any) -> dict[str, Any]:
    triton = {"url": url, "model": name, "health_interval_s": 0.2, **extra.pop("triton", {})}
    return {"name": name, "backend": "triton", "triton": triton, **IO, **extra}


def client(app: App, tenant: str, timeout_s: float | None = 10) -> AsyncClient:
    return AsyncClient(f"127.0.0.1:{app.grpc_port}", KEYS[tenant], timeout_s=timeout_s)


async def outcome(mc: AsyncClient, name: str, x: np.ndarray) -> MandantClientError | None:
    try:
        result = await mc.infer(name, {"INPUT0": x})
    except MandantClientError as exc:
        return exc
    np.testing.assert_allclose(result["OUTPUT0"], good(x), rtol=1e-6)
    return None


# -- a batch's INVALID_ARGUMENT is one request's -----------------------------------------


async def test_triton_s_invalid_argument_about_a_batch_fails_only_its_request(
    tmp_path: Path,
) -> None:
    """acme's value that Triton refuses, batched with globex's good calls: globex's are
    served and never see acme's value; acme's call alone gets Triton's reason."""
    batching = {"max_batch_size": 16, "max_queue_delay_ms": 300, "dispatch": "delay"}
    async with (
        fake_triton() as (url, _),
        App(config(url, model(url, "picky", batching=batching)), tmp_path) as app,
        client(app, "acme") as acme,
        client(app, "globex") as globex,
    ):
        bad = np.ones((1, 4), np.float32)
        bad[0, 0] = -42.125  # acme's secret
        for _ in range(2):
            results = await asyncio.gather(
                outcome(acme, "picky", bad),
                *(outcome(globex, "picky", np.ones((2, 4), np.float32)) for _ in range(7)),
            )
            assert results[1:] == [None] * 7, results[1:]
            assert isinstance(results[0], InvalidInput), repr(results[0])
            assert "value out of range: -42.125 in batch of 1" in str(results[0])
            assert "request id: 7" not in str(results[0])


# -- answers not as declared -------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["direct", "batched"])
async def test_answers_not_matching_the_declared_outputs_are_unavailable_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, batched: bool
) -> None:
    batching = {"batching": {"max_batch_size": 8, "max_queue_delay_ms": 1}} if batched else {}
    caplog.set_level(logging.ERROR, logger="mandant.backends.triton")
    async with fake_triton() as (url, _):
        models = [model(url, name, **batching) for name in ["good", *MISMATCHED]]
        async with App(config(url, *models), tmp_path) as app, client(app, "acme") as acme:
            x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
            assert await outcome(acme, "good", x) is None
            for name in MISMATCHED:
                for _ in range(2):
                    error = await outcome(acme, name, x)
                    assert isinstance(error, Unavailable), (name, repr(error))
                    assert "does not match the model's outputs" in str(error), name
                    assert "Traceback" not in str(error)
                logged = [r for r in caplog.records if f"model {name}:" in r.getMessage()]
                assert len(logged) == 1, (name, [r.getMessage() for r in logged])
            assert await outcome(acme, "good", x) is None


# -- timeouts and the shared breaker -------------------------------------------------------


async def test_one_tenant_s_slow_calls_leave_the_breaker_closed_for_the_others(
    tmp_path: Path,
) -> None:
    """acme's calls outlast ``timeout_s`` (no client deadline) while Triton answers
    globex's: each of acme's is UNAVAILABLE, and globex is still served at once."""
    triton = {"timeout_s": 1.0, "health_interval_s": 0.05}
    async with (
        fake_triton() as (url, _),
        App(config(url, model(url, "sleepy", triton=triton)), tmp_path) as app,
        client(app, "acme", None) as acme,
        client(app, "globex") as globex,
    ):
        slow = np.full((1, 4), 4.0, np.float32)
        fast = np.zeros((1, 4), np.float32)
        slow_calls = asyncio.gather(*(outcome(acme, "sleepy", slow) for _ in range(6)))
        while not slow_calls.done():  # globex's calls answered meanwhile
            assert await outcome(globex, "sleepy", fast) is None
            await asyncio.sleep(0.05)
        results = await slow_calls
        assert all(isinstance(r, Unavailable) for r in results), results
        assert [await outcome(globex, "sleepy", fast) for _ in range(3)] == [None] * 3


async def test_timeouts_while_triton_answers_only_health_checks_open_the_breaker(
    tmp_path: Path,
) -> None:
    """A model that answers nobody behind a Triton whose health checks still answer (a
    wedged instance): after five timeouts the breaker refuses calls at once instead of
    each waiting ``timeout_s``."""
    triton = {"timeout_s": 1.0, "health_interval_s": 0.05}
    async with (
        fake_triton() as (url, _),
        App(config(url, model(url, "sleepy", triton=triton)), tmp_path) as app,
        client(app, "acme", None) as acme,
    ):
        slow = np.full((1, 4), 4.0, np.float32)
        results = await asyncio.gather(*(outcome(acme, "sleepy", slow) for _ in range(6)))
        assert all(isinstance(r, Unavailable) for r in results), results
        start = time.monotonic()
        assert isinstance(await outcome(acme, "sleepy", np.zeros((1, 4), np.float32)), Unavailable)
        assert time.monotonic() - start < 0.8  # refused by the breaker, no wait


async def test_timeouts_while_triton_answers_nothing_open_the_breaker(tmp_path: Path) -> None:
    """A Triton that stopped answering anything (its health polls too): five calls time
    out, then the breaker refuses the next calls at once."""
    triton = {"timeout_s": 1.0, "health_interval_s": 3600}
    async with (
        fake_triton() as (url, fake),
        App(config(url, model(url, "good", triton=triton)), tmp_path) as app,
        client(app, "acme", None) as acme,
    ):
        x = np.ones((1, 4), np.float32)
        assert await outcome(acme, "good", x) is None
        fake.hung = True
        timed_out = await asyncio.gather(*(outcome(acme, "good", x) for _ in range(5)))
        assert all(isinstance(r, Unavailable) for r in timed_out), timed_out
        start = time.monotonic()
        assert isinstance(await outcome(acme, "good", x), Unavailable)
        assert time.monotonic() - start < 0.8  # refused by the breaker, no wait


@asynccontextmanager
async def sleepy_app(tmp_path: Path) -> AsyncIterator[App]:
    """Mandant with Triton's ``sleepy`` (a call sleeps its input's seconds): a long
    ``timeout_s``, clients' deadlines shorter, health polled often."""
    triton = {"timeout_s": 30.0, "health_interval_s": 0.05}
    async with (
        fake_triton() as (url, _),
        App(config(url, model(url, "sleepy", triton=triton)), tmp_path) as app,
    ):
        yield app


async def all_give_up(caller: Any, seconds: float, calls: int) -> None:
    """``calls`` calls at once, each sleeping ``seconds``: every caller gives up first."""
    x = np.full((1, 4), seconds, np.float32)
    results = await asyncio.gather(*(outcome(caller, "sleepy", x) for _ in range(calls)))
    assert all(isinstance(r, DeadlineExceeded) for r in results), results


async def refused_at_once(caller: Any) -> None:
    start = time.monotonic()
    refused = await outcome(caller, "sleepy", np.zeros((1, 4), np.float32))
    assert isinstance(refused, Unavailable), repr(refused)
    assert time.monotonic() - start < 0.3  # refused by the breaker, no wait


async def test_calls_their_callers_gave_up_on_while_triton_answers_nobody_open_the_breaker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wedged model (health checks answer, calls never do) and clients whose deadline
    (0.5 s) is shorter than ``timeout_s`` (30 s), as real clients' are: every call was
    abandoned by its caller, so the breaker never opened and each call waited its whole
    deadline. Now five such calls, given up once Triton has answered nothing for
    ``SILENT_S`` (5 s; 0.3 here) while asked, open it and the next is refused at once."""
    monkeypatch.setattr(triton_backend, "SILENT_S", 0.3)
    async with sleepy_app(tmp_path) as app, client(app, "acme", 0.5) as acme:
        assert await outcome(acme, "sleepy", np.zeros((1, 4), np.float32)) is None
        await all_give_up(acme, 60.0, 5)
        await refused_at_once(acme)


async def test_one_tenant_s_short_deadlines_on_a_slow_model_leave_the_breaker_closed(
    tmp_path: Path,
) -> None:
    """A model that takes 0.4 s and answers: acme's burst of calls with a 0.15 s
    deadline all give up before any answer, yet Triton is not failing (it answered
    globex in 0.4 s): globex is still served."""
    slow = np.full((1, 4), 0.4, np.float32)
    async with (
        sleepy_app(tmp_path) as app,
        client(app, "acme", 0.15) as acme,
        client(app, "globex") as globex,
    ):
        assert await outcome(globex, "sleepy", slow) is None
        for _ in range(2):
            await all_give_up(acme, 0.4, 8)
        assert await outcome(globex, "sleepy", slow) is None


async def test_one_tenant_s_calls_slow_for_their_data_leave_the_breaker_closed(
    tmp_path: Path,
) -> None:
    """globex's calls are quick (Triton's slowest recent answer: milliseconds); acme's
    bursts of calls slow for their inputs (0.4 s) give up at 0.15 s. Before, each
    counted as a failure once it waited twice the slowest answer (0.1 s at least), and
    acme opened the breaker for globex: one tenant's data and deadlines are no sign
    that Triton answers nobody."""
    quick = np.zeros((1, 4), np.float32)
    async with (
        sleepy_app(tmp_path) as app,
        client(app, "acme", 0.15) as acme,
        client(app, "globex") as globex,
    ):
        assert await outcome(globex, "sleepy", quick) is None
        for _ in range(3):
            await all_give_up(acme, 0.4, 6)
        assert await outcome(globex, "sleepy", quick) is None


async def test_short_deadlines_before_any_answer_leave_the_breaker_closed(
    tmp_path: Path,
) -> None:
    """The same on a model that has answered nothing yet: how long it takes is not
    known, so acme's calls that gave up at 0.15 s said nothing of Triton (they counted
    as failures against a 0.1 s floor and opened the breaker for globex)."""
    async with (
        sleepy_app(tmp_path) as app,
        client(app, "acme", 0.15) as acme,
        client(app, "globex") as globex,
    ):
        for _ in range(3):
            await all_give_up(acme, 0.4, 4)
        assert await outcome(globex, "sleepy", np.full((1, 4), 0.4, np.float32)) is None


async def test_a_model_wedged_from_the_start_opens_the_breaker_after_the_cold_stall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before any answer, a call its caller gave up on counts once Triton was asked
    and silent ``SILENT_S`` (5 s; 0.3 here): a model wedged since Mandant started,
    clients' deadlines shorter than ``timeout_s``, never opened the breaker."""
    monkeypatch.setattr(triton_backend, "SILENT_S", 0.3)
    async with sleepy_app(tmp_path) as app, client(app, "acme", 0.5) as acme:
        await all_give_up(acme, 60.0, 5)
        await refused_at_once(acme)


async def test_a_failed_config_poll_keeps_triton_s_max_batch_size(tmp_path: Path) -> None:
    """One ModelConfig poll that times out does not make Mandant forget Triton's
    max_batch_size (batches would go to Triton whole, be refused and be split); a
    server that does not serve ModelConfig has none."""
    async with (
        fake_triton() as (url, fake),
        App(config(url, model(url, "good")), tmp_path) as app,
    ):
        backend = app.registry.resolve(Tenant("acme"), "good").backend
        assert isinstance(backend, TritonBackend) and backend.triton_max_batch_size == 64
        fake.config_fails = grpc.StatusCode.DEADLINE_EXCEEDED
        await backend.refresh()
        assert backend.triton_max_batch_size == 64
        fake.config_fails = grpc.StatusCode.UNIMPLEMENTED
        await backend.refresh()
        assert backend.triton_max_batch_size == 0


# -- configured tensors against Triton's ---------------------------------------------------


def _io(input_type: str = "FP32", output_type: str = "FP32", shape: int = 4) -> dict[str, Any]:
    return {
        "inputs": [{"name": "INPUT0", "datatype": input_type, "shape": [-1, shape]}],
        "outputs": [{"name": "OUTPUT0", "datatype": output_type, "shape": [-1, 3]}],
    }


async def test_configured_tensors_contradicting_triton_s_fail_the_load(tmp_path: Path) -> None:
    """A configured FP64 input on Triton's FP32 model loaded READY, published FP64 in
    ModelMetadata, and every call following it was INVALID_ARGUMENT, blamed on its
    caller. Now the load fails, naming the tensor and both datatypes (log and the
    admin's load answer); tenants see the generic reason."""
    renamed = {**_io(), "outputs": [{**_io()["outputs"][0], "name": "OUT9"}]}
    entries = {
        "good": _io(),
        "in64": _io(input_type="FP64"),
        "out64": _io(output_type="FP64"),
        "wide": _io(shape=5),
        "renamed": renamed,
    }
    async with fake_triton() as (url, _):
        models = [{**model(url, name), **io} for name, io in entries.items()]
        async with App(config(url, *models), tmp_path) as app, client(app, "acme") as acme:
            failures = {m.key.name: m.failure for m in app.registry.all()}
            assert failures["good"] is None
            assert "INPUT0 is FP64 in the configuration, FP32" in str(failures["in64"])
            assert "OUTPUT0 is FP64 in the configuration, FP32" in str(failures["out64"])
            assert "[-1, 5] in the configuration, [-1, 4]" in str(failures["wide"])
            assert "no such output (its outputs: OUTPUT0)" in str(failures["renamed"])
            for name in ("in64", "out64", "wide", "renamed"):
                assert not await acme.model_ready(name)
            assert await outcome(acme, "good", np.ones((1, 4), np.float32)) is None
            with pytest.raises(errors.Unavailable, match="FP64 in the configuration"):
                await app.registry.load("in64")


async def test_a_model_whose_first_probe_is_slow_starts_ready(tmp_path: Path) -> None:
    """The first poll connects to Triton too; on a busy host it took longer than a
    poll's 1 s, and the model started unready (logged), which failed a load through
    the control API. It has 5 s."""
    async with fake_triton() as (url, fake):
        fake.first_ready_s = 1.5
        async with App(config(url, model(url, "good")), tmp_path) as app:
            assert app.registry.resolve(Tenant("acme"), "good").backend.ready


async def test_tensors_triton_s_model_changes_to_contradict_make_it_unready(
    tmp_path: Path,
) -> None:
    """Triton's model reloaded with other tensors than configured: the next metadata
    poll makes the model unready (logged), and ready again once they agree."""
    async with (
        fake_triton() as (url, fake),
        App(config(url, model(url, "good")), tmp_path) as app,
        client(app, "acme") as acme,
    ):
        backend = app.registry.resolve(Tenant("acme"), "good").backend
        assert backend.ready
        fake.input_datatype = "FP16"
        await backend.refresh()
        assert not backend.ready and not await acme.model_ready("good")
        fake.input_datatype = "FP32"
        await backend.refresh()
        assert backend.ready
        assert await outcome(acme, "good", np.ones((1, 4), np.float32)) is None


async def test_a_model_unloaded_on_triton_s_side_is_unready_at_its_first_not_found(
    tmp_path: Path,
) -> None:
    """Every call until the next readiness poll reached Triton, got NOT_FOUND and logged
    an ERROR line (352 in 0.3 s with a real Triton): now the first makes the model
    unready, the next are refused here, and the poll makes it ready again."""
    async with fake_triton() as (url, fake):
        slow_poll = model(url, "good", triton={"health_interval_s": 60})
        async with (
            App(config(url, slow_poll), tmp_path) as app,
            client(app, "acme") as acme,
        ):
            backend = app.registry.resolve(Tenant("acme"), "good").backend
            x = np.ones((1, 4), np.float32)
            assert await outcome(acme, "good", x) is None
            fake.gone = frozenset({"good"})
            before = fake.infers
            assert isinstance(await outcome(acme, "good", x), Unavailable)
            assert not backend.ready
            for _ in range(5):
                assert isinstance(await outcome(acme, "good", x), Unavailable)
            assert fake.infers == before + 1  # refused here, not sent
            fake.gone = frozenset()
            await backend.refresh()
            assert backend.ready and await outcome(acme, "good", x) is None


async def test_triton_s_tensors_of_a_datatype_mandant_does_not_carry_are_not_served(
    tmp_path: Path,
) -> None:
    """A model whose tensors come from Triton (none configured) with a BF16 input
    loaded READY, published BF16 in ModelMetadata, and every call with raw contents
    failed INTERNAL where the datatype was looked up. Now the load fails naming it,
    and a model whose Triton model changes to such a tensor is unready until it
    changes back."""
    async with fake_triton() as (url, fake):
        found = {k: v for k, v in model(url, "found").items() if k not in IO}
        fake.input_datatype = "BF16"
        async with App(config(url, found), tmp_path) as app, client(app, "acme") as acme:
            (failed,) = app.registry.all()
            assert "INPUT0 is BF16 on Triton's model 'found', a datatype Mandant does not" in (
                str(failed.failure)
            )
            assert not await acme.model_ready("found")
            fake.input_datatype = "FP32"
            await app.registry.load("found")
            assert await outcome(acme, "found", np.ones((1, 4), np.float32)) is None
            backend = app.registry.resolve(Tenant("acme"), "found").backend
            fake.input_datatype = "BF16"
            await backend.refresh()
            assert not backend.ready and not await acme.model_ready("found")
            metadata = await acme.model_metadata("found")
            assert [t.datatype for t in metadata.inputs] == ["FP32"]  # BF16 never published


async def test_triton_s_words_about_inputs_name_none_of_its_internals(tmp_path: Path) -> None:
    """Triton's INVALID_ARGUMENT text reached the tenant with only the exact
    ``'<triton model>'`` replaced, and cut first: an unquoted name, an instance's name,
    a path or a host went through. Now each is Mandant's name or left out."""
    async with fake_triton() as (url, _):
        public = {**model(url, "chatty"), "name": "public"}
        async with App(config(url, public), tmp_path) as app, client(app, "acme") as acme:
            refused = await outcome(acme, "public", np.ones((1, 4), np.float32))
            assert isinstance(refused, InvalidInput)
            text = str(refused)
            assert "bad input for model public v7 at <path> (host <address>); see public at" in text
            for internal in ("chatty", "/opt", "gpu-7", "10.3.4.5", "request id: 7"):
                assert internal not in text
