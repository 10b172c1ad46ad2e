"""The tiny models Triton serves in the tests: numpy only, so both the test process and
PyTriton's process (``serve.py``, another virtual environment) import them.

``tiny``: ``OUTPUT0 = tanh(INPUT0 @ W + B)`` (FP32 [-1, 3]) and ``OUTPUT1 = sum(INPUT0)``
(FP32 [-1, 1]) for ``INPUT0`` FP32 [-1, 4].

``poison``: the same, but it raises (Triton answers INTERNAL) on a batch holding any
negative value: a model failing on one caller's data.

``poison-shared``: ``poison`` behind Triton's own dynamic batcher (it waits up to
``SHARED_DELAY_S`` for more calls): Triton joins calls that Mandant sent one by one, so
one caller's negative value fails every call of Triton's batch.

``queued``: ``tiny`` taking ``QUEUED_SLEEP_S`` per call, one call at a time, with one
place in Triton's queue (``max_queue_size: 1``): Triton refuses the others UNAVAILABLE
"Exceeds maximum queue size".

``slow``: ``tiny`` taking ``SLOW_SLEEP_S`` per call, one call at a time, no batcher and
no queue bound: Triton holds every call sent to it, first come first served.
"""

from __future__ import annotations

import numpy as np

NAME = "tiny"
POISON_NAME = "poison"
SHARED_POISON_NAME = "poison-shared"
SHARED_DELAY_S = 0.2
QUEUED_NAME = "queued"
QUEUED_SLEEP_S = 0.3
SLOW_NAME = "slow"
SLOW_SLEEP_S = 0.1
NAMES = (NAME, POISON_NAME, SHARED_POISON_NAME, QUEUED_NAME, SLOW_NAME)
W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 6.0) / 10.0
B = np.array([0.1, -0.2, 0.3], dtype=np.float32)


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    x = x.astype(np.float32)
    return {
        "OUTPUT0": np.tanh(x @ W + B).astype(np.float32),
        "OUTPUT1": x.sum(axis=1, keepdims=True).astype(np.float32),
    }


def poisoned(x: np.ndarray) -> dict[str, np.ndarray]:
    if (x < 0).any():
        raise ValueError("negative input")
    return expected(x)
