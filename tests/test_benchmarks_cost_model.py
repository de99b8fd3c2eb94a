"""The cost model's counters and formulas (benchmarks/cost_model.py): fast, meta device."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import cost_model
from benchmarks.shapes import BenchShape, expert_hidden
from moc_kernels import reference

TINY = BenchShape("tiny", 32, 64, 4, expert_hidden(64), 2, 2, 512, 2, torch.bfloat16)


@pytest.fixture(scope="module")
def rows():
    return cost_model.all_rows(TINY)


def test_byte_counter_counts_inputs_and_outputs_but_not_views():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    with cost_model.ByteCounter() as counter:
        c = a + b  # reads 2 x 512 B, writes 512 B
        c.view(16, 8).t()  # views move nothing
    assert counter.bytes == 3 * 8 * 16 * 4
    assert counter.ops == 1


def test_tensor_bytes_counts_broadcast_elements_once():
    row = torch.randn(1, 16)
    assert cost_model.tensor_bytes(row.expand(100, 16)) == 16 * 4
    assert cost_model.tensor_bytes(torch.empty(3, 5, dtype=torch.bfloat16)) == 30


def _reference_flops(fn, *args):
    with FlopCounterMode(display=False) as flops:
        fn(*args)
    return flops.get_total_flops()


def test_kernel_forward_flops_equal_the_reference_matrix_products():
    s = TINY
    x = torch.empty(s.tokens, s.dim, device="meta")
    w1 = torch.empty(s.experts, s.dim, s.hidden, device="meta")
    w2 = torch.empty(s.experts, s.hidden, s.dim, device="meta")
    assert cost_model.kernel_costs("expert_swiglu", s)["fwd"][0] == _reference_flops(
        reference.expert_swiglu, x, w1, w1, w2
    )
    q = torch.empty(s.tokens, s.experts, s.heads, s.head_dim, device="meta")
    kernel = cost_model.kernel_costs("small_attention", s, length=s.experts)["fwd"][0]
    assert kernel == _reference_flops(reference.small_attention, q, q, q)


def test_routed_swiglu_does_k_over_e_of_expert_swiglus_work(rows):
    """The top-k MoE's experts: kernel FLOPs k/E of the all-expert pass's forward, and the kernel
    design's FLOPs equal the reference's counted ones (the backward does not recompute G and U)."""
    routed = {r.pass_: r for r in rows if r.op == "routed_swiglu"}
    assert set(routed) == {"fwd", "fwd+bwd"}
    all_experts = cost_model.kernel_costs("expert_swiglu", TINY)["fwd"][0]
    assert routed["fwd"].kernel_flops == TINY.top_k / TINY.experts * all_experts
    for r in routed.values():
        assert r.kernel_flops == r.reference_flops, r


def test_routed_reference_counts_extrapolate_exactly():
    """routed_rows measures the reference at two token counts and extrapolates; at a third count the
    extrapolation equals a direct measurement (the counts are affine in N under balanced routing)."""
    tokens = 3 * cost_model.ROUTED_TOKENS[1]
    shape = TINY.with_tokens(tokens)
    extrapolated = {r.pass_: (r.reference_flops, r.reference_bytes) for r in cost_model.routed_rows(shape)}
    x = torch.randn(tokens, shape.dim, dtype=shape.dtype, requires_grad=True)
    w13 = torch.randn(shape.experts, shape.dim, 2 * shape.hidden, dtype=shape.dtype, requires_grad=True)
    w2 = torch.randn(shape.experts, shape.hidden, shape.dim, dtype=shape.dtype, requires_grad=True)
    idx = (torch.arange(tokens * shape.top_k) % shape.experts).view(tokens, shape.top_k)
    inputs = (x, idx, *w13.split(shape.hidden, dim=-1), w2)
    assert extrapolated["fwd"] == cost_model.measure_reference(reference.routed_swiglu, *inputs)
    dy = torch.randn(tokens, shape.top_k, shape.dim, dtype=shape.dtype)
    assert extrapolated["fwd+bwd"] == cost_model.measure_reference(reference.routed_swiglu, *inputs, grads=(dy,))


def test_kernel_design_moves_fewer_bytes_than_the_reference(rows):
    assert {r.op for r in rows} >= {"expert_swiglu", "topk_gather", "fused_logit_nll[all]"}
    for r in rows:
        assert 0 < r.kernel_bytes < r.reference_bytes, r
        assert r.kernel_ms > 0 and r.reference_ms >= r.kernel_ms * 0.999, r


def test_layer_row_and_table_are_labelled_as_a_model(rows):
    layer = rows[-1]
    assert layer.op == "moc_layer" and layer.kernel_bytes < layer.reference_bytes
    table = cost_model.format_table(rows, TINY)
    assert "a model, not a measurement" in table and "moc_layer" in table


def test_cli_rejects_bad_tokens(capsys):
    assert cost_model.main(["--tokens", "0"]) == 2
    assert "--tokens must be >= 1, got 0" in capsys.readouterr().err


def test_table_carries_the_wave_models_gemm_traffic_column(rows):
    table = cost_model.format_table(rows, TINY, traffic={("expert_swiglu", "fwd+bwd"): 1.0625})
    assert "GEMM traffic / fewest (wave model)" in table.splitlines()[2]
    by_row = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in table.splitlines()[4:]}
    assert by_row[("expert_swiglu", "fwd+bwd")].endswith("| 1.06x |")
    assert by_row[("expert_swiglu", "fwd")].endswith("| - |")
