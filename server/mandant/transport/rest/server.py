"""The KServe v2 REST port (Triton's 8000): aiohttp on the server's event loop, the
same data plane, keys, visibility rules, status table and TLS settings as gRPC.

Served: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready`` (open), and under
``/v2/models/{name}[/versions/{version}]`` (tenant key): ``GET`` metadata, ``GET
/ready``, ``GET /config``, ``POST /infer`` (JSON tensors and the binary-data
extension). ``GET /v2/models[/{name}[/versions/{version}]]/stats`` takes a tenant key
(its own calls) or an admin key (every tenant's, or one tenant's with the
``mandant-tenant`` header), as gRPC's ModelStatistics. Configuration and statistics
are gRPC's messages (``transport/grpc/model_config.py``, ``statistics.py``) in
protobuf's JSON mapping, field names as in the proto and 64-bit integers as numbers,
as Triton's REST answers them. Model control (``POST /v2/repository/...``):
``repository.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from google.protobuf import json_format
from google.protobuf.message import Message

from mandant.config import ServerConfig, TlsConfig
from mandant.context import current_request_id
from mandant.events import NullObserver, Observer
from mandant.observability.stats import InferenceStats
from mandant.scheduling.door import CallCap, FrontDoor
from mandant.service import EXTENSIONS, SERVER_NAME, DataPlane
from mandant.tenancy.keys import AdminKeys
from mandant.transport import http
from mandant.transport.grpc.model_config import model_config
from mandant.transport.grpc.statistics import TENANT_METADATA, model_statistics
from mandant.transport.listeners import Listener
from mandant.transport.rest.codec import (
    HEADER_LENGTH,
    AnswerBody,
    JsonInferRequest,
    JsonTurns,
    encode_answer,
)
from mandant.transport.rest.gate import (
    EXPECTING,
    Access,
    AdminAuthenticator,
    CertificateAuthenticator,
    RestGate,
    body_of,
    error_response,
    expect_later,
)
from mandant.transport.rest.repository import add_repository_routes
from mandant.transport.tls import ServerTls
from mandant.transport.unread import UnreadAnswers
from mandant.types import Call, TensorSpec

logger = logging.getLogger(__name__)

#: Request ids kept for logs (longer ones are refused by the data plane).
MAX_LOGGED_ID = 256
_MODEL = "/v2/models/{name}"
_VERSION = "/v2/models/{name}/versions/{version}"


class RestServer:
    def __init__(
        self,
        plane: DataPlane,
        config: ServerConfig,
        observer: Observer | None = None,
        stats: InferenceStats | None = None,
        authenticate_admin: AdminAuthenticator | None = None,
        authenticate_certificate: CertificateAuthenticator | None = None,
        cap: CallCap | None = None,
        door: FrontDoor | None = None,
        unread: UnreadAnswers | None = None,
    ) -> None:
        """``stats``: what ``/stats`` answers from (fed through ``observer``);
        ``authenticate_admin``: the tenant directory's admin-key check (without it,
        ``config.admin_keys`` as they are now); ``authenticate_certificate``: the
        tenant of a verified client certificate's identities (with ``tls.client_ca``);
        ``unread``: each tenant's answers not read yet (the gRPC port's too)."""
        if unread is None:
            unread = UnreadAnswers(config.max_unread_answer_bytes, observer or NullObserver())
        self._unread = unread
        self._json_turns = JsonTurns()  # large JSON answers' pieces, fairly
        self._plane = plane
        self._config = config
        self._stats = stats or InferenceStats()
        self._max_body = config.max_message_bytes
        tls = config.tls
        self._tls = ServerTls(tls) if tls is not None else None
        mtls = tls is not None and tls.client_ca is not None
        gate = RestGate(
            plane.authenticate,
            authenticate_admin or AdminKeys(config.admin_keys).authenticate,
            observer=observer,
            cap=cap if cap is not None else CallCap(config.max_concurrent_rpcs),
            door=door if door is not None else FrontDoor(config.front_door_slots),
            authenticate_certificate=authenticate_certificate if mtls else None,
            max_body=self._max_body,
            unread=unread,
            read_timeout_s=config.message_read_timeout_s,
        )
        self._gate = gate
        app = web.Application(client_max_size=self._max_body)
        routes = app.router
        routes.add_get("/v2", gate.route(Access.OPEN, self._server_metadata))
        routes.add_get("/v2/health/live", gate.route(Access.OPEN, self._live))
        routes.add_get("/v2/health/ready", gate.route(Access.OPEN, self._ready))
        stats_route = gate.route(Access.TENANT_OR_ADMIN, self._model_stats)
        routes.add_get("/v2/models/stats", stats_route)  # all models: before {name}
        for base in (_MODEL, _VERSION):
            routes.add_get(base, gate.route(Access.TENANT, self._model_metadata))
            routes.add_get(f"{base}/ready", gate.route(Access.TENANT, self._model_ready))
            routes.add_get(f"{base}/config", gate.route(Access.TENANT, self._model_config))
            routes.add_get(f"{base}/stats", stats_route)
            routes.add_post(
                f"{base}/infer",
                gate.route(Access.TENANT, self._infer, fair=True),
                expect_handler=expect_later,
            )
        add_repository_routes(routes, gate, plane)
        routes.add_route("*", "/{tail:.*}", _not_found, expect_handler=expect_later)
        # Connections still open after the drain (``aclose``) are closed at once.
        self._runner = http.runner(app)
        self.port = 0

    @property
    def calls(self) -> int:
        """Calls being served now."""
        return self._gate.calls

    @property
    def listeners(self) -> list[Listener]:
        """The REST port."""
        return [Listener("REST port", "server.host", self._config.host, self._config.rest_port)]

    async def start(self) -> int:
        """Bind and serve; returns the bound port (0 binds a free one)."""
        (listener,) = self.listeners
        context = self._tls.context if self._tls is not None else None
        self.port = await http.serve(self._runner, listener, context)
        return self.port

    def reload_tls(self, tls: TlsConfig) -> None:
        """Serve the files at ``tls``'s paths to connections made from now on
        (HTTPS with the gRPC port's certificate where ``server.tls`` is set)."""
        if self._tls is not None:
            self._tls.reload(tls)

    async def aclose(self, grace_s: float = 0.0) -> None:
        """Stop listening and refuse new inference calls (503), let calls in progress
        finish within ``grace_s``, then close every connection."""
        self._plane.drain()
        for site in list(self._runner.sites):
            await site.stop()
        if self._gate.calls:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gate.wait_idle(), grace_s)
        await self._runner.cleanup()

    # -- open ----------------------------------------------------------------------

    async def _server_metadata(self, request: web.Request, call: Call) -> web.Response:
        return web.json_response(
            {"name": SERVER_NAME, "version": self._plane.version, "extensions": list(EXTENSIONS)}
        )

    async def _live(self, request: web.Request, call: Call) -> web.Response:
        live = self._plane.live
        return web.json_response({"live": live}, status=200 if live else 503)

    async def _ready(self, request: web.Request, call: Call) -> web.Response:
        ready = self._plane.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    # -- models --------------------------------------------------------------------

    async def _model_metadata(self, request: web.Request, call: Call) -> web.Response:
        name, version = _model_of(request)
        model = self._plane.model(call.caller, name, version)
        versions = [m.key.version for m in self._plane.model_versions(call.caller, name)]
        return web.json_response(
            {
                "name": model.key.name,
                "versions": versions,
                "platform": model.backend.platform,
                "inputs": [_tensor(t) for t in model.spec.inputs],
                "outputs": [_tensor(t) for t in model.spec.outputs],
            }
        )

    async def _model_ready(self, request: web.Request, call: Call) -> web.Response:
        name, version = _model_of(request)
        ready = self._plane.model_ready(call.caller, name, version)
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _model_config(self, request: web.Request, call: Call) -> web.Response:
        name, version = _model_of(request)
        model = self._plane.model(call.caller, name, version)
        return web.json_response(_json(model_config(model)))

    async def _model_stats(self, request: web.Request, call: Call) -> web.Response:
        """A tenant key: its own calls; an admin key: every tenant's, or one tenant's
        with the ``mandant-tenant`` header (``transport/grpc/statistics.py``)."""
        info = request.match_info
        await self._stats.settled()  # every call answered so far is counted
        stats = model_statistics(
            self._plane,
            self._stats,
            call.tenant,
            request.headers.get(TENANT_METADATA),
            info.get("name", ""),
            info.get("version", ""),
        )
        return web.json_response({"model_stats": [_json(s) for s in stats]})

    async def _infer(self, request: web.Request, call: Call) -> web.StreamResponse:
        body = body_of(request)  # read by the gate, within the size limit
        name, version = _model_of(request)
        self._plane.refuse_early(call, name, version)  # parsing the JSON costs much more
        infer_request = JsonInferRequest(
            name,
            version,
            body,
            request.headers.get(HEADER_LENGTH),
            self._config.max_bytes_elements,
            self._config.max_json_bytes,
        )
        if infer_request.request_id:
            current_request_id.set(infer_request.request_id[:MAX_LOGGED_ID])
        response = await self._plane.infer(call, infer_request)
        tenant = call.caller.id
        self._unread.check_answer(tenant, response.nbytes)  # past it: refused unwritten
        answer = await encode_answer(
            response, infer_request.binary_outputs(), self._json_turns.turn(tenant)
        )
        held = Held(self._unread, tenant, answer.size)
        if answer.header_length is None:
            content_type, headers = "application/json", None
        else:
            content_type = "application/octet-stream"
            headers = {HEADER_LENGTH: str(answer.header_length)}
        if answer.size > STREAMED_ABOVE_BYTES:
            return StreamedAnswer(held, answer, content_type, headers)
        return HeldAnswer(held, body=answer.joined(), content_type=content_type, headers=headers)


#: An answer larger than this is written a piece at a time (:class:`StreamedAnswer`).
STREAMED_ABOVE_BYTES = 1 << 20
#: ... in writes of this many bytes, each waiting for the client to take the last.
STREAMED_WRITE_BYTES = 1 << 20


class Held:
    """An inference answer's bytes, counted as its tenant's unread answers from the
    answer's making until aiohttp has written it or failed to (``transport/unread.py``):
    the call has given back its places by then, and aiohttp holds the body until its
    client reads."""

    def __init__(self, unread: UnreadAnswers, tenant: str, size: int) -> None:
        self._unread: UnreadAnswers | None = unread
        self._tenant = tenant
        self._size = size
        unread.take(tenant, size)  # or refused, past the tenant's bound

    def written(self) -> None:
        """The answer is written, or never will be (once; later calls do nothing)."""
        unread, self._unread = self._unread, None
        if unread is not None:
            unread.release(self._tenant, self._size)


class _HeldResponse(web.StreamResponse):
    """A response :class:`Held` until written; :meth:`_write_body` writes what its
    class does not leave to aiohttp."""

    _held: Held

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(request)
        except BaseException:  # the connection is gone: write_eof never comes
            self._held.written()
            raise

    async def write_eof(self, data: bytes = b"") -> None:
        try:
            await self._write_body()
            await super().write_eof(data)
        finally:
            self._held.written()

    async def _write_body(self) -> None:
        return None


class HeldAnswer(_HeldResponse, web.Response):
    """An answer in one body (aiohttp writes it)."""

    def __init__(self, held: Held, **response: Any) -> None:
        super().__init__(**response)
        self._held = held


class StreamedAnswer(_HeldResponse):
    """A large answer written from the pieces it was made of, a piece at a time as its
    client takes them. Joined into one body first, a 288 MB JSON answer was copied
    whole on the event loop, and again into the transport's buffer, while every other
    call waited (0.7 s)."""

    def __init__(
        self, held: Held, answer: AnswerBody, content_type: str, headers: dict[str, str] | None
    ) -> None:
        super().__init__(headers=headers)
        self.content_type = content_type
        self.content_length = answer.size
        self._pieces = answer.pieces
        self._held = held

    async def _write_body(self) -> None:
        pieces, self._pieces = self._pieces, ()
        for piece in pieces:
            view = memoryview(piece)
            for start in range(0, len(view), STREAMED_WRITE_BYTES):
                await self.write(view[start : start + STREAMED_WRITE_BYTES])


def _model_of(request: web.Request) -> tuple[str, str]:
    info = request.match_info
    return info["name"], info.get("version", "")


def _json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's REST JSON: every field, proto names, 64-bit
    integers as numbers."""
    return json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


async def _not_found(request: web.Request) -> web.Response:
    """404, or 405 (with ``Allow``) for a path served with other methods, as Triton;
    a body it waits to be invited to send is never asked for (``expect_later``)."""
    response = error_response(404, "no such endpoint")
    for resource in request.app.router.resources():
        match, allowed = await resource.resolve(request)
        if match is None and allowed and "*" not in allowed:
            methods = ", ".join(sorted(allowed))
            response = error_response(
                405, f"{request.method} is not served here; {methods} is", {"Allow": methods}
            )
            break
    if request.get(EXPECTING):
        response.force_close()
    return response
