"""Where a server listens: a TCP port, and the setting that gave its host. A failure to
bind one is an OSError naming the listener, that setting and the address (a resolver's
own message, "Name or service not known", names none of them), whether
:meth:`Listener.check` finds it before the models load or the bind that serves does
(then gRPC's reason is only in its log)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass


def bare(host: str) -> str:
    """``host`` without the brackets of an IPv6 address written as in a URL
    (``[::1]``): ``server.host`` may be written either way."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC targets and URLs write it: an IPv6 address in brackets."""
    host = bare(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Listener:
    """One TCP port a server binds, as its error messages name it."""

    #: "gRPC port", "REST port", "HTTP port", "internal HTTP port".
    name: str
    #: The setting ``host`` came from, e.g. ``server.http_host``.
    host_setting: str
    host: str
    #: 0: a free one.
    port: int

    def bind_error(self, reason: str) -> OSError:
        """The error of a failure to bind this port, for ``reason``."""
        return OSError(
            f"cannot bind the {self.name} ({self.host_setting} {self.host!r}, port "
            f"{self.port}): {reason}"
        )

    def check(self, held: contextlib.ExitStack | None = None) -> None:
        """Raise :meth:`bind_error` where the port cannot be bound now (in use, an
        address not on this machine, a host that does not resolve). A server checks its
        listeners before it loads its models, so that such a start stops at once, not
        after minutes of loading. The sockets are bound as the servers bind theirs
        (SO_REUSEADDR: a port whose last connections wait in TIME_WAIT is free) and
        listen, so that a second bind of the same port fails; they are closed at once,
        or when ``held`` closes (:func:`check_listeners`). The bind that serves may still
        fail (a race), and says so alike."""
        host = bare(self.host) or None  # "": every address
        try:
            addresses = socket.getaddrinfo(
                host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise self.bind_error(exc.strerror or str(exc)) from exc
        with contextlib.ExitStack() as own:
            sockets = own if held is None else held
            # Once each: a name that /etc/hosts lists twice resolves to one address
            # twice, and the second bind would fail on the first's held socket.
            unique = dict.fromkeys((f, k, p, a) for f, k, p, _, a in addresses)
            for family, kind, protocol, address in unique:
                try:
                    sock = socket.socket(family, kind, protocol)
                except OSError:  # a family this kernel lacks (IPv6 off): the servers skip it
                    continue
                sockets.enter_context(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                    sock.listen()
                except OSError as exc:
                    raise self.bind_error(reason_of(exc)) from exc


def check_listeners(listeners: Iterable[Listener]) -> None:
    """:meth:`Listener.check` each of a server's listeners, every socket held until the
    last is bound: two of them on one port of one address under two spellings
    (``127.0.0.1`` and ``localhost``, ``::1`` and ``[::1]``, ``0.0.0.0`` and an
    address of this machine) fail here too, not once the models have loaded."""
    with contextlib.ExitStack() as held:
        for listener in listeners:
            listener.check(held)


def reason_of(exc: OSError) -> str:
    """Why a bind failed, in words: the errno's text (asyncio's own message repeats
    the address); a resolver's error, which has no errno above 0, as it says."""
    errno = exc.errno or 0
    return os.strerror(errno) if errno > 0 else exc.strerror or str(exc)
