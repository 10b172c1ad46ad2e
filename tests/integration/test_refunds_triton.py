"""Calls refused because the backend is down are not charged: a real Triton (PyTriton)
serves ``tiny`` until it is killed; Mandant's calls then fail on the transport and,
once the circuit breaker opens, at the breaker — both after admission — and the
tenant's quota keeps only the call that ran. A call whose deadline passes while
Triton computes it stays charged, as an in-process model's does: Triton has its rows
and computes them whatever the caller does (it was refunded, so a deadline shorter
than Triton's time ran it for free)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest

from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc
from tests.clock_helpers import same_utc_day
from tests.servers import ServerThread
from tests.triton_server import MODEL, TritonProcess, available

_missing = available()
if _missing is not None and os.environ.get("CI"):
    raise RuntimeError(f"Triton tests cannot run in CI: {_missing}")
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")

KEY = "down-tenant-key"
METADATA = (("authorization", f"Bearer {KEY}"),)


def request(rows: int, timeout_us: int | None = None) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="tiny")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 4])
    message.raw_input_contents.append(np.ones((rows, 4), np.float32).tobytes())
    if timeout_us is not None:  # v2 ``timeout``, µs
        message.parameters["timeout"].int64_param = timeout_us
    return message


def test_a_call_whose_deadline_passes_while_triton_computes_it_stays_charged(
    triton: TritonProcess, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "grace_s": 0},
            "tenants": [
                {"id": "acme", "api_keys": [hash_key(KEY)], "quota": {"rows_per_day": 100}}
            ],
            "models": [
                {
                    "name": "tiny",
                    "backend": "triton",
                    "triton": {"url": triton.url, "model": MODEL, "health_interval_s": 3600},
                }
            ],
        }
    )
    with ServerThread(config, tmp_path) as server, grpc.insecure_channel(server.target) as ch:
        assert server.app is not None
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with same_utc_day():
            stub.ModelInfer(request(2), metadata=METADATA)
            # The Python process that computes PyTriton's model stops: Triton takes the
            # calls, and the model does not answer them within their 0.3 s.
            assert triton._process is not None
            os.kill(triton._process.pid, signal.SIGSTOP)
            try:
                for _ in range(3):
                    with pytest.raises(grpc.RpcError) as caught:
                        stub.ModelInfer(request(10, 300_000), metadata=METADATA, timeout=30)
                    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            finally:
                os.kill(triton._process.pid, signal.SIGCONT)
            assert server.call(server.app.admission.quota_used("acme"))["rows_today"] == 32


def test_calls_refused_by_a_dead_backend_or_open_breaker_are_not_charged(
    triton: TritonProcess, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0, "grace_s": 0},
            "tenants": [{"id": "acme", "api_keys": [hash_key(KEY)], "quota": {"rows_per_day": 60}}],
            "models": [
                {
                    "name": "tiny",
                    "backend": "triton",
                    # Readiness is not polled again: calls reach the dead backend.
                    "triton": {"url": triton.url, "model": MODEL, "health_interval_s": 3600},
                }
            ],
        }
    )
    with ServerThread(config, tmp_path) as server, grpc.insecure_channel(server.target) as ch:
        assert server.app is not None
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with same_utc_day():
            stub.ModelInfer(request(2), metadata=METADATA)
            triton.kill()
            for _ in range(12):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ModelInfer(request(4), metadata=METADATA)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            used = server.call(server.app.admission.quota_used("acme"))["rows_today"]
            assert used == 2
