"""``fused_log_probs`` (the fused next-token distribution, DESIGN §5a): the reference against the
distribution written out in fp64 from DESIGN §5, the Triton kernel (interpreter on CPU) against the
reference, and both against ``fused_logit_nll`` (the same q). Every strategy, M = 2 and 3."""

import pytest
import torch

import moc_kernels as mk
from moc_kernels import backend
from tests.conftest import assert_rel_close

EPS = 1e-6  # DESIGN §5's epsilon in the entropy and gap weights
TEMPS = [0.85, 1.1, 1.3]
MIXTURE_WEIGHTS = [0.7, 1.4, 0.5]
CONTRASTIVE_BETAS = [1.5, -0.5, 0.25]  # poe with a negative beta: contrastive decoding


def weights_for(strategy, num_models):
    return (CONTRASTIVE_BETAS if strategy == "poe" else MIXTURE_WEIGHTS)[:num_models]


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN, so an element a kernel forgets fails."""
    module = backend.kernel_module("fused_logit_nll")
    monkeypatch.setattr(module, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype))


def make_logits(num_models, rows, vocab, dtype=torch.float32):
    logits = [torch.randn(rows, vocab) * (2 + i) + i for i in range(num_models)]
    logits[0][1] = 0.7  # all equal: gap 0, maximal entropy
    logits[-1][0, 5] = 80.0  # one huge logit: entropy ~ 0
    return [lg.to(dtype) for lg in logits]


def full_fused_log_probs(logits, strategy, temperatures, weights):
    """log q [N, V] and weights [M, N] in fp64, written out in full from the table of DESIGN §5."""
    z = torch.stack([lg.double() / t for lg, t in zip(logits, temperatures)])  # [M, N, V]
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)  # [M, N]
    top2 = p.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    fixed = torch.tensor(weights, dtype=torch.float64)[:, None].expand_as(entropy)
    inverse_entropy, gap_eps = 1 / (entropy + EPS), gap + EPS
    a = {
        "average": torch.full_like(entropy, 1 / len(logits)),
        "poe": fixed,
        "entropy": inverse_entropy / inverse_entropy.sum(0),
        "gap": gap_eps / gap_eps.sum(0),
        "mixture": fixed / fixed.sum(0),
    }
    a["mixture_entropy"], a["mixture_gap"] = a["entropy"], a["gap"]
    alpha = a[strategy]
    if strategy.startswith("mixture"):
        return torch.log((alpha[..., None] * p).sum(0)), alpha
    if strategy == "poe":  # the product of the models' distributions, each to its beta, renormalised
        return torch.log_softmax((alpha[..., None] * log_p).sum(0), -1), alpha
    return torch.log_softmax((alpha[..., None] * z).sum(0), -1), alpha


@pytest.mark.parametrize("strategy", mk.STRATEGIES)
@pytest.mark.parametrize("num_models,vocab", [(2, 50257), (3, 1031)])
def test_reference_is_the_fused_distribution_of_design(strategy, num_models, vocab):
    logits = make_logits(num_models, 7, vocab)
    temps, weights = TEMPS[:num_models], weights_for(strategy, num_models)
    log_q, alpha = mk.fused_log_probs(logits, strategy, temps, weights, return_weights=True)
    expected, expected_alpha = full_fused_log_probs(logits, strategy, temps, weights)
    assert log_q.dtype == torch.float32 and log_q.shape == (7, vocab)
    assert_rel_close(log_q, expected, torch.float32, f"{strategy} log q")
    assert_rel_close(alpha, expected_alpha, torch.float32, f"{strategy} weights")
    # Normalised, including poe with a negative beta (the fp32 row sum of V probabilities).
    torch.testing.assert_close(log_q.double().exp().sum(-1), torch.ones(7, dtype=torch.float64), rtol=2e-5, atol=0)


# V = 50257 (GPT-2) takes the large tiles with a ragged last tile; 1031 is two small tiles, the
# second nearly all masked. The interpreter is slow: few rows.
@pytest.mark.triton
@pytest.mark.parametrize(
    "num_models,vocab,dtype",
    [(2, 50257, torch.float32), (3, 50257, torch.bfloat16), (3, 1031, torch.float32), (2, 1031, torch.bfloat16)],
)
def test_kernel_matches_reference(num_models, vocab, dtype):
    logits = make_logits(num_models, 2 if vocab > 4096 else 5, vocab, dtype)
    temps = TEMPS[:num_models]
    for strategy in mk.STRATEGIES:
        weights = weights_for(strategy, num_models)
        expected, expected_alpha = mk.fused_log_probs(logits, strategy, temps, weights, return_weights=True)
        with mk.use_backend("triton"):
            got, alpha = mk.fused_log_probs(logits, strategy, temps, weights, return_weights=True)
        # Both compute in fp32 from the same (possibly bf16) values, so the fp32 tolerance holds.
        assert got.dtype == torch.float32
        assert_rel_close(got, expected, torch.float32, f"{strategy} log q")
        assert_rel_close(alpha, expected_alpha, torch.float32, f"{strategy} weights")
        assert got.logsumexp(-1).abs().max() < 1e-5, f"{strategy}: q does not sum to 1"


@pytest.mark.parametrize("backend_name", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("num_models", [2, 3])
def test_agrees_with_fused_logit_nll(backend_name, num_models):
    """The NLL op and the distribution op describe one q: nll = -log q[target], every strategy."""
    rows, vocab = 6, 1500
    logits = make_logits(num_models, rows, vocab)
    targets = torch.randint(0, vocab, (rows,))
    targets[0] = 5  # the huge logit's own token
    temps = TEMPS[:num_models]
    with mk.use_backend(backend_name):
        for strategy in mk.STRATEGIES:
            weights = weights_for(strategy, num_models)
            nll = mk.fused_logit_nll(logits, targets, strategy, temps, weights)
            log_q, alpha = mk.fused_log_probs(logits, strategy, temps, weights, return_weights=True)
            assert_rel_close(-log_q.gather(1, targets[:, None]).squeeze(1), nll.nll, torch.float32, strategy)
            assert_rel_close(alpha, nll.weights, torch.float32, f"{strategy} weights")


@pytest.mark.parametrize("backend_name", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_a_model_fused_with_itself_is_its_own_distribution(backend_name):
    logits = torch.randn(4, 777) * 3
    own = torch.log_softmax(logits, -1)
    with mk.use_backend(backend_name):
        for strategy in mk.STRATEGIES:
            assert_rel_close(mk.fused_log_probs([logits, logits.clone()], strategy), own, torch.float32, strategy)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("backend_name", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_non_finite_logits_follow_the_documented_rules(backend_name):
    """-inf: an impossible token (probability 0, row finite); +inf or NaN: that row is NaN; a -inf
    logit under a negative poe beta would make the fused logit +inf: that row is NaN too."""
    rows, vocab = 5, 300
    logits = [torch.randn(rows, vocab) * 2, torch.randn(rows, vocab)]
    logits[0][0, :150] = float("-inf")
    logits[1][0, 7] = float("-inf")
    logits[0][1, 9] = float("nan")
    logits[1][2, 299] = float("inf")
    logits[1][3, 11] = float("-inf")  # harmless, except under a negative beta of model b
    with mk.use_backend(backend_name):
        for strategy in mk.STRATEGIES:
            log_q = mk.fused_log_probs(logits, strategy, [0.9, 1.1])
            assert torch.isnan(log_q[[1, 2]]).all(), strategy
            assert not torch.isnan(log_q[[0, 3, 4]]).any(), strategy
            # Impossible for every model: impossible. For one model: impossible in a product (log-linear
            # pool), possible in a mixture.
            impossible = torch.zeros(vocab, dtype=torch.bool)
            impossible[: 0 if strategy.startswith("mixture") else 150] = True
            impossible[7] = True
            assert (log_q[0, impossible] == float("-inf")).all(), strategy
            assert torch.isfinite(log_q[0, ~impossible]).all(), strategy
        contrastive = mk.fused_log_probs(logits, "poe", weights=[1.5, -0.5])
    assert torch.isnan(contrastive[[1, 2, 3]]).all()
    assert torch.isfinite(contrastive[4]).all()


@pytest.mark.triton
def test_compiles_fullgraph_without_graph_breaks():
    logits = make_logits(2, 4, 333)

    def next_token_scores(a, b):
        log_q, alpha = mk.fused_log_probs([a, b], "entropy", [0.9, 1.2], return_weights=True)
        return log_q + mk.fused_log_probs([a, b], "mixture", weights=[1.0, 3.0]), alpha

    compiled = torch.compile(next_token_scores, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(*logits)
        expected = next_token_scores(*logits)
    for out, ref in zip(got, expected):
        assert_rel_close(out, ref, torch.float32, "compiled")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(strategy="mixture", weights=[1.0, -0.5]), "mixture weights are probabilities and must be > 0"),
        (dict(strategy="poe", weights=[-1.0, -0.5]), "poe needs at least one beta > 0"),
        (dict(strategy="poe", weights=[1.0, float("nan")]), "weights must be finite"),
        (dict(strategy="entropy", temperatures=[1.0, 0.0]), "temperatures must be > 0"),
        (dict(strategy="vote"), "unknown strategy 'vote'"),
        (dict(strategy="average", weights=[1.0]), "1 weights for 2 models"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    logits = [torch.randn(3, 10), torch.randn(3, 10)]
    with pytest.raises(ValueError, match=message):
        mk.fused_log_probs(logits, **kwargs)
    with pytest.raises(ValueError, match="logits shapes differ"):
        mk.fused_log_probs([torch.randn(3, 10), torch.randn(3, 11)], "average")


def test_negative_betas_score_the_contrastive_distribution():
    """Scoring accepts what generation samples from: poe's NLL with a negative beta is -log q[t] of the
    normalised log_softmax(1.5 z_a - 0.5 z_b), in both the fused_logit_nll reference and the kernel."""
    logits = make_logits(2, 6, 2000)
    targets = torch.randint(0, 2000, (6,))
    expected, _ = full_fused_log_probs(logits, "poe", [1.0, 1.0], [1.5, -0.5])
    expected = -expected.gather(1, targets[:, None]).squeeze(1)
    for name in ("reference", "triton"):
        with mk.use_backend(name):
            got = mk.fused_logit_nll(logits, targets, "poe", weights=[1.5, -0.5]).nll
        assert_rel_close(got, expected, torch.float32, name)
