"""Triton's model repository extension on the REST port, as gRPC's RepositoryIndex,
RepositoryModelLoad and RepositoryModelUnload:

* ``POST /v2/repository/index`` (tenant key): the models the tenant sees, each with
  ``name``, ``version``, ``state`` (READY or UNAVAILABLE) and ``reason``; a body
  ``{"ready": true}`` lists ready ones only.
* ``POST /v2/repository/models/{name}/load`` (admin key): (re)load from the
  configuration file, or from ``{"parameters": {"config": "<JSON model entry>"}}``.
* ``POST /v2/repository/models/{name}/unload`` (admin key): stop routing the model,
  let its calls finish, free it (``unload_dependents`` has nothing to act on).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from mandant.errors import InvalidInput
from mandant.service import DataPlane
from mandant.transport.rest.gate import Access, RestGate, body_of
from mandant.types import Call


def add_repository_routes(routes: web.UrlDispatcher, gate: RestGate, plane: DataPlane) -> None:
    async def index(request: web.Request, call: Call) -> web.Response:
        ready_only = bool((await _body(request)).get("ready", False))
        return web.json_response(
            [
                {"name": m.key.name, "version": m.key.version, "state": m.state,
                 "reason": m.reason}
                for m in plane.repository_index(call.caller)
                if m.ready or not ready_only
            ]
        )  # fmt: skip

    async def load(request: web.Request, call: Call) -> web.Response:
        parameters = (await _body(request)).get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput("'parameters' is a JSON object")
        await plane.load_model(request.match_info["name"], parameters)
        return web.Response()

    async def unload(request: web.Request, call: Call) -> web.Response:
        await _body(request)
        await plane.unload_model(request.match_info["name"])
        return web.Response()

    routes.add_post("/v2/repository/index", gate.route(Access.TENANT, index))
    model = "/v2/repository/models/{name}"
    routes.add_post(f"{model}/load", gate.route(Access.ADMIN, load))
    routes.add_post(f"{model}/unload", gate.route(Access.ADMIN, unload))


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object ({} for an empty body); InvalidInput otherwise."""
    raw = body_of(request)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, or nested too deeply
        raise InvalidInput("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput("the request body is a JSON object")
    return body
