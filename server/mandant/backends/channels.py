"""Long-lived gRPC channels to remote inference servers, one per (URL, TLS), shared by
every model that lives there and closed when the last of them lets go.

A channel belongs to the event loop it was made on: :class:`ChannelPool` is made by the
composition root and handed to the backends; they ``acquire`` in ``start()`` and
``release`` in ``aclose()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

#: Keepalive while calls are in flight (Triton's server refuses pings more often than
#: every 5 min on an idle connection, and the health poll keeps it busy anyway): a
#: server that stops answering (its host or the network gone) fails the calls
#: UNAVAILABLE 20 s after a ping, instead of each waiting for its deadline. gRPC waits
#: for a ping's answer as long as ``ping_timeout_ms`` says (a minute by default),
#: whatever the keepalive timeout. Reconnect quickly after the server comes back
#: instead of gRPC's up-to-2-min backoff; no message size limit of our own (Mandant's
#: front end already bounds requests).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.ping_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)


@dataclass(slots=True)
class _Shared:
    channel: grpc.aio.Channel
    users: int


class ChannelPool:
    def __init__(self, options: tuple[tuple[str, int], ...] = CHANNEL_OPTIONS) -> None:
        self._options = options
        self._channels: dict[tuple[str, bool], _Shared] = {}

    def acquire(self, url: str, tls: bool = False) -> grpc.aio.Channel:
        """The channel to ``url`` (made on first use, on the running loop)."""
        shared = self._channels.get((url, tls))
        if shared is None:
            channel = (
                grpc.aio.secure_channel(url, grpc.ssl_channel_credentials(), self._options)
                if tls
                else grpc.aio.insecure_channel(url, self._options)
            )
            shared = self._channels[(url, tls)] = _Shared(channel, 0)
        shared.users += 1
        return shared.channel

    async def release(self, url: str, tls: bool = False) -> None:
        shared = self._channels.get((url, tls))
        if shared is None:
            return
        shared.users -= 1
        if shared.users <= 0:
            del self._channels[(url, tls)]
            await shared.channel.close()

    def __len__(self) -> int:
        return len(self._channels)
