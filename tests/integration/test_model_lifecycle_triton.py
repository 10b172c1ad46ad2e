"""A Triton-backed model without Mandant batching (one request per Triton call, the
DirectScheduler) unloaded while a call of it runs on Triton: that call still answers,
and the unloaded version is closed (its health polling stops) even when the admin's
client gives up on the unload. Against the fake KServe v2 server of
``test_triton_answers`` (its ``sleepy`` model sleeps INPUT0[0, 0] seconds)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from mandant.app import App
from mandant.backends.channels import ChannelPool
from mandant.backends.triton import TritonBackend
from mandant.config import parse_config
from mandant.errors import Unavailable
from mandant.tenancy.keys import hash_key
from tests.integration.test_triton_answers import fake_triton, model

ADMIN = (("authorization", "Bearer lifecycle-admin-key"),)
ACME = (("authorization", "Bearer lifecycle-acme-key"),)


def _app(url: str, grace_s: float) -> App:
    config = parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "rest_port": 0,
                "grace_s": grace_s,
                "admin_keys": [hash_key("lifecycle-admin-key")],
            },
            "tenants": [{"id": "acme", "api_keys": [hash_key("lifecycle-acme-key")]}],
            "models": [model(url, "sleepy")],
        }
    )
    return App(config, Path("/tmp"))


def _sleeping(seconds: float) -> pb.ModelInferRequest:
    x = np.full((1, 4), seconds, np.float32)
    request = pb.ModelInferRequest(model_name="sleepy", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    return request


def _health_watchers() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "triton-health-sleepy"]


async def _until(condition: object, deadline_s: float = 15.0) -> None:
    limit = time.monotonic() + deadline_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < limit, "not within the deadline"
        await asyncio.sleep(0.05)


async def test_a_call_running_on_triton_answers_after_its_model_is_unloaded() -> None:
    """The call outlives grace_s on Triton: it answers (it got no status at all: the
    backend closed its channel under it, and the client waited to its deadline)."""
    async with fake_triton() as (url, _), _app(url, grace_s=0.5) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = asyncio.ensure_future(stub.ModelInfer(_sleeping(2.0), metadata=ACME, timeout=12))
            await _until(lambda: any(m.calls for m in app.registry.all()))
            await stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="sleepy"), metadata=ADMIN, timeout=12
            )
            answer = await call
        assert len(answer.raw_output_contents) == 1
        await _until(lambda: not _health_watchers())  # and then it was closed


async def test_an_unload_the_admin_gave_up_on_still_closes_the_model() -> None:
    """The admin's client leaves while the unload waits for a call: the version is
    closed all the same once the call answered (its Triton was polled forever)."""
    async with fake_triton() as (url, _), _app(url, grace_s=10) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = asyncio.ensure_future(stub.ModelInfer(_sleeping(1.5), metadata=ACME, timeout=12))
            await _until(lambda: any(m.calls for m in app.registry.all()))
            with pytest.raises(grpc.aio.AioRpcError) as gave_up:
                await stub.RepositoryModelUnload(
                    pb.RepositoryModelUnloadRequest(model_name="sleepy"),
                    metadata=ADMIN,
                    timeout=0.3,
                )
            assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await call
        assert not app.registry.all()
        await _until(lambda: not _health_watchers())


async def test_a_call_whose_channel_closes_under_it_is_unavailable() -> None:
    """Not the caller's cancellation: answered Unavailable, not a CancelledError that
    leaves the caller's call without a status."""
    async with fake_triton() as (url, _):
        spec = parse_config({"models": [model(url, "sleepy")]}).model_specs(Path("/tmp"))[0]
        backend = TritonBackend(spec, ChannelPool())
        await backend.start()
        x = np.full((1, 4), 5.0, np.float32)
        call = asyncio.create_task(backend.infer({"INPUT0": x}))
        await asyncio.sleep(0.3)  # on Triton now
        await backend.aclose()
        with pytest.raises(Unavailable, match="model 'sleepy' was unloaded"):
            await asyncio.wait_for(call, 10)
