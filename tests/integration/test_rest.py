"""The KServe v2 REST port against a real server: ``tritonclient.http`` unchanged
(probes, metadata, every datatype as JSON and as binary data, requested outputs), and
plain HTTP for what a client library hides: keys, visibility, malformed bodies, the
status table with ``Retry-After``, unknown routes, body limits. Against one process and
against ``workers: 2``, whose engine serves the REST port."""

from __future__ import annotations

import gzip
import http.client
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from mandant.config import parse_config
from mandant.service import MAX_LOAD_CONFIG_CHARS
from mandant.tenancy.keys import hash_key
from mandant.transport.rest.repository import MAX_BODY_BYTES, MAX_LOAD_BODY_BYTES
from tests.servers import ECHO_MODEL, SERVER_KINDS, Server, metric, serving

DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
KEYS = {
    "acme": "acme-k",
    "globex": "globex-k",
    "limited": "limited-k",
    "small": "small-k",
    "admin": "admin-k",
}
MAX_BODY = 1 << 20
#: JSON larger than this is refused (binary data is bounded by MAX_BODY alone).
MAX_JSON = 64 << 10


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def _echo_all(name: str) -> dict[str, Any]:
    tensors = [{"name": f"IN_{t}", "datatype": t, "shape": [-1, -1]} for t in DTYPES]
    return {
        "name": name,
        "factory": "mandant.demo.models:echo_all",
        "inputs": tensors,
        "outputs": [{**t, "name": str(t["name"]).replace("IN_", "OUT_")} for t in tensors],
    }


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = parse_config(
        {
            "server": {
                "grpc_port": 0,
                "http_port": 0,
                "rest_port": 0,
                "grace_s": 0,
                "max_message_bytes": MAX_BODY,
                "max_json_bytes": MAX_JSON,
                "admin_keys": [hash_key(KEYS["admin"])],
            },
            "tenants": [
                {"id": "acme", "api_keys": [hash_key(KEYS["acme"])]},
                {"id": "globex", "api_keys": [hash_key(KEYS["globex"])]},
                {
                    "id": "limited",
                    "api_keys": [hash_key(KEYS["limited"])],
                    "rate_limit": {"requests_per_s": 0.01, "burst": 1},
                },
                {
                    "id": "small",
                    "api_keys": [hash_key(KEYS["small"])],
                    "quota": {"rows_per_day": 2},
                },
            ],
            "models": [
                ECHO_MODEL,
                _echo_all("alltypes"),
                {**ECHO_MODEL, "name": "secret", "tenant": "acme"},
            ],
        }
    )
    with serving(request.param, config, tmp_path_factory.mktemp("rest")) as running:
        yield running


def rest(server: Server) -> str:
    return f"127.0.0.1:{server.rest_port}"


def client(server: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(rest(server))


def call(
    server: Server,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP call: status, headers, body (errors included)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(
        f"http://{rest(server)}{path}", data=data, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def error_of(body: bytes) -> str:
    message = json.loads(body)["error"]
    assert isinstance(message, str)
    return message


def echo_request(data: Any, shape: list[int], datatype: str = "FP32") -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT0", "datatype": datatype, "shape": shape, "data": data}]}


def _sample(datatype: str, rng: np.random.Generator, json_safe: bool) -> np.ndarray:
    shape = (2, 3)
    if datatype == "BYTES":
        if json_safe:  # JSON carries text
            return np.array(["café", "", "a", "bc", "déf", "x y"], dtype=np.object_).reshape(shape)
        values = [bytes(rng.integers(0, 256, rng.integers(0, 9), dtype=np.uint8)) for _ in range(6)]
        return np.array(values, dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(np.bool_)
    dtype = np.dtype(DTYPES[datatype])
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


# -- tritonclient.http, unchanged ---------------------------------------------------


def test_probes_and_server_metadata_need_no_key(server: Server) -> None:
    triton_client = client(server)
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    metadata = triton_client.get_server_metadata()
    assert metadata["name"] == "mandant"
    assert "model_repository" in metadata["extensions"]


def test_model_metadata_and_readiness(server: Server) -> None:
    triton_client = client(server)
    assert triton_client.is_model_ready("echo", headers=auth("globex"))
    assert triton_client.is_model_ready("echo", "1", headers=auth("globex"))
    metadata = triton_client.get_model_metadata("echo", headers=auth("globex"))
    assert metadata == {
        "name": "echo",
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
    }


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(server: Server, binary: bool) -> None:
    rng = np.random.default_rng(11)
    arrays = {t: _sample(t, rng, json_safe=not binary) for t in DTYPES}
    inputs = []
    for datatype, array in arrays.items():
        tensor = triton.InferInput(f"IN_{datatype}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput(f"OUT_{t}", binary_data=binary) for t in DTYPES]
    result = client(server).infer(
        "alltypes", inputs, outputs=outputs, request_id="r-1", headers=auth("acme")
    )
    assert result.get_response()["id"] == "r-1"
    for datatype, array in arrays.items():
        got = result.as_numpy(f"OUT_{datatype}")
        output = result.get_output(f"OUT_{datatype}")
        assert output["datatype"] == datatype
        assert ("parameters" in output) is binary
        assert got.shape == array.shape
        np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(server: Server, algorithm: str) -> None:
    array = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = triton.InferInput("INPUT0", [2, 4], "FP32")
    tensor.set_data_from_numpy(array)
    result = client(server).infer(
        "echo", [tensor], headers=auth("acme"), request_compression_algorithm=algorithm
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)


def test_without_requested_outputs_all_come_back_as_binary(server: Server) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = triton.InferInput("INPUT0", [3, 4], "FP32")
    tensor.set_data_from_numpy(array, binary_data=False)
    result = client(server).infer("echo", [tensor], headers=auth("globex"))
    assert result.get_output("OUTPUT0")["parameters"] == {"binary_data_size": 48}
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)


async def test_asyncio_client_with_bytes(server: Server) -> None:
    async_client = triton_aio.InferenceServerClient(rest(server))
    try:
        assert await async_client.is_server_ready()
        rng = np.random.default_rng(5)
        arrays = {t: _sample(t, rng, json_safe=False) for t in DTYPES}
        inputs = []
        for datatype, array in arrays.items():
            tensor = triton_aio.InferInput(f"IN_{datatype}", list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = await async_client.infer("alltypes", inputs, headers=auth("acme"))
        for datatype, array in arrays.items():
            np.testing.assert_array_equal(result.as_numpy(f"OUT_{datatype}"), array)
    finally:
        await async_client.close()


def test_only_the_requested_outputs_are_returned(server: Server) -> None:
    rng = np.random.default_rng(3)
    inputs = []
    for datatype in DTYPES:
        tensor = triton.InferInput(f"IN_{datatype}", [2, 3], datatype)
        tensor.set_data_from_numpy(_sample(datatype, rng, json_safe=False))
        inputs.append(tensor)
    wanted = [triton.InferRequestedOutput("OUT_INT16"), triton.InferRequestedOutput("OUT_BYTES")]
    result = client(server).infer("alltypes", inputs, outputs=wanted, headers=auth("acme"))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUT_INT16", "OUT_BYTES"]
    assert result.as_numpy("OUT_FP32") is None


def test_errors_reach_tritonclient_with_status_and_message(server: Server) -> None:
    tensor = triton.InferInput("INPUT0", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
    with pytest.raises(InferenceServerException) as missing:
        client(server).infer("nope", [tensor], headers=auth("acme"))
    assert missing.value.status() == "404"
    assert missing.value.message() == "model 'nope' not found"
    with pytest.raises(InferenceServerException) as unauthenticated:
        client(server).infer("echo", [tensor])
    assert unauthenticated.value.status() == "401"


# -- plain HTTP ----------------------------------------------------------------------


def test_health_endpoints_are_open(server: Server) -> None:
    assert call(server, "GET", "/v2/health/live")[0] == 200
    status, _, body = call(server, "GET", "/v2/health/ready")
    assert (status, json.loads(body)) == (200, {"ready": True})


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS["acme"]}],
    ids=["none", "unknown", "not-bearer"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/echo"),
        ("GET", "/v2/models/echo/ready"),
        ("POST", "/v2/models/echo/infer"),
    ],
)
def test_model_endpoints_need_a_key(
    server: Server, headers: dict[str, str], method: str, path: str
) -> None:
    body = echo_request([1.0, 2.0], [1, 2]) if method == "POST" else None
    status, answer_headers, answer = call(server, method, path, body, headers)
    assert status == 401
    assert answer_headers["WWW-Authenticate"] == "Bearer"
    assert error_of(answer) == "missing or invalid API key"


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("GET", "/ready"),
        ("GET", "/versions/1"),
        ("GET", "/stats"),
        ("GET", "/config"),
        ("POST", "/infer"),
        ("POST", "/versions/1/infer"),
    ],
)
def test_a_private_model_is_not_found_for_other_tenants(
    server: Server, method: str, suffix: str
) -> None:
    body = echo_request([1.0, 2.0], [1, 2]) if method == "POST" else None
    for name in ("secret", "absent"):
        status, _, answer = call(server, method, f"/v2/models/{name}{suffix}", body, auth("globex"))
        assert status == 404
        assert re.fullmatch(rf"model '{name}'( version '1')? not found", error_of(answer))
    owner_status, _, _ = call(server, method, f"/v2/models/secret{suffix}", body, auth("acme"))
    assert owner_status == 200


def test_model_config_through_tritonclient(server: Server) -> None:
    config = client(server).get_model_config("alltypes", headers=auth("acme"))
    assert (config["name"], config["backend"], config["max_batch_size"]) == ("alltypes", "torch", 0)
    assert config["input"][0]["name"] == "IN_BOOL"
    assert config["input"][0]["data_type"] == "TYPE_BOOL"
    assert config["input"][0]["dims"] == [-1, -1]  # numbers, not protobuf's int64 strings
    assert config["version_policy"] == {"all": {}}  # the default: every version served
    with pytest.raises(InferenceServerException) as hidden:
        client(server).get_model_config("secret", headers=auth("globex"))
    assert hidden.value.status() == "404"


def _successes(stats: dict[str, Any], name: str) -> int:
    (entry,) = [s for s in stats["model_stats"] if s["name"] == name]
    count = entry["inference_stats"]["success"]["count"]
    assert isinstance(count, int)
    return count


def test_statistics_show_a_tenant_its_own_calls_only(server: Server) -> None:
    triton_client = client(server)

    def successes(tenant: str, name: str = "echo", **headers: str) -> int:
        stats = triton_client.get_inference_statistics(name, headers={**auth(tenant), **headers})
        return _successes(stats, name)

    before = {tenant: successes(tenant) for tenant in ("acme", "globex")}
    before_admin = successes("admin")
    request = echo_request([1.0], [1, 1])
    for _ in range(3):
        assert call(server, "POST", "/v2/models/echo/infer", request, auth("acme"))[0] == 200
    assert call(server, "POST", "/v2/models/echo/infer", request, auth("globex"))[0] == 200
    assert successes("acme") == before["acme"] + 3
    assert successes("globex") == before["globex"] + 1
    assert successes("admin") >= before_admin + 4  # every tenant's
    assert successes("admin", **{"mandant-tenant": "acme"}) == successes("acme")
    unknown = {**auth("admin"), "mandant-tenant": "acmee"}
    status, _, body = call(server, "GET", "/v2/models/stats", None, unknown)
    assert status == 400 and "no tenant 'acmee' is configured" in error_of(body), body
    every = triton_client.get_inference_statistics(headers=auth("globex"))
    assert {s["name"] for s in every["model_stats"]} == {"echo", "alltypes"}  # no "secret"
    status, _, _ = call(server, "GET", "/v2/models/secret/stats", None, auth("globex"))
    assert status == 404
    assert call(server, "GET", "/v2/models/stats")[0] == 401


def test_json_data_nested_or_flat(server: Server) -> None:
    for data in ([[1, 2.5], [3, 4]], [1, 2.5, 3, 4]):
        status, _, body = call(
            server, "POST", "/v2/models/echo/infer", echo_request(data, [2, 2]), auth("acme")
        )
        assert status == 200, body
        (output,) = json.loads(body)["outputs"]
        assert output == {
            "name": "OUTPUT0",
            "datatype": "FP32",
            "shape": [2, 2],
            "data": [1.0, 2.5, 3.0, 4.0],
        }


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        (b"{not json", "not a valid JSON inference request"),
        (b"[1, 2]", "the inference request must be a JSON object"),
        (b'{"inputs": {}}', "'inputs' must be a JSON array"),
        (echo_request([1.0, 2.0, 3.0], [2, 2]), "needs 4 values in data, got 3"),
        (echo_request([[1.0, 2.0], [3.0]], [2, 2]), "data holds values that are not FP32"),
        (echo_request(["a", "b"], [1, 2]), "data holds values that are not FP32"),
        (echo_request([1.0, 2.0], [2]), "expected shape [-1, -1], got [2]"),
        (echo_request([1.0, 2.0], [1, 2], "INT32"), "expected datatype FP32, got INT32"),
        (echo_request([1.0, 2.0], [1, "2"]), "each dimension of shape must be a JSON integer"),
        # Beyond int64: a 500 (a message too long to format), or past admission, whose
        # metrics could not count the rows, with the tenant's concurrency place kept.
        (echo_request([1.0], [10**400, 1]), "each dimension of shape is a 64-bit integer"),
        (echo_request([1.0], [10**4299, 10**4299]), "each dimension of shape is a 64-bit integer"),
        (
            {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2]}]},
            "has neither data nor binary_data_size",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "datatype": "FP32",
                        "shape": [1, 2],
                        "parameters": {"binary_data_size": 10**400},
                    }
                ]
            },
            "binary_data_size is a 64-bit integer",
        ),
        ({**echo_request([1, 2], [1, 2]), "id": 7}, "'id' must be a JSON string"),
        (
            {**echo_request([1, 2], [1, 2]), "outputs": [{"name": "NOPE"}]},
            "unknown output 'NOPE'",
        ),
        (  # was answered 200 with the tensor in the JSON body
            {
                **echo_request([1, 2], [1, 2]),
                "outputs": [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "r"}}],
            },
            "output 'OUTPUT0': shared memory is not supported",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "INPUT0",
                        "datatype": "FP32",
                        "shape": [1, 2],
                        "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 8},
                    }
                ]
            },
            "input 'INPUT0': shared memory is not supported",
        ),
        (echo_request([True, 2.0], [1, 2]), "data holds values that are not FP32"),
        (  # no sequence batcher: served as an unrelated request, without a word
            {**echo_request([1, 2], [1, 2]), "parameters": {"sequence_id": 5}},
            "parameter 'sequence_id': sequences are not supported",
        ),
        (
            {**echo_request([1, 2], [1, 2]), "parameters": {"sequence_start": True}},
            "parameter 'sequence_start': sequences are not supported",
        ),
        (  # JSON numbers have no bound: beyond int64 (was a 500)
            {**echo_request([1, 2], [1, 2]), "parameters": {"timeout": 10**400}},
            "parameter 'timeout' is a non-negative 64-bit integer (microseconds)",
        ),
    ],
)
def test_malformed_requests_are_400(
    server: Server, request_body: bytes | dict[str, Any], message: str
) -> None:
    status, _, body = call(server, "POST", "/v2/models/echo/infer", request_body, auth("acme"))
    assert status == 400
    assert message in error_of(body)


def test_json_values_out_of_range_or_of_the_wrong_kind_are_400(server: Server) -> None:
    inputs = [
        {"name": f"IN_{t}", "datatype": t, "shape": [1, 1], "data": [_ONE[t]]} for t in DTYPES
    ]
    status, _, _ = call(
        server, "POST", "/v2/models/alltypes/infer", {"inputs": inputs}, auth("acme")
    )
    assert status == 200
    for datatype, bad in (("UINT8", 256), ("INT8", -129), ("INT32", 1.5), ("BOOL", 1)):
        wrong = [dict(t, data=[bad]) if t["datatype"] == datatype else t for t in inputs]
        status, _, body = call(
            server, "POST", "/v2/models/alltypes/infer", {"inputs": wrong}, auth("acme")
        )
        assert status == 400, datatype
        assert f"input 'IN_{datatype}'" in error_of(body)


_ONE: dict[str, Any] = {t: (True if t == "BOOL" else "x" if t == "BYTES" else 1) for t in DTYPES}


def binary_request(
    tensors: list[tuple[str, str, list[int], bytes]], size_delta: int = 0
) -> tuple[bytes, dict[str, str]]:
    """A body with each input's bytes after the JSON, as tritonclient.http builds it."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(raw) + size_delta},
                }
                for name, datatype, shape, raw in tensors
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    body = head + b"".join(raw for *_, raw in tensors)
    return body, {"Inference-Header-Content-Length": str(len(head))}


def test_binary_data_extension_by_hand(server: Server) -> None:
    array = np.arange(6, dtype="<f4").reshape(2, 3)
    body, headers = binary_request([("INPUT0", "FP32", [2, 3], array.tobytes())])
    status, answer_headers, answer = call(
        server, "POST", "/v2/models/echo/infer", body, {**headers, **auth("acme")}
    )
    assert status == 200
    header_length = int(answer_headers["Inference-Header-Content-Length"])
    head = json.loads(answer[:header_length])
    assert head["outputs"] == [
        {
            "name": "OUTPUT0",
            "datatype": "FP32",
            "shape": [2, 3],
            "parameters": {"binary_data_size": 24},
        }
    ]
    np.testing.assert_array_equal(np.frombuffer(answer[header_length:], "<f4"), array.ravel())


@pytest.mark.parametrize(
    ("raw_bytes", "size_delta", "header", "message"),
    [
        (20, 0, None, "FP32 [2, 3] needs 24 bytes, got 20"),
        (24, -4, None, "4 bytes of binary data belong to no input"),
        (24, 4, None, "runs past the 24 bytes of binary data"),
        (24, 0, "-1", "outside the body"),
        (24, 0, "ten", "is not an integer"),
        (24, 0, "1_0", "is not an integer"),  # Python's int() reads 10
        (24, 0, " +9", "is not an integer"),
        (24, 0, "1" * 5000, "outside the body"),  # int() refuses 4,301 digits: was a 500
        (24, 0, "0" * 4999 + "5", "outside the body"),
        (24, 0, "10", "the first 10 bytes of the body (Inference-Header-Content-Length) are not"),
    ],
)
def test_binary_framing_errors_are_400(
    server: Server, raw_bytes: int, size_delta: int, header: str | None, message: str
) -> None:
    raw = np.ones((2, 3), "<f4").tobytes()[:raw_bytes]
    body, headers = binary_request([("INPUT0", "FP32", [2, 3], raw)], size_delta)
    if header is not None:
        headers["Inference-Header-Content-Length"] = header
    status, _, answer = call(
        server, "POST", "/v2/models/echo/infer", body, {**headers, **auth("acme")}
    )
    assert status == 400
    assert message in error_of(answer)


def test_leftover_binary_data_is_400(server: Server) -> None:
    body, headers = binary_request([("INPUT0", "FP32", [1, 1], b"\0\0\0\0")])
    status, _, answer = call(
        server, "POST", "/v2/models/echo/infer", body + b"xx", {**headers, **auth("acme")}
    )
    assert status == 400
    assert "2 bytes of binary data belong to no input" in error_of(answer)


def test_rate_limit_is_429_with_retry_after(server: Server) -> None:
    request = echo_request([1.0], [1, 1])
    first = call(server, "POST", "/v2/models/echo/infer", request, auth("limited"))
    assert first[0] == 200
    status, headers, body = call(server, "POST", "/v2/models/echo/infer", request, auth("limited"))
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert "rate limit" in error_of(body)


def test_a_tenant_out_of_requests_is_refused_before_its_json_is_parsed(server: Server) -> None:
    """Parsing a JSON body costs far more than refusing it: a tenant whose requests
    bucket is empty is refused first, so a body that does not parse gets 429, not 400
    (REST is served where the limits are, the engine of ``workers: 2`` too)."""
    call(server, "POST", "/v2/models/echo/infer", echo_request([1.0], [1, 1]), auth("limited"))
    status, _, body = call(server, "POST", "/v2/models/echo/infer", b"{not json", auth("limited"))
    assert status == 429
    assert "rate limit requests_per_s" in error_of(body)
    # Another tenant's model stays unknown to it: resolved before the limits.
    status, _, body = call(server, "POST", "/v2/models/secret/infer", b"{", auth("limited"))
    assert status == 404


def test_a_call_larger_than_the_quota_is_412(server: Server) -> None:
    request = echo_request([1.0, 2.0, 3.0], [3, 1])
    status, headers, body = call(server, "POST", "/v2/models/echo/infer", request, auth("small"))
    assert status == 412
    assert "Retry-After" not in headers
    assert error_of(body)


def test_a_body_over_max_message_bytes_is_413(server: Server) -> None:
    raw = bytes(MAX_BODY + 8)
    body, headers = binary_request([("INPUT0", "FP32", [1, len(raw) // 4], raw)])
    status, _, answer = call(
        server, "POST", "/v2/models/echo/infer", body, {**headers, **auth("acme")}
    )
    assert status == 413
    assert f"larger than {MAX_BODY} bytes" in error_of(answer)


def _expecting(server: Server, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """Send a request's head with ``Expect: 100-continue`` and wait for the server's
    first answer; send the body only if that is ``100 Continue``, as a client does.
    Everything the server sent, until it closed the connection or answered whole."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        received = sock.recv(65536)
        if received.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
            sock.sendall(body)
        while not re.search(rb"\r\n\r\n(.|\n)*\}$", received[25:]):
            chunk = sock.recv(65536)  # the answer's JSON body ends it (or the close)
            if not chunk:
                break
            received += chunk
        return received


@pytest.mark.parametrize(
    ("caller", "length", "status"),
    [
        ({}, 0, 401),  # no key
        (auth("acme"), MAX_BODY + 1, 413),  # a body over the bound, announced
        (auth("acme"), 0, 200),
    ],
    ids=["no key", "too large", "served"],
)
def test_a_body_is_asked_for_only_once_the_key_and_its_length_passed(
    server: Server, caller: dict[str, str], length: int, status: int
) -> None:
    """``Expect: 100-continue``: aiohttp invited every body as the request arrived, a
    caller without a key or one announcing 500 MB too; the server then read and
    dropped it for up to a second. The invitation now comes only where the body is
    read; a request refused before it closes its connection."""
    body = json.dumps(echo_request([1.0, 2.0], [1, 2])).encode()
    if length:
        body += b" " * (length - len(body))  # JSON may end in spaces
    answer = _expecting(server, "/v2/models/echo/infer", body, caller)
    invited = answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert invited == (status == 200), answer[:200]
    final = answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert final.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    if status != 200:
        assert b"Connection: close" in final.split(b"\r\n\r\n")[0]


def test_an_unknown_expectation_is_417_with_its_text_cut(server: Server) -> None:
    """Answered as every error is, ``{"error": ...}`` (it was aiohttp's text/plain,
    with the whole header value in it)."""
    request = "POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=10) as sock:
        sock.sendall(f"{request}Expect: {'x' * 4000}\r\n\r\n".encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 417 "), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    assert json.loads(body)["error"] == f"unknown Expect: {'x' * 64}…"


def test_a_body_the_caller_has_no_room_for_is_refused_before_it_is_asked_for(
    server: Server,
) -> None:
    """``Expect: 100-continue`` from a caller whose bodies on their way leave no room:
    refused (429) before the invitation, its connection closed (it was invited, then
    refused, and read and dropped what it sent)."""
    head = (
        f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY}\r\n"
        f"Authorization: Bearer {KEYS['small']}\r\n\r\n"
    ).encode()
    held = [socket.create_connection(("127.0.0.1", server.rest_port)) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(head + b" " * (MAX_BODY - 16))  # nearly whole, never ended
        time.sleep(0.3)
        answer = _expecting(server, "/v2/models/echo/infer", b" " * 1024, auth("small"))
    finally:
        for sock in held:
            sock.close()
    assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]
    assert b"Connection: close" in answer.split(b"\r\n\r\n")[0]


@pytest.mark.parametrize("binary_out", [False, True])
def test_a_large_answer_written_a_piece_at_a_time_arrives_whole(
    server: Server, binary_out: bool
) -> None:
    """Answers over 1 MiB are written from the pieces they were made of, as the client
    takes them (``StreamedAnswer``), not joined into one body first: the 200,000
    values come back as JSON (about 3 MB) exactly, with their length announced; a
    binary answer under 1 MiB, in one body, beside it."""
    values = np.random.default_rng(7).random(200_000, dtype=np.float32)
    raw = values.tobytes()
    body, headers = binary_request([("INPUT0", "FP32", [1, values.size], raw)])
    head = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
    head["outputs"] = [{"name": "OUTPUT0", "parameters": {"binary_data": binary_out}}]
    text = json.dumps(head).encode()
    body, headers["Inference-Header-Content-Length"] = text + raw, str(len(text))
    status, answer_headers, answer = call(
        server, "POST", "/v2/models/echo/infer", body, {**headers, **auth("acme")}
    )
    assert status == 200
    assert int(answer_headers["Content-Length"]) == len(answer)
    if binary_out:
        length = int(answer_headers["Inference-Header-Content-Length"])
        assert np.frombuffer(answer[length:], np.float32).tobytes() == raw
    else:
        assert len(answer) > 1 << 20
        (output,) = json.loads(answer)["outputs"]
        assert np.array(output["data"], np.float32).tobytes() == raw


def test_a_json_part_over_max_json_bytes_is_413_and_binary_data_is_not_bounded(
    server: Server,
) -> None:
    """JSON is parsed on the event loop: beyond ``max_json_bytes`` it is refused unparsed
    (a 40 MB JSON body stalled every other call for seconds); the same tensor as binary
    data is served."""
    values = [0.5] * (MAX_JSON // 4)
    status, _, answer = call(
        server, "POST", "/v2/models/echo/infer", echo_request(values, [1, len(values)]),
        auth("acme"),
    )  # fmt: skip
    assert status == 413
    assert f"JSON is larger than {MAX_JSON} bytes" in error_of(answer)
    raw = np.array(values, np.float32).tobytes()
    body, headers = binary_request([("INPUT0", "FP32", [1, len(values)], raw)])
    status, _, answer = call(
        server, "POST", "/v2/models/echo/infer", body, {**headers, **auth("acme")}
    )
    assert status == 200


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/"), ("GET", "/v3"), ("GET", "/v2/models"), ("POST", "/v2/x")]
)
def test_unknown_routes_are_404(server: Server, method: str, path: str) -> None:
    status, _, body = call(server, method, path, None, auth("acme"))
    assert status == 404
    assert error_of(body) == "no such endpoint"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v2/models/echo/infer", "POST"),
        ("POST", "/v2/models/echo", "GET"),
        ("PUT", "/v2/health/ready", "GET"),
    ],
)
def test_a_known_path_with_another_method_is_405(
    server: Server, method: str, path: str, allowed: str
) -> None:
    """As Triton answers (it was 404, as for a path that does not exist)."""
    status, headers, body = call(server, method, path, None, auth("acme"))
    assert status == 405
    assert allowed in headers["Allow"]
    assert error_of(body) == f"{method} is not served here; {headers['Allow']} is"


def test_a_version_with_leading_zeros_is_that_version(server: Server) -> None:
    """Triton reads versions as integers: ``01`` is version 1."""
    status, _, body = call(server, "GET", "/v2/models/echo/versions/01", None, auth("acme"))
    assert status == 200, body
    assert json.loads(body)["versions"] == ["1"]


def test_answers_are_counted_under_grpc_status_names(server: Server) -> None:
    def count(code: str) -> float:
        labels = {"tenant": "globex", "model": "echo", "code": code}
        return metric(server, KEYS["admin"], "mandant_requests_total", **labels) or 0.0

    before_ok, before_invalid = count("OK"), count("INVALID_ARGUMENT")
    assert (
        call(server, "POST", "/v2/models/echo/infer", echo_request([1], [1, 1]), auth("globex"))[0]
        == 200
    )
    assert (
        call(server, "POST", "/v2/models/echo/infer", echo_request([1], [1]), auth("globex"))[0]
        == 400
    )
    assert (count("OK"), count("INVALID_ARGUMENT")) == (before_ok + 1, before_invalid + 1)


def _raw_call(port: int, method: str, path: str, body: bytes, headers: dict[str, bytes]) -> int:
    """A call whose header values are bytes as given (http.client passes them on)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path)
        for name, value in {**headers, "Content-Length": str(len(body)).encode()}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()


def test_a_body_that_is_not_in_its_content_encoding_is_400(server: Server) -> None:
    body = json.dumps(echo_request([1.0, 2.0], [1, 2])).encode()
    key = auth("acme")["Authorization"].encode()
    port = int(rest(server).rsplit(":", 1)[1])
    for encoding in (b"gzip", b"deflate", b"br"):  # br: not taken (aiohttp took it)
        headers = {"Authorization": key, "Content-Encoding": encoding}
        assert _raw_call(port, "POST", "/v2/models/echo/infer", body, headers) == 400


def test_a_key_that_is_not_utf8_is_401_on_both_http_ports(server: Server) -> None:
    key = {"Authorization": b"Bearer \xff\xfe"}
    body = json.dumps(echo_request([1.0, 2.0], [1, 2])).encode()
    port = int(rest(server).rsplit(":", 1)[1])
    assert _raw_call(port, "POST", "/v2/models/echo/infer", body, key) == 401
    for path in ("/usage", "/metrics", "/api/dashboard"):
        assert _raw_call(server.http_port, "GET", path, b"", key) == 401


def test_a_bytes_string_that_is_not_unicode_is_400(server: Server) -> None:
    inputs = [
        {"name": f"IN_{t}", "datatype": t, "shape": [1, 1], "data": [_ONE[t]]} for t in DTYPES
    ]
    lone = [dict(t, data=["\ud800"]) if t["datatype"] == "BYTES" else t for t in inputs]
    body = json.dumps({"inputs": lone}).encode()  # json writes it as the escape \ud800
    status, _, answer = call(server, "POST", "/v2/models/alltypes/infer", body, auth("acme"))
    assert status == 400
    assert "not valid Unicode" in error_of(answer)


# -- model repository bodies ------------------------------------------------------------

_INDEX = "/v2/repository/index"
_UNLOAD = "/v2/repository/models/absent/unload"
_LOAD = "/v2/repository/models/absent/load"


def _many_values(size: int) -> bytes:
    """A JSON object of ``size`` bytes of the slowest JSON to parse (tiny values)."""
    return b'{"ready": false, "x": [' + b"{}," * ((size - 26) // 3) + b"{}]}"


@pytest.mark.parametrize(
    ("path", "tenant", "bound"),
    [(_INDEX, "acme", MAX_BODY_BYTES), (_UNLOAD, "admin", MAX_BODY_BYTES),
     (_LOAD, "admin", MAX_LOAD_BODY_BYTES)],
)  # fmt: skip
def test_repository_bodies_over_their_bound_are_413_unparsed(
    server: Server, path: str, tenant: str, bound: int
) -> None:
    """The repository routes parse their JSON whole on the event loop: a tenant's 60 MiB
    index body (under ``max_message_bytes``) stalled every tenant's calls for 5 s."""
    body = _many_values(bound + 1)
    assert bound < len(body) < MAX_BODY
    status, _, answer = call(server, "POST", path, body, auth(tenant))
    assert status == 413, answer[:200]
    assert error_of(answer) == f"request body is larger than {bound} bytes"


def test_a_repository_body_s_length_over_its_bound_is_413_before_it_is_sent(
    server: Server,
) -> None:
    """Refused from Content-Length: the client never sends the body (were it awaited,
    the server would wait for it and this call would time out)."""
    port = int(rest(server).rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("POST", _INDEX)
        connection.putheader("Authorization", auth("acme")["Authorization"])
        connection.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
        connection.endheaders()
        answer = connection.getresponse()
        assert answer.status == 413
        assert error_of(answer.read()) == f"request body is larger than {MAX_BODY_BYTES} bytes"
    finally:
        connection.close()


@pytest.mark.parametrize("encoding", ["chunked", "gzip"])
def test_a_repository_body_without_its_length_is_bounded_as_it_arrives(
    server: Server, encoding: str
) -> None:
    """Chunked (no Content-Length), or gzip (its length says nothing of what it
    inflates to): refused part way, as ``/infer``'s bodies are."""
    body = _many_values(4 * MAX_BODY_BYTES)
    port = int(rest(server).rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = auth("acme")
        if encoding == "gzip":
            headers["Content-Encoding"] = "gzip"
            connection.request("POST", _INDEX, gzip.compress(body), headers)
        else:
            pieces = (body[i : i + 4096] for i in range(0, len(body), 4096))
            connection.request("POST", _INDEX, pieces, headers, encode_chunked=True)
        answer = connection.getresponse()
        assert answer.status == 413
        assert error_of(answer.read()) == f"request body is larger than {MAX_BODY_BYTES} bytes"
    finally:
        connection.close()
    status, _, listed = call(server, "POST", _INDEX, {"ready": True}, auth("acme"))
    assert status == 200 and "echo" in {m["name"] for m in json.loads(listed)}


@pytest.mark.parametrize(
    ("tail", "status", "error"),
    [
        (
            bytes(MAX_BODY_BYTES + (128 << 10)),
            413,
            f"request body is larger than {MAX_BODY_BYTES} bytes as sent",
        ),
        (
            gzip.compress(b"") * 5_000,  # 100,000 bytes: under the bound as sent
            400,
            "the request body has more gzip members than its size explains (one per 1024 "
            "bytes sent or 32768 inflated)",
        ),
    ],
    ids=["zeros after its member", "empty members"],
)
def test_a_chunked_gzip_body_is_bounded_by_what_is_sent(
    server: Server, tail: bytes, status: int, error: str
) -> None:
    """A gzip body of unknown length was bounded only by what it inflated to: zeros
    after its member, or empty members (20 bytes each, a new inflater each), went on
    for as long as the client sent them, a core busy on one body (16 MiB of members
    took 6.8 s of the server's CPU), before a rate limit or a key's tenant was looked
    at."""
    packed = gzip.compress(json.dumps({"ready": True}).encode()) + tail
    port = int(rest(server).rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {**auth("acme"), "Content-Encoding": "gzip"}
        pieces = (packed[i : i + 4096] for i in range(0, len(packed), 4096))
        connection.request("POST", _INDEX, pieces, headers, encode_chunked=True)
        answer = connection.getresponse()
        assert answer.status == status
        assert error_of(answer.read()) == error
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("path", "body", "tenant", "error"),
    [
        (_INDEX, {"ready": "false"}, "acme", "'ready' is a JSON boolean"),
        (_INDEX, {"ready": 0}, "acme", "'ready' is a JSON boolean"),
        (_LOAD, {"parameters": []}, "admin", "'parameters' is a JSON object"),
    ],
)
def test_repository_flags_of_the_wrong_json_type_are_400(
    server: Server, path: str, body: dict[str, Any], tenant: str, error: str
) -> None:
    """``{"ready": "false"}`` listed the ready models only ("false" is true to Python),
    and a load's ``"parameters": []`` was taken for none; Triton refuses both."""
    status, _, answer = call(server, "POST", path, body, auth(tenant))
    assert (status, error_of(answer)) == (400, error)


def test_a_load_s_longest_config_fits_its_body_bound(server: Server) -> None:
    """``MAX_LOAD_CONFIG_CHARS`` characters of the longest JSON escapes (12 bytes each,
    a character beyond the BMP) are read and parsed: refused for what they say (400),
    not for their size."""
    config = "\U0001f600" * MAX_LOAD_CONFIG_CHARS
    body = json.dumps({"parameters": {"config": config}}).encode()
    assert len(body) > 12 * MAX_LOAD_CONFIG_CHARS
    status, _, answer = call(server, "POST", _LOAD, body, auth("admin"))
    assert status == 400, answer[:200]
    assert "larger than" not in error_of(answer)
