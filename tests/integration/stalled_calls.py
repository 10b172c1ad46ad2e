"""gRPC calls that send part of their message and then nothing, as a stalled client's
do: raw HTTP/2 (``h2``) on one connection, since a gRPC client always sends its
messages whole."""

from __future__ import annotations

import select
import socket
import struct
import time

import grpc
import h2.config
import h2.connection
import h2.events

STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class StalledCalls:
    """``calls`` calls of ``path`` on one connection, each declaring a message of
    ``declared`` bytes and sending ``sent`` of them (``key``: its ``authorization``;
    ``source``: the local address to connect from, another loopback address say;
    ``metadata``: more headers, as they are: no gRPC client sends a value that is not
    printable ASCII). Sending all of it (``sent == declared``) makes whole calls (of
    zero bytes: an empty message)."""

    def __init__(
        self,
        port: int,
        path: str,
        key: str | None = None,
        calls: int = 1,
        declared: int = 1 << 20,
        sent: int = 512,
        source: str | None = None,
        metadata: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self._sock = socket.create_connection(
            ("127.0.0.1", port), source_address=(source, 0) if source else None
        )
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, validate_outbound_headers=not metadata)
        )
        self._conn.initiate_connection()
        headers: list[tuple[bytes, bytes]] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        if key is not None:
            headers.append((b"authorization", f"Bearer {key}".encode()))
        headers += metadata
        self._unsent: dict[int, bytes] = {}
        for _ in range(calls):
            stream = self._conn.get_next_available_stream_id()
            self._conn.send_headers(stream, headers)
            self._unsent[stream] = struct.pack(">?I", False, declared) + bytes(sent)
        #: Each call's status once it has one: (the status, its message).
        self.ended: dict[int, tuple[grpc.StatusCode, str]] = {}
        self._flush()

    def statuses(self, timeout_s: float) -> list[tuple[grpc.StatusCode, str]]:
        """Every call's status, waiting at most ``timeout_s`` for them (the calls
        still open then are left out)."""
        end = time.monotonic() + timeout_s
        while len(self.ended) < len(self._unsent) and (left := end - time.monotonic()) > 0:
            self._flush()
            readable, _, _ = select.select([self._sock], [], [], min(left, 0.1))
            if readable:
                data = self._sock.recv(1 << 16)
                if not data:
                    break
                for event in self._conn.receive_data(data):
                    self._note(event)
        return [self.ended[stream] for stream in sorted(self.ended)]

    def close(self) -> None:
        self._sock.close()

    def _note(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            fields = {bytes(k): bytes(v) for k, v in event.headers}
            if b"grpc-status" in fields:
                code = STATUS_CODES.get(int(fields[b"grpc-status"]), grpc.StatusCode.UNKNOWN)
                self.ended[event.stream_id] = (code, fields.get(b"grpc-message", b"").decode())
        elif isinstance(event, h2.events.StreamReset):  # after its status, if any
            self.ended.setdefault(event.stream_id, (grpc.StatusCode.UNKNOWN, "stream reset"))

    def _flush(self) -> None:
        """Send what flow control lets through of what is left to send."""
        for stream, body in self._unsent.items():
            if not body or stream in self.ended:
                continue
            size = min(
                len(body),
                self._conn.local_flow_control_window(stream),
                self._conn.max_outbound_frame_size,
            )
            if size > 0:
                self._conn.send_data(stream, body[:size])
                self._unsent[stream] = body[size:]
        if out := self._conn.data_to_send():
            self._sock.sendall(out)
