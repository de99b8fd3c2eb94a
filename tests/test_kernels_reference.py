"""The references are the spec: check them against independent formulations and autograd."""

import math

import pytest
import torch
import torch.nn.functional as F

import moc_kernels as mk
from moc_kernels import reference

# ---------------------------------------------------------------- expert_swiglu / topk_gather / attention


def test_expert_swiglu_matches_per_expert_loop():
    x = torch.randn(37, 40)
    w1, w3 = torch.randn(2, 6, 40, 72).unbind(0)
    w2 = torch.randn(6, 72, 40)
    y = mk.expert_swiglu(x, w1, w3, w2)
    for e in range(6):
        expected = (F.silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]
        torch.testing.assert_close(y[:, e], expected, rtol=1e-5, atol=1e-4)


def test_expert_swiglu_accepts_packed_gate_up_views_and_bf16():
    x = torch.randn(9, 16, dtype=torch.bfloat16)
    packed = torch.randn(3, 16, 2 * 24, dtype=torch.bfloat16)
    w2 = torch.randn(3, 24, 16, dtype=torch.bfloat16)
    y = mk.expert_swiglu(x, packed[..., :24], packed[..., 24:], w2)
    assert y.dtype == torch.bfloat16 and y.shape == (9, 3, 16)
    expected = reference.expert_swiglu(x.float(), packed[..., :24].float(), packed[..., 24:].float(), w2.float())
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("op", ["expert_swiglu", "topk_gather", "small_attention"])
def test_gradcheck_fp64(op):
    d = dict(dtype=torch.float64, requires_grad=True)
    if op == "expert_swiglu":
        args = (torch.randn(5, 6, **d), torch.randn(3, 6, 4, **d), torch.randn(3, 6, 4, **d), torch.randn(3, 4, 6, **d))
        fn = reference.expert_swiglu
    elif op == "topk_gather":
        idx = torch.stack([torch.randperm(5)[:3] for _ in range(4)])
        args = (torch.randn(4, 5, 3, **d),)
        fn = lambda y: reference.topk_gather(y, idx)
    else:
        args = tuple(torch.randn(3, 4, 2, 5, **d) for _ in range(3))
        fn = lambda q, k, v: reference.small_attention(q, k, v, return_entropy=True)
    assert torch.autograd.gradcheck(fn, args)


def test_topk_gather_forward_and_backward_are_exact():
    y = torch.randn(37, 6, 40, requires_grad=True)
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(37)])
    s = mk.topk_gather(y, idx)
    for n in range(0, 37, 7):
        assert torch.equal(s[n], y[n, idx[n]])
    grad = torch.randn_like(s)
    s.backward(grad)
    expected = torch.zeros_like(y)
    for n in range(37):
        expected[n, idx[n]] = grad[n]
    assert torch.equal(y.grad, expected)


@pytest.mark.parametrize("length", [1, 3, 8])
def test_small_attention_equals_sdpa_and_entropy_of_explicit_softmax(length):
    q, k, v = (torch.randn(11, length, 3, 20) for _ in range(3))
    out, entropy = mk.small_attention(q, k, v, return_entropy=True)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
    probs = torch.softmax(torch.einsum("nlhd,nmhd->nhlm", q, k) / math.sqrt(20), dim=-1)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1), rtol=1e-5, atol=1e-5)
    assert entropy.shape == (11, 3, length)
    if length == 1:
        assert torch.all(entropy.abs() < 1e-6)


def test_argument_errors_are_clear():
    with pytest.raises(ValueError, match="w2 must be"):
        mk.expert_swiglu(torch.randn(2, 4), torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="exceeds E"):
        mk.topk_gather(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown strategy 'bogus'"):
        mk.fused_logit_nll([torch.randn(2, 5)] * 2, torch.zeros(2, dtype=torch.int64), "bogus")
    with pytest.raises(ValueError, match="at least 2 models"):
        mk.fused_logit_nll([torch.randn(2, 5)], torch.zeros(2, dtype=torch.int64), "average")


# ---------------------------------------------------------------- fused_logit_nll vs full materialisation


def naive_fused_log_probs(logits, strategy, temperatures, weights, eps=1e-6):
    """The fused log-distribution [N, V] written out in full, straight from DESIGN §5 (fp64)."""
    z = torch.stack([lg.double() / t for lg, t in zip(logits, temperatures)])  # [M, N, V]
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)  # [M, N]
    top2 = p.sort(-1, descending=True).values[..., :2]
    gap = top2[..., 0] - top2[..., 1]
    m = len(logits)
    beta = torch.tensor(weights if weights is not None else [1 / m] * m, dtype=torch.float64)[:, None]
    alpha = {
        "average": torch.full_like(entropy, 1 / m),
        "poe": beta.expand_as(entropy),
        "mixture": (beta / beta.sum()).expand_as(entropy),
    }
    for name, raw in (("entropy", 1 / (entropy + eps)), ("gap", gap + eps)):
        alpha[name] = alpha["mixture_" + name] = raw / raw.sum(0)
    a = alpha[strategy]
    if strategy.startswith("mixture"):
        return torch.log((a[..., None] * p).sum(0)), a, entropy
    if strategy == "poe":
        return torch.log_softmax((a[..., None] * log_p).sum(0), -1), a, entropy
    return torch.log_softmax((a[..., None] * z).sum(0), -1), a, entropy


def make_logits(num_models, rows, vocab, dtype=torch.float32):
    logits = [torch.randn(rows, vocab) * (2 + i) for i in range(num_models)]
    logits[0][1] = 0.7  # all equal: gap 0, maximal entropy
    logits[-1][2, 5] = 80.0  # one huge logit: entropy ~ 0
    return [lg.to(dtype) for lg in logits]


@pytest.mark.parametrize("strategy", mk.STRATEGIES)
@pytest.mark.parametrize("num_models,vocab", [(2, 50257), (3, 1031)])
def test_fused_logit_nll_matches_full_materialisation(strategy, num_models, vocab):
    rows = 23
    logits = make_logits(num_models, rows, vocab)
    targets = torch.randint(0, vocab, (rows,))
    targets[[3, 9]] = mk.IGNORE_INDEX
    temps = [0.85, 1.1, 1.3][:num_models]
    betas = [0.7, 1.4, 0.5][:num_models]
    out = mk.fused_logit_nll(logits, targets, strategy, temps, betas)
    log_q, alpha, entropy = naive_fused_log_probs(logits, strategy, temps, betas)
    expected = -log_q.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    expected[[3, 9]] = 0
    assert out.nll.dtype == torch.float32 and out.nll.shape == (rows,)
    torch.testing.assert_close(out.nll.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.weights.double(), alpha.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.entropy.double(), entropy, rtol=1e-4, atol=1e-5)
    if strategy in ("gap", "mixture_gap"):  # row 1 of model 0 is flat; the others are not
        assert out.weights[0, 1] < 1e-3


def test_fused_distribution_is_normalised_for_poe():
    logits = make_logits(2, 5, 97)
    full = torch.stack(
        [mk.fused_logit_nll(logits, torch.full((5,), v), "poe", [0.9, 1.2], [1.0, 1.0]).nll for v in range(97)]
    )
    # nll is fp32: the sum of 97 probabilities carries fp32 rounding
    torch.testing.assert_close(torch.exp(-full.double()).sum(0), torch.ones(5, dtype=torch.float64), rtol=1e-5, atol=0)


def test_gap_with_all_gaps_zero_gives_equal_weights():
    logits = [torch.zeros(4, 50), torch.full((4, 50), 3.0)]
    out = mk.fused_logit_nll(logits, torch.arange(4), "gap")
    torch.testing.assert_close(out.weights, torch.full((2, 4), 0.5))


@pytest.mark.parametrize("strategy", mk.STRATEGIES)
def test_fusing_a_model_with_itself_gives_its_own_nll(strategy):
    lg = torch.randn(31, 333) * 2
    targets = torch.randint(0, 333, (31,))
    own = F.cross_entropy(lg, targets, reduction="none")
    out = mk.fused_logit_nll([lg, lg.clone()], targets, strategy)
    torch.testing.assert_close(out.nll, own, rtol=1e-5, atol=1e-5)


def test_multi_equals_single_and_bf16_is_close():
    logits = make_logits(2, 40, 5003, torch.bfloat16)
    targets = torch.randint(0, 5003, (40,))
    multi = mk.fused_logit_nll_multi(logits, targets, mk.STRATEGIES, [0.8, 1.2])
    for strategy in mk.STRATEGIES:
        single = mk.fused_logit_nll(logits, targets, strategy, [0.8, 1.2])
        assert torch.equal(single.nll, multi[strategy].nll)
        fp32 = mk.fused_logit_nll([lg.float() for lg in logits], targets, strategy, [0.8, 1.2])
        torch.testing.assert_close(single.nll, fp32.nll)  # bf16 inputs are upcast, math is fp32


def test_non_finite_logits_follow_the_documented_rules():
    lg = torch.randn(3, 10)
    lg[0, 4] = float("-inf")  # impossible token: fine
    lg[1, 2] = float("nan")  # poisons its row
    out = mk.fused_logit_nll([lg, torch.randn(3, 10)], torch.tensor([1, 1, 1]), "entropy")
    assert torch.isfinite(out.nll[[0, 2]]).all() and torch.isfinite(out.entropy[:, [0, 2]]).all()
    assert torch.isnan(out.nll[1])
