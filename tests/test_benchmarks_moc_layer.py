"""The benchmarks' functional MoC layer and its per-expert loop take the packed ``w13`` as the model holds it.

Issue 33: ``pytest benchmarks/ --benchmark-only`` failed because the loop still took ``w1, w3`` apart while
the model passes the packed ``w13`` with ``w3=None``.
"""

import torch
from conftest import assert_rel_close

import moc_kernels
from benchmarks.moc_layer import init_params, moc_layer, per_expert_loop_swiglu
from benchmarks.shapes import BenchShape
from moc_kernels import reference

SHAPE = BenchShape("test", tokens=12, dim=16, experts=3, hidden=24, heads=2, top_k=2, vocab=32, models=2,
                   dtype=torch.float32)  # fmt: skip


def test_loop_takes_packed_w13_as_the_model_passes_it():
    x = torch.randn(SHAPE.tokens, SHAPE.dim, dtype=torch.float64)
    w13 = torch.randn(SHAPE.experts, SHAPE.dim, 2 * SHAPE.hidden, dtype=torch.float64)
    w2 = torch.randn(SHAPE.experts, SHAPE.hidden, SHAPE.dim, dtype=torch.float64)
    expected = reference.expert_swiglu(x, w13, None, w2)
    assert_rel_close(per_expert_loop_swiglu(x, w13, None, w2), expected, torch.float32, "loop, packed")
    w1, w3 = w13.split(SHAPE.hidden, dim=-1)
    assert_rel_close(per_expert_loop_swiglu(x, w1, w3, w2), expected, torch.float32, "loop, apart")


def test_functional_layer_loop_equals_vectorised_and_reaches_w13():
    params = init_params(SHAPE, "cpu")
    x = torch.randn(SHAPE.tokens, SHAPE.dim)
    results = []
    for loop in (False, True):
        with moc_kernels.use_backend("reference"):
            out, aux = moc_layer(x, params, SHAPE, loop_experts=loop)
        (grad,) = torch.autograd.grad(out.square().sum() + aux, [params["w13"]])
        results.append((out.detach(), aux.detach(), grad))
    for a, b, name in zip(results[0], results[1], ("out", "aux", "w13 grad")):
        assert_rel_close(b, a, torch.float32, name)
    assert results[0][2].abs().sum() > 0


def test_training_step_with_the_loop_patched_in(monkeypatch):
    """What ``test_training_step[loop]`` does: the model's reference path with the loop as expert_swiglu."""
    from model.config import ModelConfig
    from model.lm import LunarisLM

    config = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_experts=3, top_k=2, vocab_size=64, max_seq_len=16,
                         multiple_of=16, kernels="reference")  # fmt: skip
    model = LunarisLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    expected = model(ids[:, :-1], ids[:, 1:]).loss
    monkeypatch.setattr(moc_kernels.reference, "expert_swiglu", per_expert_loop_swiglu)
    out = model(ids[:, :-1], ids[:, 1:])
    (out.loss + out.aux_loss).backward()
    assert_rel_close(out.loss.detach(), expected.detach(), torch.float32, "loss")
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
