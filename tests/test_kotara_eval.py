"""Kotara's numbers: baselines against Hugging Face's own loss and a token-by-token loop, self-fusion,
``--strategy all`` against each strategy alone, batching, padded vocabularies.

Tiny GPT-2 models and a word-level tokenizer are built in a temporary directory: no downloads.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOLERANCE, assert_rel_close
from test_kotara_support import build_gpt2, build_tokenizer, one_torch_thread, write_corpus  # noqa: F401

import moc_kernels as mk
from kotara import loading
from kotara.evaluate import FusionSpec, evaluate
from kotara.windows import rolling_windows

MAX_LENGTH = 16


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("kotara")
    text_path = write_corpus(root / "text.txt", num_lines=12)
    tokenizer_dir = build_tokenizer(root / "tok", text_path)
    return {
        "root": root,
        "text": text_path,
        "a": build_gpt2(root / "a", tokenizer_dir, seed=1),
        "b": build_gpt2(root / "b", tokenizer_dir, seed=2, extra_columns=7),  # logits padded past the tokenizer
    }


def _load(workspace, names, max_tokens=None):
    """Tokenizer, models and text; ``max_tokens`` keeps only the text's first tokens (faster tests)."""
    tokenizer = loading.load_tokenizer(str(workspace["a"]))
    models = [
        loading.load_model(str(workspace[n]), loading.model_label(i), torch.get_default_device(), torch.float32)
        for i, n in enumerate(names)
    ]
    text = loading.tokenize_file(tokenizer, str(workspace["text"]))
    if max_tokens is not None:
        text.token_ids = text.token_ids[:max_tokens]
    return tokenizer, models, text


def _spec(strategies, count=2, temperatures=None):
    return FusionSpec(list(strategies), temperatures or [1.0] * count, [1.0 / count] * count, [1.0 / count] * count)


def _run(models, text, tokenizer, stride, strategies=("average",), batch_size=1, temperatures=None, max_length=None):
    windows = rolling_windows(len(text.token_ids), max_length or MAX_LENGTH, stride)
    spec = _spec(strategies, len(models), temperatures)
    return evaluate(
        models, text.token_ids, text.num_bytes, windows, spec, batch_size, len(tokenizer), keep_token_nll=True
    )


def test_tokenized_text_has_bos_prefix_and_byte_count(workspace):
    tokenizer, _, text = _load(workspace, ["a", "b"])
    assert text.prefix == "bos" and text.token_ids[0].item() == tokenizer.bos_token_id
    assert text.num_bytes == workspace["text"].stat().st_size
    assert len(text.token_ids) > 4 * MAX_LENGTH  # several windows


def test_baseline_equals_hf_loss_when_stride_equals_max_length(workspace):
    tokenizer, models, text = _load(workspace, ["a", "b"])
    result = _run(models, text, tokenizer, stride=MAX_LENGTH)
    ids = text.token_ids
    assert result.tokens == len(ids) - 1
    # Independent: HF's own shifted loss on the input x[a : t_e] with labels -100 (ignored) before the
    # block, so it scores exactly the targets x[t_b : t_e]; a = max(0, t_e - 1 - L) gives the short last
    # block a full window of context. (The last input position's prediction is dropped by HF's shift.)
    for index, model in enumerate(models):
        total = 0.0
        for t_b in range(1, len(ids), MAX_LENGTH):
            t_e = min(t_b + MAX_LENGTH, len(ids))
            a = max(0, t_e - 1 - MAX_LENGTH)
            chunk = ids[None, a:t_e]
            labels = chunk.clone()
            labels[0, : t_b - a] = -100
            with torch.no_grad():
                if index == 0:  # model a has no padded columns: HF's own `labels=` loss applies directly
                    loss = model.module(input_ids=chunk, labels=labels).loss * (t_e - t_b)
                else:  # model b's padding columns must be dropped before the softmax
                    logits = model.module(input_ids=chunk).logits[0, :-1, : len(tokenizer)]
                    loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="sum")
            total += float(loss)
        assert abs(result.model_nll[index] - total) <= 1e-5 * total
        assert result.ppl(result.model_nll[index]) == pytest.approx(math.exp(total / (len(ids) - 1)), rel=1e-5)


def _token_by_token(model, ids, vocab_size, context_start):
    """NLL of every target t from the input x[context_start(t) : t], one forward per token."""
    out = []
    for t in range(1, len(ids)):
        with torch.no_grad():
            logits = model.module(input_ids=ids[None, context_start(t) : t]).logits[0, -1, :vocab_size]
        out.append(-torch.log_softmax(logits.float(), -1)[ids[t]])
    return torch.stack(out)


@pytest.mark.parametrize(("stride", "num_tokens"), [(1, MAX_LENGTH + 6), (5, 2 * MAX_LENGTH + 3)])
def test_small_stride_scores_each_token_once_like_token_by_token(workspace, stride, num_tokens):
    # num_tokens > MAX_LENGTH + 1: later targets see a context cut to the last MAX_LENGTH tokens.
    tokenizer, models, text = _load(workspace, ["a", "b"], max_tokens=num_tokens)
    ids = text.token_ids
    result = _run(models, text, tokenizer, stride=stride)
    assert result.tokens == len(ids) - 1

    def context_start(t):  # DESIGN §5: block of t ends at t_e; input x[max(0, t_e - 1 - L) : t_e - 1]
        t_e = min(1 + ((t - 1) // stride + 1) * stride, len(ids))
        return max(0, t_e - 1 - MAX_LENGTH)

    for model in models:
        expected = _token_by_token(model, ids, len(tokenizer), context_start)
        got = result.token_nll[model.name]
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert abs(result.model_nll[models.index(model)] - float(expected.double().sum())) <= 1e-5 * float(
            expected.sum()
        )
    if stride == 1:  # every token sees min(t, L) tokens of context: the full-context definition
        full = _token_by_token(models[0], ids, len(tokenizer), lambda t: max(0, t - MAX_LENGTH))
        assert torch.allclose(result.token_nll["a"], full, rtol=1e-5, atol=1e-5)


def test_fusing_a_model_with_itself_gives_its_own_ppl_for_every_strategy(workspace):
    tokenizer, models, text = _load(workspace, ["a", "a"])
    result = _run(models, text, tokenizer, stride=MAX_LENGTH, strategies=mk.STRATEGIES, batch_size=4)
    own = result.model_nll[0]
    assert result.model_nll[1] == pytest.approx(own, rel=1e-6)
    for strategy in mk.STRATEGIES:
        assert result.strategy_nll[strategy] == pytest.approx(own, rel=1e-5), strategy
        assert result.strategy_mean_weights[strategy] == pytest.approx([0.5, 0.5], abs=1e-6), strategy
    assert result.top1_agreement == [1.0]
    assert result.mean_jsd[0] == pytest.approx(0.0, abs=1e-6)
    assert result.nll_pearson[0] == pytest.approx(1.0, abs=1e-9)


def test_alone_at_temperature_is_self_fusion_at_that_temperature(workspace):
    """A model fused with itself at T is that model alone at T: the row Kotara adds for tempered models.
    The T = 1 baseline stays the model's own NLL, whatever the fusion temperatures are."""
    tokenizer, models, text = _load(workspace, ["a", "a"], max_tokens=3 * MAX_LENGTH)
    plain = _run(models, text, tokenizer, stride=MAX_LENGTH)
    tempered = _run(models, text, tokenizer, stride=MAX_LENGTH, temperatures=[0.7, 0.7])
    assert tempered.model_nll == pytest.approx(plain.model_nll, rel=1e-9)
    assert tempered.model_nll_at_temperature[0] == pytest.approx(tempered.strategy_nll["average"], rel=1e-5)
    assert tempered.model_nll_at_temperature[0] != pytest.approx(tempered.model_nll[0], rel=1e-3)
    assert plain.model_nll_at_temperature == pytest.approx(plain.model_nll, rel=1e-12)  # T = 1: the same


def test_strategy_all_equals_each_strategy_alone(workspace):
    tokenizer, models, text = _load(workspace, ["a", "b"], max_tokens=3 * MAX_LENGTH)
    temps = [0.85, 1.1]
    together = _run(models, text, tokenizer, stride=7, strategies=mk.STRATEGIES, batch_size=3, temperatures=temps)
    for strategy in mk.STRATEGIES:
        alone = _run(models, text, tokenizer, stride=7, strategies=[strategy], batch_size=3, temperatures=temps)
        assert alone.strategy_nll[strategy] == pytest.approx(together.strategy_nll[strategy], rel=1e-12)
        assert torch.equal(alone.token_nll[strategy], together.token_nll[strategy])
        assert alone.strategy_mean_weights[strategy] == pytest.approx(together.strategy_mean_weights[strategy])
    # Two different random models: fusion must actually differ from either model alone.
    assert together.strategy_nll["average"] != pytest.approx(together.model_nll[0], rel=1e-3)
    assert 0.0 < together.mean_jsd[0] < math.log(2.0)
    assert 0.0 <= together.top1_agreement[0] <= 1.0


@pytest.mark.parametrize("batch_size", [2, 5])
def test_batched_windows_equal_unbatched(workspace, batch_size):
    tokenizer, models, text = _load(workspace, ["a", "b"], max_tokens=3 * MAX_LENGTH)
    # stride < max_length: the first windows are shorter than the rest, so batches are padded.
    one = _run(models, text, tokenizer, stride=6, strategies=mk.STRATEGIES, batch_size=1)
    many = _run(models, text, tokenizer, stride=6, strategies=mk.STRATEGIES, batch_size=batch_size)
    assert many.tokens == one.tokens
    for key in one.token_nll:
        assert torch.allclose(many.token_nll[key], one.token_nll[key], rtol=1e-5, atol=1e-5), key
    for i in range(2):
        assert many.model_nll[i] == pytest.approx(one.model_nll[i], rel=1e-6)
    for strategy in mk.STRATEGIES:
        assert many.strategy_nll[strategy] == pytest.approx(one.strategy_nll[strategy], rel=1e-6)


def test_padded_logit_columns_are_sliced_to_the_tokenizer(workspace):
    tokenizer, models, text = _load(workspace, ["b", "a"])
    assert models[0].logit_columns == len(tokenizer) + 7
    result = _run(models, text, tokenizer, stride=MAX_LENGTH)
    ids = text.token_ids[: MAX_LENGTH + 1]
    with torch.no_grad():
        logits = models[0].module(input_ids=ids[None, :-1]).logits[0]
    # Softmax over the tokenizer's tokens only: the padding columns carry no probability.
    expected = torch.nn.functional.cross_entropy(logits[:, : len(tokenizer)], ids[1:], reduction="none")
    assert torch.allclose(result.token_nll["a"][:MAX_LENGTH], expected, rtol=1e-5, atol=1e-6)
    loading.check_vocab(models, len(tokenizer))
    with pytest.raises(ValueError, match="vocab mismatch"):
        loading.check_vocab(models, len(tokenizer) + 8)


# Properties of the fused distribution, through the public moc_kernels API Kotara uses.


def _random_logits(rows=6, vocab=37, models=2):
    return [torch.randn(rows, vocab) * 3 for _ in range(models)]


@pytest.mark.parametrize("betas", [[0.5, 0.5], [1.0, 1.0], [0.3, 1.7]])
def test_poe_fused_distribution_sums_to_one(betas):
    logits = _random_logits()
    rows, vocab = logits[0].shape
    # -nll for every possible target gives log q over the whole vocabulary.
    log_q = torch.stack(
        [-mk.fused_logit_nll(logits, torch.full((rows,), v), "poe", [0.9, 1.2], betas).nll for v in range(vocab)], 1
    )
    assert torch.allclose(log_q.double().logsumexp(1), torch.zeros(rows, dtype=torch.float64), atol=1e-5)


def test_weights_lie_in_unit_interval_and_sum_to_one():
    logits = _random_logits(rows=32, models=3)
    targets = torch.randint(0, 37, (32,))
    for strategy, result in mk.fused_logit_nll_multi(logits, targets, mk.STRATEGIES, weights=[1, 2, 3]).items():
        if strategy == "poe":  # betas are exponents, not a partition of unity
            continue
        assert (result.weights >= 0).all() and (result.weights <= 1).all(), strategy
        assert torch.allclose(result.weights.sum(0), torch.ones(32), atol=1e-6), strategy


def test_gap_with_equal_top2_falls_back_to_equal_weights():
    # Both models have a tied maximum: gap 0 for each, so alpha = (0 + eps) / (2 eps) = 1/2 each.
    a = torch.tensor([[2.0, 2.0, 0.0, -1.0]])
    b = torch.tensor([[0.0, 5.0, 5.0, 1.0]])
    result = mk.fused_logit_nll([a, b], torch.tensor([1]), "gap")
    assert result.weights[:, 0].tolist() == pytest.approx([0.5, 0.5])
    assert result.nll[0] == pytest.approx(-torch.log_softmax((a + b) / 2, -1)[0, 1].item(), rel=1e-6)


def test_similarity_stats_match_their_definitions():
    from kotara.similarity import pearson_from_sums, token_stats

    a = torch.randn(40, 53) * 2
    b = a + torch.randn(40, 53)  # similar, not identical
    b[:5] = a[:5]  # identical rows: JS 0, same argmax
    targets = torch.randint(0, 53, (40,))
    stats = token_stats([a, b], targets)
    pa, pb = a.double().softmax(-1), b.double().softmax(-1)
    mid = (pa + pb) / 2
    jsd = 0.5 * (pa * (pa / mid).log()).sum(-1) + 0.5 * (pb * (pb / mid).log()).sum(-1)
    assert torch.allclose(stats["jsd"][0].double(), jsd, atol=1e-6)
    assert (stats["jsd"][0, :5] <= 1e-6).all()  # a difference of ~ln(53) entropies: fp32 rounding
    assert stats["agree"][0].tolist() == (a.argmax(-1) == b.argmax(-1)).float().tolist()
    nll_a = torch.nn.functional.cross_entropy(a, targets, reduction="none")
    assert torch.allclose(stats["nll"][0], nll_a, rtol=1e-6, atol=1e-6)
    x, y = stats["nll"].double()
    r = pearson_from_sums(40, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum())
    assert r == pytest.approx(float(torch.corrcoef(torch.stack([x, y]))[0, 1]), rel=1e-9)
    assert math.isnan(pearson_from_sums(3, 3.0, 1.0, 3.0, 1.0, 1.0))  # constant x: undefined
    # -inf logits (impossible tokens) are allowed: statistics stay finite where the target is possible.
    a[:, 7], b[:, 9] = float("-inf"), float("-inf")
    masked = token_stats([a, b], torch.zeros(40, dtype=torch.int64))
    assert torch.isfinite(masked["jsd"]).all() and torch.isfinite(masked["nll"]).all()


def test_similarity_nll_at_temperature_for_mixed_temperatures():
    """One model tempered, one not: the untempered row is its own NLL (it was an uninitialised copy)."""
    from kotara.similarity import token_stats

    a, b = torch.randn(30, 17) * 3, torch.randn(30, 17) * 3
    targets = torch.randint(0, 17, (30,))
    stats = token_stats([a, b], targets, temperatures=[1.0, 1.7])
    at_temperature = stats["nll_at_temperature"].double()
    assert torch.equal(stats["nll_at_temperature"][0], stats["nll"][0])
    expected_b = torch.nn.functional.cross_entropy(b.double() / 1.7, targets, reduction="none")
    assert torch.allclose(at_temperature[1], expected_b, rtol=1e-6, atol=1e-6)


@pytest.mark.triton
def test_triton_fusion_equals_reference_through_kotara(workspace):
    """--kernels triton (Triton's interpreter on CPU) and the reference give the same fused NLLs,
    the entropy-weighted ones included (these tiny models are sharp: entropies down to ~1e-6 nats)."""
    tokenizer, models, text = _load(workspace, ["a", "b"], max_tokens=2 * MAX_LENGTH)
    kwargs = dict(stride=MAX_LENGTH, strategies=mk.STRATEGIES, temperatures=[0.8, 1.3])
    with mk.use_backend("reference"):
        reference = _run(models, text, tokenizer, **kwargs)
    with mk.use_backend("triton"):
        triton = _run(models, text, tokenizer, **kwargs)
    for strategy in mk.STRATEGIES:
        assert_rel_close(triton.token_nll[strategy], reference.token_nll[strategy], torch.float32, strategy)
        tolerance = TOLERANCE[torch.float32]  # fp32 sums in another order: the kernel tests' table
        assert triton.strategy_mean_weights[strategy] == pytest.approx(
            reference.strategy_mean_weights[strategy], rel=tolerance
        )
