#!/usr/bin/env bash
# Issue 11's checks for a GPU host (16 cores, one NVIDIA GPU), in one run; each table
# goes to the terminal and to benchmarks/results/gpu_host/<name>.txt with the card,
# the commit and the date. About 12 minutes.
#
#   benchmarks/gpu_host.sh            # after `make install-test` on the GPU host
#
# Settings from the environment: PYTHON (default .venv/bin/python, else python3),
# BENCH_SECONDS (each measured row; default 5), STEP_TIMEOUT (seconds one step may
# take before it is stopped and counted failed; default 300), COMMIT (the header's
# commit where the tree has no .git), BENCH_OUT (where the tables go).
#
# 1. tests/integration/test_cuda.py (CUDA placement, streams, pinned staging)
# 2. an MLP widened to 4096 on CUDA: rows/s served through the batcher vs raw torch
# 3. echo calls/s with 1, 2, 4, 8, 12 gRPC front ends, the load on the other cores
# 4. issue 11's noisy neighbour with front ends on cores of their own: the 4096-wide
#    classifier kept on the CPU (the bottleneck), 4 front ends + engine on cores 0-5,
#    the loads on the last core; one process beside it
# 5. workers: 1 vs 2 on one core each side (the 2-core table, for comparison)
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=.venv/bin/python
    [[ -x $PYTHON ]] || PYTHON=python3
fi
SECONDS_PER_ROW=${BENCH_SECONDS:-5}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}
export PYTHONPATH=${PYTHONPATH:-server:clients/python}
OUT=${BENCH_OUT:-benchmarks/results/gpu_host}
CORES=${CORES:-$(nproc)}
mkdir -p "$OUT"
failed=()

header() {
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT"
    echo "# $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "# GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'none found')"
    echo
}

step() {  # step NAME COMMAND...
    local name=$1
    shift
    echo "== $name: $*"
    { header; echo "\$ $*"; timeout "$STEP_TIMEOUT" "$@"; } 2>"$OUT/$name.stderr" | tee "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    if [[ $status -ne 0 ]]; then
        failed+=("$name")
        tail -20 "$OUT/$name.stderr"
        # a step stopped by its timeout leaves the servers it started: stop them
        pkill -f -- '-m (mandant|benchmarks\._)' 2>/dev/null
        sleep 1
    else
        rm -f "$OUT/$name.stderr"
    fi
}

# the most wanted first: a run cut short still has them
step test_cuda "$PYTHON" -m pytest -v -p no:cacheprovider tests/integration/test_cuda.py
step gpu_engine "$PYTHON" -m benchmarks.gpu_engine --seconds "$SECONDS_PER_ROW"
step workers_scaling "$PYTHON" -m benchmarks.workers_scaling --front-ends 1,2,4,8,12 \
    --cores "$CORES" --seconds "$SECONDS_PER_ROW"
for workers in 4 1; do
    step "noisy_neighbour_workers$workers" "$PYTHON" -m benchmarks.noisy_neighbour \
        --seconds $((2 * SECONDS_PER_ROW)) --hidden 4096 --max-batch-size 16 --flood 64 \
        --device cpu --workers "$workers" --server-cpus 0-5 --client-cpu $((CORES - 1))
done
step workers "$PYTHON" -m benchmarks.workers --seconds "$SECONDS_PER_ROW"

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (see $OUT/<name>.stderr)"
    exit 1
fi
echo "tables in $OUT/"
