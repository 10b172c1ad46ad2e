"""What the light client puts on the wire and how it reads the answer, against a real
grpc.aio server with a fake servicer (tests/unit/fake_kserve.py) that shows what it
received and answers what a real Mandant cannot be made to answer on demand (typed
contents, INTERNAL, UNAVAILABLE). The client against the real server is in
tests/integration/test_client_e2e.py."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from mandant_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidInput,
    MandantClientError,
    ServerError,
    Unavailable,
)
from tests.unit.fake_kserve import API_KEY, SLOW, FakeServer, serve_fake


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    async with serve_fake() as fake:
        yield fake


def sync_infer(target: str, **kwargs: Any) -> dict[str, np.ndarray]:
    with Client(target, api_key=API_KEY, timeout_s=5) as client:
        return client.infer(**kwargs)


async def test_request_fields_and_header(server: FakeServer) -> None:
    batch = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    outputs = await asyncio.to_thread(
        sync_infer,
        server.target,
        model="classifier",
        inputs={"INPUT0": batch, "WORDS": np.array(["hi", "ü"], dtype=object)},
        version="1",
        outputs=["INPUT0", "WORDS"],
        request_id="req-1",
        parameters={"priority": 2, "tag": "x", "flag": True, "ratio": 0.5},
    )
    np.testing.assert_array_equal(outputs["INPUT0"], batch)
    assert outputs["WORDS"].tolist() == [b"hi", "ü".encode()]

    assert server.servicer.seen_metadata[0]["authorization"] == f"Bearer {API_KEY}"
    sent = server.servicer.seen_requests[0]
    assert (sent.model_name, sent.model_version, sent.id) == ("classifier", "1", "req-1")
    assert [o.name for o in sent.outputs] == ["INPUT0", "WORDS"]
    assert sent.parameters["priority"].int64_param == 2
    assert sent.parameters["tag"].string_param == "x"
    assert sent.parameters["flag"].bool_param is True
    assert sent.parameters["ratio"].double_param == 0.5


async def test_an_int_version_is_sent_as_its_decimal_string(server: FakeServer) -> None:
    for multiplex in (False, True):
        async with AsyncClient(server.target, api_key=API_KEY, multiplex=multiplex) as client:
            await client.infer("echo", {"X": np.zeros(1, np.float32)}, version=7)
        with Client(server.target, api_key=API_KEY, multiplex=multiplex) as sync_client:
            await asyncio.to_thread(
                sync_client.infer, "echo", {"X": np.zeros(1, np.float32)}, version=12
            )
    assert [r.model_version for r in server.servicer.seen_requests] == ["7", "12", "7", "12"]


@pytest.mark.parametrize(
    ("version", "error", "got"),
    [
        (1.0, TypeError, "got float 1.0"),
        (True, TypeError, "got bool True"),
        (b"1", TypeError, "got bytes b'1'"),
        (-1, ValueError, "got -1"),
    ],
)
@pytest.mark.parametrize("call", ["infer", "model_ready", "model_metadata"])
async def test_a_version_neither_str_nor_non_negative_int_is_refused_naming_it(
    call: str, version: object, error: type[Exception], got: str
) -> None:
    """Refused before anything is sent (no server here), by every call that takes a
    version, sync or async, unary or multiplexed."""
    message = f"version must be a str, a non-negative int or None, {got}"
    args: tuple[object, ...] = (
        ("echo", {"X": np.zeros(1, np.float32)}) if call == "infer" else ("echo",)
    )
    for multiplex in (False, True):
        async with AsyncClient("127.0.0.1:1", multiplex=multiplex) as client:
            with pytest.raises(error, match=f"^{re.escape(message)}$"):
                await getattr(client, call)(*args, version=version)
        with (
            Client("127.0.0.1:1", multiplex=multiplex) as sync_client,
            pytest.raises(error, match=f"^{re.escape(message)}$"),
        ):
            getattr(sync_client, call)(*args, version=version)


X = {"X": np.zeros(1, np.float32)}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"inputs": {"X": [[1.0, 2.0], [3.0]]}}, InvalidInput, "input 'X' is not an array"),
        ({"inputs": {"X": ["a\ud800"]}}, InvalidInput, "BYTES input 'X' holds a str that is"),
        ({"model": "e\ud800"}, InvalidInput, "model 'e\\ud800' is not UTF-8 text"),
        ({"request_id": "\udc80"}, InvalidInput, "request_id '\\udc80' is not UTF-8"),
        ({"outputs": ["o\ud800"]}, InvalidInput, "output name 'o\\ud800' is not UTF-8"),
        ({"inputs": {0: np.zeros(1, np.float32)}}, TypeError, "input name must be a str"),
        ({"outputs": [0]}, TypeError, "output name must be a str, got int 0"),
        ({"parameters": {"k": "\ud800"}}, InvalidInput, "parameter 'k' '\\ud800' is not"),
    ],
)
async def test_what_a_request_cannot_carry_is_refused_naming_it(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Before anything is sent, by every mode: a ragged list, text UTF-8 cannot write (a
    lone surrogate, as ``surrogateescape`` decoding leaves), a name that is not a str.
    numpy's ValueError, UnicodeEncodeError and protobuf's "bad argument type for
    built-in operation" came out before, outside the client's exceptions."""
    call = {"model": "echo", "inputs": X, **kwargs}
    pattern = f"^(INVALID_ARGUMENT: )?{re.escape(message)}"
    for multiplex in (False, True):
        async with AsyncClient("127.0.0.1:1", multiplex=multiplex) as client:
            with pytest.raises(error, match=pattern):
                await client.infer(**call)
        with (
            Client("127.0.0.1:1", multiplex=multiplex) as sync_client,
            pytest.raises(error, match=pattern),
        ):
            sync_client.infer(**call)


@pytest.mark.parametrize("call", ["model_ready", "model_metadata"])
async def test_a_model_name_or_version_a_request_cannot_carry_is_refused_naming_it(
    call: str,
) -> None:
    for args, kwargs, error, message in [
        (("e\ud800",), {}, InvalidInput, "INVALID_ARGUMENT: model 'e\\ud800' is not UTF-8"),
        (("echo",), {"version": "1\ud800"}, InvalidInput, "INVALID_ARGUMENT: version '1"),
        ((0,), {}, TypeError, "model must be a str, got int 0"),
    ]:
        async with AsyncClient("127.0.0.1:1") as client:
            with pytest.raises(error, match=f"^{re.escape(message)}"):
                await getattr(client, call)(*args, **kwargs)
        with (
            Client("127.0.0.1:1") as sync_client,
            pytest.raises(error, match=f"^{re.escape(message)}"),
        ):
            getattr(sync_client, call)(*args, **kwargs)


async def test_numpy_scalars_are_parameters_as_the_numbers_they_hold(server: FakeServer) -> None:
    """``np.int64(1)`` was refused ("must be bool, int, float or str") where
    ``np.float64`` passed (a float subclass)."""
    async with AsyncClient(server.target, api_key=API_KEY, timeout_s=5) as client:
        parameters = {"i": np.int64(3), "f": np.float32(1.5), "b": np.bool_(True)}
        await client.infer("echo", X, parameters=parameters, request_id=None)  # type: ignore[arg-type]
    (seen,) = server.servicer.seen_requests
    assert seen.parameters["i"].int64_param == 3
    assert seen.parameters["f"].double_param == 1.5
    assert seen.parameters["b"].bool_param is True


async def test_typed_contents_are_decoded(server: FakeServer) -> None:
    async with AsyncClient(server.target, api_key=API_KEY) as client:
        typed = await client.infer("typed", {"X": np.zeros(1, np.int32)})
    assert typed["OUT"].tolist() == [7, -7]


@pytest.mark.parametrize(
    ("model", "cls", "code"),
    [
        ("broken", ServerError, grpc.StatusCode.INTERNAL),
        ("down", Unavailable, grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_server_faults(
    server: FakeServer, model: str, cls: type[MandantClientError], code: grpc.StatusCode
) -> None:
    for multiplex in (False, True):
        async with AsyncClient(server.target, api_key=API_KEY, multiplex=multiplex) as client:
            with pytest.raises(cls) as caught:
                await client.infer(model, {"X": np.zeros(1, np.float32)})
        assert caught.value.code is code


async def test_client_deadline(server: FakeServer) -> None:
    async with AsyncClient(server.target, api_key=API_KEY) as client:
        with pytest.raises(DeadlineExceeded):
            await client.infer(SLOW, {"X": np.zeros(1, np.float32)}, timeout_s=0.05)


async def test_messages_above_grpc_default_4mib_pass(server: FakeServer) -> None:
    big = np.ones((5, 1024, 1024), dtype=np.float32)  # 20 MiB each way
    for multiplex in (False, True):
        async with AsyncClient(server.target, api_key=API_KEY, multiplex=multiplex) as client:
            outputs = await client.infer("echo", {"INPUT0": big})
        np.testing.assert_array_equal(outputs["INPUT0"], big)
