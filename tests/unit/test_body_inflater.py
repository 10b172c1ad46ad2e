"""The REST gate inflates a compressed body itself, a step at a time: the event loop
serves others between steps (aiohttp inflated what had come in one go: 60 MiB from
61 KiB in one 80 ms turn, with or without a key)."""

from __future__ import annotations

import gzip
import random
import zlib

import pytest

from mandant.transport.rest.gate import INFLATE_STEP, BodyInflater, UnreadableBody
from tests.fakes import with_loop_turns


async def inflated(inflater: BodyInflater, data: bytes) -> bytes:
    """``data`` through ``inflater``, alone."""
    body = bytearray()
    await inflater.inflate(data, body, lambda: None)
    return bytes(body)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),  # zlib's wrapper, as tritonclient sends it
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),  # raw
    ],
)
async def test_a_large_body_is_inflated_with_the_loop_free_between_steps(
    encoding: str, compress: object
) -> None:
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB
    packed = compress(data)  # type: ignore[operator]
    inflater = BodyInflater(encoding)
    out, turns = await with_loop_turns(inflated(inflater, packed))
    assert out == data and inflater.ended
    assert turns >= len(data) // INFLATE_STEP - 1  # a turn for the others at each step


class Refused(Exception):
    pass


async def test_the_body_is_told_each_step_as_it_grows_and_may_stop_it() -> None:
    """``grew`` is called after every step with the body a step longer (the gate counts
    it against the caller's bodies on their way there): it was told once the piece had
    inflated whole, 64 KiB sent to 64 MiB, so sixteen such bodies of one tenant held
    1.3 GB before any was counted. Raising in ``grew`` stops the inflating there."""
    packed = gzip.compress(bytes(64 << 20))  # 64 MiB of zeros: 64 KiB of gzip
    body = bytearray()
    sizes: list[int] = []

    def grew() -> None:
        sizes.append(len(body))
        if len(body) > 1 << 20:
            raise Refused

    inflater = BodyInflater("gzip")
    with pytest.raises(Refused):
        await inflater.inflate(packed, body, grew)
    assert sizes == [INFLATE_STEP * n for n in range(1, len(sizes) + 1)]
    assert (1 << 20) < len(body) <= (1 << 20) + INFLATE_STEP and not inflater.ended


async def _inflate_in_pieces(encoding: str, packed: bytes, pieces: list[int]) -> bytes:
    """``packed`` inflated as it arrives in pieces of these lengths (the rest last);
    AssertionError unless it ended whole."""
    inflater = BodyInflater(encoding)
    out = bytearray()
    for length in [*pieces, len(packed)]:
        piece, packed = packed[:length], packed[length:]
        if piece:
            await inflater.inflate(piece, out, lambda: None)
    assert inflater.ended
    return bytes(out)


@pytest.mark.parametrize(
    "compress",
    [zlib.compress, lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)],
    ids=["zlib's wrapper", "raw"],
)
@pytest.mark.parametrize("first", [1, 2, 3])
async def test_a_deflate_body_is_read_whatever_its_first_piece(
    compress: object, first: int
) -> None:
    """Which deflate it is shows in its first two bytes: a first piece of one byte (a
    slow client, a chunked body) once made a body in zlib's wrapper read as raw: 400."""
    data = b'{"inputs": []}' * 100
    packed = compress(data)  # type: ignore[operator]
    assert await _inflate_in_pieces("deflate", packed, [first]) == data


async def test_a_gzip_body_of_several_members_is_read_whole() -> None:
    """``cat a.gz b.gz`` is gzip (RFC 1952), and gzip's tool takes zeros after the last
    member: the second member was dropped, and the body read cut short."""
    first, second = b'{"inputs": [' * 50, b"]}" * 50
    packed = gzip.compress(first) + gzip.compress(second) + bytes(16)
    for pieces in ([], [len(gzip.compress(first))], [5, 7, 11]):
        assert await _inflate_in_pieces("gzip", packed, pieces) == first + second


@pytest.mark.parametrize(
    ("encoding", "packed"),
    [
        ("gzip", gzip.compress(b"body", mtime=0) + b"not gzip"),
        ("deflate", zlib.compress(b"body") + b"more"),
    ],
)
async def test_data_after_the_end_of_a_compressed_body_is_refused(
    encoding: str, packed: bytes
) -> None:
    """It was dropped silently."""
    with pytest.raises(zlib.error):
        await inflated(BodyInflater(encoding), packed)


async def test_a_body_of_many_members_is_read_while_they_carry_their_bytes() -> None:
    """BGZF (bgzip) writes a member per 64 KiB and an empty one at the end: read whole.
    Members with next to nothing in them (20-byte empty ones: a new inflater each, 9 µs
    of the loop's time for 20 bytes sent) are refused past one per MEMBER_BYTES."""
    blocks = [random.Random(i).randbytes(2048) for i in range(200)]
    packed = b"".join(gzip.compress(block) for block in blocks) + gzip.compress(b"")
    assert await _inflate_in_pieces("gzip", packed, [4096] * 120) == b"".join(blocks)
    # Compressible data: 64 KiB of zeros is some 100 bytes a member, its inflated size
    # explains it (a 4 MiB tensor of zeros, bgzipped, was refused).
    zeros = b"".join(gzip.compress(bytes(65280)) for _ in range(66)) + gzip.compress(b"")
    assert await _inflate_in_pieces("gzip", zeros, [4096]) == bytes(65280 * 66)
    with pytest.raises(UnreadableBody, match="more gzip members than its size explains"):
        await inflated(BodyInflater("gzip"), gzip.compress(b"") * 100)
