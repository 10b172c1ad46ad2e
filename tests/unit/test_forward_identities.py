"""A front end's forwarded calls (``workers: N``, ``transport/grpc/forward.py``): the
client certificate identities it names to the engine (a legal metadata value whatever
the certificate holds, read back as exactly the identities written), and an engine
socket gone told as such."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from mandant.errors import ENGINE_DOWN
from mandant.transport.grpc.forward import Forwarder, decode_identities, encode_identities

TRICKY = [
    ["CN=acme-client", "spiffe://test/acme"],
    ["CN=x\nCN=acme-client"],  # one identity, not two
    ["CN=caf\u00e9", "CN=\ufffd"],  # non-ASCII (a decoded name, or a replaced byte)
    ["CN=a,O=b", 'URI:"quoted"', ""],
]


@pytest.mark.parametrize("identities", TRICKY)
def test_identities_travel_as_printable_ascii_and_come_back_unchanged(
    identities: list[str],
) -> None:
    value = encode_identities(identities)
    assert all(0x20 <= ord(char) <= 0x7E for char in value)
    assert decode_identities(value) == identities


def test_no_value_is_no_identity_and_anything_else_is_refused() -> None:
    assert decode_identities(None) == [] and decode_identities("") == []
    for bad in ('{"CN": "x"}', "[1]", '"CN=x"'):
        with pytest.raises(ValueError):
            decode_identities(bad)


class _Engine:
    up = True  # the link has not seen it go: the call finds the socket gone

    async def lost(self) -> None:
        await asyncio.Event().wait()


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float:
        return 5.0

    def set_trailing_metadata(self, metadata: object) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


@pytest.mark.parametrize("folder", ["plain", "a b", "jos\u00e9"])
async def test_an_engine_socket_gone_is_told_without_its_path(tmp_path: Path, folder: str) -> None:
    """gRPC's failure to reach the engine's socket names its path (percent-encoded):
    the client is told the engine is not reachable instead (an engine's own answer is
    passed on as it is, ``test_model_control.py``)."""
    forwarder = Forwarder(f"unix:{tmp_path / folder / 'control.sock'}", _Engine())
    context = _Context()
    try:
        with pytest.raises(grpc.aio.AbortError):
            await forwarder.forward("/inference.GRPCInferenceService/ServerMetadata")(
                b"", cast(Any, context)
            )
    finally:
        await forwarder.aclose()
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, ENGINE_DOWN)
