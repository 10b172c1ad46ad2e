"""Issue 12's version switch, as an operator makes it: ``mandant serve`` under
concurrent load from two tenants, a SIGHUP that adds version 2 of a shared model and a
tenant-private model, then a SIGHUP that removes version 1. No call fails; calls
without a version move to version 2; calls pinned to a version get that version; the
private model is its tenant's alone."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.servers import ECHO_MODEL, WorkersServer

X = np.arange(8, dtype=np.float32).reshape(2, 4)
TENANTS = ("acme", "globex")


def scaler(version: int, factory: str) -> dict[str, Any]:
    return {
        **ECHO_MODEL,
        "name": "scaler",
        "version": version,
        "factory": f"tests.integration.control_models:{factory}",
    }


PRIVATE = {**ECHO_MODEL, "name": "mine", "tenant": "acme"}


def config_data(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "grace_s": 10},
        "tenants": [{"id": t, "api_keys": [hash_key(f"{t}-key")]} for t in TENANTS],
        "models": models,
    }


async def call(
    stub: pb_grpc.GRPCInferenceServiceStub, tenant: str, model: str, version: str = ""
) -> np.ndarray | grpc.StatusCode:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(X.shape))
    request.raw_input_contents.append(X.tobytes())
    try:
        answer = await stub.ModelInfer(
            request, metadata=(("authorization", f"Bearer {tenant}-key"),), timeout=30
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(X.shape)


def factor(answer: np.ndarray | grpc.StatusCode) -> float | grpc.StatusCode:
    """What the model multiplied by (2: version 1, 3: version 2), or the status."""
    if isinstance(answer, grpc.StatusCode):
        return answer
    return float(answer[0, 1] / X[0, 1])


async def test_sighup_adds_a_version_and_a_private_model_then_removes_v1_under_load(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mandant.yaml"
    path.write_text(yaml.safe_dump(config_data([scaler(1, "doubled")])))
    config = parse_config(config_data([scaler(1, "doubled")]), str(path))
    with WorkersServer(config, tmp_path, path, workers=1) as server:
        assert server.process is not None
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            seen: dict[tuple[str, str, int], list[float | grpc.StatusCode]] = {}
            stop = asyncio.Event()

            async def caller(tenant: str, version: str, n: int = 0) -> None:
                answers = seen.setdefault((tenant, version, n), [])  # one caller's, in order
                while not stop.is_set():
                    answers.append(factor(await call(stub, tenant, "scaler", version)))

            async def until(check: Any, within_s: float = 30) -> None:
                deadline = time.monotonic() + within_s
                while not await check():
                    assert time.monotonic() < deadline, "the reload did not take effect"
                    await asyncio.sleep(0.05)

            unpinned = [asyncio.create_task(caller(t, "", n)) for t in TENANTS for n in range(2)]
            pinned_v1 = [asyncio.create_task(caller(t, "1")) for t in TENANTS]
            await asyncio.sleep(0.5)

            # Version 2 and acme's private model arrive.
            path.write_text(
                yaml.safe_dump(config_data([scaler(1, "doubled"), scaler(2, "tripled"), PRIVATE]))
            )
            server.process.send_signal(signal.SIGHUP)

            async def v2_serves() -> bool:
                return factor(await call(stub, "globex", "scaler")) == 3.0

            await until(v2_serves)
            assert factor(await call(stub, "acme", "mine")) == 1.0
            assert factor(await call(stub, "globex", "mine")) == grpc.StatusCode.NOT_FOUND
            pinned_v2 = [asyncio.create_task(caller(t, "2")) for t in TENANTS]
            await asyncio.sleep(0.5)
            for task in pinned_v1:  # version 1 goes next: its callers are done
                task.cancel()
            await asyncio.gather(*pinned_v1, return_exceptions=True)

            # Version 1 goes.
            path.write_text(yaml.safe_dump(config_data([scaler(2, "tripled"), PRIVATE])))
            server.process.send_signal(signal.SIGHUP)

            async def v1_gone() -> bool:
                return factor(await call(stub, "acme", "scaler", "1")) == grpc.StatusCode.NOT_FOUND

            await until(v1_gone)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*unpinned, *pinned_v2)

    for tenant in TENANTS:
        assert seen[(tenant, "1", 0)] and set(seen[(tenant, "1", 0)]) == {2.0}
        assert seen[(tenant, "2", 0)] and set(seen[(tenant, "2", 0)]) == {3.0}
    for (_, version, _), answers in seen.items():
        if version:
            continue
        assert set(answers) <= {2.0, 3.0}, answers  # no call failed
        moved = answers.index(3.0)  # each caller moves to version 2, and stays there
        assert set(answers[moved:]) == {3.0} and 2.0 in answers[:moved]
