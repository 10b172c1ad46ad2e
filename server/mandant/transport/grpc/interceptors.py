"""The one interceptor every RPC passes: it authenticates the caller of protected
methods before the servicer runs, and maps every exception to a status code through
``status.py``'s table. Unknown exceptions become INTERNAL with a generic message and
a request id that is logged with the traceback."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc

from mandant.context import current_model, current_request_id, current_tenant
from mandant.errors import MandantError, Unauthenticated
from mandant.events import NullObserver, Observer
from mandant.transport.grpc.status import INTERNAL_MESSAGE, status_for, trailers_for
from mandant.types import Tenant

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = "inference.GRPCInferenceService"
#: Probes: open without a key, like Triton's.
OPEN_METHODS = frozenset(
    f"/{INFERENCE_SERVICE}/{name}" for name in ("ServerLive", "ServerReady", "ServerMetadata")
)

ADMIN_SERVICE = "mandant.admin.v1.AdminService"

Authenticator = Callable[[str | None], Tenant]
AdminAuthenticator = Callable[[str | None], None]
Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


class GatewayInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        authenticate: Authenticator,
        protected_prefix: str = f"/{INFERENCE_SERVICE}/",
        open_methods: Collection[str] = OPEN_METHODS,
        observer: Observer | None = None,
        authenticate_admin: AdminAuthenticator | None = None,
        admin_prefix: str = f"/{ADMIN_SERVICE}/",
    ) -> None:
        self._authenticate = authenticate
        self._authenticate_admin = authenticate_admin or _no_admins
        self._admin_prefix = admin_prefix
        self._observer: Observer = observer or NullObserver()
        self._protected_prefix = protected_prefix
        self._open_methods = open_methods
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        protected = method.startswith(self._protected_prefix) and method not in self._open_methods
        admin = method.startswith(self._admin_prefix)
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._guard(handler.unary_unary, protected, admin, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _guard(self, behavior: Behavior, protected: bool, admin: bool, method: str) -> Behavior:
        authenticate = self._authenticate
        authenticate_admin = self._authenticate_admin
        observer = self._observer

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # Every answer is reported once: tenant and model are configured names
            # ("" when unknown), code the status name, duration from the first byte.
            start = time.perf_counter()
            code = "OK"
            tenant_id = ""
            current_model.set("")
            try:
                if protected:
                    caller = authenticate(_authorization(context))
                    current_tenant.set(caller)
                    tenant_id = caller.id
                elif admin:
                    authenticate_admin(_authorization(context))
                current_request_id.set(getattr(request, "id", ""))
                return await behavior(request, context)
            except MandantError as exc:
                code = status_for(exc).name
                trailers = trailers_for(exc)
                if trailers:
                    context.set_trailing_metadata(trailers)
                await context.abort(status_for(exc), str(exc))
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception:
                code = "INTERNAL"
                request_id = current_request_id.get() or uuid.uuid4().hex[:16]
                logger.exception(
                    "internal error serving %s (request id %s, tenant %s)",
                    method,
                    request_id,
                    tenant_id or "-",
                )
                await context.abort(
                    grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE.format(request_id=request_id)
                )
            finally:
                observer.request_finished(
                    tenant_id, current_model.get(), code, time.perf_counter() - start
                )

        return guarded


def _aborted_code(context: grpc.aio.ServicerContext) -> str:
    """The status a servicer aborted with (UNKNOWN where grpc does not say)."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _no_admins(authorization: str | None) -> None:
    raise Unauthenticated("missing or invalid admin key")
