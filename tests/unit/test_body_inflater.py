"""The REST gate inflates a compressed body itself, a step at a time: the event loop
serves others between steps (aiohttp inflated what had come in one go: 60 MiB from
61 KiB in one 80 ms turn, with or without a key)."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import pytest

from mandant.transport.rest.gate import INFLATE_STEP, BodyInflater


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
    turns = 0

    async def other_tenant() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    beside = asyncio.ensure_future(other_tenant())
    try:
        inflater = BodyInflater(encoding)
        out = await inflater.inflate(packed, len(data) + 1)
    finally:
        beside.cancel()
    assert out == data and inflater.ended
    assert turns >= len(data) // INFLATE_STEP - 1  # a turn for the others at each step


async def test_inflating_stops_a_little_past_the_room_it_is_given() -> None:
    packed = gzip.compress(bytes(64 << 20))  # 64 MiB of zeros: 64 KiB of gzip
    inflater = BodyInflater("gzip")
    out = await inflater.inflate(packed, 1 << 20)
    assert (1 << 20) < len(out) <= (1 << 20) + INFLATE_STEP and not inflater.ended
