"""Word-level generation across tokenizers (kotara.word_generate, DESIGN §5c): seeded draws from toy
models match the fused closed-word mixture Q, and the CLI generates with two real tokenizers."""

from __future__ import annotations

import functools
import json
import math
from collections import Counter

import pytest
import torch
from test_kotara_word_score import build_workspace
from test_kotara_words import CHARS, MERGES, SPACES_ALONE, ToyLM, all_texts, canonical_lm, fused_log_prob

from kotara import word_generate
from kotara.cli import main


class ToyWordLM:
    """A toy LM (an exact distribution over texts) as ``word_generate.WordLM``; EOS is id len(vocab)."""

    def __init__(self, name: str, lm: ToyLM, tokenizer):
        self.name, self.lm, self.tokenizer = name, lm, tokenizer
        self.vocab = tokenizer.vocab
        self.in_set = torch.tensor([t.startswith(" ") for t in self.vocab])
        self.eos_id, self.prefix_id = len(self.vocab), -1

    def tokens(self, text):
        return [self.vocab.index(t) for t in self.tokenizer.tokens(text)]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)

    def token_starts(self, text):
        return self.tokenizer.starts(text)

    def log_probs_along(self, context, new):
        ids = [*context, *new]
        return torch.stack([self._next_log_probs(tuple(ids[: len(context) + k])) for k in range(len(new) + 1)])

    @functools.cache  # noqa: B019  (a test's few toy models; a row is a pure function of its prefix)
    def _next_log_probs(self, ids: tuple[int, ...]) -> torch.Tensor:
        prefix = tuple(self.vocab[i] for i in ids)
        if self.lm.prefix_mass.get(prefix, 0.0) == 0.0:
            return torch.full((len(self.vocab) + 1,), float("-inf"), dtype=torch.float64)
        probs = self.lm.next_probs(prefix)
        return torch.tensor([probs[t] for t in self.vocab] + [probs["<eos>"]], dtype=torch.float64).log()


MODELS = [(canonical_lm(MERGES, 2), MERGES), (canonical_lm(SPACES_ALONE, 3), SPACES_ALONE)]
# Texts of up to 3 characters for the frequency test: 39 outcomes, each frequent enough to be measured.
SHORT_LENGTH = 3
SHORT_MODELS = [
    (canonical_lm(MERGES, 7, SHORT_LENGTH), MERGES),
    (canonical_lm(SPACES_ALONE, 8, SHORT_LENGTH), SPACES_ALONE),
]
WEIGHTS = [0.6, 0.4]
DRAWS = 5_000
FAILURE = 1e-6  # the probability that the bounds below fail for a correct sampler


def deviation_bound(p: float, log_term: float) -> float:
    """The t at which Bernstein's inequality for the frequency of an outcome of probability p in DRAWS
    draws, P(|freq - p| >= t) <= 2 exp(-n t^2 / (2 p (1 - p) + 2 t / 3)), gives 2 exp(-log_term).
    Variance-aware: for outcomes as rare as these (p <= 0.1) it is 1.6x (p = 0.095) to 10x (p = 0.001)
    tighter than Hoeffding's sqrt(log_term / 2n), so 5,000 draws have more power here than 20,000 had
    with Hoeffding."""
    n = DRAWS
    return (log_term / 3 + math.sqrt(log_term**2 / 9 + 2 * n * log_term * p * (1 - p))) / n


@pytest.mark.parametrize("strategy", ["mixture", "mixture_bayes"])
def test_sampled_texts_follow_the_fused_distribution(strategy):
    """Every text of up to 3 characters is an outcome. Bernstein's bound per text with a union over the
    39 of them: a correct sampler's frequencies all stay within ``bound(Q(x))`` of Q with probability
    1 - FAILURE."""
    lms = [ToyWordLM(n, lm, tok) for n, (lm, tok) in zip("ab", SHORT_MODELS)]
    generator = torch.Generator().manual_seed(0)
    counts = Counter(
        word_generate.generate_words(lms, "", strategy, WEIGHTS, 10, generator=generator).completion
        for _ in range(DRAWS)
    )
    texts = all_texts(SHORT_LENGTH)
    assert set(counts) <= set(texts)
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    exact = {x: math.exp(fused_log_prob(SHORT_MODELS, x, strategy, weights)) for x in texts}
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-12)
    log_term = math.log(2 * len(texts) / FAILURE)

    def bound(p: float) -> float:
        return deviation_bound(p, log_term)

    worst = max(texts, key=lambda x: abs(counts[x] / DRAWS - exact[x]) / bound(exact[x]))
    assert abs(counts[worst] / DRAWS - exact[worst]) <= bound(exact[worst]), (worst, counts[worst], exact[worst])
    # Power: a sampler drawing from either model alone (ignoring the other, or the weights) has, at some
    # text, |R(x) - Q(x)| > bound(R(x)) + bound(Q(x)): its frequencies (within bound(R(x)) of R, with
    # probability 1 - FAILURE) would break the bound. Twice over: the gap is > 2x that sum.
    for alone in ([1.0, 1e-12], [1e-12, 1.0]):
        w = torch.tensor(alone, dtype=torch.float64)
        wrong = {x: math.exp(fused_log_prob(SHORT_MODELS, x, strategy, w)) for x in texts}
        assert max(abs(wrong[x] - p) / (bound(wrong[x]) + bound(p)) for x, p in exact.items()) > 2


def test_drawing_a_word_leaves_the_models_rows_as_they_were():
    # A WordLM may hand out the same tensor again (one that caches what it returns): drawing a word at a
    # boundary masks EOS and the non-boundary tokens in its own copy, never in the model's rows.
    class SameTensorLM(ToyWordLM):
        def __init__(self, *args):
            super().__init__(*args)
            self.rows = {}

        def log_probs_along(self, context, new):
            key = (tuple(context), tuple(new))
            return self.rows.setdefault(key, super().log_probs_along(context, new))

    lm = SameTensorLM("a", canonical_lm(SPACES_ALONE, 3), SPACES_ALONE)
    context = lm.tokens("a")
    before = lm.log_probs_along(context, []).clone()
    word_generate.draw_word(lm, context, False, True, None, 10)
    assert torch.equal(lm.log_probs_along(context, []), before) and torch.isfinite(before[0, -1])


def test_words_end_before_a_space_that_starts_a_boundary_only():
    # SPACES_ALONE writes "a  b" as "a", " ", " ", "b": the second space follows a space, so it is
    # inside the word " " + " b"; a sampler that ended words at every word-start token would split it.
    lm = ToyWordLM("a", canonical_lm(SPACES_ALONE, 3), SPACES_ALONE)
    generator = torch.Generator().manual_seed(1)
    outs = [word_generate.generate_words([lm], "", "mixture", [1.0], 10, generator=generator) for _ in range(400)]
    assert all("".join(o.words) == o.completion for o in outs)
    assert all(not w[-1].isspace() for o in outs for w in o.words[:-1])
    assert any("  " in o.completion for o in outs)


def test_greedy_picks_the_candidate_with_the_highest_fused_factor():
    lms = [ToyWordLM(n, lm, tok) for n, (lm, tok) in zip("abc", [*MODELS, (canonical_lm(CHARS, 1), CHARS)])]
    out = word_generate.generate_words(lms, "", "mixture", [0.2, 0.3, 0.5], 10, do_sample=False)
    again = word_generate.generate_words(lms, "", "mixture", [0.2, 0.3, 0.5], 10, do_sample=False)
    assert out.completion == again.completion and out.finish_reason == "eos"
    first_words = []
    for lm in lms:
        word, _ = word_generate.draw_word(lm, [], True, True, None, 10)
        first_words.append(word)
    scores = []
    for word in first_words:
        factor = [
            math.log(w) + word_generate.segment_log_q(lm, [], lm.tokens(word), True, len(out.words) > 1)
            for w, lm in zip([0.2, 0.3, 0.5], lms)
        ]
        scores.append(torch.logsumexp(torch.tensor(factor), 0))
    assert out.words[0] == first_words[int(torch.stack(scores).argmax())]


def test_max_new_tokens_counts_the_first_models_tokens_in_whole_words():
    lms = [ToyWordLM(n, lm, tok) for n, (lm, tok) in zip("ab", MODELS)]
    generator = torch.Generator().manual_seed(2)
    for _ in range(200):
        out = word_generate.generate_words(lms, "", "mixture", WEIGHTS, 2, generator=generator)
        assert out.new_tokens == len(lms[0].tokens(out.completion)) <= 2
        assert out.finish_reason in ("eos", "length")


def test_a_prompt_ending_in_whitespace_is_an_error():
    lms = [ToyWordLM("a", *MODELS[0])]
    with pytest.raises(ValueError, match="end with a non-space character"):
        word_generate.generate_words(lms, "ab ", "mixture", [1.0], 4)


# ------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("kotara_word_generate"))


def generate_argv(workspace, out, *extra):
    argv = ["generate", "--model", str(workspace["a"]), "--model", str(workspace["b"]), "--device", "cpu"]
    return argv + ["--prompt", "the model", "--prompt", "", "--max_new_tokens", "6", "--save_outputs", str(out), *extra]


def test_cli_samples_and_greedy_decodes_per_word(workspace, tmp_path, capsys):
    first, second, greedy = tmp_path / "1.jsonl", tmp_path / "2.jsonl", tmp_path / "g.jsonl"
    sampled = ["--do_sample", "--seed", "3", "--strategy", "mixture_switch", "--switch_rate", "0.2"]
    assert main(generate_argv(workspace, first, *sampled)) == 0
    assert main(generate_argv(workspace, second, *sampled)) == 0
    assert main(generate_argv(workspace, greedy)) == 0
    stdout = capsys.readouterr().out
    assert "mixture_switch per word" in stdout and "mixture per word" in stdout
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert first.read_text() == second.read_text()  # seeded
    assert len(rows) == 2 and all(r["fusion_unit"] == "word" for r in rows)
    for row in rows + [json.loads(line) for line in greedy.read_text().splitlines()]:
        assert row["completion"] == "".join(row["words"])
        assert row["new_tokens"] <= 6 and row["finish_reason"] in ("eos", "stop", "length")
        assert all(abs(sum(w) - 1) < 1e-9 for w in row["weights"])
        assert all(w.startswith(" ") for w in row["words"][1 if row["prompt"] == "" else 0 :])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--do_sample", "--top_k", "5"], "--top_k, --top_p and --sampling_temperature reshape one vocabulary"),
        (["--strategy", "entropy"], "combines the models' logits token by token"),
        (["--prompt", "ends with a space "], "a prompt must be empty or end with a non-space character"),
    ],
)
def test_cli_word_generation_user_errors(workspace, tmp_path, capsys, extra, message):
    out = tmp_path / "never.jsonl"
    assert main(generate_argv(workspace, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()
