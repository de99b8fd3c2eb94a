#!/usr/bin/env bash
# One command for a CUDA machine: tests with the Triton kernels, benchmarks, compile report, cost
# model, activation memory and the summary, all written into one folder.
#
#   bash benchmarks/run_gpu.sh [OUTDIR]          (default: bench-out/<date>-<host>)
#   ALLOW_CPU=1 bash benchmarks/run_gpu.sh DIR   run the parts that need no GPU (CPU timings, the
#                                                compile report, cost model, activation memory
#                                                under the interpreter); the CUDA tests are skipped
#
# Each step's log is DIR/<step>.log; a failing step is reported and the others still run; the exit
# status is 1 when any step failed. Run from anywhere: it changes to the repository root.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT="${1:-bench-out/$(date -u +%Y%m%dT%H%M%SZ)-$(hostname -s)}"
PY="${PYTHON:-python}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    if [[ "${ALLOW_CPU:-0}" != "1" ]]; then
        echo "error: no CUDA device visible to torch; this script times the Triton kernels on a GPU." >&2
        echo "       Set ALLOW_CPU=1 to run the parts that need no GPU (CPU timings, compile report, cost model)." >&2
        exit 2
    fi
    CUDA=0
else
    CUDA=1
fi

mkdir -p "$OUT" || exit 2
failed=()
step() {  # step NAME CMD...: run CMD, log to $OUT/NAME.log, remember failures
    local name="$1"; shift
    echo "== $name: $*"
    local start=$SECONDS
    if "$@" > "$OUT/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s)"
    else
        echo "   FAILED (exit $?, $((SECONDS - start)) s): see $OUT/$name.log"
        failed+=("$name")
    fi
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p')"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    [[ $CUDA == 1 ]] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} > "$OUT/machine.txt" 2>&1

if [[ $CUDA == 1 ]]; then
    # The kernel tests (marker triton) on CUDA tensors, compiled; the rest of the suite is the CPU one.
    step tests "$PY" -m pytest -q -m triton tests
else
    echo "== tests: skipped (no CUDA; the CPU suite is: python -m pytest -q tests)"
fi
step benchmarks "$PY" -m pytest benchmarks/ --benchmark-only -q --benchmark-json "$OUT/results.json"
# JSON goes to its own file (stdout only), the log keeps stderr.
step compile_report sh -c "'$PY' -m moc_kernels.report --json > '$OUT/compile_report.json'"
step cost_model "$PY" -m benchmarks.cost_model
step activation_memory sh -c "'$PY' -m benchmarks.activation_memory --json > '$OUT/activation_memory.json'"
if [[ -s "$OUT/results.json" ]]; then
    extra=()
    [[ -s "$OUT/compile_report.json" ]] && extra+=(--report-json "$OUT/compile_report.json")
    [[ -s "$OUT/activation_memory.json" ]] && extra+=(--activation-memory "$OUT/activation_memory.json")
    step summary "$PY" -m benchmarks.summary "$OUT/results.json" --out "$OUT" "${extra[@]}"
else
    echo "== summary: skipped (no results.json)"; failed+=("summary")
fi

echo "results in $OUT (summary.md, benchmarks.png, results.json, *.log)"
if (( ${#failed[@]} )); then
    echo "failed steps: ${failed[*]}"
    exit 1
fi
