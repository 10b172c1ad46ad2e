"""Triton's model repository extension on the REST port, as gRPC's RepositoryIndex,
RepositoryModelLoad and RepositoryModelUnload:

* ``POST /v2/repository/index`` (tenant key): the models the tenant sees, each with
  ``name``, ``version``, ``state`` (READY or UNAVAILABLE) and ``reason``; a body
  ``{"ready": true}`` lists ready ones only.
* ``POST /v2/repository/models/{name}/load`` (admin key): (re)load from the
  configuration file, or from ``{"parameters": {"config": "<JSON model entry>"}}``.
* ``POST /v2/repository/models/{name}/unload`` (admin key): stop routing the model,
  let its calls finish, free it (``unload_dependents`` has nothing to act on).

Their bodies are parsed whole on the event loop, so each route takes a body no larger
than it needs (:data:`MAX_BODY_BYTES`, :data:`MAX_LOAD_BODY_BYTES`; 413 beyond, as the
gate bounds every body): a tenant's 60 MiB index body of tiny JSON values stalled every
tenant's calls for 5 s and grew the server by 1.5 GiB.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mandant.errors import InvalidInput
from mandant.heap import loads_untrusted
from mandant.service import MAX_LOAD_CONFIG_CHARS, DataPlane
from mandant.transport.rest.gate import Access, RestGate, body_of, expect_later
from mandant.types import Call

#: Largest body of the index and unload routes (Triton's are a flag or two): 64 KiB of
#: the slowest JSON to parse (``{},`` repeated) takes 3-6 ms on the event loop (one
#: core of the dev machine); the load route's bound, about 50 ms (admin keys only).
MAX_BODY_BYTES = 64 << 10
#: Largest body of a load: its ``config`` parameter, ``MAX_LOAD_CONFIG_CHARS``
#: characters of at most 12 bytes each once JSON-escaped (a character beyond the BMP
#: is two ``\uXXXX`` escapes), and room for the rest of the body: 832 KiB.
MAX_LOAD_BODY_BYTES = 12 * MAX_LOAD_CONFIG_CHARS + MAX_BODY_BYTES


def add_repository_routes(routes: web.UrlDispatcher, gate: RestGate, plane: DataPlane) -> None:
    async def index(request: web.Request, call: Call) -> web.Response:
        ready_only = (await _body(request)).get("ready", False)
        if not isinstance(ready_only, bool):  # "false" is true to Python: Triton refuses it
            raise InvalidInput("'ready' is a JSON boolean")
        return web.json_response(
            [
                {"name": m.key.name, "version": m.key.version, "state": m.state,
                 "reason": m.reason}
                for m in plane.repository_index(call.caller)
                if m.ready or not ready_only
            ]
        )  # fmt: skip

    async def load(request: web.Request, call: Call) -> web.Response:
        parameters = (await _body(request)).get("parameters")
        if parameters is None:
            parameters = {}
        elif not isinstance(parameters, dict):  # [] or "" was taken for no parameters
            raise InvalidInput("'parameters' is a JSON object")
        await plane.load_model(request.match_info["name"], parameters)
        return web.Response()

    async def unload(request: web.Request, call: Call) -> web.Response:
        await _body(request)
        await plane.unload_model(request.match_info["name"])
        return web.Response()

    model = "/v2/repository/models/{name}"
    for path, access, behavior, max_body in (
        ("/v2/repository/index", Access.TENANT, index, MAX_BODY_BYTES),
        (f"{model}/load", Access.ADMIN, load, MAX_LOAD_BODY_BYTES),
        (f"{model}/unload", Access.ADMIN, unload, MAX_BODY_BYTES),
    ):
        routes.add_post(
            path, gate.route(access, behavior, max_body=max_body), expect_handler=expect_later
        )


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object ({} for an empty body); InvalidInput otherwise."""
    raw = body_of(request).tobytes()  # within the route's small max_body
    if not raw.strip():
        return {}
    try:
        body = loads_untrusted(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, or nested too deeply
        raise InvalidInput("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput("the request body is a JSON object")
    return body
