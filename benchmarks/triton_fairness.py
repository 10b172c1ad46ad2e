"""A light tenant beside another tenant's flood of a slow model on Triton, with
``triton.max_in_flight: auto`` (the default) against 256 (the default before it), in
one run.

    .venv/bin/python -m benchmarks.triton_fairness [--seconds 10] [--flood 16]

Triton (PyTriton, ``.venv-triton``; ``make triton-venv``) serves the tests' ``slow``
model: 0.1 s a call, one call at a time, no batcher, every call sent to it held. One
``mandant serve`` (core 0) forwards two models to it, ``slow-auto`` (``max_in_flight``
left to ``auto``: twice what Triton's model config runs at once, 2 here) and
``slow-256``; for each in turn, acme's ``--flood`` closed-loop callers and globex's one
(core 1), for ``--seconds`` after ``--warmup``. Triton serves the calls it holds first
come first served: with 256 in flight every flooding call is there ahead of globex's;
with ``auto`` they wait in Mandant's queues, where the tenants take turns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._load import Load, demo_data, run, table
from benchmarks._server import mandant_server
from benchmarks._server import write_config as write_yaml
from tests.triton_server import TritonProcess
from tests.triton_server.tiny import SLOW_NAME, SLOW_SLEEP_S

#: Mandant's model name -> its ``max_in_flight`` (None: the default, ``auto``).
MODELS = {"slow-auto": None, "slow-256": 256}


def write_config(triton_url: str) -> Path:
    """The demo's tenants (no limits) and ``slow`` forwarded to Triton twice."""
    models = []
    for name, in_flight in MODELS.items():
        triton = {"url": triton_url, "model": SLOW_NAME, "timeout_s": 60}
        if in_flight is not None:
            triton["max_in_flight"] = in_flight
        models.append({"name": name, "backend": "triton", "triton": triton})
    return write_yaml(demo_data(models))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--flood", type=int, default=16)
    args = parser.parse_args()
    rows = []
    with TritonProcess() as triton, mandant_server(write_config(triton.url)) as mandant:
        for model, in_flight in MODELS.items():
            flood = Load("acme", model, args.flood, rows=1, width=4)
            light = Load("globex", model, 1, rows=1, width=4)
            a, b = run(mandant, [flood, light], args.seconds, args.warmup)
            errors = a.errors + b.errors
            rows.append(
                (
                    "auto (2 here)" if in_flight is None else str(in_flight),
                    f"{b.p(50):.0f}",
                    f"{b.p(99):.0f}",
                    f"{b.rps:.2f}",
                    f"{a.rps:.2f}",
                    errors if not errors else f"{errors} ({a.error or b.error})",
                )
            )
    print(
        f"Triton model `{SLOW_NAME}` ({SLOW_SLEEP_S * 1000:.0f} ms a call, one at a time); "
        f"acme at concurrency {args.flood}, globex at 1; {args.seconds:g} s per row after "
        f"{args.warmup:g} s warm-up; Mandant on core 0, clients on core 1\n"
    )
    print(
        table(
            ["max_in_flight", "globex p50 ms", "globex p99 ms", "globex calls/s",
             "acme calls/s", "errors"],
            rows,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
