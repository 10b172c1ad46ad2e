"""Serve the tiny test model on a real Triton Inference Server through PyTriton.

Run with the interpreter of ``.venv-triton`` (PyTriton pins its own numpy and
protobuf): ``python serve.py --grpc-port P --http-port Q --metrics-port R``. Prints
``READY`` once Triton serves the model, then serves until SIGTERM/SIGINT.

The models are ``tiny.py``'s, so a test can compute the expected result with numpy alone:
``tiny`` (max batch 64, Triton's dynamic batcher on) and ``poison`` (max batch 64, no
dynamic batcher: each request runs alone, so its failure is its own), ``poison-shared``
(``poison`` behind Triton's dynamic batcher), ``queued`` (slow, one place in Triton's
queue) and ``slow`` (slow, no batcher, no queue bound).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
from pytriton.triton import Triton, TritonConfig
from tiny import (  # this script's folder is on sys.path
    NAME,
    POISON_NAME,
    QUEUED_NAME,
    QUEUED_SLEEP_S,
    SHARED_DELAY_S,
    SHARED_POISON_NAME,
    SLOW_NAME,
    SLOW_SLEEP_S,
    expected,
    poisoned,
)


@batch
def infer(INPUT0: np.ndarray) -> dict[str, np.ndarray]:
    return expected(INPUT0)


@batch
def infer_poison(INPUT0: np.ndarray) -> dict[str, np.ndarray]:
    return poisoned(INPUT0)


@batch
def infer_queued(INPUT0: np.ndarray) -> dict[str, np.ndarray]:
    time.sleep(QUEUED_SLEEP_S)
    return expected(INPUT0)


@batch
def infer_slow(INPUT0: np.ndarray) -> dict[str, np.ndarray]:
    time.sleep(SLOW_SLEEP_S)
    return expected(INPUT0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--workspace", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = TritonConfig(
        grpc_address="127.0.0.1",
        http_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        exit_timeout_secs=1,
    )
    inputs = [Tensor(name="INPUT0", dtype=np.float32, shape=(4,))]
    outputs = [
        Tensor(name="OUTPUT0", dtype=np.float32, shape=(3,)),
        Tensor(name="OUTPUT1", dtype=np.float32, shape=(1,)),
    ]
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=NAME,
            infer_func=[infer] * args.instances,
            inputs=inputs,
            outputs=outputs,
            config=ModelConfig(
                max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=100)
            ),
            strict=True,
        )
        triton.bind(
            model_name=POISON_NAME,
            infer_func=infer_poison,
            inputs=inputs,
            outputs=outputs,
            config=ModelConfig(max_batch_size=64, batcher=None),  # type: ignore[arg-type]
            strict=True,
        )
        delay_us = int(SHARED_DELAY_S * 1e6)
        triton.bind(
            model_name=SHARED_POISON_NAME,
            infer_func=infer_poison,
            inputs=inputs,
            outputs=outputs,
            config=ModelConfig(
                max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=delay_us)
            ),
            strict=True,
        )
        queue = QueuePolicy(max_queue_size=1)
        triton.bind(
            model_name=QUEUED_NAME,
            infer_func=infer_queued,
            inputs=inputs,
            outputs=outputs,
            config=ModelConfig(
                max_batch_size=1,
                batcher=DynamicBatcher(max_queue_delay_microseconds=0, default_queue_policy=queue),
            ),
            strict=True,
        )
        triton.bind(
            model_name=SLOW_NAME,
            infer_func=infer_slow,
            inputs=inputs,
            outputs=outputs,
            config=ModelConfig(max_batch_size=64, batcher=None),  # type: ignore[arg-type]
            strict=True,
        )
        print("READY", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
