"""Fusion of models whose tokenizers differ: the closed-word mixture (DESIGN §5c).

Token-level fusion needs one vocabulary. Across tokenizers we fuse per *segment* of the text
instead, with segments cut by a rule that depends on the text alone:

  boundaries   every offset i >= 1 with text[i] == " " and text[i - 1] not whitespace (str.isspace):
               the space that follows a word. They cut the text into segments s_0 ... s_J; every
               segment but the first starts with that space, every one but the last ends with a
               non-whitespace character.

Each model m must start a token at every boundary (``check_token_starts``; an error otherwise,
never a fallback that merges segments: merging by tokenizer would break the guarantee below).
With W_m the tokens whose text starts with a space (``word_start_mask``, from the tokenizer's own
decoding) and S_m(ctx) = sum_{t in W_m} p_m(t | ctx), the probability that model m writes s_j as
one closed word is

    log q_m(s_j) = sum_{tokens t of s_j} log p_m(t) + log S_m(after s_j) - log S_m(before s_j)

with S_m(before s_0) = S_m(after s_J) = 1 (``segment_log_probs``). S_m(after s_j) is the row that
predicts the first token of s_{j+1}, so for one model the sum over j telescopes to its own log
probability of the text: one model reduces exactly to its token-level bits/byte. The fused
log Q(x) = sum_j log sum_m w_{m,j} q_m(s_j) with weights from the past only (``fuse``):

  mixture          w_{m,j} = the fixed weights w_m (normalised to sum 1)
  mixture_bayes    w_{m,j} ∝ w_m prod_{i<j} q_m(s_i): the posterior, so Q = sum_m w_m P_m(x)
  mixture_switch   fixed share: the posterior after s_{j-1}, then (1 - α) posterior + α / M

Each q_m(. | past) is a sub-distribution over the next closed word, so Q sums to at most 1 over
all texts (exactly 1 for models that only ever write their canonical tokenisation and end every
text with EOS): -log2 Q / bytes is an honest bits/byte. tests/test_kotara_words.py checks that
exhaustively on a toy alphabet, and that the naive scheme (mixing between the token boundaries the
tokenisations share) exceeds 1.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from typing import Any

import torch

WORD_STRATEGIES = ("mixture", "mixture_bayes", "mixture_switch")
DEFAULT_SWITCH_RATE = 0.01
# A space after a non-whitespace character. Python's \S is exactly "not str.isspace()" (checked over
# every code point in the tests), so this is the rule of DESIGN §5c.
_BOUNDARY = re.compile(r"(?<=\S) ")
# Anchors for deciding W_m: decode([anchor, t]) minus decode([anchor]) (see word_start_mask).
_ANCHOR_TEXTS = ("a", "x", "0", ".")


def boundaries(text: str) -> list[int]:
    """The boundary offsets of ``text`` (character offsets, increasing, each >= 1)."""
    return [match.start() for match in _BOUNDARY.finditer(text)]


def segments(text: str) -> list[str]:
    """``text`` cut at its boundaries: s_0 ... s_J, whose concatenation is ``text``."""
    cuts = [0, *boundaries(text), len(text)]
    return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def tokenize_with_starts(tokenizer: Any, pieces: Sequence[str]) -> tuple[list[int], list[int]]:
    """Token ids of the text ``"".join(pieces)`` and the character offset where each token starts.

    The text is tokenized in parts cut where the tokens cannot change (``kotara.loading.exact_parts``,
    as ``kotara.loading.tokenize_file`` does) and their offset mappings shifted by the characters
    before them. Returns (ids, starts), both of length n.
    """
    from kotara.loading import exact_parts

    ids: list[int] = []
    starts: list[int] = []
    base = 0
    for piece in exact_parts(tokenizer, pieces):
        encoding = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        ids.extend(encoding["input_ids"])
        starts.extend(base + start for start, _ in encoding["offset_mapping"])
        base += len(piece)
    return ids, starts


# The rule that tokenizers attaching a boundary space to the token before it (DeepSeek-Coder's
# "Ġ=Ġ", "Ġ>Ġ") would satisfy: a space after a letter or digit only. Named in the error, not used.
_AFTER_ALNUM = re.compile(r"(?<=[^\W_]) ")


def check_token_starts(starts: Sequence[int], text: str, model: str, bounds: Sequence[int] | None = None) -> None:
    """Raise ValueError (one line: the model, the offset, the text around it) unless every boundary
    of ``text`` is the start of one of the tokens whose start offsets are ``starts``. When the token
    over the boundary ends just after its space (the tokenizer attaches the space to the token before
    it) and every space after a letter or digit does start a token, the error says that this rule would
    hold for the model."""
    token_starts = set(starts)
    ordered = sorted(token_starts)
    for offset in boundaries(text) if bounds is None else bounds:
        if offset not in token_starts:
            around = text[max(0, offset - 20) : offset + 20]
            k = bisect.bisect_left(ordered, offset)  # ordered[k - 1] < offset < ordered[k]
            hint = ""
            if 0 < k < len(ordered) and ordered[k] == offset + 1:
                token = text[ordered[k - 1] : ordered[k]]
                rule = all(m.start() in token_starts for m in _AFTER_ALNUM.finditer(text))
                hint = f"; its tokenizer attaches the space to the token before it ({token!r})" + (
                    ": every space after a letter or digit does start a token, so a boundary rule 'a space "
                    "after a letter or digit' would hold for it (not offered: boundaries must not depend on "
                    "the tokenizers)"
                    if rule
                    else ""
                )
            raise ValueError(
                f"model {model}: no token starts at the word boundary at character {offset} (text around it: "
                f"{around!r}); fusion across tokenizers needs every model to start a token at each space that "
                f"follows a word{hint}"
            )


def check_segment_tokens(
    ids: Sequence[int], starts: Sequence[int], text: str, bounds: Sequence[int], in_set: torch.Tensor, model: str
) -> None:
    """Raise ValueError unless the tokens fit the closed-word reading that makes Q sum to at most 1:
    the first token of every segment after the first is in W_m (its text starts with a space), and no
    other token in W_m starts inside a segment after a non-whitespace character (a word-start token
    there would close the word in the model's own writing, e.g. a Unigram tokenizer that turns a tab or
    an NBSP into ``▁``). A word-start token after whitespace (indentation, a second space) is fine: the
    model's writing does not close a word there either. ``check_token_starts`` comes first."""
    bound_set = set(bounds)
    vocab = in_set.numel()
    seen: set[int] = set()
    for k, (token, start) in enumerate(zip(ids, starts)):
        word_start = token < vocab and bool(in_set[token])
        first_at_bound = start in bound_set and start not in seen
        seen.add(start)
        if first_at_bound and not word_start:
            raise ValueError(
                f"model {model}: the token at the word boundary at character {start} ({text[start : start + 10]!r}) "
                "does not decode to text starting with a space; fusion across tokenizers cannot tell where its "
                "words start"
            )
        if word_start and not first_at_bound and k > 0 and start > 0 and not text[start - 1].isspace():
            raise ValueError(
                f"model {model}: token {k} starts with a space but sits inside a word at character {start} (text "
                f"around it: {text[max(0, start - 20) : start + 20]!r}); its tokenizer reads a character there as "
                "a space (e.g. a tab or an NBSP normalised to ▁), which fusion across tokenizers cannot score "
                "honestly"
            )


def target_segments(starts: Sequence[int], bounds: Sequence[int]) -> torch.Tensor:
    """The segment of each token: [n] int64, the number of boundaries at or before its start."""
    return torch.tensor([bisect.bisect_right(bounds, s) for s in starts], dtype=torch.int64)


def _anchor_id(tokenizer: Any) -> int:
    """A token that decodes to text ending in a non-whitespace character, to decode other tokens after."""
    for text in _ANCHOR_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            decoded = tokenizer.decode(ids[-1:], clean_up_tokenization_spaces=False)
            if decoded and not decoded[-1].isspace():
                return int(ids[-1])
    raise ValueError("cannot find a token to decode after (none of 'a', 'x', '0', '.' encodes to one)")


def word_start_mask(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """W_m as a mask: [vocab_size] bool, True for the tokens whose text starts with a space.

    Decided by the tokenizer's own decoding: ``decode([a, t])`` minus ``decode([a])`` starts with
    " " for an anchor ``a`` (so byte-level ``Ġ...`` and SentencePiece ``▁...`` tokens both count,
    whatever a decoder does to a text's first token). Ids past the tokenizer are never in W.
    """
    anchor = _anchor_id(tokenizer)
    head = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    count = min(len(tokenizer), vocab_size)
    pairs = tokenizer.batch_decode([[anchor, t] for t in range(count)], clean_up_tokenization_spaces=False)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[:count] = torch.tensor([p.startswith(head) and p[len(head) : len(head) + 1] == " " for p in pairs])
    return mask


def segment_log_probs(
    target_log_prob: torch.Tensor,
    log_word_start: torch.Tensor,
    segment: torch.Tensor,
    num_segments: int,
    final_log_close: float = 0.0,
) -> torch.Tensor:
    """log q_m(s_j) for one model: [num_segments] fp64.

    target_log_prob: [n] log p_m of every text token (in text order); log_word_start: [n]
    log S_m of the row that predicts that token; segment: [n] int64, the segment of each token
    (non-decreasing, every segment present). ``final_log_close`` closes the last segment (0: the
    text's end is not scored, DESIGN §5; the exhaustive test passes log p_m(EOS)).
    """
    target_log_prob, log_word_start = target_log_prob.double(), log_word_start.double()
    log_q = torch.zeros(num_segments, dtype=torch.float64).index_add_(0, segment, target_log_prob)
    first = torch.ones_like(segment, dtype=torch.bool)
    first[1:] = segment[1:] != segment[:-1]
    # Segment j >= 1 starts at its first token, predicted by the row whose S is both "after s_{j-1}"
    # and "before s_j": added to the one, subtracted from the other.
    opening = log_word_start[first][1:]  # [num_segments - 1]
    log_q[:-1] += opening
    log_q[1:] -= opening
    log_q[-1] += final_log_close
    return log_q


def fused_segment_weights(
    segment_log_q: torch.Tensor, strategy: str, weights: torch.Tensor, switch_rate: float = DEFAULT_SWITCH_RATE
) -> torch.Tensor:
    """log w_{m,j}: [M, J] fp64, normalised over m, each column from the segments before it only.

    segment_log_q: [M, J] fp64 log q_m(s_j); weights: [M] fixed weights / prior (> 0, normalised here).
    """
    if strategy not in WORD_STRATEGIES:
        raise ValueError(f"unknown word-level strategy {strategy!r}; expected one of {', '.join(WORD_STRATEGIES)}")
    num_models, num_segments = segment_log_q.shape
    log_prior = (weights.double() / weights.double().sum()).log()[:, None]
    if strategy == "mixture":
        return log_prior.expand(num_models, num_segments).clone()
    if strategy == "mixture_bayes":
        past = segment_log_q.cumsum(1) - segment_log_q  # sum_{i<j} log q_m(s_i)
        unnormalised = log_prior + past
        return unnormalised - unnormalised.logsumexp(0, keepdim=True)
    if not 0.0 <= switch_rate <= 1.0:
        raise ValueError(f"switch rate must be in [0, 1], got {switch_rate}")
    # Fixed share is sequential; plain floats keep the J-step loop cheap (M is small).
    log_w = log_prior[:, 0].tolist()
    columns = segment_log_q.t().tolist()
    out = []
    log_stay = math.log1p(-switch_rate) if switch_rate < 1 else -math.inf
    log_share = math.log(switch_rate / num_models) if switch_rate > 0 else -math.inf
    for column in columns:
        out.append(log_w)
        post = [w + q for w, q in zip(log_w, column)]
        top = max(post)
        norm = top + math.log(sum(math.exp(p - top) for p in post))
        log_w = [_logaddexp(log_stay + p - norm, log_share) for p in post]
    return torch.tensor(out, dtype=torch.float64).t().reshape(num_models, num_segments)


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    top = max(a, b)
    return top + math.log(math.exp(a - top) + math.exp(b - top))


def fuse(
    segment_log_q: torch.Tensor, strategy: str, weights: torch.Tensor, switch_rate: float = DEFAULT_SWITCH_RATE
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused log Q factor of every segment, [J] fp64, and the weights w_{m,j} [M, J] fp64.

    log Q(x) is the sum of the factors: log sum_m w_{m,j} q_m(s_j) for segment j.
    """
    log_w = fused_segment_weights(segment_log_q, strategy, weights, switch_rate)
    return (log_w + segment_log_q).logsumexp(0), log_w.exp()


def fuse_tokens(
    log_probs: torch.Tensor, strategy: str, weights: torch.Tensor, switch_rate: float = DEFAULT_SWITCH_RATE
) -> tuple[float, list[float]]:
    """``mixture_bayes`` / ``mixture_switch`` per token for models that share a vocabulary: every token is
    its own segment with q_m = p_m(token). log_probs: [M, n] fp64 in text order. Returns (NLL in nats,
    the mean weight of each model over the n tokens)."""
    factors, weights_per_token = fuse(log_probs, strategy, weights, switch_rate)
    return -float(factors.sum()), weights_per_token.mean(1).tolist()


def bits_per_byte(log_prob: float, num_bytes: int) -> float:
    """-log2 of a probability given as ``log_prob`` (nats), per UTF-8 byte."""
    return -log_prob / (math.log(2.0) * num_bytes)


# ------------------------------------------------------------------- the open last segment (lm-eval's requests)


def scored_segment_log_probs(
    target_log_prob: torch.Tensor,
    log_word_start: torch.Tensor,
    scored: torch.Tensor,
    segment: torch.Tensor,
    num_segments: int,
    final_log_close: float = 0.0,
) -> torch.Tensor:
    """``segment_log_probs`` for a text whose first tokens are not scored (lm-eval's context tokens without a
    prefix, or left-truncated ones): [num_segments] fp64.

    scored: [n] bool, whether each token's log p and log S (the row that predicts it) exist. An unscored
    token contributes nothing, and neither does the S of the row that would have predicted it, so a
    segment whose first token is unscored has no ``S(before)``; the scored tokens are a suffix of the text,
    so the factors still telescope, for one model, to the sum of its scored tokens' log p.
    """
    if num_segments == 0:  # an empty context
        return torch.zeros(0, dtype=torch.float64)
    keep = scored.to(torch.bool)
    zero = torch.zeros((), dtype=torch.float64)
    return segment_log_probs(
        torch.where(keep, target_log_prob.double(), zero),
        torch.where(keep, log_word_start.double(), zero),
        segment,
        num_segments,
        final_log_close,
    )


def open_log_q_ratio(
    full_table: torch.Tensor,
    context_table: torch.Tensor,
    strategy: str,
    weights: torch.Tensor,
    switch_rate: float = DEFAULT_SWITCH_RATE,
) -> float:
    """log Q(c·x) - log Q(c) (nats) for the closed-word mixture whose last segment is open (DESIGN §5b).

    full_table: [M, J] fp64 log q_m of the segments of c·x (last one open unless closed on purpose);
    context_table: [M, J_c] those of c alone (last one open; J_c = 0 for an empty context). The
    segments before c's last one are the same in both and cancel; every weight comes from the past
    segments only, so exp of this, summed over continuations, is at most 1.
    """
    log_q = float(fuse(full_table, strategy, weights, switch_rate)[0].sum())
    if context_table.shape[1] == 0:
        return log_q
    return log_q - float(fuse(context_table, strategy, weights, switch_rate)[0].sum())
