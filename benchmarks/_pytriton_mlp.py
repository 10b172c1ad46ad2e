"""Serve an MLP on a real Triton Inference Server through PyTriton: the model half of
``benchmarks/batching.py``'s PyTriton side. Runs under ``.venv-triton``'s interpreter
(PyTriton pins its own numpy and protobuf; no torch there), so the MLP is numpy: the
same weights as Mandant's torch model, exported by the benchmark to an ``.npz`` file
(``W0, b0, W1, b1, …`` as torch's ``nn.Linear`` stores them: ``y = x @ W.T + b``).

    python _pytriton_mlp.py --grpc-port P --http-port Q --metrics-port R \\
        --workspace DIR --weights FILE.npz [--max-queue-delay-us 100]

Model ``mlp``: INPUT0 FP32 [-1, 256] → OUTPUT0 FP32 [-1, 16], ReLU between layers,
``max_batch_size`` 64, Triton's dynamic batcher on, one instance. Prints ``READY``
once bound, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

NAME = "mlp"


def load_layers(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    weights = np.load(path)
    count = len(weights.files) // 2
    return [(np.ascontiguousarray(weights[f"W{i}"].T), weights[f"b{i}"]) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--max-queue-delay-us", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    layers = load_layers(args.weights)
    width_in, width_out = layers[0][0].shape[0], layers[-1][0].shape[1]

    @batch  # type: ignore[untyped-decorator]
    def infer(INPUT0: np.ndarray) -> dict[str, np.ndarray]:
        x = INPUT0.astype(np.float32, copy=False)
        for index, (weight, bias) in enumerate(layers):
            if index:
                np.maximum(x, 0.0, out=x)
            x = x @ weight + bias
        return {"OUTPUT0": x}

    config = TritonConfig(
        grpc_address="127.0.0.1",
        http_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        exit_timeout_secs=1,
    )
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=NAME,
            infer_func=infer,
            inputs=[Tensor(name="INPUT0", dtype=np.float32, shape=(width_in,))],
            outputs=[Tensor(name="OUTPUT0", dtype=np.float32, shape=(width_out,))],
            config=ModelConfig(
                max_batch_size=64,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        print("READY", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
