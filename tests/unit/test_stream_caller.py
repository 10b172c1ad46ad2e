"""Who an open ModelStreamInfer stream serves: the key is checked again at its first
message (a reload between the gate's check and the stream's start is not missed) and
after every reload; a revoked key is refused, and its stream ends."""

from __future__ import annotations

from typing import Any, cast

import pytest

from mandant.errors import Unauthenticated
from mandant.events import NullObserver
from mandant.transport.grpc.stream import REVOKED_END, InferStream
from mandant.types import Tenant
from mandant_client._multiplex import END_MARK


class _Plane:
    def __init__(self) -> None:
        self.tenant_snapshot = object()


class _Context:
    """What a stream tells gRPC about its end: its trailing metadata."""

    def __init__(self) -> None:
        self.trailers: tuple[tuple[str, str], ...] = ()

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers


def _stream(
    plane: _Plane, keys: dict[str, Tenant | None], context: _Context | None = None
) -> InferStream:
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
        cast(Any, context or _Context()),
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
    context = _Context()
    stream = _stream(plane, keys, context)
    assert stream._caller().weight == 2  # the first message: the tenant as it is now
    keys["now"] = None  # revoked in the file, not reloaded yet: nothing changes
    assert stream._caller().id == "acme"
    assert context.trailers == ()
    plane.tenant_snapshot = object()  # the reload
    with pytest.raises(Unauthenticated):
        stream._caller()
    assert context.trailers == ((END_MARK, REVOKED_END),)  # the stream ends


def test_an_error_answer_echoes_an_id_only_as_long_as_ids_may_be() -> None:
    """Ids are bounded in bytes: 200 two-byte characters were refused as too long, and
    echoed whole in the refusal."""
    from mandant.transport.grpc.stream import _bounded

    assert _bounded("é" * 128) == "é" * 128
    assert _bounded("é" * 200) == ""


def test_checking_streams_at_a_reload_tags_no_context_with_their_tenant() -> None:
    """The check authenticates each stream as the gate does, which tags the context
    with the tenant for the logs: run in the reload's context, every later line of the
    reload (and of the reloads after it: a signal handler keeps its context) was
    logged as one customer's."""
    from mandant.config import ServerConfig
    from mandant.context import current_tenant
    from mandant.transport.grpc.servicer import InferenceServicer

    class _Tagging:
        def check_key(self) -> None:
            current_tenant.set(Tenant("acme"))

    servicer = InferenceServicer(cast(Any, _Plane()), ServerConfig(), NullObserver())
    servicer._streams.add(cast(Any, _Tagging()))
    servicer.check_streams()
    assert current_tenant.get(None) is None
