"""What BYTES framing costs on the event loop, in ms: ``mandant.wire.split_bytes`` /
``join_bytes`` against the per-element loop they replaced, and typed ``contents``
conversion, for 10⁵ and 10⁶ elements (best of ``--repeat`` runs, one process, so the
rows of one run compare).

    .venv/bin/python -m benchmarks.bytes_codec [--repeat 5]
"""

from __future__ import annotations

import argparse
import struct
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from mandant.wire import join_bytes, split_bytes
from mandant_client._proto import grpc_service_pb2 as pb

_LENGTH = struct.Struct("<I")


def split_per_element(raw: bytes, count: int) -> np.ndarray:
    """The loop ``split_bytes`` replaced: one unpack, check and slice per element."""
    out = np.empty(count, dtype=np.object_)
    view, offset = memoryview(raw), 0
    for index in range(count):
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        out[index] = bytes(view[offset : offset + length])
        offset += length
    return out


def join_per_element(array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts += (_LENGTH.pack(len(data)), data)
    return b"".join(parts)


def objects_via_list(values: Sequence[bytes]) -> np.ndarray:
    """How typed BYTES contents were converted before: a list, then one assignment."""
    out = np.empty(len(values), dtype=np.object_)
    out[:] = list(values)
    return out


SPLITS = (split_per_element, split_bytes)
JOINS = (join_per_element, join_bytes)


def best_ms(call: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def elements(count: int, kind: str) -> list[bytes]:
    if kind == "empty":
        return [b""] * count
    if kind == "16 B each":
        return [b"0123456789abcdef"] * count
    lengths = np.random.default_rng(0).integers(0, 32, count)
    return [bytes(int(n)) for n in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print("| elements | kind | split: loop → now | join: loop → now |")
    print("| ---: | --- | ---: | ---: |")
    for count in (10**5, 10**6):
        for kind in ("empty", "16 B each", "mixed 0-31 B"):
            items = elements(count, kind)
            array = np.empty(count, dtype=np.object_)
            array[:] = items
            raw = join_per_element(array)
            assert join_bytes(array) == raw and split_bytes(raw, count).tolist() == items
            split = [best_ms(partial(f, raw, count), args.repeat) for f in SPLITS]
            join = [best_ms(partial(f, array), args.repeat) for f in JOINS]
            print(
                f"| {count:,} | {kind} | {split[0]:.1f} → {split[1]:.1f} "
                f"| {join[0]:.1f} → {join[1]:.1f} |"
            )
    print()
    print("| elements | typed contents | list → one numpy call |")
    print("| ---: | --- | ---: |")
    for count in (10**5, 10**6):
        contents = pb.InferTensorContents(bytes_contents=[b"abcd"] * count)
        values = contents.bytes_contents

        before = best_ms(partial(objects_via_list, values), args.repeat)
        now = best_ms(partial(np.array, values, dtype=np.object_), args.repeat)
        print(f"| {count:,} | BYTES | {before:.1f} → {now:.1f} |")
        contents.fp32_contents.extend(np.arange(count, dtype=np.float32).tolist())
        fp32 = partial(np.array, contents.fp32_contents, dtype=np.float32)
        print(f"| {count:,} | FP32 | {best_ms(fp32, args.repeat):.2f} (one call already) |")


if __name__ == "__main__":
    main()
