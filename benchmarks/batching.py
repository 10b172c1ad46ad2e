"""Batching on vs off, side by side with PyTriton: one-row calls to an MLP
256→1024→1024→16 (seed 0) served by Mandant with its dynamic batcher (the default
dispatch) and without it, and the same weights served by PyTriton (Triton's C++ front
end, a Python model, Triton's dynamic batcher), all driven by ``tritonclient.grpc.aio``
at concurrency 1, 16 and 64, in one run.

    .venv/bin/python -m benchmarks.batching [--seconds 5] [--concurrency 1 16 64]
        [--hidden 1024] [--triton-delay-us 100] [--no-triton] [--compute-nice 5]
        [--rounds 3]

Each server runs alone on core 0 (``taskset``: Mandant with one torch thread; Triton,
its Python-backend stub and the numpy model with one BLAS thread); the load generator
is a process of its own on core 1. Mean batch: rows per model execution over each
point (warm-up included), from Mandant's ``mandant_batch_size`` histogram on
``/metrics`` (read with the admin key) and from Triton's statistics API
(``inference_count / execution_count``). PyTriton needs ``.venv-triton``
(``make triton-venv``). ``--compute-nice`` sets Mandant's ``server.compute_nice`` (how
much lower than its event loop the model's thread runs; 0 is how Mandant ran before
the setting existed).

Both servers stay up for the whole run and the points are measured in turn, at each
concurrency Mandant on, Mandant off, PyTriton; ``--rounds N`` measures them all N
times over, and each ratio is then judged on its median over the rounds, with its
range (on this VM one point moves by ±10% from one minute to the next, PyTriton's as
much as Mandant's).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from benchmarks._load import (
    SERVER_CPU,
    THREAD_ENV,
    Load,
    Result,
    classifier,
    demo_data,
    prime,
    run,
    run_pinned,
    table,
)
from benchmarks._server import mandant_process, write_config
from benchmarks._triton import MLP_NAME, triton_mlp

ON, OFF, TRITON = "Mandant, batching on", "Mandant, batching off", "PyTriton (dynamic batcher)"
#: Targets at concurrency 64 (issue 10).
TARGET_ON_OFF, TARGET_MEAN_BATCH, TARGET_VS_TRITON = 1.4, 8.0, 1.2
T = TypeVar("T")


@dataclass
class Point:
    server: str
    result: Result
    mean_batch: float


@dataclass
class Target:
    """A served model the points are measured on: its address, name and batch totals."""

    url: str
    model: str
    batch_totals: Callable[[], tuple[float, float]]


def measure(
    target: str,
    model: str,
    server: str,
    concurrency: int,
    args: argparse.Namespace,
    batch_totals: Callable[[], tuple[float, float]],
) -> Point:
    rows_before, batches_before = batch_totals()
    load = Load("acme", model, concurrency, client="tritonclient")
    [result] = run(target, [load], args.seconds, args.warmup)
    rows_after, batches_after = batch_totals()
    batches = batches_after - batches_before
    return Point(server, result, (rows_after - rows_before) / batches if batches else float("nan"))


def warm(target: str, model: str, concurrency: int) -> None:
    """Unmeasured load at the highest concurrency first: the first batches of each size
    (buffers, allocations, PyTriton's shared memory) stay out of every point."""
    prime(target, model)
    run(target, [Load("acme", model, concurrency, client="tritonclient")], 2.0, 0.0)


@contextlib.contextmanager
def servers(args: argparse.Namespace) -> Iterator[tuple[dict[str, Target], str]]:
    """Mandant (the MLP with and without batching) and, unless ``--no-triton``,
    PyTriton, all up and warm: the targets by label, and why PyTriton is missing."""
    data = demo_data(
        [
            classifier(MLP_NAME, hidden=args.hidden),
            classifier(f"{MLP_NAME}-off", hidden=args.hidden, batching=None),
        ]
    )
    if args.compute_nice is not None:
        data["server"] = {**data["server"], "compute_nice": args.compute_nice}
    with contextlib.ExitStack() as stack:
        served = stack.enter_context(mandant_process(write_config(data), SERVER_CPU, THREAD_ENV))
        targets = {
            label: Target(served.target, model, functools.partial(served.batch_totals, model))
            for label, model in ((ON, MLP_NAME), (OFF, f"{MLP_NAME}-off"))
        }
        missing = ""
        if not args.no_triton:
            from mandant.demo.models import classifier as build

            weights = build(seed=0, hidden=args.hidden).state_dict()
            state = {name: value.numpy() for name, value in weights.items()}
            try:
                triton = stack.enter_context(
                    triton_mlp(state, SERVER_CPU, args.triton_delay_us, THREAD_ENV)
                )
            except RuntimeError as exc:  # Triton would not start: say so under the table
                missing = f"\nPyTriton: error: {exc}"
            else:
                targets[TRITON] = Target(triton.url, MLP_NAME, triton.batch_totals)
        for target in targets.values():
            warm(target.url, target.model, max(args.concurrency))
        yield targets, missing


def points(
    args: argparse.Namespace, targets: dict[str, Target]
) -> list[dict[tuple[str, int], Point]]:
    """Every point, round after round, the servers in turn at each concurrency."""
    rounds = []
    for _ in range(args.rounds):
        measured = {}
        for concurrency in args.concurrency:
            for label, target in targets.items():
                measured[label, concurrency] = measure(
                    target.url, target.model, label, concurrency, args, target.batch_totals
                )
        rounds.append(measured)
    return rounds


def model_alone_ms(hidden: int, rows: int, iterations: int = 200) -> tuple[float, float]:
    """(torch, numpy) ms per forward pass of the MLP at ``rows``, one thread, here."""
    from mandant.demo.models import classifier as build

    torch.set_num_threads(1)
    module = build(seed=0, hidden=hidden)
    x = torch.randn(rows, 256)
    layers = [
        (m.weight.detach().numpy().T.copy(), m.bias.detach().numpy())
        for m in module.modules()
        if isinstance(m, torch.nn.Linear)
    ]

    def numpy_forward(value: np.ndarray) -> np.ndarray:
        for index, (weight, bias) in enumerate(layers):
            value = (np.maximum(value, 0.0) if index else value) @ weight + bias
        return value

    return _ms_per_pass(module, x, iterations), _ms_per_pass(numpy_forward, x.numpy(), iterations)


def _ms_per_pass(forward: Callable[[T], object], value: T, iterations: int) -> float:
    """ms per ``forward(value)``, after 10 passes of warm-up."""
    with torch.inference_mode():
        for _ in range(10):
            forward(value)
        start = time.perf_counter()
        for _ in range(iterations):
            forward(value)
    return (time.perf_counter() - start) / iterations * 1e3


def _ratio(a: Point | None, b: Point | None) -> float:
    if a is None or b is None or not a.result.answered or not b.result.answered:
        return float("nan")
    return a.result.rps / b.result.rps


def _fmt(value: float, digits: int) -> str:
    return "–" if np.isnan(value) else f"{value:.{digits}f}"


def _median(values: list[float], digits: int) -> tuple[float, str]:
    """The median (the verdict's) and how it is shown: with the range over rounds."""
    median = float(np.median(values))
    shown = _fmt(median, digits)
    if len(values) > 1 and not np.isnan(median):
        shown += f" ({min(values):.{digits}f}–{max(values):.{digits}f})"
    return median, shown


def _verdict(value: float, target: float) -> str:
    return "not measured" if np.isnan(value) else ("met" if value >= target else "NOT met")


def report(
    args: argparse.Namespace,
    rounds: list[dict[tuple[str, int], Point]],
    alone: list[tuple[int, float, float]],
) -> str:
    rows = []
    for number, measured in enumerate(rounds, 1):
        for (server, concurrency), point in measured.items():
            r = point.result
            label = server if len(rounds) == 1 else f"{server} (round {number})"
            rows.append(
                (concurrency, label, r.rps, r.p(50), r.p(99), point.mean_batch, r.errors, r.error)
            )
    rows.sort(key=lambda row: row[0])  # stable: round by round within a concurrency
    lines = [
        f"MLP 256→{args.hidden}→{args.hidden}→16 (seed 0), one row per call, tritonclient.grpc.aio;"
        f" {args.seconds:g} s per point after {args.warmup:g} s warm-up; server on core 0,"
        " client on core 1; Mandant's compute_nice: "
        + ("server default" if args.compute_nice is None else str(args.compute_nice))
        + ("" if len(rounds) == 1 else f"; {len(rounds)} rounds, the servers in turn"),
        table(
            ["conc", "server", "inf/s", "p50 ms", "p99 ms", "mean batch", "errors", "first error"],
            rows,
        ),
        "",
    ]
    ratio_rows = []
    for concurrency in args.concurrency:
        on = [measured.get((ON, concurrency)) for measured in rounds]
        on_off, on_off_shown = _median(
            [_ratio(p, m.get((OFF, concurrency))) for p, m in zip(on, rounds, strict=True)], 2
        )
        vs_triton, vs_triton_shown = _median(
            [_ratio(p, m.get((TRITON, concurrency))) for p, m in zip(on, rounds, strict=True)], 2
        )
        mean, mean_shown = _median([p.mean_batch if p else float("nan") for p in on], 1)
        row: list[object] = [concurrency, on_off_shown, mean_shown, vs_triton_shown]
        if concurrency == 64:
            row += [
                f"≥ {TARGET_ON_OFF} {_verdict(on_off, TARGET_ON_OFF)}",
                f"≥ {TARGET_MEAN_BATCH:g} {_verdict(mean, TARGET_MEAN_BATCH)}",
                f"≥ {TARGET_VS_TRITON} {_verdict(vs_triton, TARGET_VS_TRITON)}",
            ]
        else:
            row += ["–", "–", "–"]
        ratio_rows.append(row)
    if len(rounds) > 1:
        lines.append(f"ratios: the median of {len(rounds)} rounds (their range)")
    headers = ["conc", "on/off", "mean batch (on)", "Mandant on/PyTriton"]
    headers += ["target on/off", "target mean batch", "target vs PyTriton"]
    lines.append(table(headers, ratio_rows))
    lines.append("")
    lines.append(
        "model alone on core 0, one thread (ms per forward): "
        + "; ".join(f"{n} row(s): torch {t:.3f}, numpy {n_:.3f}" for n, t, n_ in alone)
        + " (numpy: this interpreter's, PyTriton's model runs the same code under .venv-triton)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--triton-delay-us", type=int, default=100)
    parser.add_argument("--no-triton", action="store_true", help="skip the PyTriton side")
    parser.add_argument("--compute-nice", type=int, default=None, help="server.compute_nice")
    parser.add_argument("--rounds", type=int, default=1, help="measure every point N times")
    args = parser.parse_args()
    with servers(args) as (targets, failed):
        rounds = points(args, targets)
    alone = [
        (rows, *run_pinned([(model_alone_ms, (args.hidden, rows))], int(SERVER_CPU))[0])
        for rows in (1, 64)
    ]
    print(report(args, rounds, alone) + failed)


if __name__ == "__main__":
    main()
