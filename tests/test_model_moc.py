"""Properties of the MoC layer (DESIGN §2) that a wrong implementation would fail."""

import math

import pytest
import torch

import moc_kernels as mk
from model import ModelConfig
from model.moc import (
    CollaborativeExpertsModule,
    SmallMHA,
    expert_fractions,
    normalised_diversity_loss,
    switch_balance_loss,
)


def tiny(**overrides) -> ModelConfig:
    base = dict(d_model=32, n_layers=1, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=32)
    base.update(kernels="reference", n_experts=4, top_k=2)
    base.update(overrides)
    return ModelConfig.from_dict(base)


def layer(**overrides) -> CollaborativeExpertsModule:
    moc = CollaborativeExpertsModule(tiny(**overrides))
    for p in moc.parameters():  # LunarisLM owns the init; here any non-degenerate weights will do
        torch.nn.init.normal_(p, 0.0, 0.2)
    return moc


def test_expert_fractions_count_every_slot():
    idx = torch.tensor([[0, 1], [0, 2], [3, 0]])
    assert torch.equal(expert_fractions(idx, 5), torch.tensor([3, 1, 1, 1, 0]) / 6.0)


def test_balance_loss_matches_switch_definition():
    probs = torch.softmax(torch.randn(7, 5), -1)
    idx = probs.topk(2, -1).indices
    load = expert_fractions(idx, 5)
    expected = 5 * sum(load[e] * probs[:, e].mean() for e in range(5))
    torch.testing.assert_close(switch_balance_loss(load, probs), expected)


def test_balance_loss_is_one_for_a_uniform_router_and_larger_when_skewed():
    moc = layer()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        moc.gate.weight.zero_()
        moc.gate.bias.zero_()
        uniform = moc(x).balance_loss
        # Any load f with p uniform gives E * sum_e f_e / E = 1.
        assert uniform.item() == pytest.approx(1.0, abs=1e-6)
        moc.gate.bias.copy_(torch.tensor([4.0, 2.0, 0.0, 0.0]))
        skewed = moc(x).balance_loss
    # Every token picks experts 0 and 1: f = (.5, .5, 0, 0), P concentrated there -> close to E/2 = 2.
    assert skewed.item() > 1.8


def test_diversity_loss_is_in_minus_one_zero():
    moc = layer(n_experts=6, top_k=3)
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        value = moc(x).diversity_loss.item()
        assert -1.0 <= value <= 0.0
        moc.collab_attn.q_proj.weight.zero_()  # all scores equal -> uniform rows, entropy log k
        assert moc(x).diversity_loss.item() == pytest.approx(-1.0, abs=1e-6)
        moc.collab_attn.q_proj.weight.normal_(0.0, 50.0)  # very peaked rows -> entropy near 0
        peaked = moc(x).diversity_loss.item()
    assert -0.5 < peaked <= 0.0


def test_diversity_loss_normalisation():
    entropy = torch.full((3, 2, 4), math.log(4))
    assert normalised_diversity_loss(entropy, 4).item() == pytest.approx(-1.0)
    assert normalised_diversity_loss(torch.zeros(3, 2, 1), 1).item() == 0.0


def test_top1_collab_weights_are_exactly_one():
    # With k = 1 the collab softmax row is [1]: the attention returns exactly its value vector.
    mha = SmallMHA(32, 4)
    selected = torch.randn(10, 1, 32)
    with torch.no_grad(), mk.use_backend("reference"):
        context, entropy = mha(selected)
        expected = mha.o_proj(mha.v_proj(selected))
    assert torch.equal(context, expected)
    assert torch.equal(entropy, torch.zeros_like(entropy))
    moc = layer(top_k=1)
    out = moc(torch.randn(2, 5, 32))
    assert out.diversity_loss.item() == 0.0 and out.collab_entropy.item() == 0.0
    assert out.diversity_loss.requires_grad  # still in the graph: one code path for every k


def test_stats_are_detached_and_shaped():
    moc = layer()
    out = moc(torch.randn(2, 8, 32))
    assert out.out.shape == (2, 8, 32)
    assert out.expert_load.shape == (4,) and not out.expert_load.requires_grad
    assert out.expert_load.sum().item() == pytest.approx(1.0)
    assert not out.router_entropy.requires_grad and not out.collab_entropy.requires_grad
    assert 0.0 <= out.router_entropy.item() <= math.log(4) + 1e-6
    assert out.balance_loss.requires_grad and out.diversity_loss.requires_grad


def test_every_parameter_gets_a_gradient():
    moc = layer(n_experts=6, top_k=3)
    out = moc(torch.randn(2, 8, 32))
    (out.out.square().mean() + out.balance_loss + out.diversity_loss).backward()
    for name, p in moc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_layer_is_per_token():
    # The MoC layer mixes nothing across tokens: a token's output depends on that token only.
    moc = layer()
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        full = moc(x).out
        alone = torch.cat([moc(x[:, i : i + 1]).out for i in range(6)], dim=1)
    torch.testing.assert_close(full, alone, rtol=1e-5, atol=1e-6)
