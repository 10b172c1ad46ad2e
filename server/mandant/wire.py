"""The KServe v2 raw tensor layout that every side of Mandant reads and writes:
fixed-size datatypes as little-endian row-major bytes, BYTES as each element's
4-byte little-endian length followed by its bytes. Pure numpy; errors are
``ValueError`` with a plain message, for callers to translate at their boundary."""

from __future__ import annotations

import struct

import numpy as np

_LENGTH = struct.Struct("<I")


def min_bytes_size(count: int) -> int:
    """The fewest bytes ``count`` BYTES elements can take: one length prefix each."""
    return count * _LENGTH.size


def split_bytes(raw: bytes, count: int) -> np.ndarray:
    """``count`` length-prefixed elements as a 1-d object array of ``bytes``."""
    if min_bytes_size(count) > len(raw):  # before allocating: a shape may claim any count
        raise ValueError(
            f"{count} BYTES elements need at least {min_bytes_size(count)} bytes "
            f"of length prefixes, got {len(raw)}"
        )
    out = np.empty(count, dtype=np.object_)
    view = memoryview(raw)
    offset, end = 0, len(raw)
    for index in range(count):
        if offset + 4 > end:
            raise ValueError(f"BYTES data ends inside element {index}'s length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise ValueError(
                f"BYTES element {index} declares {length} bytes, {end - offset} remain"
            )
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != end:
        raise ValueError(f"{end - offset} bytes left after {count} BYTES elements")
    return out


def join_bytes(array: np.ndarray) -> bytes:
    """The elements of an object, bytes or str array, length-prefixed (str as UTF-8)."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)
