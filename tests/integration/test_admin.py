"""``mandant.admin.v1.AdminService`` over real gRPC: admin keys only, usage per tenant
matching the traffic sent, one tenant or all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mandant_client import Client, InvalidInput
from mandant_client._proto import admin_pb2, admin_pb2_grpc
from tests.clock_helpers import same_utc_day, utc_day
from tests.servers import SERVER_KINDS, Server, ServerThread, demo_config, serving, wait_for_calls

ADMIN = (("authorization", "Bearer admin-demo-key"),)


@pytest.fixture(scope="module", params=SERVER_KINDS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    """A server, and the UTC day its traffic began (its ``rows_today`` is that day's)."""
    with serving(request.param, demo_config(), tmp_path_factory.mktemp("admin")) as running:
        day = utc_day()
        with Client(running.target, api_key="acme-demo-key") as acme:
            for rows in (1, 3):
                acme.infer("classifier", {"INPUT0": np.ones((rows, 256), np.float32)})
            with pytest.raises(InvalidInput):
                acme.infer("classifier", {"INPUT0": np.ones((1, 3), np.float32)})
        wait_for_calls(running, "admin-demo-key", 3)
        yield running, day


@pytest.fixture(scope="module")
def server(served: tuple[Server, str]) -> Server:
    return served[0]


@pytest.fixture
def admin(server: Server) -> Iterator[admin_pb2_grpc.AdminServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


def test_usage_of_every_tenant(
    admin: admin_pb2_grpc.AdminServiceStub, served: tuple[Server, str]
) -> None:
    reply = admin.GetUsage(admin_pb2.GetUsageRequest(), metadata=ADMIN)
    usage = {t.tenant: t for t in reply.tenants}
    assert set(usage) == {"acme", "globex", "initech"}
    acme = usage["acme"]
    assert dict(acme.requests) == {"OK": 2, "INVALID_ARGUMENT": 1}
    assert dict(acme.rows) == {"classifier": 4}
    assert acme.compute_seconds["classifier"] > 0
    with same_utc_day(since=served[1]):
        assert acme.rows_today == 4
    assert acme.quota_rows_per_day == 0
    assert not usage["globex"].requests
    assert reply.generated_at.endswith("Z")


def test_usage_of_one_tenant(admin: admin_pb2_grpc.AdminServiceStub) -> None:
    reply = admin.GetUsage(admin_pb2.GetUsageRequest(tenant="initech"), metadata=ADMIN)
    assert [t.tenant for t in reply.tenants] == ["initech"]
    with pytest.raises(grpc.RpcError) as err:
        admin.GetUsage(admin_pb2.GetUsageRequest(tenant="nobody"), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as long:  # its text comes back cut, not whole
        admin.GetUsage(admin_pb2.GetUsageRequest(tenant="x" * 20_000), metadata=ADMIN)
    assert long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(long.value.details()) < 200


@pytest.mark.parametrize("key", [None, "acme-demo-key", "admin-demo-key-2"])
def test_only_admin_keys(admin: admin_pb2_grpc.AdminServiceStub, key: str | None) -> None:
    metadata = () if key is None else (("authorization", f"Bearer {key}"),)
    with pytest.raises(grpc.RpcError) as err:
        admin.GetUsage(admin_pb2.GetUsageRequest(), metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == "missing or invalid admin key"


def test_without_admin_keys_everything_is_refused(tmp_path: Path) -> None:
    with (
        ServerThread(demo_config(admin_keys=[]), tmp_path) as bare,
        grpc.insecure_channel(bare.target) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        admin_pb2_grpc.AdminServiceStub(channel).GetUsage(
            admin_pb2.GetUsageRequest(), metadata=ADMIN
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
