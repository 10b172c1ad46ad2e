"""An instance's staging buffers: reused across batches, grown when a batch needs
more, never handed out twice between releases. Plain numpy memory stands in for
pinned memory (the pool takes its allocator)."""

from __future__ import annotations

import numpy as np
import pytest

from mandant.backends.staging import StagingBuffers

FP32 = np.dtype(np.float32)
INT64 = np.dtype(np.int64)


class CountingAllocator:
    def __init__(self) -> None:
        self.calls: list[tuple[np.dtype, int]] = []

    def __call__(self, dtype: np.dtype, elements: int) -> np.ndarray:
        self.calls.append((dtype, elements))
        return np.empty(elements, dtype)


def test_a_buffer_is_reused_from_batch_to_batch() -> None:
    allocate = CountingAllocator()
    staging = StagingBuffers(allocate)
    first = staging.take(FP32, (16, 256))
    staging.release()
    second = staging.take(FP32, (8, 256))
    assert second.ctypes.data == first.ctypes.data
    assert second.shape == (8, 256) and second.dtype == FP32
    assert second.flags.c_contiguous and second.flags.writeable
    assert len(allocate.calls) == 1


def test_buffers_taken_before_a_release_never_overlap() -> None:
    allocate = CountingAllocator()
    staging = StagingBuffers(allocate)
    a = staging.take(FP32, (4, 4))
    b = staging.take(FP32, (4, 4))
    c = staging.take(INT64, (4,))
    assert not np.shares_memory(a, b)
    assert c.dtype == INT64
    assert len(allocate.calls) == 3
    staging.release()
    again = [staging.take(FP32, (4, 4)), staging.take(FP32, (4, 4)), staging.take(INT64, (2,))]
    assert {x.ctypes.data for x in again} == {a.ctypes.data, b.ctypes.data, c.ctypes.data}
    assert len(allocate.calls) == 3


def test_a_batch_larger_than_the_buffer_grows_it_to_a_power_of_two() -> None:
    allocate = CountingAllocator()
    staging = StagingBuffers(allocate)
    staging.take(FP32, (4, 256))
    staging.release()
    held = staging.held_bytes
    big = staging.take(FP32, (65, 256))  # 16,640 elements: 32,768 allocated
    assert allocate.calls == [(FP32, 1024), (FP32, 32768)]
    staging.release()
    assert staging.held_bytes == 32768 * 4 > held  # the small one was dropped
    assert staging.take(FP32, (3, 256)).ctypes.data == big.ctypes.data


def test_the_smallest_fitting_free_buffer_serves_a_batch() -> None:
    staging = StagingBuffers(CountingAllocator())
    large = staging.take(FP32, (5000,))
    small = staging.take(FP32, (10,))
    staging.release()
    assert staging.take(FP32, (10,)).ctypes.data == small.ctypes.data
    assert staging.take(FP32, (10,)).ctypes.data == large.ctypes.data


@pytest.mark.parametrize("shape", [(), (0, 3), (2, 0)])
def test_scalar_and_empty_shapes(shape: tuple[int, ...]) -> None:
    staging = StagingBuffers(CountingAllocator())
    view = staging.take(FP32, shape)
    assert view.shape == shape
