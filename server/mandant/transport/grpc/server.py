"""The grpc.aio server: inference service, health checking, reflection, TLS,
message-size limits, graceful stop."""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from mandant.config import ServerConfig
from mandant.events import Observer
from mandant.observability.usage import UsageReports
from mandant.service import DataPlane
from mandant.transport.grpc.admin import AdminServicer
from mandant.transport.grpc.interceptors import (
    ADMIN_SERVICE,
    INFERENCE_SERVICE,
    AdminAuthenticator,
    GatewayInterceptor,
)
from mandant.transport.grpc.servicer import InferenceServicer
from mandant_client._proto import admin_pb2, admin_pb2_grpc
from mandant_client._proto import grpc_service_pb2 as pb
from mandant_client._proto import grpc_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: How often gRPC health re-reads the server's readiness.
HEALTH_POLL_S = 0.5


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """One pool holding every service we serve, for the reflection service (ours live
    in a private pool, the health and reflection protos in the default one)."""
    pool = descriptor_pool.DescriptorPool()
    for file in (
        pb.DESCRIPTOR,
        admin_pb2.DESCRIPTOR,
        health_pb2.DESCRIPTOR,
        reflection_pb2.DESCRIPTOR,
    ):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    return pool


class GrpcServer:
    def __init__(
        self,
        plane: DataPlane,
        config: ServerConfig,
        observer: Observer | None = None,
        usage: UsageReports | None = None,
        authenticate_admin: AdminAuthenticator | None = None,
    ) -> None:
        """``usage``: serve ``mandant.admin.v1.AdminService`` from these reports, to the
        callers ``authenticate_admin`` accepts (the tenant directory's admin keys;
        None: nobody); without ``usage`` the admin service is not served."""
        self._plane = plane
        self._config = config
        self._health = health.aio.HealthServicer()
        self._health_watch: asyncio.Task[None] | None = None
        self._server = grpc.aio.server(
            interceptors=[
                GatewayInterceptor(
                    plane.authenticate,
                    observer=observer,
                    authenticate_admin=authenticate_admin,
                )
            ],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
                *(
                    [("grpc.max_concurrent_streams", config.max_concurrent_streams)]
                    if config.max_concurrent_streams
                    else []
                ),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(plane), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        services = [INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME]
        if usage is not None:
            admin_pb2_grpc.add_AdminServiceServicer_to_server(  # type: ignore[no-untyped-call]
                AdminServicer(usage), self._server
            )
            services.append(ADMIN_SERVICE)
        reflection.enable_server_reflection(
            services,
            self._server,
            pool=_reflection_pool(),
        )
        self.port = 0

    async def start(self) -> int:
        """Bind and start; returns the bound port (useful with port 0)."""
        address = f"{self._config.host}:{self._config.grpc_port}"
        tls = self._config.tls
        if tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key.read_bytes(), tls.cert.read_bytes())]
            )
            self.port = self._server.add_secure_port(address, credentials)
        await self._server.start()
        await self._set_health(self._ready())
        self._health_watch = asyncio.create_task(self._follow_readiness(), name="grpc-health")
        return self.port

    async def _set_health(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", INFERENCE_SERVICE):
            await self._health.set(service, status)

    def _ready(self) -> bool:
        """The data plane's readiness; a check that raises counts as not ready."""
        try:
            return self._plane.ready
        except Exception:
            logger.exception("readiness check failed; reporting NOT_SERVING")
            return False

    async def _follow_readiness(self) -> None:
        """gRPC health says what ``/readyz`` and ServerReady say: the data plane's
        readiness, polled every :data:`HEALTH_POLL_S` (and set at once on drain)."""
        ready = self._ready()
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            now = self._ready()
            if now != ready:
                ready = now
                logger.warning("server %s", "ready" if ready else "not ready")
                await self._set_health(ready)

    async def stop(self, grace_s: float) -> None:
        """Stop taking calls, let those in flight finish within ``grace_s``."""
        self._plane.drain()
        watch, self._health_watch = self._health_watch, None
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)

    async def wait(self) -> None:
        await self._server.wait_for_termination()
