"""``kotara generate`` for models whose tokenizers differ: sampling from the closed-word mixture (DESIGN §5c).

One word at a time: draw a model m by the current weights w_{m,j}; draw the word's first token
from m's next-token distribution restricted to W_m and renormalised (unrestricted for the text's
first word); then its tokens until it draws a word-start token where one would start a boundary
(after a non-whitespace character; that token is dropped: it belongs to the next word, which the
next draw decides) or EOS. The word's text is appended and every model is extended by its own
canonical tokens of the text, from which its q_m(word) updates the weights (``kotara.words``).
For models that put probability only on their canonical tokenisations this draws texts exactly
from Q (tests/test_kotara_word_generate.py compares the frequencies with Q on a toy vocabulary).

Greedy (no ``--do_sample``): each model proposes its greedy next word (argmax at every token, the
same stopping rule) and the candidate with the highest fused factor sum_m w_{m,j} q_m(word) wins.

Prompts: empty, or ending in a non-whitespace character (the next word then starts at a boundary);
every model must start a token at each boundary of the prompt, as in scoring. The prompt's words
set the weights (``mixture_bayes``, ``mixture_switch``) as scored text would. No KV cache on this
path: each step runs the model over its whole context (generations here are short).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kotara import words

WORD_FINISH_REASONS = ("eos", "stop", "length")


class WordLM(Protocol):
    """What word-level generation needs from one model and its own tokenizer."""

    name: str
    in_set: torch.Tensor  # [V] bool: W, the tokens whose text starts with a space
    eos_id: int | None
    prefix_id: int

    def tokens(self, text: str) -> list[int]: ...  # canonical ids of ``text`` (no prefix)

    def decode(self, ids: Sequence[int]) -> str: ...  # text of ids (no prefix)

    def token_starts(self, text: str) -> list[int]: ...  # character offset where each of tokens(text) starts

    def log_probs_along(self, context: Sequence[int], new: Sequence[int]) -> torch.Tensor:
        """[len(new) + 1, V] fp32|fp64: row i = log p(next | prefix, context, new[:i])."""
        ...


@dataclass
class WordGeneration:
    """One prompt's completion drawn word by word; ``weights[j][m]`` is model m's weight for word j."""

    prompt: str
    completion: str
    words: list[str]
    drawn_by: list[str]  # the model each word came from (greedy: whose candidate won)
    weights: list[list[float]]
    new_tokens: int  # the first model's canonical tokens of the completion
    strategy: str
    finish_reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "completion": self.completion, "words": self.words, "drawn_by": self.drawn_by,
            "weights": self.weights, "new_tokens": self.new_tokens, "strategy": self.strategy,
            "finish_reason": self.finish_reason, "fusion_unit": "word",
        }  # fmt: skip


def _set_mass(log_p: torch.Tensor, in_set: torch.Tensor) -> float:
    return float(torch.logsumexp(log_p[: in_set.numel()].masked_fill(~in_set, float("-inf")), 0))


def _choose(log_p: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> int:
    if greedy:
        return int(log_p.argmax())
    return int(torch.multinomial(torch.softmax(log_p.double(), 0), 1, generator=generator))


def draw_word(
    lm: WordLM,
    context: list[int],
    first: bool,
    greedy: bool,
    generator: torch.Generator | None,
    max_tokens: int,
) -> tuple[str, str | None]:
    """One word from ``lm`` after its ``context`` ids: (text, None), or (text, "eos" / "length") when the
    word ends the generation (EOS drawn; ``max_tokens`` tokens without an end)."""
    drawn: list[int] = []
    log_p = lm.log_probs_along(context, [])[0].double()
    if not first:  # the word starts at a boundary: its first token starts with a space
        vocab = lm.in_set.numel()
        # Out of place: the row is the model's (a WordLM may hand out the same tensor again).
        special = torch.full_like(log_p[vocab:], float("-inf"))
        log_p = torch.cat([log_p[:vocab].masked_fill(~lm.in_set, float("-inf")), special])
    while True:
        token = _choose(log_p, greedy, generator)
        if lm.eos_id is not None and token == lm.eos_id:
            return lm.decode(context + drawn)[len(lm.decode(context)) :], "eos"
        if drawn and token < lm.in_set.numel() and bool(lm.in_set[token]):
            text = lm.decode(context + drawn)[len(lm.decode(context)) :]
            if text and not text[-1].isspace():  # the token would start a boundary: the next word's
                return text, None
        drawn.append(token)
        if len(drawn) >= max_tokens:
            return lm.decode(context + drawn)[len(lm.decode(context)) :], "length"
        log_p = lm.log_probs_along(context + drawn, [])[0].double()


def extend_ids(lm: WordLM, context: list[int], text: str) -> list[int]:
    """``lm``'s canonical ids of ``text`` (the whole text so far), checked to extend ``context``."""
    ids = lm.tokens(text)
    if ids[: len(context)] != context:
        raise ValueError(f"model {lm.name}: its tokens of the text so far change when a word is added ({text[-40:]!r})")
    return ids


def segment_log_q(lm: WordLM, context: list[int], ids: list[int], first: bool, closed: bool) -> float:
    """log q_m of the segment whose tokens are ``ids[len(context):]`` (DESIGN §5c); ``closed``: the
    text goes on after it (log S after is added), else it is the text's last segment."""
    new = ids[len(context) :]
    rows = lm.log_probs_along(context, new).double()
    log_q = float(rows[torch.arange(len(new)), torch.tensor(new, dtype=torch.int64)].sum()) if new else 0.0
    if not first:
        log_q -= _set_mass(rows[0], lm.in_set)
    if closed:
        log_q += _set_mass(rows[-1], lm.in_set)
    return log_q


def _next_weights(table: list[list[float]], strategy: str, prior: torch.Tensor, switch_rate: float) -> torch.Tensor:
    """w_{m,j} [M] fp64 for the next segment from the past segments' log q (``table[m]``)."""
    past = torch.tensor(table, dtype=torch.float64).reshape(len(prior), -1)
    padded = torch.cat([past, torch.zeros(len(prior), 1, dtype=torch.float64)], 1)
    return words.fused_segment_weights(padded, strategy, prior, switch_rate)[:, -1].exp()


def _prompt_table(lms: Sequence[WordLM], prompt: str) -> tuple[list[list[int]], list[list[float]]]:
    """Each model's ids of the prompt and the log q of its segments, scored as text that a word follows."""
    if prompt and prompt[-1].isspace():
        raise ValueError("a prompt must be empty or end with a non-space character: generation adds whole words")
    if not prompt:
        return [[] for _ in lms], [[] for _ in lms]
    bounds = words.boundaries(prompt)
    contexts, table = [], []
    for lm in lms:
        ids, starts = lm.tokens(prompt), lm.token_starts(prompt)
        words.check_token_starts(starts, prompt, lm.name, bounds)
        words.check_segment_tokens(ids, starts, prompt, bounds, lm.in_set, lm.name)
        rows = lm.log_probs_along([], ids).double()  # [n + 1, V]
        log_s = torch.tensor([_set_mass(row, lm.in_set) for row in rows], dtype=torch.float64)
        log_p = rows[torch.arange(len(ids)), torch.tensor(ids, dtype=torch.int64)]
        segment = words.target_segments(starts, bounds)
        log_q = words.segment_log_probs(log_p, log_s[:-1], segment, len(bounds) + 1, float(log_s[-1]))
        contexts.append(ids)
        table.append(log_q.tolist())
    return contexts, table


def generate_words(
    lms: Sequence[WordLM],
    prompt: str,
    strategy: str,
    weights: Sequence[float],
    max_new_tokens: int,
    do_sample: bool = True,
    switch_rate: float = words.DEFAULT_SWITCH_RATE,
    generator: torch.Generator | None = None,
    stop: Sequence[str] = (),
) -> WordGeneration:
    """Complete ``prompt`` word by word from the fused closed-word mixture of ``lms`` (M >= 1)."""
    prior = torch.tensor(list(weights), dtype=torch.float64)
    contexts, table = _prompt_table(lms, prompt)
    text, start0, out = prompt, len(contexts[0]), WordGeneration(prompt, "", [], [], [], 0, strategy, "length")
    while True:
        w = _next_weights(table, strategy, prior, switch_rate)
        first = not text
        budget = max_new_tokens - (len(contexts[0]) - start0)
        if do_sample:
            m = int(torch.multinomial(w, 1, generator=generator))
            word, ending = draw_word(lms[m], contexts[m], first, False, generator, max(budget, 1))
        else:
            m, word, ending = _greedy_word(lms, contexts, text, w, first, max(budget, 1))
        ids = [extend_ids(lm, ctx, text + word) for lm, ctx in zip(lms, contexts)]
        if ending == "length" or len(ids[0]) - start0 > max_new_tokens:
            break  # whole words only: this one does not fit
        for lm_index, lm in enumerate(lms):
            table[lm_index].append(segment_log_q(lm, contexts[lm_index], ids[lm_index], first, ending is None))
        text, contexts = text + word, ids
        out.words.append(word)
        out.drawn_by.append(lms[m].name)
        out.weights.append(w.tolist())
        hit = min((text.find(s, len(prompt)) for s in stop if text.find(s, len(prompt)) >= 0), default=-1)
        if hit >= 0:
            text, out.finish_reason = text[:hit], "stop"
            break
        if ending == "eos":
            out.finish_reason = "eos"
            break
    out.completion = text[len(prompt) :]
    out.new_tokens = len(contexts[0]) - start0
    return out


def _greedy_word(lms, contexts, text, w, first, budget) -> tuple[int, str, str | None]:
    """Each model's greedy word; the one with the highest fused factor log sum_m w_m q_m(word) wins."""
    best = None
    for m, lm in enumerate(lms):
        word, ending = draw_word(lm, contexts[m], first, True, None, budget)
        factor = [
            float(w[k].log()) + segment_log_q(other, contexts[k], extend_ids(other, contexts[k], text + word), first,
                                              ending is None)
            for k, other in enumerate(lms)
        ]  # fmt: skip
        score = float(torch.logsumexp(torch.tensor(factor), 0))
        if best is None or score > best[0]:
            best = (score, m, word, ending)
    return best[1], best[2], best[3]


class HFWordLM:
    """A loaded causal LM with its own tokenizer, as ``WordLM`` (full forward over the context each call)."""

    def __init__(self, model: Any, tokenizer: Any, prefix_id: int, temperature: float = 1.0):
        self.name, self.model, self.tokenizer = model.name, model, tokenizer
        self.vocab_size = len(tokenizer)
        self.in_set = words.word_start_mask(tokenizer, self.vocab_size)
        self.eos_id = tokenizer.eos_token_id
        self.prefix_id, self.temperature = prefix_id, temperature

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)

    def token_starts(self, text: str) -> list[int]:
        return words.tokenize_with_starts(self.tokenizer, [text])[1]

    @torch.no_grad()
    def log_probs_along(self, context: Sequence[int], new: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor([[self.prefix_id, *context, *new]], dtype=torch.int64, device=self.model.device)
        out = self.model.module(input_ids=ids)
        logits = (out.logits if hasattr(out, "logits") else out[0])[0, len(context) :, : self.vocab_size]
        return torch.log_softmax(logits.float() / self.temperature, -1).cpu()


# ------------------------------------------------------------------------------------ the CLI's word path


def format_word_generation(generation: WordGeneration, index: int, total: int, names: Sequence[str]) -> str:
    """One completion for the console: a header line (words, who drew them, mean weights), prompt, completion."""
    count = max(len(generation.weights), 1)
    mean = [sum(w[i] for w in generation.weights) / count for i in range(len(names))]
    weights = " ".join(f"{n} {w:.3f}" for n, w in zip(names, mean))
    drawn = " ".join(f"{n} {generation.drawn_by.count(n)}" for n in names)
    return (
        f"[{index + 1}/{total}] {generation.strategy} per word · {generation.finish_reason} after "
        f"{len(generation.words)} words ({generation.new_tokens} tokens of model {names[0]}) · words drawn {drawn} · "
        f"mean weights {weights}\n"
        f"prompt:     {generation.prompt}\n"
        f"completion: {generation.completion}\n"
    )
