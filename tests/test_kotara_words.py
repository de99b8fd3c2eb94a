"""The closed-word mixture across tokenizers (kotara.words, DESIGN §5c).

The exhaustive tests use toy language models that are exact distributions over texts: a table of
probabilities of every string up to a small length, pushed through a toy tokenizer's canonical
tokenisation and written token by token with an EOS at the end. Then the probability of every text
under the fused model can be summed over all texts.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from kotara import words

ALPHABET = "ab "
MAX_LENGTH = 5
EOS = "<eos>"


# ------------------------------------------------------------------------------------ the text rule


def test_boundaries_follow_the_text_rule_and_segments_tile_the_text():
    rng = random.Random(0)
    chars = "ab \t\n\u00a0\u2003\x1c.é"
    for _ in range(300):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 12)))
        expected = [i for i in range(1, len(text)) if text[i] == " " and not text[i - 1].isspace()]
        assert words.boundaries(text) == expected, repr(text)
        parts = words.segments(text)
        assert "".join(parts) == text
        assert all(p.startswith(" ") for p in parts[1:])
        assert all(not p[-1].isspace() for p in parts[:-1])


def test_python_regex_whitespace_is_str_isspace():
    # The boundary regex relies on \S meaning "not str.isspace()" for every code point.
    import re

    space = re.compile(r"\s")
    assert all(bool(space.match(c)) == c.isspace() for c in map(chr, range(sys.maxunicode + 1)))


# ------------------------------------------------------------------------------------ toy models


class ToyTokenizer:
    """Canonical tokenisation: cut at the boundaries, then greedy longest match from ``vocab``."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.word_start = {t for t in vocab if t.startswith(" ")}

    def tokens(self, text: str) -> list[str]:
        out = []
        for part in words.segments(text):
            i = 0
            while i < len(part):
                piece = max((t for t in self.vocab if part.startswith(t, i)), key=len)
                out.append(piece)
                i += len(piece)
        return out

    def starts(self, text: str) -> list[int]:
        return list(itertools.accumulate([0] + [len(t) for t in self.tokens(text)][:-1]))


class ToyLM:
    """A distribution over token sequences, read autoregressively (EOS ends every sequence)."""

    def __init__(self, sequence_probs: dict[tuple[str, ...], float], vocab: list[str]):
        self.vocab = vocab
        self.prefix_mass: dict[tuple[str, ...], float] = {}
        self.complete: dict[tuple[str, ...], float] = {}
        for seq, p in sequence_probs.items():
            self.complete[seq] = self.complete.get(seq, 0.0) + p
            for k in range(len(seq) + 1):
                self.prefix_mass[seq[:k]] = self.prefix_mass.get(seq[:k], 0.0) + p

    def next_probs(self, prefix: tuple[str, ...]) -> dict[str, float]:
        total = self.prefix_mass[prefix]
        probs = {t: self.prefix_mass.get(prefix + (t,), 0.0) / total for t in self.vocab}
        probs[EOS] = self.complete.get(prefix, 0.0) / total
        return probs


def all_texts(max_length: int = MAX_LENGTH) -> list[str]:
    return ["".join(c) for n in range(1, max_length + 1) for c in itertools.product(ALPHABET, repeat=n)]


def canonical_lm(tokenizer: ToyTokenizer, seed: int, max_length: int = MAX_LENGTH) -> ToyLM:
    """Random probabilities of every text up to ``max_length`` characters, on its canonical tokenisation only."""
    rng = random.Random(seed)
    texts = all_texts(max_length)
    raw = [rng.random() ** 3 for _ in texts]
    total = sum(raw)
    return ToyLM({tuple(tokenizer.tokens(x)): p / total for x, p in zip(texts, raw)}, tokenizer.vocab)


def per_token(lm: ToyLM, tokenizer: ToyTokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(log p(token) [n], log S before each token [n], log p(EOS) at the end), fp64."""
    tokens = tokenizer.tokens(text)
    log_p, log_s = [], []
    for k, token in enumerate(tokens):
        probs = lm.next_probs(tuple(tokens[:k]))
        log_p.append(math.log(probs[token]) if probs[token] > 0 else -math.inf)
        mass = sum(probs[t] for t in tokenizer.word_start)
        log_s.append(math.log(mass) if mass > 0 else -math.inf)
    close = lm.next_probs(tuple(tokens))[EOS]
    return torch.tensor(log_p, dtype=torch.float64), torch.tensor(log_s, dtype=torch.float64), math.log(close)


def segment_table(models, text: str) -> torch.Tensor:
    """log q_m(s_j) [M, J] for (lm, tokenizer) pairs, the last segment closed by EOS (after the checks
    the word path runs on every model)."""
    bounds = words.boundaries(text)
    rows = []
    for lm, tokenizer in models:
        starts = tokenizer.starts(text)
        words.check_token_starts(starts, text, "toy", bounds)
        ids = [tokenizer.vocab.index(t) for t in tokenizer.tokens(text)]
        in_set = torch.tensor([t in tokenizer.word_start for t in tokenizer.vocab])
        words.check_segment_tokens(ids, starts, text, bounds, in_set, "toy")
        log_p, log_s, close = per_token(lm, tokenizer, text)
        segment = words.target_segments(starts, bounds)
        rows.append(words.segment_log_probs(log_p, log_s, segment, len(bounds) + 1, close))
    return torch.stack(rows)


class UnigramToyTokenizer(ToyTokenizer):
    """A Unigram (SentencePiece-style) tokenizer: each segment cut by Viterbi, the split whose pieces'
    log-scores sum highest (not greedy longest match: "aba" is "a" + "ba" here)."""

    def __init__(self, scores: dict[str, float]):
        super().__init__(list(scores))
        self.scores = scores

    def tokens(self, text: str) -> list[str]:
        out = []
        for part in words.segments(text):
            best: list[tuple[float, list[str]]] = [(0.0, [])] + [(-math.inf, [])] * len(part)
            for end in range(1, len(part) + 1):
                for piece, score in self.scores.items():
                    start = end - len(piece)
                    if start >= 0 and part[start:end] == piece and best[start][0] + score > best[end][0]:
                        best[end] = (best[start][0] + score, best[start][1] + [piece])
            out.extend(best[-1][1])
        return out


CHARS = ToyTokenizer(list(ALPHABET))
UNIGRAM = UnigramToyTokenizer({"a": -2.0, "b": -2.0, " ": -3.0, "ab": -3.5, "ba": -1.5, " a": -2.5, " b": -0.5,
                               "  ": -2.0, " ab": -6.0})  # fmt: skip
MERGES = ToyTokenizer(["a", "b", " ", "ab", "ba", " a", " b", " ab", "bb"])
SPACES_ALONE = ToyTokenizer(["a", "b", " ", "aa", "ab", "bab"])
TOY_MODELS = [
    (canonical_lm(CHARS, 1), CHARS),
    (canonical_lm(MERGES, 2), MERGES),
    (canonical_lm(SPACES_ALONE, 3), SPACES_ALONE),
]
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def fused_log_prob(models, text, strategy, weights=WEIGHTS, switch_rate=0.1) -> float:
    factors, _ = words.fuse(segment_table(models, text), strategy, weights, switch_rate)
    return float(factors.sum())


def naive_common_boundary_log_prob(models, text, weights=WEIGHTS) -> float:
    """The naive scheme: mix each model's probability of the tokens between the offsets where every
    tokenisation starts a token (no closing terms). Not a distribution."""
    common = set.intersection(*(set(tok.starts(text)) for _, tok in models))
    cuts = sorted(common)
    pieces = []
    for lm, tok in models:
        log_p, _, close = per_token(lm, tok, text)
        piece = torch.tensor([sum(1 for c in cuts if c <= s) - 1 for s in tok.starts(text)])
        per_piece = torch.zeros(len(cuts), dtype=torch.float64).index_add_(0, piece, log_p)
        per_piece[-1] += close
        pieces.append(per_piece)
    table = torch.stack(pieces)
    return float((table + (weights / weights.sum()).log()[:, None]).logsumexp(0).sum())


def test_toy_models_are_distributions_over_texts():
    # The premise of the exhaustive test: each model alone sums to 1 over all texts.
    for lm, tok in TOY_MODELS:
        total = sum(math.exp(float(segment_table([(lm, tok)], x).sum())) for x in all_texts())
        assert total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("strategy", words.WORD_STRATEGIES)
def test_exhaustive_fused_probabilities_sum_to_one(strategy):
    total = sum(math.exp(fused_log_prob(TOY_MODELS, x, strategy)) for x in all_texts())
    assert total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("strategy", words.WORD_STRATEGIES)
def test_exhaustive_sum_is_one_with_a_unigram_tokenizer(strategy):
    """The guarantee with a Viterbi (Unigram) tokenizer whose splits are not greedy and which writes
    word-start tokens after whitespace inside a segment ("a  b": " b" after " "; the check accepts them)."""
    assert UNIGRAM.tokens("aba") == ["a", "ba"] and UNIGRAM.tokens("a  b") == ["a", " ", " b"]
    models = [TOY_MODELS[1], (canonical_lm(UNIGRAM, 5), UNIGRAM)]
    total = sum(math.exp(fused_log_prob(models, x, strategy, WEIGHTS[:2])) for x in all_texts())
    assert total == pytest.approx(1.0, abs=1e-12)


def test_exhaustive_sum_is_below_one_when_a_model_wastes_mass_on_non_canonical_tokenisations():
    # Model b writes MERGES' canonical tokens with probability 0.7 and single characters (valid
    # MERGES tokens, non-canonical for it) with 0.3: that mass never reaches a scored text.
    canonical, chars = canonical_lm(MERGES, 2), canonical_lm(CHARS, 4)
    mixed = {seq: 0.7 * p for seq, p in canonical.complete.items()}
    for seq, p in chars.complete.items():
        mixed[seq] = mixed.get(seq, 0.0) + 0.3 * p
    leaky = [TOY_MODELS[0], (ToyLM(mixed, MERGES.vocab), MERGES)]
    for strategy in words.WORD_STRATEGIES:
        total = sum(math.exp(fused_log_prob(leaky, x, strategy, WEIGHTS[:2])) for x in all_texts())
        assert 0.5 < total < 1.0 - 1e-3, strategy


def test_naive_common_boundary_scheme_exceeds_one():
    # Regression: the scheme the closed-word mixture replaces is not a distribution.
    total = sum(math.exp(naive_common_boundary_log_prob(TOY_MODELS[:2], x, WEIGHTS[:2])) for x in all_texts())
    assert total > 1.01


# ------------------------------------------------------------------------------------ properties


def test_one_model_telescopes_to_its_own_log_probability():
    generator = torch.Generator().manual_seed(0)
    log_p = -torch.rand(50, generator=generator, dtype=torch.float64) * 5
    log_s = -torch.rand(50, generator=generator, dtype=torch.float64)
    segment = torch.sort(torch.randint(0, 12, (50,), generator=generator)).values
    segment = torch.unique_consecutive(segment, return_inverse=True)[1]  # every segment present
    log_q = words.segment_log_probs(log_p, log_s, segment, int(segment.max()) + 1)
    assert float(log_q.sum()) == pytest.approx(float(log_p.sum()), abs=1e-9)
    for strategy in words.WORD_STRATEGIES:
        copies = log_q.expand(3, -1)
        factors, _ = words.fuse(copies, strategy, WEIGHTS)
        assert float(factors.sum()) == pytest.approx(float(log_p.sum()), abs=1e-9)


def sample_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [x for x in rng.sample(all_texts(), count) if words.boundaries(x)]


def test_bounds_of_mixture_and_mixture_bayes():
    weights = WEIGHTS / WEIGHTS.sum()
    for text in sample_texts(60, seed=1):
        table = segment_table(TOY_MODELS, text)
        num_bytes = len(text.encode())
        alone = [words.bits_per_byte(float(row.sum()), num_bytes) for row in table]
        mixture = words.bits_per_byte(fused_log_prob(TOY_MODELS, text, "mixture"), num_bytes)
        bayes_log_q = fused_log_prob(TOY_MODELS, text, "mixture_bayes")
        bayes = words.bits_per_byte(bayes_log_q, num_bytes)
        assert mixture <= sum(float(w) * b for w, b in zip(weights, alone)) + 1e-12
        assert bayes <= min(b + math.log2(1 / float(w)) / num_bytes for w, b in zip(weights, alone)) + 1e-12
        # mixture_bayes is the whole-text mixture sum_m w_m P_m(x).
        whole = torch.logsumexp(weights.log() + table.sum(1), 0)
        assert bayes_log_q == pytest.approx(float(whole), abs=1e-12)


def test_switch_rate_zero_is_bayes_and_one_is_the_uniform_mixture():
    for text in sample_texts(20, seed=2):
        bayes = fused_log_prob(TOY_MODELS, text, "mixture_bayes")
        assert fused_log_prob(TOY_MODELS, text, "mixture_switch", switch_rate=0.0) == pytest.approx(bayes, abs=1e-12)
        # With alpha = 1 every weight after the first segment's (the prior) is 1/M.
        ones = torch.ones(3, dtype=torch.float64)
        uniform = fused_log_prob(TOY_MODELS, text, "mixture", weights=ones)
        switch_all = fused_log_prob(TOY_MODELS, text, "mixture_switch", weights=ones, switch_rate=1.0)
        assert switch_all == pytest.approx(uniform, abs=1e-12)


@pytest.mark.parametrize("strategy", words.WORD_STRATEGIES)
def test_causal_a_shared_prefix_gets_identical_factors(strategy):
    # "ab ba" and "ab b" share their first segment; "ab ba" and "ab bab" share none but the first.
    for text, other, shared in (("ab ba", "ab b", 1), ("a b a", "a b b", 2), ("b  a", "b  ab", 0)):
        factors = words.fuse(segment_table(TOY_MODELS, text), strategy, WEIGHTS, 0.1)[0]
        others = words.fuse(segment_table(TOY_MODELS, other), strategy, WEIGHTS, 0.1)[0]
        assert torch.equal(factors[:shared], others[:shared])
        assert shared == 0 or not torch.equal(factors[: shared + 1], others[: shared + 1])


@pytest.mark.parametrize("strategy", words.WORD_STRATEGIES)
def test_symmetric_in_model_order(strategy):
    order = [2, 0, 1]
    for text in sample_texts(20, seed=3):
        forward = fused_log_prob(TOY_MODELS, text, strategy)
        permuted = fused_log_prob([TOY_MODELS[i] for i in order], text, strategy, WEIGHTS[order])
        assert permuted == pytest.approx(forward, abs=1e-12)


def test_unknown_strategy_and_bad_switch_rate_are_errors():
    table = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown word-level strategy 'entropy'"):
        words.fuse(table, "entropy", torch.ones(2))
    with pytest.raises(ValueError, match="switch rate"):
        words.fuse(table, "mixture_switch", torch.ones(2), switch_rate=1.5)


# ------------------------------------------------------------------------------------ real tokenizers

SAMPLE = (
    "def f(a, b):\n    return a  +  b\n\n\tx = [1, 2]  # naïve café, 10 000 €\n"
    "The cat sat.  Then it ran;\r\nit's 'quoted' (yes) — fine…  end "
)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _train(pre_tokenizer, decoder, special: list[str], byte_level: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizer, decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=alphabet)
    backend.train_from_iterator([SAMPLE * 3, SAMPLE.upper()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special[-1], eos_token=special[-1])


def gpt2_pattern_bpe():
    from tokenizers import Regex, decoders, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT2_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return _train(pre, decoders.ByteLevel(), ["<|endoftext|>"], byte_level=True)


def metaspace_bpe():
    from tokenizers import decoders, pre_tokenizers

    scheme = dict(replacement="▁", prepend_scheme="first")
    return _train(pre_tokenizers.Metaspace(**scheme), decoders.Metaspace(**scheme), ["<unk>", "<s>"], byte_level=False)


def project_bpe():
    from model.data import train_tokenizer

    return train_tokenizer([SAMPLE * 3, SAMPLE.upper()], vocab_size=400)


# Metaspace with prepend_scheme "first" prepends to every piece tokenized: one piece only for it.
@pytest.mark.parametrize("build, line_pieces", [(gpt2_pattern_bpe, True), (metaspace_bpe, False), (project_bpe, True)])
def test_real_tokenizers_start_a_word_start_token_at_every_boundary(build, line_pieces):
    tokenizer = build()
    text = SAMPLE + "unseen néeds  here\n  and there x"
    lines = text.splitlines(keepends=True)
    pieces = ["".join(lines[:3]), "".join(lines[3:])] if line_pieces else [text]
    ids, starts = words.tokenize_with_starts(tokenizer, pieces)
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text
    bounds = words.boundaries(text)
    words.check_token_starts(starts, text, "a", bounds)
    in_w = words.word_start_mask(tokenizer, len(tokenizer) + 5)
    words.check_segment_tokens(ids, starts, text, bounds, in_w, "a")  # "  here", "\n  and": accepted
    assert not in_w[len(tokenizer) :].any()
    by_start = {}
    for token_id, start in zip(ids, starts):
        by_start.setdefault(start, token_id)
    for offset in bounds:
        assert in_w[by_start[offset]], (offset, tokenizer.convert_ids_to_tokens(by_start[offset]))
    # A word-start token after a non-space character is exactly a boundary.
    after_word = {s for t, s in zip(ids, starts) if in_w[t] and s > 0 and not text[s - 1].isspace()}
    assert after_word == set(bounds)


def test_a_tokenizer_that_drops_spaces_is_an_error(tmp_path):
    from transformers import AutoTokenizer

    from kotara import demo

    tokenizer = AutoTokenizer.from_pretrained(demo.build_tokenizer(Path(tmp_path), ["the", "cat", "sat"]))
    text = "the cat sat"
    _, starts = words.tokenize_with_starts(tokenizer, [text])
    with pytest.raises(
        ValueError, match=r"^model b: no token starts at the word boundary at character 3 .*'the cat sat'"
    ):
        words.check_token_starts(starts, text, "b")


def test_a_word_start_token_inside_a_word_is_an_error():
    """A Unigram tokenizer that normalises NBSP (or a tab) to a space writes "▁b" inside the segment
    "a\u00a0b": every boundary still starts a token, but its "▁b" would close the word "a" in its own
    writing, so Q would count that mass twice. Refused (it was accepted before)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("▁a", -1.0), ("▁b", -1.0), ("a", -2.0), ("b", -2.0), ("▁", -3.0)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0))
    backend.normalizer = normalizers.Sequence([normalizers.Replace("\u00a0", " "), normalizers.Replace("\t", " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    in_w = words.word_start_mask(tokenizer, len(tokenizer))
    for text in ("a\u00a0b a", "a\tb a"):
        ids, starts = words.tokenize_with_starts(tokenizer, [text])
        bounds = words.boundaries(text)
        words.check_token_starts(starts, text, "j", bounds)  # what was checked before: passes
        with pytest.raises(ValueError, match=r"^model j: token 1 starts with a space but sits inside a word at ch"):
            words.check_segment_tokens(ids, starts, text, bounds, in_w, "j")
    ids, starts = words.tokenize_with_starts(tokenizer, ["a b  a"])  # a second space: "▁a" after whitespace
    words.check_segment_tokens(ids, starts, "a b  a", words.boundaries("a b  a"), in_w, "j")


def test_a_tokenizer_attaching_the_boundary_space_to_the_token_before_gets_the_rule_named():
    """DeepSeek-Coder 33B writes "x = 10" as x, "Ġ=Ġ", 1, 0: no token starts at the space before 10.
    The error says so and names the rule (a space after a letter or digit) that would hold for it."""
    text = "x = 10 y"
    starts = [0, 1, 4, 5, 6]  # x | " = " | 1 | 0 | " y"
    with pytest.raises(ValueError, match=r"attaches the space to the token before it \(' = '\).*after a letter or"):
        words.check_token_starts(starts, text, "d")
