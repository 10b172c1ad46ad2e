"""Host buffers that one model instance reuses from batch to batch to stage its inputs
for the copy to its GPU. No torch here: the buffers come from an injected allocator
(pinned memory from the torch backend, plain numpy arrays in tests).

A copy to a GPU from pageable memory blocks the host; from pinned (page-locked) memory
it runs asynchronously on the instance's CUDA stream, and allocating pinned memory is
slow, so an instance keeps its buffers: by dtype, one for each input it is staging at
once, each grown (to a power of two elements) when a batch needs more and never shrunk
(batches are bounded by ``max_batch_size``).

Reuse is safe only once nothing reads a buffer any more. The lifecycle that ensures it:
the instance (used by one thread at a time) takes views for one batch with
:meth:`StagingBuffers.take`, copies them to the device, and calls
:meth:`StagingBuffers.release` only after synchronising its stream — which ends every
copy from them, whether the forward pass succeeded or raised; the views never leave the
instance (the model sees device tensors, its outputs are copied back into other memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

#: ``allocate(dtype, elements)``: a one-dimensional array of at least ``elements``.
Allocate = Callable[[np.dtype, int], np.ndarray]

#: The smallest buffer allocated, in elements.
_MIN_ELEMENTS = 1024


class StagingBuffers:
    """One instance's staging buffers (see module doc). Not thread-safe: one user."""

    def __init__(self, allocate: Allocate) -> None:
        self._allocate = allocate
        self._free: dict[np.dtype, list[np.ndarray]] = {}
        self._taken: list[tuple[np.dtype, np.ndarray]] = []

    @property
    def held_bytes(self) -> int:
        """Bytes of every buffer kept, free or taken."""
        free = sum(buffer.nbytes for buffers in self._free.values() for buffer in buffers)
        return free + sum(buffer.nbytes for _, buffer in self._taken)

    def take(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A writable C-contiguous array of ``shape``, viewing a buffer that no other view
        taken since the last :meth:`release` uses: the smallest free one that fits, else
        a new one (replacing a free one too small for this batch)."""
        elements = math.prod(shape)
        free = self._free.setdefault(dtype, [])
        fitting = [n for n, buffer in enumerate(free) if buffer.size >= elements]
        if fitting:
            buffer = free.pop(min(fitting, key=lambda n: free[n].size))
        else:
            if free:  # too small for this batch: grow it (the old one is dropped)
                free.pop(max(range(len(free)), key=lambda n: free[n].size))
            buffer = self._allocate(dtype, max(_MIN_ELEMENTS, 1 << (elements - 1).bit_length()))
        self._taken.append((dtype, buffer))
        return buffer[:elements].reshape(shape)

    def release(self) -> None:
        """Every buffer taken is free for the next batch. Call only when no copy from
        them can still be in flight and no view of them is read any more."""
        for dtype, buffer in self._taken:
            self._free[dtype].append(buffer)
        self._taken.clear()
