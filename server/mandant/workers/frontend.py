"""One gRPC front-end process of ``workers: N``: the composition root of what it runs.

It holds the tenant directory (to authenticate), the gRPC server on the shared port
(SO_REUSEPORT: the kernel spreads connections over the front ends), and its link to
the engine; nothing global. ModelInfer and ModelStreamInfer are served here up to the
engine's answer; every other RPC is forwarded to the engine.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from mandant import __version__
from mandant.config import MandantConfig, config_folder
from mandant.service import DataPlane
from mandant.tenancy.directory import TenantDirectory
from mandant.transport.grpc.forward import Forwarder
from mandant.transport.grpc.server import GrpcServer, certificate_identities
from mandant.transport.tls import (
    CERTIFICATES_KEPT,
    rotated,
    same_tls_shape,
    server_ssl_context,
)
from mandant.workers.engine_link import EngineLink, RemoteObserver
from mandant.workers.sockets import EngineSockets

logger = logging.getLogger(__name__)


class FrontEnd:
    def __init__(self, config: MandantConfig, sockets: EngineSockets, config_path: Path) -> None:
        self.config_path = config_path
        self.config = config = config.resolved(self.base_dir)
        self.directory = TenantDirectory.from_config(config)
        self.link = EngineLink(sockets.requests)
        self.plane = DataPlane(self.directory, None, version=__version__, engine=self.link)
        tls = config.server.tls
        mtls = tls is not None and tls.client_ca is not None
        self.forwarder = Forwarder(
            sockets.control, self.link, certificate_identities if mtls else None
        )
        self.grpc = GrpcServer(
            self.plane,
            config.server,
            observer=RemoteObserver(self.link),
            authenticate_admin=self.directory.authenticate_admin,
            authenticate_certificate=self.directory.authenticate_certificate,
            forward=self.forwarder,
        )
        self.grpc_port = 0

    async def start(self) -> None:
        await self.link.start()
        try:
            self.grpc_port = await self.grpc.start()
        except BaseException:
            await self.link.aclose()
            raise
        self.link.set_accepting(True)

    @property
    def base_dir(self) -> Path:
        """Where the configuration's relative paths resolve, now (``config_folder``)."""
        return config_folder(self.config_path)

    def reload(self, config: MandantConfig) -> list[str]:
        """A new configuration's tenants, keys and certificates (the engine applies
        the rest); returns what changed, in words. As ``App.reload``: a change of TLS's
        shape waits for a restart (:func:`same_tls_shape`: the old settings stay), the
        certificate files are read again all the same (:func:`rotated`), where they can
        be (else the old certificates stay); each is logged as a warning."""
        config = config.resolved(self.base_dir)
        changes = self.directory.replace(config.tenants, config.server.admin_keys)
        self.grpc.tenants_changed()
        new, old = config.server.tls, self.config.server.tls
        if not same_tls_shape(new, old):
            logger.warning(
                "configuration reload: 'server' (tls) changed: applied at the next restart"
            )
        tls = rotated(old, new)
        if tls is not None:
            try:
                server_ssl_context(tls)  # refuses a key that does not match its certificate
                self.grpc.reload_tls(tls)
            except (OSError, ssl.SSLError) as exc:
                logger.warning("configuration reload: %s: %s", CERTIFICATES_KEPT, exc)
        elif old is not None:
            tls = old  # TLS turned off in the file: on until a restart
        server = config.server.model_copy(update={"tls": tls})
        self.config = config.model_copy(update={"server": server})
        return changes

    async def aclose(self, grace_s: float | None = None) -> None:
        """Stop taking calls, finish those in flight (the engine is still up), then
        close the link."""
        grace_s = self.config.server.grace_s if grace_s is None else grace_s
        self.link.set_accepting(False)
        await self.grpc.stop(grace_s)
        await self.forwarder.aclose()
        await self.link.aclose()
