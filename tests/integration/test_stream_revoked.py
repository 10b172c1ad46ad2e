"""A revoked key's ``ModelStreamInfer`` streams whose client never reads the answers
(one process, and ``workers: 2``, whose front ends serve streams): they end, and the
tenant's new key is served again."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from mandant.config import parse_config
from mandant.tenancy.keys import hash_key
from mandant_client._multiplex import MAX_INFLIGHT_METADATA
from mandant_client._proto import grpc_service_pb2 as pb
from tests.servers import ECHO_MODEL, SERVER_KINDS, Server, ServerThread, metric, serve

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
INFER = "/inference.GRPCInferenceService/ModelInfer"
ADMIN_KEY = "revoked-admin-key"
#: A connection of its own per channel (grpc shares one between channels by default):
#: ``workers: 2``'s kernel spreads connections, not calls, over the front ends. No BDP
#: probing: the client's receive window stays at HTTP/2's 64 KiB, and an answer of
#: 0.9 MB waits in the server for a client that does not read.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
NOT_READING = [*OWN_CONNECTION, ("grpc.http2.bdp_probe", 0)]
#: How long each wait may take: generous, the streams end a few seconds after the
#: reload (``stream.py``, ``REVOKED_WRITE_WAIT_S``), on a loaded machine later.
DEADLINE_S = 30.0


def _key(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _request(width: int) -> bytes:
    message = pb.ModelInferRequest(model_name="echo", id=f"w{width}")
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, width])
    message.raw_input_contents.append(bytes(4 * width))
    return message.SerializeToString()


def _config(key: str) -> dict[str, Any]:
    """One tenant, ``t``, of ``key``; one stream per process, whose one unread answer
    (0.9 MB) puts the tenant at ``max_unread_answer_bytes``."""
    return {
        "server": {
            "grpc_port": 0,
            "http_port": 0,
            "rest_port": 0,
            "max_message_bytes": 1 << 20,
            "max_tenant_streams": 1,
            "max_unread_answer_bytes": 1 << 19,
            "admin_keys": [hash_key(ADMIN_KEY)],
        },
        "tenants": [{"id": "t", "api_keys": [hash_key(key)]}],
        "models": [ECHO_MODEL],
    }


def _revoke(server: Server, key: str) -> None:
    """Reload ``server`` with ``key`` in place of the tenant's key: on the server's
    loop (one process), or by SIGHUP (``workers``)."""
    if isinstance(server, ServerThread):

        async def reload() -> None:
            assert server.app is not None
            server.app.reload(parse_config(_config(key), "test"))

        server.call(reload())
        return
    data = yaml.safe_load(server.config_path.read_text())
    data["tenants"][0]["api_keys"] = [hash_key(key)]
    server.config_path.write_text(yaml.safe_dump(data))
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)


async def _served(target: str, key: str) -> bool:
    """Whether ``key`` opens a stream and has a message answered on it, and a unary
    call answered, on a connection of its own."""
    async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
        method = channel.stream_stream(
            STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        stream = method(metadata=_key(key), timeout=10)
        try:
            await stream.write(_request(4))
            await stream.done_writing()
            answers = [answer.error_message async for answer in stream]
            await channel.unary_unary(INFER)(_request(4), metadata=_key(key), timeout=10)
        except grpc.aio.AioRpcError:
            return False
        return answers == [""]


async def _write_all(call: Any, message: bytes, count: int) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        for _ in range(count):
            await call.write(message)


@pytest.mark.parametrize("kind", SERVER_KINDS)
async def test_a_revoked_keys_streams_that_are_not_read_end_and_free_the_tenant(
    tmp_path: Path, kind: str
) -> None:
    """Streams of a key about to be revoked, written to with large messages, their
    answers never read: revoked, they stayed open as long as their connection (an
    answer's write waited for ever), holding the tenant's places under
    ``server.max_tenant_streams`` and its unread answers' bytes, so that its new key
    could open no stream and every inference call of it was refused
    RESOURCE_EXHAUSTED. They now end UNAUTHENTICATED once a write of theirs has waited
    a few seconds, their answers left unwritten dropped."""
    processes = 1 if kind == SERVER_KINDS[0] else 2  # that serve streams
    server = serve(kind, parse_config(_config("old-key"), "test"), tmp_path)
    held: list[tuple[grpc.aio.Channel, Any, asyncio.Future[None]]] = []
    try:
        # One stream of the old key on every process that serves streams (one more on
        # a process is refused as it opens): the tenant has no place left anywhere.
        for _ in range(40):
            if len(held) == processes:
                break
            channel = grpc.aio.insecure_channel(server.target, options=NOT_READING)
            call = channel.stream_stream(STREAM)(metadata=_key("old-key"))
            with contextlib.suppress(grpc.aio.AioRpcError):
                if MAX_INFLIGHT_METADATA in dict(await call.initial_metadata()):
                    writes = asyncio.ensure_future(_write_all(call, _request(230_000), 8))
                    held.append((channel, call, writes))
                    continue
            await channel.close()
        assert len(held) == processes, "the old key's streams did not reach every process"
        # Each stream's first answer (0.9 MB) is made, and waits for its client.
        deadline = time.monotonic() + DEADLINE_S
        answered = {"tenant": "t", "model": "echo", "code": "OK"}
        while (
            await asyncio.to_thread(metric, server, ADMIN_KEY, "mandant_requests_total", **answered)
            or 0
        ) < processes:
            assert time.monotonic() < deadline, "the old key's messages were not answered"
            await asyncio.sleep(0.05)

        await asyncio.to_thread(_revoke, server, "new-key")
        deadline = time.monotonic() + DEADLINE_S
        # Served on every process (a few connections: the kernel picks the process).
        while not all([await _served(server.target, "new-key") for _ in range(2 * processes)]):
            assert time.monotonic() < deadline, "the tenant's new key is not served"
            await asyncio.sleep(0.2)

        for _, call, writes in held:
            # gRPC sends the status after the answers handed to it: read, it comes.
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for _ in call:
                    pass
            assert (
                await asyncio.wait_for(call.code(), DEADLINE_S) == grpc.StatusCode.UNAUTHENTICATED
            )
            assert await call.details() == "missing or invalid API key"
            await asyncio.wait_for(writes, DEADLINE_S)
    finally:
        for channel, _, writes in held:
            writes.cancel()
            await channel.close()
        server.stop()
