"""Ports for the servers the tests start (stdlib only: Triton's own venv imports it)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: Where ports are drawn from when Linux's ephemeral range cannot be read.
_EPHEMERAL_DEFAULT = (32768, 60999)
#: The lowest port handed out.
_LOWEST = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT


def free_port() -> int:
    """A port free on 127.0.0.1 now, below the kernel's ephemeral range when there is
    room: a port from that range (a bind to port 0) is also a source port for outgoing
    connections, and a client of another test took one between its check here and the
    server's bind (``Address already in use``, once in a `make test`)."""
    low, _ = _ephemeral_range()
    for _ in range(100) if low - _LOWEST > 1000 else ():
        port = random.randrange(_LOWEST, low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
