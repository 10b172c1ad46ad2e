"""What an admin's ModelStatistics for every model (Triton's default request: no name)
costs the event loop that answers it, as tenants x models grow: the server's own
``admin_statistics`` over an ``InferenceStats`` fed as calls feed it (one OK call of
each tenant to each model), against a repository of that many models. With
``workers: N`` it runs on the engine's loop, which every front end waits on (silent
for 5 s, it is taken for gone).

    .venv/bin/python -m benchmarks.statistics_scale [--sizes 300x60 1000x60 1000x150]

In process, no server: the figure is the call's own time, best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace
from typing import Any

from benchmarks._load import table
from mandant.observability.stats import InferenceStats
from mandant.transport.grpc.statistics import admin_statistics


def _plane(models: int) -> Any:
    keys = [SimpleNamespace(key=SimpleNamespace(name=f"m{m}", version="1", owner=None))
            for m in range(models)]  # fmt: skip
    return SimpleNamespace(all_models=lambda: keys)


def measure(tenants: int, models: int, repeat: int) -> list[object]:
    stats = InferenceStats()
    for tenant in range(tenants):
        for model in range(models):
            stats.record_finished(f"t{tenant}", "", f"m{model}", "1", True, 0.001)
    plane = _plane(models)
    best = min(_timed(lambda: admin_statistics(plane, stats, "", "")) for _ in range(repeat))
    one = min(_timed(lambda: admin_statistics(plane, stats, "m3", "")) for _ in range(repeat))
    return [tenants, models, tenants * models, f"{best * 1000:.1f}", f"{one * 1000:.1f}"]


def _timed(work: Any) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["300x60", "1000x60", "1000x150"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = []
    for size in args.sizes:
        tenants, models = (int(n) for n in size.split("x"))
        rows.append(measure(tenants, models, args.repeat))
    print(table(["tenants", "models", "entries", "every model ms", "one model ms"], rows))


if __name__ == "__main__":
    main()
