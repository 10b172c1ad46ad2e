"""A front end's model and admin RPCs (``workers: N``), forwarded to the engine.

ModelInfer and ModelStreamInfer are a front end's own (they scale per call); every
other RPC — metadata, config, statistics, repository control, AdminService — reads
or changes what only the engine holds (the models, the statistics, usage), so the
front end hands the client's bytes and metadata, as they came, to the engine's gRPC
server on its private Unix socket and hands back its answer or status. The engine's
gate authenticates them as it would on the public port; the front end adds the
verified client certificate's identities (mTLS) in :data:`PEER_IDENTITIES`, which it
never takes from a client: a JSON list in ASCII (a metadata value is printable ASCII,
and no identity can pass for two).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from typing import Protocol

import grpc

from mandant.errors import ENGINE_DOWN, ENGINE_LOST_FORWARDED
from mandant.transport.grpc.gateway import Context, Forward
from mandant.transport.grpc.status import INTERNAL_MESSAGE

logger = logging.getLogger(__name__)

#: Metadata naming a forwarded call's verified client certificate identities (one per
#: line); only the engine's private socket trusts it.
PEER_IDENTITIES = "mandant-peer-identities"
_NOT_FORWARDED = frozenset({PEER_IDENTITIES, "user-agent", "te", "content-type"})


def encode_identities(identities: list[str]) -> str:
    return json.dumps(identities)  # ensure_ascii: escapes what a header may not hold


def decode_identities(value: str | None) -> list[str]:
    """What :func:`encode_identities` wrote (none: no value)."""
    identities = json.loads(value) if value else []
    if not isinstance(identities, list) or not all(isinstance(i, str) for i in identities):
        raise ValueError(f"{PEER_IDENTITIES} is not a list of strings")
    return identities


def _forwarded(metadata: Iterable[tuple[str, str | bytes]]) -> list[tuple[str, str | bytes]]:
    """The client's metadata the engine gets: not gRPC's own, and not a text value
    gRPC's client cannot send (printable ASCII only: ``x-user: José``, a tab), which
    failed the whole call INTERNAL where one process answers it (an ``authorization``
    so dropped is then no key: UNAUTHENTICATED, as one process answers it too)."""
    return [
        (key, value)
        for key, value in metadata
        if key not in _NOT_FORWARDED
        and not key.startswith((":", "grpc-"))
        and (isinstance(value, bytes) or (value.isascii() and value.isprintable()))
    ]


class Engine(Protocol):
    """What a front end knows of the engine's liveness (its ``EngineLink``)."""

    @property
    def up(self) -> bool:
        """Connected to the engine."""
        ...

    async def lost(self) -> None:
        """Until the connection in use now is gone (the engine died, or went silent)."""
        ...


class Forwarder:
    """``target``: the engine's socket (``unix:/path``). ``engine``: whether it answers:
    a call made while it does not is refused UNAVAILABLE at once, and a call waiting on
    an engine that dies or goes silent fails UNAVAILABLE then, as inference calls do
    (it waited for its deadline, or for ever). ``identities``: a call's verified client
    certificate identities (mTLS), if any."""

    def __init__(
        self,
        target: str,
        engine: Engine,
        identities: Callable[[Context], list[str]] | None = None,
    ) -> None:
        # An answer of any size, as a single process sends it (GetUsage and
        # ModelStatistics grow with the tenants and models: gRPC's default 4 MiB).
        self._channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", -1)]
        )
        self._engine = engine
        self._identities = identities
        #: How gRPC's own failures to reach the socket name it (``unix:/path``, the
        #: path percent-encoded: a space, a non-ASCII letter in TMPDIR): an UNAVAILABLE
        #: of the engine's that quotes another Unix address (a model's load error) is
        #: its answer, and was taken for the engine being down.
        path = target.removeprefix("unix:")
        self._socket_names = {target, "unix:" + urllib.parse.quote(path, safe="/")}

    async def aclose(self) -> None:
        await self._channel.close()

    def forward(self, path: str) -> Forward:
        """What hands a call of ``path`` (its message's bytes, as they came) to the
        engine and returns the engine's answer's bytes, or ends the call with the
        engine's status; the gate checks the caller first (``Gate.forwarded``)."""
        call = self._channel.unary_unary(path)
        engine = self._engine
        identities = self._identities
        socket_names = self._socket_names

        async def forward(raw: bytes, context: Context) -> bytes:
            if not engine.up:
                await context.abort(grpc.StatusCode.UNAVAILABLE, ENGINE_DOWN)
            try:
                metadata = _forwarded(context.invocation_metadata() or ())
                if identities is not None:
                    peer = identities(context)
                    if peer:
                        metadata.append((PEER_IDENTITIES, encode_identities(peer)))
                answered = asyncio.ensure_future(
                    call(raw, metadata=tuple(metadata), timeout=context.time_remaining())
                )
                lost = asyncio.ensure_future(engine.lost())
                try:
                    await asyncio.wait((answered, lost), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost.cancel()
                    if not answered.done():
                        answered.cancel()
                if answered.done():  # else the engine went away first (now cancelling it)
                    answer: bytes = answered.result()
                    return answer
            except grpc.aio.AioRpcError as exc:
                trailers = _forwarded(exc.trailing_metadata() or ())
                pushback = [
                    (key, value)
                    for key, value in exc.trailing_metadata() or ()
                    if key == "grpc-retry-pushback-ms"
                ]
                if trailers or pushback:
                    context.set_trailing_metadata(tuple(trailers + pushback))
                details = exc.details() or ""
                unreached = any(name in details for name in socket_names)
                if exc.code() is grpc.StatusCode.UNAVAILABLE and unreached:
                    details = ENGINE_DOWN  # gRPC's, not the engine's answer: no path
                await context.abort(exc.code(), details)
            except Exception:  # a fault of ours: a status at once, never a hung call
                request_id = uuid.uuid4().hex[:16]
                logger.exception("internal error forwarding %s (request id %s)", path, request_id)
                await context.abort(
                    grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE.format(request_id=request_id)
                )
            await context.abort(grpc.StatusCode.UNAVAILABLE, ENGINE_LOST_FORWARDED)
            return b""  # not reached: abort ends the call

        return forward
