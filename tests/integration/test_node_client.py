"""The Node.js client (``clients/node``: @grpc/grpc-js + @grpc/proto-loader on
``protos/grpc_service.proto``) against a real Mandant server (the ``App`` that
``mandant serve`` runs, on port 0): ``npm ci`` installs the locked dependencies once a
session, then ``check.js`` makes the calls and prints one JSON line each. Tensors of
every kind come back as they went (typed arrays by datatype, 64-bit integers exactly,
BYTES framed); another tenant's private model is NOT_FOUND; a rate-limited tenant gets
RESOURCE_EXHAUSTED with the ``grpc-retry-pushback-ms`` trailer as ``retryAfterMs`` and
``retryable`` true (false for the rest); a wrong key is UNAUTHENTICATED. The codec's own
cases (unaligned raw outputs, framing errors) and ``mandant.js`` against a fake server
(bad options and keys, size-limit errors, calls after ``close()``) are the client's
``node --test`` suite, run here too."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from mandant.config import MandantConfig, parse_config
from mandant.tenancy.keys import hash_key
from tests.servers import ECHO_MODEL, ROOT, WorkersServer

NODE_CLIENT = ROOT / "clients" / "node"
CALL_TIMEOUT_S = 60


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, once ``npm ci`` has installed the client's locked dependencies."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed (Debian: apt-get install nodejs npm)")
    installed = subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return node


def node_config() -> MandantConfig:
    def tenant(name: str, **limits: object) -> dict[str, object]:
        return {"id": name, "api_keys": [hash_key(f"{name}-key")], **limits}

    def echo(name: str, datatype: str, **extra: object) -> dict[str, Any]:
        tensors = {"datatype": datatype, "shape": [-1, -1]}
        return {
            **ECHO_MODEL,
            "name": name,
            "inputs": [{"name": "INPUT0", **tensors}],
            "outputs": [{"name": "OUTPUT0", **tensors}],
            **extra,
        }

    return parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0},
            "tenants": [
                tenant("acme"),
                tenant("globex"),
                tenant("limited", rate_limit={"requests_per_s": 0.5, "burst": 1}),
            ],
            "models": [
                ECHO_MODEL,
                echo("echo_int64", "INT64"),
                {
                    **ECHO_MODEL,
                    "name": "echo_bytes",
                    "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [-1]}],
                    "outputs": [{"name": "OUTPUT0", "datatype": "BYTES", "shape": [-1]}],
                },
                echo("secret", "FP32", tenant="acme"),
            ],
        }
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkersServer]:
    """``mandant serve`` (one process) as a user runs it, from a configuration file.
    One server kind: the gRPC wire is the same with ``workers: N`` (its front ends
    run the same parsing and status table), and each kind costs seconds to start."""
    with WorkersServer(node_config(), tmp_path_factory.mktemp("node"), workers=1) as running:
        yield running


def check(
    node: str,
    server: WorkersServer,
    key: str,
    model: str,
    inputs: list[dict[str, Any]],
    calls: int = 1,
) -> list[dict[str, Any]]:
    """``node check.js``'s JSON lines, one per call."""
    done = subprocess.run(
        [node, "check.js", server.target, key, model, json.dumps(inputs), str(calls)],
        cwd=NODE_CLIENT,
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == calls, done.stdout
    return lines


def tensor(datatype: str, values: np.ndarray[Any, Any] | list[str]) -> dict[str, Any]:
    shape = list(np.shape(values))
    data = values.ravel().tolist() if isinstance(values, np.ndarray) else values
    return {"name": "INPUT0", "datatype": datatype, "shape": shape, "data": data}


def test_infer_returns_the_fp32_tensor_it_sent(node: str, server: WorkersServer) -> None:
    sent = np.random.default_rng(7).standard_normal((3, 5)).astype(np.float32)
    [line] = check(node, server, "acme-key", "echo", [tensor("FP32", sent)])
    assert line["ok"], line
    output = line["outputs"]["OUTPUT0"]
    assert output["array"] == "Float32Array" and output["shape"] == [3, 5]
    np.testing.assert_array_equal(np.array(output["data"], np.float32).reshape(3, 5), sent)


def test_int64_values_beyond_a_double_come_back_exactly(node: str, server: WorkersServer) -> None:
    sent = np.array([[2**62 + 1, -(2**63)], [2**53 + 1, -7]], np.int64)
    inputs = [tensor("INT64", sent)]
    inputs[0]["data"] = [str(value) for value in inputs[0]["data"]]  # JSON numbers are doubles
    [line] = check(node, server, "acme-key", "echo_int64", inputs)
    assert line["ok"], line
    output = line["outputs"]["OUTPUT0"]
    assert (output["shape"], output["array"]) == ([2, 2], "BigInt64Array")
    assert output["data"] == [str(value) for value in sent.ravel()]


def test_bytes_elements_come_back_framed_as_they_went(node: str, server: WorkersServer) -> None:
    sent = ["", "tenant", "naïve ✓", "a\u0000b"]
    [line] = check(node, server, "acme-key", "echo_bytes", [tensor("BYTES", sent)])
    assert line["ok"], line
    assert line["outputs"]["OUTPUT0"]["data"] == sent


def test_another_tenants_private_model_is_not_found(node: str, server: WorkersServer) -> None:
    rows = [tensor("FP32", np.ones((1, 2), np.float32))]
    [own] = check(node, server, "acme-key", "secret", rows)
    assert own["ok"], own
    [other] = check(node, server, "globex-key", "secret", rows)
    assert (other["ok"], other["code"], other["codeName"]) == (False, 5, "NOT_FOUND")
    assert (other["retryable"], other["retryAfterMs"]) == (False, None)


def test_a_rate_limited_tenant_gets_resource_exhausted_with_pushback(
    node: str, server: WorkersServer
) -> None:
    """0.5 requests/s with a burst of 1: the first call passes, the next ones wait ~2 s."""
    rows = [tensor("FP32", np.ones((1, 2), np.float32))]
    first, *refused = check(node, server, "limited-key", "echo", rows, calls=3)
    assert first["ok"], first
    for line in refused:
        assert (line["ok"], line["code"], line["codeName"]) == (False, 8, "RESOURCE_EXHAUSTED")
        assert "rate limit" in line["details"]
        assert line["retryable"] is True
        assert 0 < line["retryAfterMs"] <= 2000


def test_a_wrong_key_is_unauthenticated(node: str, server: WorkersServer) -> None:
    [line] = check(node, server, "wrong-key", "echo", [tensor("FP32", np.ones((1, 2), np.float32))])
    assert (line["ok"], line["code"], line["codeName"]) == (False, 16, "UNAUTHENTICATED")
    assert (line["retryable"], line["retryAfterMs"]) == (False, None)


def test_the_node_clients_own_tests_pass(node: str) -> None:
    done = subprocess.run(
        [node, "--test"], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
