#!/usr/bin/env bash
# The GPU protocol (docs/GPU.md): one time-boxed run that proves and times the kernels on a CUDA machine.
#
#   bash benchmarks/run_gpu.sh OUTDIR              at most 8 minutes on one H100/H200, cold caches included
#   ALLOW_CPU=1 bash benchmarks/run_gpu.sh OUTDIR  the dry run without a GPU (compiled steps skipped, small sizes)
#
# OUTDIR ends with exactly summary.md, results.json, machine.txt, protocol.png and logs.tar.gz, rewritten
# after every step. Exit 0: every step passed; 1: a step failed or ran out of time; 2: bad usage.
# Everything is in benchmarks/protocol.py (PROTOCOL_BUDGET_S=SECONDS shortens the budget).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/run_gpu.sh OUTDIR" >&2
    exit 2
fi
exec "${PYTHON:-python3}" -m benchmarks.protocol "$1"
