"""Where a server listens: a TCP port, and the setting that gave its host. A failure to
bind one is an OSError naming the listener, that setting and the address (a resolver's
own message, "Name or service not known", names none of them), the same whether
:meth:`Listener.check` finds it before the models load or the bind that serves does."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Listener:
    #: "gRPC port", "REST port", "HTTP port", "internal HTTP port".
    name: str
    #: The setting ``host`` came from, e.g. ``server.http_host``.
    host_setting: str
    host: str
    #: 0: a free one.
    port: int

    def bind_error(self, reason: str) -> OSError:
        return OSError(
            f"cannot bind the {self.name} ({self.host_setting} {self.host!r}, port "
            f"{self.port}): {reason}"
        )

    def check(self) -> None:
        """Raise :meth:`bind_error` where the port cannot be bound now (in use, an
        address not on this machine, a host that does not resolve). A server checks its
        listeners before it loads its models, so that such a start stops at once, not
        after minutes of loading. The sockets are bound as the servers bind theirs
        (SO_REUSEADDR: a port whose last connections wait in TIME_WAIT is free) and
        closed at once; the bind that serves may still fail (a race), and says so alike."""
        try:
            addresses = socket.getaddrinfo(  # gRPC's form of an IPv6 address: [::1]
                self.host.strip("[]"), self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise self.bind_error(exc.strerror or str(exc)) from None
        for family, kind, protocol, _, address in addresses:
            with socket.socket(family, kind, protocol) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    reason = os.strerror(exc.errno) if exc.errno else str(exc)
                    raise self.bind_error(reason) from None
