#!/usr/bin/env bash
# Every benchmark of issues 10 and 11 that runs on this machine, in sequence, with the
# issues' settings; each table goes to the terminal and to benchmarks/results/<name>.txt
# (with the command, commit, date, CPU and load average at its start). About 20 minutes
# on the 2-core development machine.
#
#   benchmarks/run_all.sh                  # the recorded run (quiet machine, please)
#   BENCH_SECONDS=1 benchmarks/run_all.sh  # a smoke test: every bench end to end, short,
#                                          # tables in a temporary folder (not results/)
#   BENCH_ONLY="frontend workers" benchmarks/run_all.sh   # only the benches named
#   BENCH_OUT=benchmarks/results/DIR benchmarks/run_all.sh  # tables into DIR instead
#
# Each bench starts its own servers, pinned to core 0, and its load on core 1.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-server:clients/python}
if [[ -n ${BENCH_SECONDS:-} ]]; then
    OUT=${BENCH_OUT:-$(mktemp -d -t mandant-bench-smoke-XXXX)}
else
    OUT=${BENCH_OUT:-benchmarks/results}
fi
mkdir -p "$OUT"
failed=()

bench() {  # bench NAME SECONDS MODULE ARGS...
    local name=$1 seconds=${BENCH_SECONDS:-$2} module=$3
    shift 3
    if [[ -n ${BENCH_ONLY:-} && " $BENCH_ONLY " != *" $name "* ]]; then
        return 0
    fi
    local args=(--seconds "$seconds" "$@")
    if [[ -n ${BENCH_SECONDS:-} ]]; then args+=(--warmup 0.5); fi
    local command="$PYTHON -m $module ${args[*]}"
    echo "== $name: $command"
    local started=$SECONDS
    {
        echo "\$ $command"
        echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- server clients benchmarks ':!benchmarks/results' || echo ' (uncommitted changes)')"
        echo "# $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo
        "$PYTHON" -m "$module" "${args[@]}"
    } 2>"$OUT/$name.stderr" | tee "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    echo "($name: $((SECONDS - started)) s, exit $status)"
    if [[ $status -ne 0 ]]; then
        failed+=("$name")
        tail -20 "$OUT/$name.stderr"
    else
        rm -f "$OUT/$name.stderr"
    fi
}

bench frontend 5 benchmarks.frontend
bench batching 5 benchmarks.batching --rounds 3
bench noisy_neighbour_h4096 15 benchmarks.noisy_neighbour --hidden 4096
bench noisy_neighbour_h4096_b16 15 benchmarks.noisy_neighbour --hidden 4096 --max-batch-size 16
bench noisy_neighbour_demo 10 benchmarks.noisy_neighbour
# A tenant whose calls the model raises on, beside a light tenant (the batcher's split).
bench poisoned_neighbour 6 benchmarks.poisoned_neighbour
# Issue 11's set-up: a flood of 4 x max_batch_size, one process and two front ends;
# three rounds each, judged on the median (one round's ratios move by up to half a batch, ±5%).
bench noisy_neighbour_h4096_b16_flood64 15 benchmarks.noisy_neighbour --hidden 4096 --max-batch-size 16 --flood 64 --rounds 3
bench noisy_neighbour_h4096_b16_flood64_workers2 15 benchmarks.noisy_neighbour --hidden 4096 --max-batch-size 16 --flood 64 --workers 2 --rounds 3
bench noisy_neighbour_demo_door16 10 benchmarks.noisy_neighbour --front-door-slots 16
bench gc_pauses 15 benchmarks.gc_pauses
bench isolation 6 benchmarks.isolation
# Calls whose short deadline passes before the server gets to them, beside a light tenant.
bench isolation_deadlines 6 benchmarks.isolation --workers 1 --attacks deadlines
bench compute_ceiling 5 benchmarks.compute_ceiling
# Issue 11 on this machine: one process against two front ends and an engine.
bench workers 5 benchmarks.workers --requests 3000
if [[ -n ${BENCH_SECONDS:-} ]]; then  # the GPU script's engine bench, on the CPU: smoke only
    bench gpu_engine_cpu 1 benchmarks.gpu_engine --device cpu --width 256 --instances 1
fi

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (see $OUT/<name>.stderr)"
    exit 1
fi
echo "tables in $OUT/"
