"""The tiny model Triton serves in the tests: numpy only, so both the test process and
PyTriton's process (``serve.py``, another virtual environment) import it.

``OUTPUT0 = tanh(INPUT0 @ W + B)`` (FP32 [-1, 3]) and ``OUTPUT1 = sum(INPUT0)`` (FP32
[-1, 1]) for ``INPUT0`` FP32 [-1, 4].
"""

from __future__ import annotations

import numpy as np

NAME = "tiny"
W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 6.0) / 10.0
B = np.array([0.1, -0.2, 0.3], dtype=np.float32)


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    x = x.astype(np.float32)
    return {
        "OUTPUT0": np.tanh(x @ W + B).astype(np.float32),
        "OUTPUT1": x.sum(axis=1, keepdims=True).astype(np.float32),
    }
