"""Admission end to end over real gRPC (local store): refusals are RESOURCE_EXHAUSTED
with the ``grpc-retry-pushback-ms`` trailer, mandant_client raises RateLimited /
QuotaExceeded with ``retry_after_s``, tritonclient sees the same code, admission runs
before tensor bytes are read, and one tenant's exhaustion leaves the others alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from mandant.config import MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from mandant_client import AsyncClient, Client, QuotaExceeded, RateLimited
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.clock_helpers import same_utc_day
from tests.servers import ECHO_MODEL, SERVER_KINDS, Server, ServerThread, serve

X = np.ones((1, 4), np.float32)


def limits_config() -> MandantConfig:
    def tenant(name: str, **limits: object) -> dict[str, object]:
        return {"id": name, "api_keys": [hash_key(f"{name}-key")], **limits}

    return parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0},
            "tenants": [
                tenant("flood", rate_limit={"requests_per_s": 1, "burst": 2}),
                tenant("budget", quota={"rows_per_day": 6}),
                tenant("triton", rate_limit={"requests_per_s": 1, "burst": 1}),
                tenant("wire", rate_limit={"requests_per_s": 1, "burst": 1}),
                tenant("sloppy", rate_limit={"requests_per_s": 0.01, "burst": 1}),
                tenant("free"),
            ],
            "models": [ECHO_MODEL],
        }
    )


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    running = serve(request.param, limits_config(), tmp_path_factory.mktemp("admission"))
    yield running
    running.stop()


def _request(rows: int, raw: bytes | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 4])
    request.raw_input_contents.append(raw if raw is not None else bytes(rows * 16))
    return request


async def test_a_flooding_tenant_is_limited_and_the_others_are_not(server: Server) -> None:
    async with (
        AsyncClient(server.target, api_key="flood-key") as flood,
        AsyncClient(server.target, api_key="free-key") as free,
    ):
        for _ in range(2):
            await flood.infer("echo", {"INPUT0": X})
        with pytest.raises(RateLimited) as caught:
            await flood.infer("echo", {"INPUT0": X})
        assert "rate limit requests_per_s=1 exceeded for tenant flood" in caught.value.message
        # One token takes 1 s to come back, less what refilled while the calls ran (on
        # a busy machine, a few hundred ms: at 5 a second, a token came back meanwhile).
        assert caught.value.retry_after_s is not None
        assert 0.0 < caught.value.retry_after_s <= 1.001

        refused = 0

        async def hammer(until: float) -> None:
            nonlocal refused
            while time.monotonic() < until:
                try:
                    await flood.infer("echo", {"INPUT0": X})
                except RateLimited:
                    refused += 1

        # 2 s: with workers: 2 on a box busy with the rest of the suite, the free
        # tenant's calls took 250 ms each beside the flood (4 in 1 s).
        until = time.monotonic() + 2.0
        flooding = [asyncio.create_task(hammer(until)) for _ in range(8)]
        answered = 0
        while time.monotonic() < until:
            out = await free.infer("echo", {"INPUT0": X})  # never refused
            np.testing.assert_array_equal(out["OUTPUT0"], X)
            answered += 1
        await asyncio.gather(*flooding)
        assert refused > 20 and answered > 5


def test_quota_exceeded_until_midnight_utc(server: Server) -> None:
    with same_utc_day(), Client(server.target, api_key="budget-key") as client:
        client.infer("echo", {"INPUT0": np.ones((4, 2), np.float32)})
        with pytest.raises(QuotaExceeded) as caught:
            client.infer("echo", {"INPUT0": np.ones((3, 2), np.float32)})
        client.infer("echo", {"INPUT0": np.ones((2, 2), np.float32)})  # the refusal took none
        with pytest.raises(QuotaExceeded):
            client.infer("echo", {"INPUT0": X})
        assert "quota rows_per_day=6 exceeded for tenant budget" in caught.value.message
        now = datetime.now(UTC)
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        assert caught.value.retry_after_s == pytest.approx((midnight - now).total_seconds(), abs=5)


def test_tritonclient_sees_resource_exhausted(server: Server) -> None:
    client = triton.InferenceServerClient(server.target)
    headers = {"authorization": "Bearer triton-key"}
    tensor = triton.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(X)
    try:
        client.infer("echo", [tensor], headers=headers)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("echo", [tensor], headers=headers)
    finally:
        client.close()
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "rate limit requests_per_s=1 exceeded for tenant triton" in caught.value.message()


def test_refusal_carries_the_pushback_trailer_and_comes_before_tensor_bytes(
    server: Server,
) -> None:
    metadata = (("authorization", "Bearer wire-key"),)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(_request(2), metadata=metadata)
        # Tensor values that do not match the shape (typed contents: finding that out
        # means reading them): refused for the rate, not for the values, so admission
        # ran before any tensor value was read.
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_typed_request(2, values=3), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(caught.value.trailing_metadata() or ())
        # A token a second: what is left of the second the first call began (on a busy
        # machine a few hundred ms go between the two calls).
        assert 500 <= int(trailers["grpc-retry-pushback-ms"]) <= 1000
        # The same bad values from a tenant with room left: INVALID_ARGUMENT.
        with pytest.raises(grpc.RpcError) as invalid:
            stub.ModelInfer(
                _typed_request(2, values=3), metadata=(("authorization", "Bearer free-key"),)
            )
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _typed_request(rows: int, values: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 4])
    tensor.contents.fp32_contents.extend([0.0] * values)
    return request


def test_live_update_applies_new_limits_through_the_app(server: Server) -> None:
    if not isinstance(server, ServerThread):
        pytest.skip("calls App.reload in the server's process; SIGHUP reloads: test_reload.py")
    assert server.app is not None
    config = limits_config()
    tenants = [
        t.model_copy(update={"rate_limit": None}) if t.id == "triton" else t for t in config.tenants
    ]
    app = server.app

    async def reload() -> None:  # on the server's loop, like SIGHUP's handler
        result = app.reload(config.model_copy(update={"tenants": tuple(tenants)}))
        assert result.applied == ("tenants changed: triton (rate_limit)",)

    server.call(reload())
    with Client(server.target, api_key="triton-key") as client:
        for _ in range(5):
            client.infer("echo", {"INPUT0": X})


def test_malformed_requests_are_refused_before_they_cost_a_token(server: Server) -> None:
    """Byte counts that do not match the shape are INVALID_ARGUMENT before admission:
    the tenant's single token is still there for its next, good call."""
    metadata = (("authorization", "Bearer sloppy-key"),)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for bad in (_request(2, raw=bytes(7)), _request(1, raw=bytes(16 * 3))):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(bad, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.ModelInfer(_request(1), metadata=metadata)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request(1), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
