"""Messages on the Unix socket between a front end and the engine (``workers: N``).

One message::

    u32 body length | u32 header length | header | frame | frame | ...

The header is msgpack ``[kind, payload, [frame length, ...]]``; the frames (tensors)
follow untouched. A sender hands the parts to the transport as they are (``writelines``:
one ``writev``, no joining); a reader receives into buffers it hands the transport
(:class:`asyncio.BufferedProtocol`), so a large message's frames are views of the
buffer the kernel wrote them into: a tensor is copied once each way, by the kernel, and
never pickled. A message that arrives whole in the reader's scratch buffer
(:data:`SCRATCH_BYTES`) is copied once more, out of it, since the next read reuses it.

Why not ZeroMQ: measured on the 2-core development machine (both ends on one core),
a pyzmq round trip costs about 35 µs of CPU per side (its I/O threads wake for every
message), a uvloop Unix-socket round trip about 10 µs; and a closed socket tells each
side at once that the other is gone.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

#: A frame: anything with the buffer protocol, one byte per item.
Buffer = bytes | memoryview
#: (body length, header length), before every message.
PREFIX = struct.Struct("<II")
#: Messages larger than half the reader's scratch buffer get a buffer of their own.
SCRATCH_BYTES = 1 << 18
#: A sender gathering one loop turn's calls (or answers) into one message sends it once
#: their frames reach this, and starts another: the length prefix is a u32, and 65
#: calls of 64 MiB in one turn overflowed it (every call of that turn then never
#: answered).
MAX_GATHERED_BYTES = 1 << 30

packb = msgpack.Packer(use_bin_type=True).pack


def unpackb(data: Buffer) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)


def encode(kind: int, payload: object, frames: Sequence[Buffer] = ()) -> list[Buffer]:
    """A message's parts, ready for ``transport.writelines``."""
    lengths = [len(frame) for frame in frames]
    header = packb([kind, payload, lengths])
    return [PREFIX.pack(len(header) + sum(lengths), len(header)), header, *frames]


class Gathered:
    """The frames of the next message a sender gathers over one loop turn, and whether
    it is full (:data:`MAX_GATHERED_BYTES`: then it is sent at once)."""

    __slots__ = ("bytes", "frames")

    def __init__(self) -> None:
        self.frames: list[Buffer] = []
        self.bytes = 0

    def add(self, frames: Sequence[Buffer]) -> bool:
        """Gather ``frames``; whether the message is full now."""
        self.frames.extend(frames)
        self.bytes += sum(map(len, frames))
        return self.bytes >= MAX_GATHERED_BYTES

    def take(self) -> list[Buffer]:
        """The frames gathered, and start again."""
        frames, self.frames, self.bytes = self.frames, [], 0
        return frames


Deliver = Callable[[int, Any, list[memoryview]], None]


class MessageReader:
    """Cuts the byte stream of a :class:`asyncio.BufferedProtocol` into messages and
    calls ``deliver(kind, payload, frames)`` for each, in order."""

    def __init__(self, deliver: Deliver, scratch_bytes: int = SCRATCH_BYTES) -> None:
        self._deliver = deliver
        self._scratch = bytearray(scratch_bytes)
        self._view = memoryview(self._scratch)
        self._start = 0  # unread data is scratch[start:end]
        self._end = 0
        self._large: bytearray | None = None  # the body of one large message, filling
        self._filled = 0
        self._header_bytes = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large is not None:
            return memoryview(self._large)[self._filled :]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._scratch) - self._end < len(self._scratch) // 4:
            unread = self._end - self._start  # move the unread start of a message to the front
            self._scratch[:unread] = self._scratch[self._start : self._end]
            self._start, self._end = 0, unread
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._large is not None:
            self._filled += nbytes
            if self._filled == len(self._large):
                body, self._large = memoryview(self._large), None
                self._body(body, self._header_bytes)
            return
        self._end += nbytes
        self._cut()

    def _cut(self) -> None:
        scratch = self._scratch
        while self._end - self._start >= PREFIX.size:
            body_bytes, header_bytes = PREFIX.unpack_from(scratch, self._start)
            begin = self._start + PREFIX.size
            if self._end - begin >= body_bytes:
                self._start = begin + body_bytes
                # One copy out of the scratch buffer (its frames outlive the next read):
                # bytes() of a bytearray slice copied twice, 27 µs against 2 for 100 kB.
                self._body(memoryview(self._view[begin : self._start].tobytes()), header_bytes)
                continue
            if body_bytes > len(scratch) // 2:  # large: receive the rest in place
                self._large = bytearray(body_bytes)
                self._filled = self._end - begin
                self._large[: self._filled] = scratch[begin : self._end]
                self._header_bytes = header_bytes
                self._start = self._end = 0
            return

    def _body(self, body: memoryview, header_bytes: int) -> None:
        kind, payload, lengths = unpackb(body[:header_bytes])
        frames = []
        offset = header_bytes
        for length in lengths:
            frames.append(body[offset : offset + length])
            offset += length
        self._deliver(kind, payload, frames)
