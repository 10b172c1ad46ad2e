"""Who an open ModelStreamInfer stream serves: the key is checked again at its first
message (a reload between the gate's check and the stream's start is not missed) and
after every reload; a revoked key is refused per message."""

from __future__ import annotations

from typing import Any, cast

import pytest

from mandant.errors import Unauthenticated
from mandant.events import NullObserver
from mandant.transport.grpc.stream import InferStream
from mandant.types import Tenant


class _Plane:
    def __init__(self) -> None:
        self.tenant_snapshot = object()


def _stream(plane: _Plane, keys: dict[str, Tenant | None]) -> InferStream:
    """A stream opened as acme, whose key now authenticates as ``keys["now"]``."""

    def authenticate() -> Tenant | None:
        tenant = keys["now"]
        if tenant is None:
            raise Unauthenticated()
        return tenant

    return InferStream(
        cast(Any, plane),
        Tenant("acme"),
        authenticate,
        cast(Any, None),
        4,
        1 << 20,
        16,
        NullObserver(),
    )


def test_the_first_message_checks_the_key_again() -> None:
    """A reload that revoked the key while the stream started (after the gate's check,
    before the stream took its snapshot of the tenants) is seen at the first message."""
    plane = _Plane()
    keys: dict[str, Tenant | None] = {"now": None}
    stream = _stream(plane, keys)
    with pytest.raises(Unauthenticated):
        stream._caller()


def test_a_reload_is_seen_by_the_next_message_and_nothing_else_is_asked() -> None:
    plane = _Plane()
    keys: dict[str, Tenant | None] = {"now": Tenant("acme", weight=2)}
    stream = _stream(plane, keys)
    assert stream._caller().weight == 2  # the first message: the tenant as it is now
    keys["now"] = None  # revoked in the file, not reloaded yet: nothing changes
    assert stream._caller().id == "acme"
    plane.tenant_snapshot = object()  # the reload
    with pytest.raises(Unauthenticated):
        stream._caller()
    keys["now"] = Tenant("acme")  # the key given back, and reloaded again
    plane.tenant_snapshot = object()
    assert stream._caller().id == "acme"


def test_an_error_answer_echoes_an_id_only_as_long_as_ids_may_be() -> None:
    """Ids are bounded in bytes: 200 two-byte characters were refused as too long, and
    echoed whole in the refusal."""
    from mandant.transport.grpc.stream import _bounded

    assert _bounded("é" * 128) == "é" * 128
    assert _bounded("é" * 200) == ""
