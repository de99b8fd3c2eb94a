"""Kotara's fusion against the floor any NLL pays: ``log_softmax`` of every model's logits.

One case per strategy (and all seven from one pass) at GPT-2's vocabulary, plus the baseline, timed
the same way. ``python -m benchmarks.summary RESULTS.json --check`` compares the reference's medians
with the baseline's against ``benchmarks.summary.BOUNDS`` (single strategy <= 2x, all <= 3x): speed
bounds live here, in the benchmarks, not in CI's tests (a shared 2-core machine makes wall time noise).

CPU: 512 rows x 50257 fp32 (1 torch thread unless BENCH_CPU_THREADS says otherwise); CUDA: the
GPT-2-small batch, 16384 rows x 50257 bf16.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import moc_kernels
from benchmarks.impls import implementation
from benchmarks.shapes import BenchShape, shape_for
from benchmarks.timing import measure

OP = "fusion_vs_log_softmax"
BASELINE = "log_softmax"
CASES = (*moc_kernels.STRATEGIES, "all")
VOCAB, CPU_ROWS, CUDA_ROWS = 50257, 512, 16384


def _inputs(device: torch.device) -> tuple[list, BenchShape]:
    on_cuda = device.type == "cuda"
    shape = replace(
        shape_for(device), tokens=CUDA_ROWS if on_cuda else CPU_ROWS, vocab=VOCAB, models=2,
        dtype=torch.bfloat16 if on_cuda else torch.float32,
    )  # fmt: skip
    sets = []
    for _ in range(2):
        logits = [(torch.randn(shape.tokens, VOCAB, device=device) * scale).to(shape.dtype) for scale in (3.0, 2.0)]
        sets.append((logits, torch.randint(0, VOCAB, (shape.tokens,), device=device)))
    return sets, shape


def _record(benchmark, fn, device, case: str, impl: str) -> None:
    sets, shape = _inputs(device)
    with torch.no_grad():
        measure(benchmark, fn, sets, device, shape.tokens, op=OP, impl=impl, pass_=case, shape=shape.describe())
    benchmark.group = OP


def test_log_softmax_baseline(benchmark, device):
    def baseline(logits, _targets):
        return [torch.log_softmax(lg.float(), -1) for lg in logits]

    _record(benchmark, baseline, device, BASELINE, "torch")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_fusion(benchmark, device, impl, case):
    fuse = implementation("fused_logit_nll_multi", impl, device)
    strategies = list(moc_kernels.STRATEGIES) if case == "all" else [case]
    temperatures = [0.9, 1.1]

    def fusion(logits, targets):
        return fuse(logits, targets, strategies, temperatures, None)

    _record(benchmark, fusion, device, case, impl)
