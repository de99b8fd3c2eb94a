"""benchmarks/activation_memory.py: the saved-tensor probe, on the meta device and under the interpreter."""

import torch

from benchmarks import activation_memory
from benchmarks.shapes import BenchShape, expert_hidden

TINY = BenchShape("tiny", 6, 32, 4, expert_hidden(32), 2, 2, 64, 2, torch.float32)


def test_probe_counts_saved_tensors_once_and_skips_parameters():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(5, 8, requires_grad=True)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x) * self.layer(x).sigmoid()  # x saved by both linears: counted once

    saved = activation_memory.saved_bytes(Twice(), x, "reference")
    # x (saved by both linears) once, the first linear's output (by mul), the sigmoid's output (by
    # sigmoid and mul) once; the second linear's output is not saved, the weights are left out.
    assert saved == 3 * 5 * 8 * 4


def test_reference_bytes_are_linear_in_tokens_and_meta_matches_cpu():
    meta = [activation_memory.measure(TINY.with_tokens(n), "meta", "reference")["saved_bytes"] for n in (4, 8, 12)]
    assert meta[2] - meta[1] == meta[1] - meta[0] > 0
    cpu = activation_memory.measure(TINY.with_tokens(8), "cpu", "reference")["saved_bytes"]
    assert cpu == meta[1]


def test_run_reports_kernel_and_reference_per_token_bytes():
    result = activation_memory.run(tokens=4, shape=TINY)
    assert result["kernel_error"] is None, result["kernel_error"]
    assert abs(result["reference_fit_error_at_full_n"]) < 1e-9
    assert 0 < result["kernel_bytes_per_token"] < result["reference_bytes_per_token"]
    report = activation_memory.format_report(result)
    assert "kernel / reference bytes per token" in report
