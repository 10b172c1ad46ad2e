"""Triton's own client, sync and asyncio, against a real Mandant server: every RPC,
every v2 datatype (raw and typed contents), requested-output subsets, results equal
to the model run directly in torch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from mandant.config import parse_config
from mandant.demo.models import classifier
from mandant.tenancy.keys import hash_key
from mandant.transport.grpc.codec import CONTENTS_FIELD
from tests.servers import SERVER_KINDS, Server, ServerThread, auth, serve

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


def _sample(datatype: str, rng: np.random.Generator, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    if datatype == "BYTES":
        values = [bytes(rng.integers(0, 256, rng.integers(0, 9), dtype=np.uint8)) for _ in range(6)]
        values[0] = b"caf\xc3\xa9"  # utf-8, with a NUL-free multibyte char
        return np.array(values, dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(np.bool_)
    dtype = np.dtype(DTYPES[datatype])
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@pytest.fixture(scope="module", params=SERVER_KINDS)
def alltypes_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    def echo_model(name: str, datatypes: list[str]) -> dict[str, object]:
        tensors = [{"name": f"IN_{t}", "datatype": t, "shape": [-1, -1]} for t in datatypes]
        return {
            "name": name,
            "factory": "mandant.demo.models:echo_all",
            "inputs": tensors,
            "outputs": [{**t, "name": str(t["name"]).replace("IN_", "OUT_")} for t in tensors],
        }

    config = parse_config(
        {
            "server": {"grpc_port": 0, "http_port": 0, "rest_port": 0},
            "tenants": [{"id": "t", "api_keys": [hash_key("k")]}],
            "models": [
                echo_model("alltypes", list(DTYPES)),
                # typed contents have no FP16 field, and raw and typed inputs don't mix
                echo_model("typed", [t for t in DTYPES if t != "FP16"]),
            ],
        }
    )
    server = serve(request.param, config, tmp_path_factory.mktemp("alltypes"))
    yield server
    server.stop()


def _inputs(
    rng: np.random.Generator, typed: bool
) -> tuple[list[triton.InferInput], dict[str, np.ndarray]]:
    arrays = {t: _sample(t, rng) for t in DTYPES if not (typed and t == "FP16")}
    inputs = []
    for datatype, array in arrays.items():
        tensor = triton.InferInput(f"IN_{datatype}", list(array.shape), datatype)
        if typed:
            _set_typed(tensor, array, datatype)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs, arrays


def _set_typed(tensor: triton.InferInput, array: np.ndarray, datatype: str) -> None:
    field = CONTENTS_FIELD[datatype]
    getattr(tensor._get_tensor().contents, field).extend(array.reshape(-1).tolist())


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_every_datatype_round_trips_sync(alltypes_server: Server, typed: bool) -> None:
    client = triton.InferenceServerClient(alltypes_server.target)
    inputs, arrays = _inputs(np.random.default_rng(7), typed)
    result = client.infer("typed" if typed else "alltypes", inputs, headers=auth("k"))
    for datatype, array in arrays.items():
        got = result.as_numpy(f"OUT_{datatype}")
        assert got.shape == array.shape
        assert result.get_output(f"OUT_{datatype}").datatype == datatype
        np.testing.assert_array_equal(got, array)


async def test_every_datatype_round_trips_aio(alltypes_server: Server) -> None:
    client = triton_aio.InferenceServerClient(alltypes_server.target)
    try:
        inputs, arrays = _inputs(np.random.default_rng(8), typed=False)
        result = await client.infer("alltypes", inputs, headers=auth("k"))
        for datatype, array in arrays.items():
            np.testing.assert_array_equal(result.as_numpy(f"OUT_{datatype}"), array)
    finally:
        await client.close()


def test_requested_outputs_select_a_subset(alltypes_server: Server) -> None:
    client = triton.InferenceServerClient(alltypes_server.target)
    inputs, arrays = _inputs(np.random.default_rng(9), typed=False)
    wanted = [triton.InferRequestedOutput("OUT_INT32"), triton.InferRequestedOutput("OUT_BYTES")]
    result = client.infer("alltypes", inputs, outputs=wanted, headers=auth("k"))
    names = [o.name for o in result.get_response().outputs]
    assert names == ["OUT_INT32", "OUT_BYTES"]
    np.testing.assert_array_equal(result.as_numpy("OUT_BYTES"), arrays["BYTES"])


def test_unknown_requested_output_is_invalid(alltypes_server: Server) -> None:
    client = triton.InferenceServerClient(alltypes_server.target)
    inputs, _ = _inputs(np.random.default_rng(10), typed=False)
    with pytest.raises(InferenceServerException) as err:
        client.infer(
            "alltypes", inputs, outputs=[triton.InferRequestedOutput("NOPE")], headers=auth("k")
        )
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unknown output 'NOPE'" in err.value.message()


def _classifier_direct(x: np.ndarray, seed: int) -> np.ndarray:
    with torch.inference_mode():
        return classifier(seed)(torch.from_numpy(x)).numpy()


def test_demo_probes_metadata_and_classifier(demo: Server) -> None:
    client = triton.InferenceServerClient(demo.target)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "mandant" and "model_repository" in meta.extensions
    assert client.is_model_ready("classifier", headers=auth("acme"))
    model = client.get_model_metadata("classifier", headers=auth("acme"))
    assert model.platform == "pytorch" and model.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("INPUT0", "FP32", [-1, 256])
    ]
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    tensor = triton.InferInput("INPUT0", [3, 256], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("classifier", [tensor], headers=auth("acme"), request_id="r-1")
    assert result.get_response().id == "r-1"
    np.testing.assert_allclose(
        result.as_numpy("OUTPUT0"), _classifier_direct(x, 0), rtol=1e-5, atol=1e-6
    )


async def test_demo_classifier_aio(demo: Server) -> None:
    client = triton_aio.InferenceServerClient(demo.target)
    try:
        assert await client.is_server_ready()
        x = np.ones((1, 256), np.float32)
        tensor = triton_aio.InferInput("INPUT0", [1, 256], "FP32")
        tensor.set_data_from_numpy(x)
        result = await client.infer("classifier", [tensor], headers=auth("globex"))
        np.testing.assert_allclose(
            result.as_numpy("OUTPUT0"), _classifier_direct(x, 1), rtol=1e-5, atol=1e-6
        )
        index = await client.get_model_repository_index(headers=auth("globex"), as_json=True)
        assert {m["name"] for m in index["models"]} == {"classifier", "echo"}
    finally:
        await client.close()


def test_weights_are_built_next_to_the_config(demo_server: ServerThread) -> None:
    """One process only: the paths are read from the server's own registry."""
    assert demo_server.app is not None
    paths = [m.spec.path for m in demo_server.app.registry.all() if m.spec.path is not None]
    assert paths and all(Path(p).exists() for p in paths)
