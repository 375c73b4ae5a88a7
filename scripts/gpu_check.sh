#!/usr/bin/env bash
# The single command for the H100 validation machine (DESIGN §2, §7).
#
#   scripts/gpu_check.sh [OUTDIR]        OUTDIR defaults to the repository's benchmarks/results/
#
# Builds tkpy in place against the torch found there (an extension built against another torch
# does not load), then runs: the GPU tests, the CPU tests, compute-sanitizer memcheck and
# racecheck on the tests marked `sanitizer`, the pytest-benchmark suite and the `tkpy bench`
# table. A failing step does not stop the later ones; a failed build skips them, as they could
# only fail the same way. Each step's exit code and duration go to OUTDIR/steps.tsv, its output to
# OUTDIR/logs/STEP.log. Last, scripts/summarize_gpu_run.py writes OUTDIR/<date>-<gpu>.json and .md.
#
# Exit status: 0 when the build and every test, sanitizer and benchmark step passed; 1 otherwise
# (decided by summarize_gpu_run.py, once the summary is written).
#
# Environment: STEP_TIMEOUT, seconds allowed per step (default 1800); COMPUTE_SANITIZER, the
# compute-sanitizer binary (default: from PATH, else $CUDA_HOME/bin); ONLY_STEPS, a space-separated
# subset of the step names below (default: every step), so that a run can be split across
# device calls of limited length (e.g. ONLY_STEPS="build gpu-tests", then ONLY_STEPS="bench-tests"
# with another OUTDIR). The build runs anyway when the extension in place does not import.
# Uses `python` from PATH, never a venv, and never lets pip reach the network.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$REPO/benchmarks/results}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
STEPS="$OUT/steps.tsv"
STEP_TIMEOUT=${STEP_TIMEOUT:-1800}
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
STEP_RC=0

printf 'step\tkind\trc\tseconds\tlog\tjunit\n' >"$STEPS"

# run_step NAME KIND JUNIT COMMAND...
#   KIND is info, build, tests, sanitizer or bench (how summarize_gpu_run.py reads the step);
#   JUNIT is the step's junit XML relative to OUT, or '-'.
#   Runs COMMAND under STEP_TIMEOUT, tees its output to logs/NAME.log, appends a row to
#   steps.tsv and leaves the exit code in STEP_RC. It never aborts the script.
run_step() {
    local name=$1 kind=$2 junit=$3
    shift 3
    if [[ -n ${ONLY_STEPS:-} && " $ONLY_STEPS " != *" $name "* && $name != build ]]; then
        STEP_RC=0
        return
    fi
    local log="logs/$name.log" start seconds
    echo "==> [$name] $*"
    start=$(date +%s.%N)
    set +e
    timeout --kill-after=30 "$STEP_TIMEOUT" "$@" </dev/null 2>&1 | tee "$OUT/$log"
    STEP_RC=${PIPESTATUS[0]}
    set -e
    seconds=$(awk -v start="$start" -v end="$(date +%s.%N)" 'BEGIN { printf "%.1f", end - start }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$STEP_RC" "$seconds" "$log" "$junit" >>"$STEPS"
    echo "<== [$name] exit code $STEP_RC in ${seconds}s"
}

summarize_and_exit() {
    local status=0
    python scripts/summarize_gpu_run.py --out "$OUT" || status=$?
    echo "gpu_check: total ${SECONDS}s, results in $OUT"
    exit "$status"
}

run_step nvidia-smi info - nvidia-smi -L

if [[ -n ${ONLY_STEPS:-} && " $ONLY_STEPS " != *" build "* ]] && python -c "import tkpy" 2>/dev/null; then
    echo "gpu_check: ONLY_STEPS leaves out the build; using the extension in place"
else
    run_step build build - env MAX_JOBS="$(nproc)" \
        python -m pip install --no-build-isolation --no-deps --no-index -e .
fi
if [[ $STEP_RC -ne 0 ]]; then
    echo "gpu_check: the build failed; skipping the tests and benchmarks"
    summarize_and_exit
fi

run_step gpu-tests tests gpu-tests.xml \
    python -m pytest tests -m gpu -q --junitxml="$OUT/gpu-tests.xml"
run_step cpu-tests tests cpu-tests.xml \
    python -m pytest tests -m "not gpu and not slow" -q -x --junitxml="$OUT/cpu-tests.xml"

# Without torch's caching allocator every tensor is its own cudaMalloc, so memcheck sees an
# overrun past a tensor's end instead of a silent write into a neighbour in the same pool block.
run_step memcheck sanitizer memcheck-tests.xml env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 \
    python -m pytest tests -m "gpu and sanitizer" -q --junitxml="$OUT/memcheck-tests.xml"
run_step racecheck sanitizer racecheck-tests.xml \
    "$SANITIZER" --tool racecheck --error-exitcode 1 \
    python -m pytest tests -m "gpu and sanitizer" -q --junitxml="$OUT/racecheck-tests.xml"

run_step bench-tests tests bench-tests.xml \
    python -m pytest benchmarks -q --benchmark-json="$OUT/bench.json" --junitxml="$OUT/bench-tests.xml"
run_step attention-plot info - \
    python scripts/plot_attention_bench.py "$OUT/bench.json" --out "$OUT/attention.png" --device cuda
# The table alone goes to bench-table.txt; the log also gets the progress lines from stderr.
run_step bench-table bench - \
    bash -o pipefail -c 'python -m tkpy bench | tee "$1"' _ "$OUT/bench-table.txt"

summarize_and_exit
