"""The KServe v2 raw tensor layout that every side of Mandant reads and writes:
fixed-size datatypes as little-endian row-major bytes, BYTES as each element's
4-byte little-endian length followed by its bytes. Pure numpy; errors are
``ValueError`` with a plain message, for callers to translate at their boundary.

BYTES runs on the event loop, so both directions avoid a Python step per element
where they can: elements of one common length (a batch of ids, hashes, empty
strings) are framed and unframed with strided numpy views; mixed lengths take one
tight loop to split (a length prefix's offset depends on every element before it)
and numpy scatters to join. Callers bound the element count
(``server.max_bytes_elements``); the README has the timings.

Large elements are copied once each way, no more: split from a view of the bytes
they arrived in (a request's body, an IPC frame) straight into each element's own
``bytes``, and written out as pieces (:func:`bytes_pieces`: the element itself after
its prefix) where the writer takes pieces. A copy of a large element is one stretch
of the event loop: each one more held every tenant's calls up (a 48 MiB element took
four copies from REST request to answer).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

_LENGTH = struct.Struct("<I")
_PREFIX = _LENGTH.size
_MAX_LENGTH = 2**32 - 1
#: Elements this long or longer are their own pieces in :func:`bytes_pieces`.
PIECE_BYTES = 64 << 10


def raw_view(array: np.ndarray, dtype: np.dtype[np.generic]) -> memoryview:
    """A fixed-size array's raw layout in ``dtype``: a flat byte view of it where it
    already is contiguous in that type (no copy), else of a converted copy. Empty
    arrays too (a memoryview of one cannot be cast)."""
    contiguous = np.ascontiguousarray(array, dtype=dtype)
    return contiguous.reshape(-1).view(np.uint8).data


def min_bytes_size(count: int) -> int:
    """The fewest bytes ``count`` BYTES elements can take: one length prefix each."""
    return count * _PREFIX


def split_bytes(raw: bytes | memoryview, count: int) -> np.ndarray:
    """``count`` length-prefixed elements as a 1-d object array of ``bytes``."""
    if min_bytes_size(count) > len(raw):  # before allocating: a shape may claim any count
        raise ValueError(
            f"{count} BYTES elements need at least {min_bytes_size(count)} bytes "
            f"of length prefixes, got {len(raw)}"
        )
    if not isinstance(raw, bytes) and len(raw) < count * PIECE_BYTES:
        # small elements: copied whole once, then sliced, is faster than a copy each
        raw = raw.tobytes()
    if count == 0:
        if raw:
            raise ValueError(f"{len(raw)} bytes left after 0 BYTES elements")
        return np.empty(0, dtype=np.object_)
    uniform = _split_uniform(raw, count)
    if uniform is not None:
        return uniform
    out = np.empty(count, dtype=np.object_)
    out[:] = _split_loop(raw, count)
    return out


def _split_uniform(raw: bytes | memoryview, count: int) -> np.ndarray | None:
    """The elements when all ``count`` have the first one's length, else None."""
    (length,) = _LENGTH.unpack_from(raw, 0)
    stride = _PREFIX + length
    if count * stride != len(raw):
        return None
    prefixes = np.ndarray((count,), dtype="<u4", buffer=raw, strides=(stride,))
    if not (prefixes == length).all():
        return None
    if length == 0:
        return np.full(count, b"", dtype=np.object_)
    last = np.ndarray((count,), dtype=np.uint8, buffer=raw, offset=stride - 1, strides=(stride,))
    if last.all():  # numpy's S → bytes drops trailing NULs: exact when none end in one
        fixed = np.ndarray(
            (count,), dtype=f"S{length}", buffer=raw, offset=_PREFIX, strides=(stride,)
        )
        return fixed.astype(np.object_)
    out = np.empty(count, dtype=np.object_)
    out[:] = _own([raw[start : start + length] for start in range(_PREFIX, len(raw), stride)])
    return out


def _split_loop(raw: bytes | memoryview, count: int) -> list[bytes]:
    unpack, offset = _LENGTH.unpack_from, 0
    items: list[Any] = []
    append = items.append
    try:
        for _ in range(count):
            start = offset + _PREFIX
            offset = start + unpack(raw, offset)[0]
            append(raw[start:offset])  # an overrun shows as offset > len(raw) below
    except struct.error:
        offset = -1
    if offset != len(raw):
        _raise_framing_error(raw, count)
    return _own(items)


def _own(items: list[Any]) -> list[bytes]:
    """Slices of ``bytes`` are copies already; slices of a view (large elements only:
    :func:`split_bytes`) are copied into their own ``bytes`` here."""
    if items and not isinstance(items[0], bytes):
        return [item.tobytes() for item in items]
    return items


def _raise_framing_error(raw: bytes | memoryview, count: int) -> None:
    """Walk the elements again, checking each, to say where the framing breaks."""
    offset, end = 0, len(raw)
    for index in range(count):
        if offset + _PREFIX > end:
            raise ValueError(f"BYTES data ends inside element {index}'s length")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _PREFIX
        if offset + length > end:
            raise ValueError(
                f"BYTES element {index} declares {length} bytes, {end - offset} remain"
            )
        offset += length
    raise ValueError(f"{end - offset} bytes left after {count} BYTES elements")


def join_bytes(array: np.ndarray) -> bytes:
    """The elements of an object, bytes or str array, length-prefixed (str as UTF-8)."""
    pieces = bytes_pieces(array)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def bytes_pieces(array: np.ndarray) -> list[bytes]:
    """:func:`join_bytes`'s bytes in pieces whose concatenation they are: an element of
    :data:`PIECE_BYTES` or more is a piece of its own, not copied (its prefix and any
    smaller elements around it are joined), so a large element is copied only where
    the pieces are written; with none that large, one piece."""
    items = array.reshape(-1).tolist()
    if set(map(type, items)) - {bytes}:
        items = [item.encode() if isinstance(item, str) else bytes(item) for item in items]
    count = len(items)
    if count == 0:
        return [b""]
    lengths = np.fromiter(map(len, items), dtype=np.int64, count=count)
    longest = int(lengths.max())
    if longest > _MAX_LENGTH:
        raise ValueError("a BYTES element is longer than 4 GiB - 1")
    if longest < PIECE_BYTES:
        return [_joined(items, lengths)]
    pieces: list[bytes] = []
    start = 0  # the smaller elements between two large ones: joined, the prefix after
    for index in np.flatnonzero(lengths >= PIECE_BYTES).tolist():
        before = _joined(items[start:index], lengths[start:index]) if index > start else b""
        pieces += (before + _LENGTH.pack(len(items[index])), items[index])
        start = index + 1
    if start < count:
        pieces.append(_joined(items[start:], lengths[start:]))
    return pieces


def _joined(items: list[bytes], lengths: np.ndarray) -> bytes:
    count = len(items)
    length = int(lengths[0])
    uniform = bool((lengths == length).all())
    if uniform and length == 0:
        return bytes(min_bytes_size(count))
    if uniform:  # exact: every element fills its fixed-width slot, NULs included
        rows = np.empty((count, _PREFIX + length), dtype=np.uint8)
        rows[:, :_PREFIX] = np.frombuffer(_LENGTH.pack(length), dtype=np.uint8)
        rows[:, _PREFIX:] = np.array(items, dtype=f"S{length}").view(np.uint8).reshape(count, -1)
        return rows.tobytes()
    data = np.frombuffer(b"".join(items), dtype=np.uint8)
    out = np.empty(min_bytes_size(count) + data.size, dtype=np.uint8)
    # Element i's prefix starts after i prefixes and the bytes of elements 0..i-1.
    starts = np.arange(0, min_bytes_size(count), _PREFIX, dtype=np.int64)
    starts[1:] += np.cumsum(lengths[:-1])
    is_data = np.ones(out.size, dtype=np.bool_)
    prefix_bytes = lengths.astype("<u4").view(np.uint8).reshape(count, _PREFIX)
    for byte in range(_PREFIX):
        out[starts + byte] = prefix_bytes[:, byte]
        is_data[starts + byte] = False
    out[is_data] = data
    return out.tobytes()
