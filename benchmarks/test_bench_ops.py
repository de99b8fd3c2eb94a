"""Timings of the ops, forward and forward+backward: reference, torch.compile(reference), Triton.

Run: ``pytest benchmarks/ --benchmark-only``. Shapes from ``benchmarks.shapes`` (GPT-2-small MoC on
CUDA, a scaled shape on CPU). Every case cycles over several freshly drawn input sets.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.impls import IMPLS, implementation
from benchmarks.shapes import BenchShape
from benchmarks.timing import forward_backward, measure

PASSES = ("fwd", "fwd+bwd")
STRATEGIES_ONE = ["entropy"]


def _input_sets(device: torch.device) -> int:
    return 3 if device.type == "cuda" else 2


def _rand(*size: int, shape: BenchShape, device: torch.device, grad: bool = False) -> torch.Tensor:
    return torch.randn(*size, device=device, dtype=shape.dtype).requires_grad_(grad)


def _run(benchmark, fn, sets, pass_, device, shape, op, impl, **extra):
    if pass_ == "fwd":
        sets = [s[:-1] for s in sets]
        with torch.no_grad():
            measure(
                benchmark,
                fn,
                sets,
                device,
                shape.tokens,
                op=op,
                impl=impl,
                pass_=pass_,
                shape=shape.describe(),
                **extra,
            )
    else:
        measure(
            benchmark, forward_backward(fn), sets, device, shape.tokens, op=op, impl=impl, pass_=pass_,
            shape=shape.describe(), **extra,
        )  # fmt: skip
    benchmark.group = f"{op} {pass_}"


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_expert_swiglu(benchmark, device, shape, impl, pass_):
    fn = implementation("expert_swiglu", impl, device)
    grad = pass_ != "fwd"
    sets = []
    for _ in range(_input_sets(device)):
        x = _rand(shape.tokens, shape.dim, shape=shape, device=device, grad=grad)
        w13 = (
            _rand(shape.experts, shape.dim, 2 * shape.hidden, shape=shape, device=device) / shape.dim**0.5
        ).requires_grad_(grad)
        w2 = (
            _rand(shape.experts, shape.hidden, shape.dim, shape=shape, device=device) / shape.hidden**0.5
        ).requires_grad_(grad)
        dy = _rand(shape.tokens, shape.experts, shape.dim, shape=shape, device=device)
        sets.append((x, w13, None, w2, (dy,)))  # w13 packed, as the model passes it
    _run(benchmark, fn, sets, pass_, device, shape, "expert_swiglu", impl)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_topk_gather(benchmark, device, shape, impl, pass_):
    fn = implementation("topk_gather", impl, device)
    sets = []
    for _ in range(_input_sets(device)):
        y = _rand(shape.tokens, shape.experts, shape.dim, shape=shape, device=device, grad=pass_ != "fwd")
        idx = torch.rand(shape.tokens, shape.experts, device=device).topk(shape.top_k, dim=-1).indices
        ds = _rand(shape.tokens, shape.top_k, shape.dim, shape=shape, device=device)
        sets.append((y, idx, (ds,)))
    _run(benchmark, fn, sets, pass_, device, shape, "topk_gather", impl)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("role", ["router", "collab"])
def test_small_attention(benchmark, device, shape, impl, pass_, role):
    """With the entropy (as the MoC layer calls it); router: L = E, collab: L = k."""
    fn = implementation("small_attention", impl, device)
    length = shape.experts if role == "router" else shape.top_k
    size = (shape.tokens, length, shape.heads, shape.head_dim)
    sets = []
    for _ in range(_input_sets(device)):
        q, k, v = (_rand(*size, shape=shape, device=device, grad=pass_ != "fwd") for _ in range(3))
        d_out = _rand(*size, shape=shape, device=device)
        d_entropy = torch.randn(shape.tokens, shape.heads, length, device=device)
        sets.append((q, k, v, True, (d_out, d_entropy)))
    _run(benchmark, fn, sets, pass_, device, shape, f"small_attention[{role} L={length}]", impl)


@pytest.mark.parametrize("strategies", ["one", "all"])
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_logit_nll(benchmark, device, shape, impl, strategies):
    """Forward only (Kotara evaluates without gradients): 'one' = entropy, 'all' = every strategy in one pass."""
    import moc_kernels

    names = STRATEGIES_ONE if strategies == "one" else list(moc_kernels.STRATEGIES)
    fn = implementation("fused_logit_nll_multi", impl, device)
    sets = []
    for _ in range(2):  # logits are the largest inputs (2 x 1.6 GB per set on CUDA)
        logits = [_rand(shape.tokens, shape.vocab, shape=shape, device=device) * 3 for _ in range(shape.models)]
        targets = torch.randint(0, shape.vocab, (shape.tokens,), device=device)
        sets.append((logits, targets, names, [1.0] * shape.models, None, None))
    _run(benchmark, fn, sets, "fwd", device, shape, f"fused_logit_nll[{strategies}]", impl, strategies=len(names))


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_routed_swiglu(benchmark, device, shape, impl, pass_):
    """The top-k MoE's experts: each token's k routed experts only (k/E of expert_swiglu's FLOPs)."""
    fn = implementation("routed_swiglu", impl, device)
    grad = pass_ != "fwd"
    # One routing (a router's top-k) shared by the input sets: torch.compile(reference) specialises on
    # the experts' row counts (its split sizes), so a routing per set would recompile it for every set.
    idx = torch.rand(shape.tokens, shape.experts, device=device).topk(shape.top_k, dim=-1).indices
    sets = []
    for _ in range(_input_sets(device)):
        x = _rand(shape.tokens, shape.dim, shape=shape, device=device, grad=grad)
        w13 = _rand(shape.experts, shape.dim, 2 * shape.hidden, shape=shape, device=device) / shape.dim**0.5
        w2 = _rand(shape.experts, shape.hidden, shape.dim, shape=shape, device=device) / shape.hidden**0.5
        w13, w2 = w13.requires_grad_(grad), w2.requires_grad_(grad)
        dy = _rand(shape.tokens, shape.top_k, shape.dim, shape=shape, device=device)
        sets.append((x, idx, w13, None, w2, (dy,)))  # w13 packed, as the model passes it
    _run(benchmark, fn, sets, pass_, device, shape, "routed_swiglu", impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_target_and_set_log_probs(benchmark, device, shape, impl):
    """Forward only: log p(target) and log p(word-start tokens) of one model's rows (DESIGN §5c)."""
    fn = implementation("target_and_set_log_probs", impl, device)
    sets = []
    for _ in range(2):
        logits = _rand(shape.tokens, shape.vocab, shape=shape, device=device) * 3
        targets = torch.randint(0, shape.vocab, (shape.tokens,), device=device)
        in_set = torch.rand(shape.vocab, device=device) < 0.4  # about GPT-2's share of "Ġ" tokens
        sets.append((logits, targets, in_set, 1.0, None))
    _run(benchmark, fn, sets, "fwd", device, shape, "target_and_set_log_probs", impl)
