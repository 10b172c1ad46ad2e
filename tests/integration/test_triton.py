"""The Triton backend against a real NVIDIA Triton Inference Server (PyTriton, started
by a fixture on free ports), with Mandant in process on port 0.

Tenants: acme owns the private ``scorer`` (Triton's ``tiny`` under another name);
``tiny`` is shared and takes its tensors from Triton's metadata; ``tiny-batched`` is
batched by Mandant and sent to Triton as one request per batch; ``echo`` is an
in-process Torch model that must keep serving while Triton is down; ``poison`` (and
``poison-batched``, batched by Mandant) is Triton's model that fails on negative inputs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2, service_pb2_grpc

from mandant import errors
from mandant.app import App
from mandant.config import MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from mandant_client import (
    AsyncClient,
    DeadlineExceeded,
    InvalidInput,
    MandantClientError,
    ModelNotFound,
    ResourceExhausted,
    Unavailable,
)
from tests.triton_server import (
    MODEL,
    POISON_MODEL,
    TritonProcess,
    available,
    expected,
    free_port,
)
from tests.triton_server.tiny import QUEUED_NAME, SHARED_POISON_NAME, SLOW_NAME

_missing = available()
if _missing is not None and os.environ.get("CI"):
    raise RuntimeError(f"Triton tests cannot run in CI: {_missing}")
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")

KEYS = {"acme": "acme-triton-key", "globex": "globex-triton-key", "initech": "initech-key"}
RNG = np.random.default_rng(5)


def config(triton_url: str, *extra_models: dict[str, Any]) -> MandantConfig:
    triton = {"url": triton_url, "model": MODEL, "timeout_s": 10, "health_interval_s": 0.2}
    poison = {**triton, "model": POISON_MODEL}
    return parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "grace_s": 0},
            "tenants": [{"id": t, "api_keys": [hash_key(k)]} for t, k in KEYS.items()],
            "models": [
                {"name": "tiny", "backend": "triton", "triton": triton},
                {"name": "scorer", "tenant": "acme", "backend": "triton", "triton": triton},
                {
                    "name": "tiny-batched",
                    "backend": "triton",
                    "triton": triton,
                    # Triton's own rule (wait up to the delay for a full batch): the
                    # adaptive default ran each call alone when the calls trickled in
                    # on a loaded machine (24 executions for 24 calls, once in CI).
                    "batching": {
                        "max_batch_size": 16,
                        "max_queue_delay_ms": 100,
                        "dispatch": "delay",
                    },
                },
                {
                    "name": "echo",
                    "backend": "torch",
                    "factory": "mandant.demo.models:echo",
                    "device": "cpu",
                    "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
                    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
                },
                {"name": "poison", "backend": "triton", "triton": poison},
                {
                    "name": "poison-batched",
                    "backend": "triton",
                    "triton": poison,
                    # Triton's own rule (wait up to the delay for a full batch): the
                    # adaptive default ran each call alone when the calls trickled in
                    # on a loaded machine (24 executions for 24 calls, once in CI).
                    "batching": {
                        "max_batch_size": 16,
                        "max_queue_delay_ms": 100,
                        "dispatch": "delay",
                    },
                },
                *extra_models,
            ],
        }
    )


def rows(n: int) -> np.ndarray:
    return RNG.standard_normal((n, 4)).astype(np.float32)


@pytest.fixture
async def mandant(triton: TritonProcess, tmp_path: Path) -> AsyncIterator[App]:
    async with App(config(triton.url), tmp_path) as app:
        yield app


def client(app: App, tenant: str, timeout_s: float | None = 10) -> AsyncClient:
    return AsyncClient(f"127.0.0.1:{app.grpc_port}", KEYS[tenant], timeout_s=timeout_s)


async def triton_direct(url: str, x: np.ndarray, outputs: tuple[str, ...]) -> dict[str, Any]:
    direct = triton_aio.InferenceServerClient(url)
    try:
        tensor = InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = await direct.infer(
            MODEL, [tensor], outputs=[InferRequestedOutput(name) for name in outputs]
        )
        return {name: result.as_numpy(name) for name in outputs}
    finally:
        await direct.close()


def triton_counter(triton: TritonProcess, name: str) -> float:
    """A counter of ``tiny`` from Triton's Prometheus endpoint (0 before any request)."""
    url = f"http://127.0.0.1:{triton.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    pattern = rf'^{name}{{[^}}]*model="{MODEL}"[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, flags=re.MULTILINE))


# -- data path ------------------------------------------------------------------------


async def test_results_through_mandant_equal_triton_direct(
    mandant: App, triton: TritonProcess
) -> None:
    x = rows(5)
    direct = await triton_direct(triton.url, x, ("OUTPUT0", "OUTPUT1"))
    async with client(mandant, "globex") as mc:
        through = await mc.infer("tiny", {"INPUT0": x})
        only = await mc.infer("tiny", {"INPUT0": x}, outputs=["OUTPUT1"])
    assert set(through) == {"OUTPUT0", "OUTPUT1"}
    for name in through:
        np.testing.assert_array_equal(through[name], direct[name])
        np.testing.assert_allclose(through[name], expected(x)[name], rtol=1e-5, atol=1e-6)
    assert set(only) == {"OUTPUT1"}
    np.testing.assert_array_equal(only["OUTPUT1"], direct["OUTPUT1"])


async def test_tritonclient_through_mandant(mandant: App, triton: TritonProcess) -> None:
    """Any KServe v2 client works unchanged, with the one extra header."""
    x = rows(3)
    mc = triton_aio.InferenceServerClient(f"127.0.0.1:{mandant.grpc_port}")
    try:
        headers = {"authorization": f"Bearer {KEYS['acme']}"}
        tensor = InferInput("INPUT0", [3, 4], "FP32")
        tensor.set_data_from_numpy(x)
        result = await mc.infer("scorer", [tensor], headers=headers)
        metadata = await mc.get_model_metadata("scorer", headers=headers)
        assert await mc.is_model_ready("scorer", headers=headers)
    finally:
        await mc.close()
    direct = await triton_direct(triton.url, x, ("OUTPUT0", "OUTPUT1"))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), direct["OUTPUT0"])
    # Inputs and outputs were not configured: they come from Triton's ModelMetadata,
    # under Mandant's name for the model.
    assert metadata.name == "scorer"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "FP32", [-1, 4])
    ]
    assert [(t.name, list(t.shape)) for t in metadata.outputs] == [
        ("OUTPUT0", [-1, 3]),
        ("OUTPUT1", [-1, 1]),
    ]


async def test_mandant_batches_go_to_triton_as_one_request(
    mandant: App, triton: TritonProcess
) -> None:
    before = triton_counter(triton, "nv_inference_exec_count")
    inputs = [rows(1 + i % 3) for i in range(24)]
    async with client(mandant, "acme") as acme, client(mandant, "initech") as initech:
        results = await asyncio.gather(
            *(
                (acme if i % 2 else initech).infer("tiny-batched", {"INPUT0": x})
                for i, x in enumerate(inputs)
            )
        )
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result["OUTPUT0"], expected(x)["OUTPUT0"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result["OUTPUT1"], expected(x)["OUTPUT1"], rtol=1e-5, atol=1e-6)
    executions = triton_counter(triton, "nv_inference_exec_count") - before
    assert 0 < executions < len(inputs)  # batches, not one execution per request


# -- isolation ------------------------------------------------------------------------

VISIBLE = {
    ("acme", "tiny"): True,
    ("acme", "scorer"): True,
    ("globex", "tiny"): True,
    ("globex", "scorer"): False,
    ("initech", "tiny"): True,
    ("initech", "scorer"): False,
}


@pytest.mark.parametrize(("tenant", "model"), sorted(VISIBLE))
async def test_isolation_of_triton_models(mandant: App, tenant: str, model: str) -> None:
    async with client(mandant, tenant) as mc:
        calls = {
            "infer": lambda name: mc.infer(name, {"INPUT0": rows(1)}),
            "metadata": mc.model_metadata,
            "ready": mc.model_ready,
        }
        for rpc, call in calls.items():
            if VISIBLE[(tenant, model)]:
                assert await call(model), rpc
                continue
            if rpc == "ready":  # not ready, as for a model that does not exist (Triton)
                assert await call(model) is False and await call("no-such-model") is False
                continue
            with pytest.raises(ModelNotFound) as hidden:
                await call(model)
            with pytest.raises(ModelNotFound) as absent:
                await call("no-such-model")
            # Indistinguishable from a model that does not exist.
            assert str(hidden.value).replace(model, "X") == str(absent.value).replace(
                "no-such-model", "X"
            ), rpc
        index = {m.name for m in await mc.models()}
    assert ("scorer" in index) == VISIBLE[(tenant, "scorer")]


# -- bad input ------------------------------------------------------------------------

BAD_REQUESTS: dict[str, dict[str, Any]] = {
    "wrong datatype": {"inputs": {"INPUT0": rows(2).astype(np.float64)}},
    "wrong shape": {"inputs": {"INPUT0": np.zeros((2, 5), np.float32)}},
    "wrong name": {"inputs": {"INPUT9": rows(2)}},
    "extra input": {"inputs": {"INPUT0": rows(2), "INPUT1": rows(2)}},
    "unknown output": {"inputs": {"INPUT0": rows(2)}, "outputs": ["OUTPUT7"]},
}


class RecordingTriton(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Stands in for Triton where a test must see every request that reaches it: reports
    ``tiny`` ready with its metadata and records (and answers) inference calls."""

    def __init__(self) -> None:
        self.infer_calls: list[service_pb2.ModelInferRequest] = []

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ModelReadyResponse(ready=request.name == MODEL)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=MODEL,
            versions=["1"],
            platform="recording",
            inputs=[tensor(name="INPUT0", datatype="FP32", shape=[-1, 4])],
            outputs=[
                tensor(name="OUTPUT0", datatype="FP32", shape=[-1, 3]),
                tensor(name="OUTPUT1", datatype="FP32", shape=[-1, 1]),
            ],
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        self.infer_calls.append(request)
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(-1, 4)
        answers = expected(x)
        wanted = [o.name for o in request.outputs] or list(answers)
        out = service_pb2.ModelInferResponse.InferOutputTensor
        return service_pb2.ModelInferResponse(
            model_name=MODEL,
            outputs=[out(name=n, datatype="FP32", shape=answers[n].shape) for n in wanted],
            raw_output_contents=[answers[n].tobytes() for n in wanted],
        )


async def test_bad_inputs_are_rejected_before_reaching_triton(tmp_path: Path) -> None:
    recorder = RecordingTriton()
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with App(config(f"127.0.0.1:{port}"), tmp_path) as app, client(app, "acme") as mc:
            for case, request in BAD_REQUESTS.items():
                with pytest.raises(InvalidInput):
                    await mc.infer("tiny", request["inputs"], outputs=request.get("outputs"))
                assert recorder.infer_calls == [], case
            # A good request does reach it, with only the requested output.
            x = rows(2)
            result = await mc.infer("tiny", {"INPUT0": x}, outputs=["OUTPUT1"])
        np.testing.assert_array_equal(result["OUTPUT1"], expected(x)["OUTPUT1"])
        assert [[o.name for o in r.outputs] for r in recorder.infer_calls] == [["OUTPUT1"]]
    finally:
        await server.stop(0)


async def test_triton_errors_keep_their_meaning_without_leaking_names(
    triton: TritonProcess, tmp_path: Path
) -> None:
    loose = {"url": triton.url, "model": MODEL, "health_interval_s": 0.2}
    io = {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    }
    ghost = {"url": triton.url, "model": "no-such-triton-model", "health_interval_s": 0.2}
    extra = [
        {"name": "loose", "backend": "triton", "triton": loose, **io},
        {"name": "ghost", "backend": "triton", "triton": ghost, **io},
    ]
    async with App(config(triton.url, *extra), tmp_path) as app, client(app, "globex") as mc:
        # Configured looser than Triton's model: Triton's INVALID_ARGUMENT comes through
        # as INVALID_ARGUMENT, naming Mandant's model, not Triton's.
        with pytest.raises(InvalidInput) as invalid:
            await mc.infer("loose", {"INPUT0": np.zeros((2, 5), np.float32)})
        assert "'loose'" in str(invalid.value)
        assert f"'{MODEL}'" not in str(invalid.value)
        # A mapping to a model Triton does not have: UNAVAILABLE, never NOT_FOUND.
        assert not await mc.model_ready("ghost")
        assert await mc.server_ready()  # ready_when: any_model (default): others serve
        with pytest.raises(Unavailable) as unavailable:
            await mc.infer("ghost", {"INPUT0": rows(1)})
        assert "no-such-triton-model" not in str(unavailable.value)
        result = await mc.infer("loose", {"INPUT0": rows(2)})
        assert result["OUTPUT0"].shape == (2, 3)


# -- one tenant's model errors are that tenant's ---------------------------------------


def good_rows(n: int) -> np.ndarray:
    return np.abs(rows(n))


def bad_rows(n: int) -> np.ndarray:
    x = good_rows(n)
    x[-1, 0] = -1.0  # the poison model raises on any negative value
    return x


async def outcome(mc: AsyncClient, model: str, x: np.ndarray) -> MandantClientError | None:
    try:
        result = await mc.infer(model, {"INPUT0": x})
    except MandantClientError as exc:
        return exc
    np.testing.assert_allclose(result["OUTPUT1"], expected(x)["OUTPUT1"], rtol=1e-5)
    return None


async def test_model_errors_of_one_tenant_are_its_own_and_leave_the_breaker_closed(
    mandant: App,
) -> None:
    """The reproduced outage: 8 calls that Triton's model fails on (INTERNAL) from acme
    opened the breaker every tenant shares, and globex's next good calls were all
    UNAVAILABLE. Now acme gets INVALID_ARGUMENT (no retry hint, no Triton internals;
    its request id, which it lacked on a model without Mandant's batching) and globex
    is served, after the bad calls and alongside them."""
    async with client(mandant, "acme") as acme, client(mandant, "globex") as globex:
        for _ in range(8):
            error = await outcome(acme, "poison", bad_rows(2))
            assert isinstance(error, InvalidInput), repr(error)
            assert "failed on this request's inputs (request id " in str(error)
            for leak in ("negative", "Traceback", POISON_MODEL + "_", "Triton"):
                assert leak not in str(error)
        assert [await outcome(globex, "poison", good_rows(2)) for _ in range(5)] == [None] * 5
        for _ in range(3):
            bad = [outcome(acme, "poison", bad_rows(1 + i % 3)) for i in range(8)]
            good = [outcome(globex, "poison", good_rows(1 + i % 3)) for i in range(8)]
            results = await asyncio.gather(*bad, *good)
            assert all(isinstance(e, InvalidInput) for e in results[:8]), results[:8]
            assert results[8:] == [None] * 8


async def test_failed_mandant_batches_leave_the_breaker_closed(mandant: App) -> None:
    """A Mandant batch that Triton's model fails on is the batch's requests' fault, not
    Triton's: the breaker stays closed and the next good calls run. (Which requests of a
    failed batch are at fault is the batcher's to find: it splits the batch on the
    non-Mandant error the backend raises; a request failing alone is INVALID_ARGUMENT.)"""
    async with client(mandant, "acme") as acme, client(mandant, "globex") as globex:
        for _ in range(8):
            error = await outcome(acme, "poison-batched", bad_rows(2))
            assert isinstance(error, InvalidInput), repr(error)
            assert "negative" not in str(error) and "Traceback" not in str(error)
        good = [outcome(globex, "poison-batched", good_rows(2)) for _ in range(5)]
        assert await asyncio.gather(*good) == [None] * 5


async def test_one_tenant_s_poisoned_rows_in_shared_triton_batches_fail_only_that_tenant(
    mandant: App,
) -> None:
    """acme's bad calls and globex's good ones at the same time, batched together by
    Mandant: the batcher splits every failed batch, so only acme's calls fail."""
    async with client(mandant, "acme") as acme, client(mandant, "globex") as globex:
        for _ in range(3):
            bad = [outcome(acme, "poison-batched", bad_rows(1)) for _ in range(6)]
            good = [outcome(globex, "poison-batched", good_rows(1)) for _ in range(6)]
            results = await asyncio.gather(*bad, *good)
            assert all(isinstance(e, InvalidInput) for e in results[:6]), results
            assert results[6:] == [None] * 6


async def test_mandant_batches_beyond_triton_s_max_batch_size_fail_only_the_request_at_fault(
    triton: TritonProcess, tmp_path: Path
) -> None:
    """Mandant batches up to 128 rows for Triton's ``tiny`` (max_batch_size 64): two
    tenants' calls that fit Triton alone are served together too (they failed together,
    INVALID_ARGUMENT); a call Triton refuses alone fails alone, with Triton's reason."""
    wide = {
        "name": "tiny-wide",
        "backend": "triton",
        "triton": {"url": triton.url, "model": MODEL, "health_interval_s": 0.2},
        "batching": {"max_batch_size": 128, "max_queue_delay_ms": 300, "dispatch": "delay"},
    }
    async with (
        App(config(triton.url, wide), tmp_path) as app,
        client(app, "acme") as acme,
        client(app, "globex") as globex,
    ):
        for _ in range(2):
            both = [outcome(acme, "tiny-wide", rows(60)), outcome(globex, "tiny-wide", rows(10))]
            assert await asyncio.gather(*both) == [None, None]
        refused, served = await asyncio.gather(
            outcome(acme, "tiny-wide", rows(100)), outcome(globex, "tiny-wide", rows(10))
        )
    assert isinstance(refused, InvalidInput), repr(refused)
    assert "64" in str(refused) and "'tiny-wide'" in str(refused)
    assert served is None


async def test_a_batch_triton_formed_blames_no_tenant_for_another_s_input(
    triton: TritonProcess, tmp_path: Path
) -> None:
    """``poison-shared``: Triton's own dynamic batcher (no Mandant batching) joins acme's
    negative call with globex's good ones and its model fails them all. globex was
    answered INVALID_ARGUMENT "failed on this request's inputs" (and charged); now no
    caller is blamed nor charged: UNAVAILABLE, saying the batch was Triton's (acme's
    too: Mandant cannot tell whose input failed). The breaker stays closed."""
    shared = {
        "name": "shared",
        "backend": "triton",
        "triton": {"url": triton.url, "model": SHARED_POISON_NAME, "health_interval_s": 0.2},
    }
    async with (
        App(config(triton.url, shared), tmp_path) as app,
        client(app, "acme") as acme,
        client(app, "globex") as globex,
    ):
        assert await outcome(globex, "shared", good_rows(2)) is None
        bad, *good = await asyncio.gather(
            outcome(acme, "shared", bad_rows(1)),
            outcome(globex, "shared", good_rows(1)),
            outcome(globex, "shared", good_rows(2)),
        )
        for error in (bad, *good):
            assert isinstance(error, Unavailable), repr(error)
            assert "formed with other calls" in str(error)
            assert "negative" not in str(error) and "inputs may not be at fault" in str(error)
        assert await outcome(globex, "shared", good_rows(3)) is None


# -- Triton's own queue -----------------------------------------------------------------


async def test_triton_s_full_queue_is_queue_full_for_its_caller_and_leaves_the_breaker_closed(
    triton: TritonProcess, tmp_path: Path
) -> None:
    """acme floods ``queued`` (one call at a time, one place in Triton's queue): Triton
    refuses the rest UNAVAILABLE "Exceeds maximum queue size". Those are acme's
    RESOURCE_EXHAUSTED with a retry pushback, not a Triton down: the breaker every
    tenant shares stays closed (it opened after 5, and globex's next call was
    UNAVAILABLE)."""
    queued = {
        "name": "queued",
        "backend": "triton",
        "triton": {"url": triton.url, "model": QUEUED_NAME, "health_interval_s": 0.2},
    }
    async with (
        App(config(triton.url, queued), tmp_path) as app,
        client(app, "acme") as acme,
        client(app, "globex") as globex,
    ):
        flood = await asyncio.gather(*(outcome(acme, "queued", good_rows(1)) for _ in range(10)))
        refused = [error for error in flood if error is not None]
        assert len(refused) >= 5, flood
        for error in refused:
            assert isinstance(error, ResourceExhausted), repr(error)
            assert error.retry_after_s is not None and error.retry_after_s > 0
            assert "'queued'" in str(error) and "queue size" not in str(error)
        assert await outcome(globex, "queued", good_rows(1)) is None


def slow_model(triton: TritonProcess, name: str = "slow", **settings: Any) -> dict[str, Any]:
    """``slow`` on Triton: 0.1 s a call, one at a time, every call sent to it held."""
    triton_settings = {"url": triton.url, "model": SLOW_NAME, "health_interval_s": 0.2}
    return {"name": name, "backend": "triton", "triton": {**triton_settings, **settings}}


async def test_max_in_flight_auto_is_twice_what_triton_s_model_runs_at_once(
    triton: TritonProcess, tmp_path: Path
) -> None:
    """Read from Triton's model config (``runs_at_once``): its one instance, times the
    calls its dynamic batcher joins; a number set in the configuration is kept."""
    fixed = slow_model(triton, "slow-fixed", max_in_flight=5)
    async with App(config(triton.url, slow_model(triton), fixed), tmp_path) as app:
        in_flight = {model.key.name: model.backend.max_concurrency for model in app.registry.all()}
    assert in_flight["tiny"] == 2 * 64  # its batcher joins up to 64 one-row calls
    assert in_flight["tiny-batched"] == 2 * 4  # ... and 4 of Mandant's batches of 16
    assert in_flight["poison"] == in_flight["slow"] == 2  # no batcher: one at a time
    assert in_flight["slow-fixed"] == 5


async def test_a_flood_of_a_slow_triton_model_waits_in_mandant_where_tenants_take_turns(
    triton: TritonProcess, tmp_path: Path
) -> None:
    """acme sends 8 calls of ``slow``, then globex one. Triton serves the calls it holds
    first come first served: with 256 in flight (the default before ``auto``) all of
    acme's went to Triton and globex's ran ninth, 0.9 s later; with ``auto`` (2 here)
    the rest wait in Mandant's fair queue and globex's runs among the first four."""
    async with (
        App(config(triton.url, slow_model(triton)), tmp_path) as app,
        client(app, "acme") as acme,
        client(app, "globex") as globex,
    ):
        answered: list[str] = []

        async def call(caller: AsyncClient, tenant: str) -> None:
            assert await outcome(caller, "slow", good_rows(1)) is None
            answered.append(tenant)

        flood = [asyncio.create_task(call(acme, "acme")) for _ in range(8)]
        await asyncio.sleep(0.05)  # acme's calls are in (their first still runs)
        await call(globex, "globex")
        await asyncio.gather(*flood)
    assert answered.index("globex") <= 3, answered


async def test_calls_given_up_keep_their_places_at_triton(
    triton: TritonProcess, tmp_path: Path
) -> None:
    """Triton runs a call whose caller left (it queues and runs it anyway): acme's calls
    given up after 40 ms, a new one every 25 ms for 0.6 s, each freed its place at its
    deadline, so all of them went to Triton, whose queue grew by 0.1 s of work every
    25 ms, and globex's call after them waited behind it (2 s). Now they keep their
    places until Triton answers them: Triton holds two calls at most, acme's wait their
    turn in Mandant, and globex's call runs after at most the two in Triton's hands."""
    async with (
        App(config(triton.url, slow_model(triton)), tmp_path) as app,
        client(app, "acme", timeout_s=0.04) as acme,
        client(app, "globex") as globex,
    ):
        given_up = []
        for _ in range(24):
            given_up.append(asyncio.create_task(outcome(acme, "slow", good_rows(1))))
            await asyncio.sleep(0.025)
        for error in await asyncio.gather(*given_up):
            assert isinstance(error, DeadlineExceeded), repr(error)
        start = time.monotonic()
        assert await outcome(globex, "slow", good_rows(1)) is None
        assert time.monotonic() - start < 0.8


# -- faults ---------------------------------------------------------------------------


async def test_triton_killed_under_load_then_restarted(
    triton: TritonProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kills the session's Triton and starts it again on the same ports. The breaker's
    opening and closing are in the log (refusing every tenant's calls, it said nothing)."""
    caplog.set_level(logging.INFO, logger="mandant.backends.triton")
    async with App(config(triton.url), tmp_path) as app, client(app, "acme", 5) as mc:
        calls: list[tuple[float, float, str]] = []  # start, seconds, outcome
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    await mc.infer("tiny", {"INPUT0": rows(2)})
                    outcome = "ok"
                except Unavailable:
                    outcome = "unavailable"
                calls.append((start, time.monotonic() - start, outcome))
                if outcome != "ok":
                    await asyncio.sleep(0.05)  # as a client backs off (it spun for 15 s)

        workers = [asyncio.create_task(load()) for _ in range(8)]
        try:
            await _kill_and_restart(triton, mc, calls, app)
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
        x = rows(4)
        result = await mc.infer("tiny", {"INPUT0": x})
        want = expected(x)["OUTPUT0"]
        np.testing.assert_allclose(result["OUTPUT0"], want, rtol=1e-5, atol=1e-6)
        assert await mc.model_ready("tiny")
        assert await mc.server_ready()
    said = [r.getMessage() for r in caplog.records if r.name == "mandant.backends.triton"]
    opened = [m for m in said if "model tiny:" in m and "its calls are refused" in m]
    closed = [m for m in said if "model tiny:" in m and "answers again" in m]
    assert opened and closed, said


def circuit_open(app: App, model: str) -> float | None:
    """``mandant_backend_circuit_open`` of ``model`` (its one version)."""
    for family in app.metrics.collect():
        for sample in family.samples:
            if sample.name == "mandant_backend_circuit_open" and sample.labels["model"] == model:
                return sample.value
    return None


async def _kill_and_restart(
    triton: TritonProcess, mc: AsyncClient, calls: list[tuple[float, float, str]], app: App
) -> None:
    await asyncio.sleep(0.5)
    assert any(o == "ok" for _, _, o in calls)
    assert circuit_open(app, "tiny") == 0

    killed_at = time.monotonic()
    await asyncio.to_thread(triton.kill)
    # 3 s: on a loaded box (2 cores, the suite's other workers) 1.5 s saw no opening.
    seen_open, watched_until = False, time.monotonic() + 3.0
    while time.monotonic() < watched_until:  # open, half open (a probe), open again
        seen_open = seen_open or circuit_open(app, "tiny") == 1
        await asyncio.sleep(0.05)
    assert seen_open
    after_kill = [c for c in calls if c[0] + c[1] > killed_at + 0.2]
    # Every call that ended after the kill failed, fast, with UNAVAILABLE
    # (the load would have raised anything else).
    assert after_kill and all(o == "unavailable" for _, _, o in after_kill)
    assert max(d for _, d, _ in after_kill) < 3.0  # no hang until a timeout

    # The server stays up; the Torch model keeps serving; readiness follows.
    echoed = await mc.infer("echo", {"INPUT0": rows(3)})
    assert echoed["OUTPUT0"].shape == (3, 4)
    assert await mc.server_live()
    assert not await mc.model_ready("tiny")
    listed = {m.name: m for m in await mc.models()}  # why, not where (it said nothing)
    assert (listed["tiny"].state, listed["tiny"].reason) == (
        "UNAVAILABLE",
        "its Triton backend does not answer",
    )
    assert await mc.server_ready()  # ready_when: any_model (default): echo still serves

    await asyncio.to_thread(triton.start)  # same ports, Mandant untouched
    recovered_at = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            await mc.infer("tiny", {"INPUT0": rows(1)})
            recovered_at = time.monotonic()
            break
        except Unavailable:
            await asyncio.sleep(0.1)
    assert recovered_at is not None, "calls did not succeed again after restart"
    assert circuit_open(app, "tiny") == 0


# -- reloads ----------------------------------------------------------------------------


async def test_a_reload_onto_a_triton_that_does_not_answer_keeps_the_serving_version(
    mandant: App, triton: TritonProcess
) -> None:
    """The new version is switched to once ready; a Triton URL that does not answer
    never is (it replaced the serving version with one never ready, every call
    UNAVAILABLE, and said it had loaded)."""
    nobody = f"127.0.0.1:{free_port()}"
    moved = config(nobody).model_dump(mode="json")
    entry = next(m for m in moved["models"] if m["name"] == "tiny")
    with pytest.raises(errors.Unavailable, match="its backend is not ready"):
        await mandant.plane.load_model("tiny", {"config": json.dumps(entry)})
    mandant.reload(config(nobody))  # SIGHUP: every Triton model moves to nobody
    assert mandant.model_changes is not None
    assert all("tiny" not in change or "failed" in change for change in await mandant.model_changes)
    async with client(mandant, "acme") as acme:
        answer = await acme.infer("tiny", {"INPUT0": rows(2)})
    assert len(answer["OUTPUT0"]) == 2


async def test_a_model_never_ready_moves_to_a_new_url_at_once(tmp_path: Path) -> None:
    """Nothing serves to be kept: a model whose Triton never answered is routed to the
    new URL whatever it answers yet, and serves once that Triton does (as at start)."""
    first, second = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    data = config(first).model_dump(mode="json")
    data["models"] = [m for m in data["models"] if m["name"] == "tiny"]
    async with App(parse_config(data), tmp_path) as app:
        moved = {**data["models"][0], "triton": {**data["models"][0]["triton"], "url": second}}
        await app.plane.load_model("tiny", {"config": json.dumps(moved)})
        (model,) = app.registry.all()
        assert model.spec.triton is not None and model.spec.triton.url == second
