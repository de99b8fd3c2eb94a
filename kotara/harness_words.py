"""Models whose tokenizers differ as one lm-evaluation-harness model: ``WordFusedLM``, registered as
``kotara_words`` (DESIGN §5b, §5c).

Every model reads each request's text with its own tokenizer exactly as lm-eval's ``hf`` model would
(``tok_encode`` with the tokenizer's default special tokens, the context's trailing whitespace moved
to the continuation, the prefix token for an empty context, left truncation to ``max_length + 1``
tokens), and the closed-word mixture of §5c fuses them per segment of the text. Write Q(t) for the
mixture of a text t whose **last segment is open** (its factor has no S_m(after)); then

  loglikelihood(c, x)      log Q(c·x) - log Q(c), from one forward of each model over hf's input;
                           for one model it telescopes to that model's log p of x's tokens after c's,
                           which is what ``hf`` computes. Every model must start a token where x
                           starts (and at every boundary), else the request is an error (one line).
  is_greedy                the fused greedy decoding below, from c, writes x (the winning model's
                           tokens are x's tokens). Each model alone: every token of x is its argmax.
  loglikelihood_rolling    ``kotara score``'s word path (``kotara.word_score``) on the document with
                           windows of max_length tokens and the hf prefix token: the same bits/byte.
  generate_until           the fused decoding below, greedy or sampled, until a stop string, EOS or
                           ``max_gen_toks`` tokens of the first model.

Fused decoding, one *piece* at a time (a piece continues the open last word, or is a whole new word):
each model proposes its piece from its own tokens (the argmax, or a draw at its temperature, at every
token; the first token from the whole vocabulary, the piece ending before a word-start token that
follows a non-space character, or at EOS). Greedy: the proposal with the highest fused factor
log Q(t·piece) - log Q(t) wins (the piece closed unless it ended at EOS or the budget); sampled: a model
is drawn by the weights of the open segment (w_{m,J} q_m(open part), normalised), and its piece is
taken. The models that proposed the winning text keep their own tokens of it; the others re-read the
text with their tokenizer. So one model alone (or copies of one model) decodes exactly token by token,
as ``hf`` does. No KV cache on this path: every step runs each model over its whole context.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from kotara import words
from kotara.loading import LoadedModel, model_label

EXTRA_HINT = "lm-evaluation-harness is not installed: pip install -e '.[eval]' (or pip install 'lm-eval[hf]')"

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
        resolve_max_length,
    )
except ImportError as err:  # one line for the CLI; the import error itself is chained for --debug
    raise ImportError(EXTRA_HINT) from err

LOGIT_STRATEGIES = ("average", "poe", "entropy", "gap", "mixture_entropy", "mixture_gap")
GENERATION_KEYS = {"do_sample", "temperature", "until", "max_gen_toks"}
DEFAULT_MAX_LENGTH = 2048  # HFLM's when neither the models nor the tokenizer say
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's
GREEDY_PIECE_TOKENS = 64  # is_greedy: the most tokens one proposed piece may have (then it is cut, open)


def _quiet() -> bool:
    return os.environ.get("TQDM_DISABLE") == "1"  # kotara eval --no_progress (lm-eval passes disable=False)


def word_strategies(strategy: str) -> list[str]:
    """The word-level strategies of ``strategy`` ('all': every one); a logit strategy is a ValueError."""
    if strategy == "all":
        return list(words.WORD_STRATEGIES)
    if strategy in words.WORD_STRATEGIES:
        return [strategy]
    if strategy in LOGIT_STRATEGIES:
        raise ValueError(
            f"strategy {strategy} combines the models' logits token by token, which needs one shared vocabulary; "
            f"across tokenizers use {', '.join(words.WORD_STRATEGIES)} or all"
        )
    raise ValueError(f"unknown strategy {strategy!r}; across tokenizers: {', '.join(words.WORD_STRATEGIES)}, or all")


@dataclass
class _Reader:
    """One model with its own tokenizer. in_set: [vocab] bool, W_m (the tokens that start a word)."""

    model: LoadedModel
    tokenizer: Any
    in_set: torch.Tensor
    prefix_id: int
    eos_ids: set[int]
    temperature: float

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def vocab(self) -> int:
        return self.in_set.numel()

    def encode(self, text: str, specials: bool = True) -> tuple[list[int], list[int], int]:
        """(ids, character start of each, number of leading special tokens) as hf's ``tok_encode`` reads ``text``."""
        if specials:
            enc = self.tokenizer(text, return_offsets_mapping=True)
        else:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]
        special = set(self.tokenizer.all_special_ids)
        lead = 0
        while lead < len(ids) and ids[lead] in special and tuple(enc["offset_mapping"][lead]) == (0, 0):
            lead += 1
        return ids, starts, lead

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


@dataclass
class _Reading:
    """One model's tokens of one request: ``full`` = leading tokens (prefix / specials) + the text's tokens.

    starts: the character start of each text token; context_tokens: how many text tokens the context has.
    """

    text: str
    context: str
    full: list[int]
    lead: int
    starts: list[int]
    context_tokens: int


def split_request(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's ``_encode_pair``: the context's trailing whitespace moves to the continuation."""
    kept = context.rstrip()
    return kept, context[len(kept) :] + continuation


def read(reader: _Reader, context: str, continuation: str) -> _Reading:
    """``reader``'s tokens of ``context + continuation`` as hf's ``loglikelihood`` builds them (the split
    already made); ValueError unless the model starts a token where the continuation starts and at
    every boundary (DESIGN §5c)."""
    text = context + continuation
    if not context:
        ids, starts, _ = reader.encode(continuation, specials=False)
        full, lead, context_tokens = [reader.prefix_id, *ids], 1, 0
    else:
        full, starts, lead = reader.encode(text)
        starts = starts[lead:]
        words.check_token_starts(starts, text, reader.name, words.boundaries(text))
        ctx_ids, _, _ = reader.encode(context)
        context_tokens = len(ctx_ids) - lead
        if continuation and (
            full[: len(ctx_ids)] != ctx_ids or len(full) == len(ctx_ids) or starts[context_tokens] != len(context)
        ):
            raise ValueError(
                f"model {reader.name}: no token starts where the continuation starts ({context[-20:]!r} | "
                f"{continuation[:20]!r}); across tokenizers every model must start a token there"
            )
        return _Reading(text, context, full, lead, starts, context_tokens)
    words.check_token_starts(starts, text, reader.name, words.boundaries(text))
    return _Reading(text, context, full, lead, starts, context_tokens)


@dataclass
class _Tables:
    """One model's segment log q of one reading, per temperature: {T: (text [J] fp64, context [J_c] fp64)};
    greedy: [n] bool, each text token is the argmax of its row (at T = 1); log_close: {T: log S after the
    last token} when asked for."""

    tables: dict[float, tuple[torch.Tensor, torch.Tensor]]
    greedy: torch.Tensor
    scored: torch.Tensor
    log_close: dict[float, float] = field(default_factory=dict)


def window(reading: _Reading, max_length: int, close: bool) -> tuple[list[int], int]:
    """The forward's input and the offset of its first token in ``full``: hf's (the last max_length + 1
    tokens, minus the last) or, with ``close``, the last max_length tokens (a row after the last token)."""
    kept = reading.full[-max_length:] if close else reading.full[-(max_length + 1) :]
    offset = len(reading.full) - len(kept)
    return (kept if close or len(kept) == 1 else kept[:-1]), offset  # one token: nothing scored, a dummy row


def tables_from_logits(
    reader: _Reader, reading: _Reading, logits: torch.Tensor, offset: int, temperatures: Sequence[float], close: bool
) -> _Tables:
    """Segment tables of ``reading`` from its forward's logits [rows, >= vocab]: row r predicts full[offset + r + 1]."""
    n = len(reading.full) - reading.lead
    position = torch.arange(n) + reading.lead  # index in full of each text token
    scored = position >= offset + 1
    rows = (position - offset - 1).clamp(min=0)
    targets = torch.tensor(reading.full[reading.lead :], dtype=torch.int64)
    bounds = words.boundaries(reading.text)
    segment = words.target_segments(reading.starts, bounds)
    context_segments = len(words.boundaries(reading.context)) + 1 if reading.context else 0
    k = reading.context_tokens
    out, closes, greedy = {}, {}, None
    logits = logits[:, : reader.vocab].float()
    for t in dict.fromkeys([1.0, *temperatures]):
        log_p = torch.log_softmax(logits / t, dim=-1)
        log_s = log_p.masked_fill(~reader.in_set, float("-inf")).logsumexp(-1)
        target_lp = log_p[rows, targets].double() if n else torch.zeros(0, dtype=torch.float64)
        target_ls = log_s[rows].double() if n else torch.zeros(0, dtype=torch.float64)
        if greedy is None:
            greedy = (log_p[rows].argmax(-1) == targets) if n else torch.zeros(0, dtype=torch.bool)
        full_q = words.scored_segment_log_probs(target_lp, target_ls, scored, segment, len(bounds) + 1)
        ctx_q = words.scored_segment_log_probs(target_lp[:k], target_ls[:k], scored[:k], segment[:k], context_segments)
        out[t] = (full_q, ctx_q)
        if close:
            closes[t] = float(log_s[-1])
    return _Tables(out, greedy, scored, closes)


def _some_model_argmax_per_piece(readings: list[_Reading], tables: list[_Tables]) -> bool:
    """A necessary condition for fused greedy decoding to write the continuation, from the forwards already
    run: in every piece of it (cut at its boundaries), some model has every token of the piece as its argmax
    (the winner of a piece proposes its own argmax tokens, and they must be the continuation's)."""
    first = readings[0]
    begin = len(first.context)
    cuts = [begin, *(b for b in words.boundaries(first.text) if b > begin), len(first.text)]
    for start, end in zip(cuts[:-1], cuts[1:]):
        if not any(
            all(g for s, g in zip(r.starts, t.greedy.tolist()) if start <= s < end) for r, t in zip(readings, tables)
        ):
            return False
    return True


@dataclass
class _State:
    """Decoding state: the text so far and each model's tokens of it (leading tokens included)."""

    text: str
    ids: list[list[int]]
    leads: list[int]


@dataclass
class _Proposal:
    text: str
    tokens: list[int]
    ending: str | None  # None: the next word starts; "eos"; "length"


@register_model("kotara_words")
class WordFusedLM(LM):
    """M >= 1 causal LMs, each with its own tokenizer, fused per word (DESIGN §5c), as an ``lm_eval`` LM.

    models: paths or ``(LoadedModel, tokenizer)`` pairs; a string is split at ``|``. strategy: mixture,
    mixture_bayes, mixture_switch, or "all" (each model alone and the three, from one set of forwards;
    ``select_row`` picks the row lm-eval is answered with). temperatures and weights: one per model, as
    in ``kotara score``; switch_rate: mixture_switch's share. max_length: context tokens per forward
    (default: the smallest of the models'). seed: the draws of ``do_sample`` tasks.
    """

    def __init__(
        self,
        models: Sequence[Any] | str,
        strategy: str = "all",
        temperatures: Sequence[float] | None = None,
        weights: Sequence[float] | None = None,
        switch_rate: float = words.DEFAULT_SWITCH_RATE,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        device: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        seed: int | None = None,
        max_batch_size: int | None = None,  # noqa: ARG002 - passed by lm-eval's simple_evaluate; unused
    ) -> None:
        super().__init__()
        if isinstance(models, str):
            models = [m for m in models.split("|") if m]
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= float(switch_rate) <= 1.0:
            raise ValueError(f"switch_rate must be in [0, 1], got {switch_rate}")
        self.strategies = word_strategies(strategy)
        count = len(models)
        temps = [float(t) for t in temperatures] if temperatures else [1.0] * count
        self.weights = [float(w) for w in weights] if weights else [1.0 / count] * count
        if len(temps) != count or len(self.weights) != count:
            raise ValueError(f"give one temperature and one weight per model ({count})")
        if any(t <= 0 for t in temps) or any(w <= 0 for w in self.weights):
            raise ValueError("temperatures and weights must be > 0")
        self.readers = _load(list(models), temps, device, dtype, trust_remote_code)
        names = [r.name for r in self.readers]
        self.rows = [*names, *self.strategies] if strategy == "all" else list(self.strategies)
        self.row = self.rows[0]
        self.strategy = strategy
        self.temperatures = temps
        self.switch_rate = float(switch_rate)
        self.batch_size = int(batch_size)
        self._max_length = max_length
        self.max_gen_toks = int(max_gen_toks)
        self.seed = seed
        self._scores: dict[tuple[str, str], dict[str, tuple[float, bool]]] = {}
        self._rolling: dict[str, dict[str, float]] = {}
        self._generations: dict[str, dict[tuple[str, str], str]] = {}
        self._steps: dict[tuple, tuple[_Proposal, _State, int]] = {}
        self.forward_calls = 0
        self.forward_s = 0.0
        self.fusion_s = 0.0

    # ------------------------------------------------------------------------------------ rows

    def select_row(self, row: str) -> None:
        """Answer lm-eval's requests with ``row`` (a model label or a strategy of ``rows``)."""
        if row not in self.rows:
            raise ValueError(f"unknown row {row!r}; expected one of {', '.join(self.rows)}")
        self.row = row

    @property
    def max_length(self) -> int:
        if self._max_length:
            return int(self._max_length)
        return min(
            resolve_max_length(r.model.module.config, r.tokenizer, default=DEFAULT_MAX_LENGTH) for r in self.readers
        )

    def get_model_info(self) -> dict[str, Any]:
        return {
            "models": [r.model.path for r in self.readers],
            "fusion_unit": "word",
            "strategy": self.strategy,
            "row": self.row,
            "temperatures": self.temperatures,
            "weights": self.weights,
            "switch_rate": self.switch_rate,
        }

    def _prior(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self.weights[i] for i in indices], dtype=torch.float64)

    # ------------------------------------------------------------------------------- forwards

    @torch.no_grad()
    def _forward(self, reader: _Reader, inputs: list[list[int]]) -> list[torch.Tensor]:
        """Each input's logits [len, >= vocab] from one right-padded batch."""
        width = max(len(i) for i in inputs)
        pad = reader.tokenizer.pad_token_id or 0
        batch = torch.full((len(inputs), width), pad, dtype=torch.long)
        for j, ids in enumerate(inputs):
            batch[j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        t0 = time.perf_counter()
        out = reader.model.module(input_ids=batch.to(reader.model.device))
        logits = (out.logits if hasattr(out, "logits") else out[0]).float().cpu()
        self.forward_calls += 1
        self.forward_s += time.perf_counter() - t0
        return [logits[j, : len(ids)] for j, ids in enumerate(inputs)]

    def _tables(self, indices: Sequence[int], readings: list[list[_Reading]], close: bool) -> list[list[_Tables]]:
        """Tables of readings[k][i] (request k, model indices[i]), each model's inputs in batches."""
        out: list[list[Any]] = [[None] * len(indices) for _ in readings]
        for i, m in enumerate(indices):
            reader = self.readers[m]
            for start in range(0, len(readings), self.batch_size):
                group = [(k, *window(readings[k][i], self.max_length, close)) for k in
                         range(start, min(start + self.batch_size, len(readings)))]  # fmt: skip
                logits = self._forward(reader, [inputs for _, inputs, _ in group])
                for (k, _, offset), lg in zip(group, logits):
                    temps = [self.temperatures[m]]
                    out[k][i] = tables_from_logits(reader, readings[k][i], lg, offset, temps, close)
        return out

    def _fused(self, indices: Sequence[int], tables: list[_Tables], strategy: str, close: bool) -> float:
        """log Q(c·x) - log Q(c) of one request for ``strategy`` over the models ``indices`` (their temperatures)."""
        full, ctx = [], []
        for m, tab in zip(indices, tables):
            q_full, q_ctx = tab.tables[self.temperatures[m]]
            if close:
                q_full = q_full.clone()
                q_full[-1] += tab.log_close[self.temperatures[m]]
            full.append(q_full)
            ctx.append(q_ctx)
        return words.open_log_q_ratio(
            torch.stack(full), torch.stack(ctx), strategy, self._prior(indices), self.switch_rate
        )

    # ------------------------------------------------------------------------- loglikelihood

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log Q(c·x) - log Q(c), is_greedy) per request for ``row``; every row is scored at once."""
        pairs = [tuple(req.args) for req in requests]
        for context, continuation in pairs:
            if not continuation:
                raise ValueError(f"empty continuation after context {context[-40:]!r}: nothing to score")
        todo = list(dict.fromkeys(p for p in pairs if p not in self._scores))
        bar = tqdm(total=len(todo), disable=disable_tqdm or _quiet(), desc="kotara words loglikelihood")
        chunk = max(self.batch_size, 1)
        for start in range(0, len(todo), chunk):
            self._score_pairs(todo[start : start + chunk])
            bar.update(min(chunk, len(todo) - start))
        bar.close()
        answers = [self._scores[p][self.row] for p in pairs]
        for pair, answer in zip(pairs, answers):
            self.cache_hook.add_partial("loglikelihood", pair, answer)
        return answers

    def _score_pairs(self, pairs: list[tuple[str, str]]) -> None:
        indices = list(range(len(self.readers)))
        readings = [[read(r, *split_request(c, x)) for r in self.readers] for c, x in pairs]
        tables = self._tables(indices, readings, close=False)
        t0 = time.perf_counter()
        for (context, continuation), request_tables, request_readings in zip(pairs, tables, readings):
            answer = {}
            for m, (reader, tab) in enumerate(zip(self.readers, request_tables)):
                q_full, q_ctx = tab.tables[1.0]
                log_q = float(q_full.sum()) - float(q_ctx.sum())  # one model: telescopes to its log p of x
                answer[reader.name] = (log_q, bool(tab.greedy[request_readings[m].context_tokens :].all()))
            c, x = split_request(context, continuation)
            possible = _some_model_argmax_per_piece(request_readings, request_tables)
            for strategy in self.strategies:
                value = self._fused(indices, request_tables, strategy, close=False)
                answer[strategy] = (value, possible and self._reproduces(strategy, c, x, request_readings))
            self._scores[(context, continuation)] = answer
        self.fusion_s += time.perf_counter() - t0

    def _reproduces(self, strategy: str, context: str, continuation: str, readings: list[_Reading]) -> bool:
        """Whether fused greedy decoding from ``context`` writes ``continuation`` (as the winners' tokens)."""
        indices = list(range(len(self.readers)))
        state = self._start(indices, context)
        budget = min(GREEDY_PIECE_TOKENS, 4 + max(len(r.full) - r.lead - r.context_tokens for r in readings))
        while True:
            proposal, after, winner = self._step(strategy, indices, state, budget, None)
            written = after.text[len(context) :]
            full, new = readings[winner].full, after.ids[winner]
            if new[: len(full)] != full[: len(new)]:  # the winner's tokens are not the continuation's
                return False
            if written.startswith(continuation):
                return True
            if not continuation.startswith(written) or proposal.ending is not None or not proposal.text:
                return False
            state = after

    # ------------------------------------------------------------------- fused word decoding

    def _start(self, indices: Sequence[int], context: str) -> _State:
        ids, leads = [], []
        for m in indices:
            reader = self.readers[m]
            if context:
                full, _, lead = reader.encode(context)
            else:
                full, lead = [reader.prefix_id], 1
            ids.append(full)
            leads.append(lead)
        return _State(context, ids, leads)

    def _propose(
        self, m: int, ids: list[int], lead: int, text: str, sample: bool, budget: int, generator: Any
    ) -> _Proposal:
        """Model m's next piece after its tokens ``ids`` of ``text`` (argmax or a draw at its temperature)."""
        reader = self.readers[m]
        base = reader.decode(ids[lead:])
        drawn: list[int] = []
        while True:
            logits = self._forward(reader, [(ids + drawn)[-self.max_length :]])[0][-1, : reader.vocab]
            log_p = torch.log_softmax(logits.double() / self.temperatures[m], -1)
            if sample:
                token = int(torch.multinomial(log_p.exp(), 1, generator=generator))
            else:
                token = int(log_p.argmax())
            piece = reader.decode(ids[lead:] + drawn)[len(base) :]
            if token in reader.eos_ids:
                return _Proposal(piece, drawn, "eos")
            so_far = text + piece
            if drawn and bool(reader.in_set[token]) and so_far and not so_far[-1].isspace():
                return _Proposal(piece, drawn, None)
            drawn.append(token)
            if len(drawn) >= budget:
                return _Proposal(reader.decode(ids[lead:] + drawn)[len(base) :], drawn, "length")

    def _score_piece(self, strategy: str, indices: Sequence[int], text: str, piece: str, close: bool) -> float:
        """The fused factor of ``piece`` after ``text``: log Q(text·piece) - log Q(text) (closed on request)."""
        try:
            readings = [[read(self.readers[m], text, piece) for m in indices]]
        except ValueError:  # a model cannot read the piece where it starts: not a candidate of the mixture
            return float("-inf")
        return self._fused(indices, self._tables(indices, readings, close)[0], strategy, close)

    def _open_weights(self, strategy: str, indices: Sequence[int], text: str) -> torch.Tensor:
        """[M] fp64: w_{m,J} q_m(open last segment of text), normalised (the models to draw from)."""
        if not text:
            prior = self._prior(indices)
            return prior / prior.sum()
        readings = [[read(self.readers[m], text, "") for m in indices]]
        tables = self._tables(indices, readings, close=False)[0]
        table = torch.stack([tab.tables[self.temperatures[m]][0] for m, tab in zip(indices, tables)])
        log_w = words.fused_segment_weights(table, strategy, self._prior(indices), self.switch_rate)[:, -1]
        return torch.softmax(log_w + table[:, -1], 0)

    def _step(
        self, strategy: str, indices: Sequence[int], state: _State, budget: int, generator: Any, sample: bool = False
    ) -> tuple[_Proposal, _State, int]:
        """One piece: (the winning proposal, the state after it, the winner's index in ``indices``)."""
        key = (strategy, tuple(indices), state.text, tuple(map(tuple, state.ids)), budget)
        if not sample and key in self._steps:
            return self._steps[key]
        if sample:
            w = self._open_weights(strategy, indices, state.text) if len(indices) > 1 else torch.ones(1)
            winner = int(torch.multinomial(w, 1, generator=generator))
            proposals = {winner: self._propose(indices[winner], state.ids[winner], state.leads[winner], state.text,
                                               True, budget, generator)}  # fmt: skip
        else:
            proposals = {
                i: self._propose(m, state.ids[i], state.leads[i], state.text, False, budget, None)
                for i, m in enumerate(indices)
            }
            distinct = list(dict.fromkeys((p.text, p.ending) for p in proposals.values()))
            winner = 0
            if len(distinct) > 1:
                t0 = time.perf_counter()
                scores = {
                    cand: self._score_piece(strategy, indices, state.text, cand[0], cand[1] is None) if cand[0]
                    else float("-inf")
                    for cand in distinct
                }  # fmt: skip
                best = max(distinct, key=lambda cand: scores[cand])  # the first of the best on ties
                winner = next(i for i, p in proposals.items() if (p.text, p.ending) == best)
                self.fusion_s += time.perf_counter() - t0
        chosen = proposals[winner]
        text = state.text + chosen.text
        ids = []
        for i, m in enumerate(indices):
            mine = proposals.get(i)
            if mine is not None and (mine.text, mine.ending) == (chosen.text, chosen.ending):
                ids.append(state.ids[i] + mine.tokens)
            else:
                reader = self.readers[m]
                ids.append(state.ids[i][: state.leads[i]] + reader.encode(text, specials=False)[0])
        result = (chosen, _State(text, ids, state.leads), winner)
        if not sample:
            self._steps[key] = result
        return result

    # ---------------------------------------------------------------------- rolling, generation

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The document's log Q from ``kotara score``'s word path (windows of max_length tokens)."""
        from kotara.word_score import prepare_input, score_words

        answers = []
        for (text,) in tqdm(
            [req.args for req in requests], disable=disable_tqdm or _quiet(), desc="kotara words rolling"
        ):
            if text not in self._rolling:
                bounds = words.boundaries(text)
                prefixes = ["bos" if r.tokenizer.bos_token_id is not None else "eos" for r in self.readers]
                items = [prepare_input(r.model, r.tokenizer, [text], p, bounds) for r, p in zip(self.readers, prefixes)]
                result = score_words(
                    items, len(text.encode("utf-8")), len(bounds) + 1, self.strategies, self.temperatures,
                    self.weights, self.max_length, self.max_length, self.switch_rate, self.batch_size,
                )  # fmt: skip
                self.forward_calls += sum(-(-len(i.token_ids) // self.max_length) for i in items)
                self.forward_s += result.forward_s
                self.fusion_s += result.fusion_s
                row_values = dict(zip(result.model_names, result.model_log_prob)) | result.strategy_log_prob
                self._rolling[text] = row_values
            answers.append(self._rolling[text][self.row])
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), answers[-1])
        return answers

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Fused word decoding for ``row`` (a model alone: its own token-by-token decoding)."""
        done = self._generations.setdefault(self.row, {})
        generator = torch.Generator().manual_seed(int(self.seed)) if self.seed is not None else None
        out = []
        for context, kwargs in tqdm(
            [req.args for req in requests], disable=disable_tqdm or _quiet(), desc="kotara words generate"
        ):
            key = (context, json.dumps(kwargs, sort_keys=True, default=str))
            if key not in done:
                done[key] = self._generate(context, dict(kwargs), generator)
            out.append(done[key])
            self.cache_hook.add_partial("generate_until", (context, kwargs), out[-1])
        return out

    def _generate(self, context: str, kwargs: dict[str, Any], generator: Any) -> str:
        names = [r.name for r in self.readers]
        indices = [names.index(self.row)] if self.row in names else list(range(len(self.readers)))
        strategy = "mixture" if self.row in names else self.row
        kwargs = dict(normalize_gen_kwargs(kwargs, self.max_gen_toks))
        unknown = sorted(k for k in set(kwargs) - GENERATION_KEYS if kwargs[k] not in (None, False))
        if unknown:
            raise ValueError(f"generation_kwargs {', '.join(unknown)} not supported across tokenizers")
        first = self.readers[indices[0]]
        eos_text = first.tokenizer.decode([first.tokenizer.eos_token_id]) if first.tokenizer.eos_token_id is not None \
            else None  # fmt: skip
        until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.get("temperature") or 0.0)
        sample = bool(kwargs.get("do_sample")) and temperature > 0
        if sample and temperature != 1.0:
            raise ValueError(f"sampling temperature {temperature:g}: across tokenizers only 1 (each model's own "
                             "temperature) is supported")  # fmt: skip
        state = self._start(indices, context)
        start0 = len(state.ids[0])
        while True:
            budget = max_new - (len(state.ids[0]) - start0)
            if budget <= 0:
                break
            proposal, state, _ = self._step(strategy, indices, state, budget, generator, sample)
            written = state.text[len(context) :]
            if proposal.ending is not None or any(s and s in written for s in until):
                break
        # As hf writes its answer: the first model's generated tokens decoded alone (at most max_gen_toks of
        # them: another model's word may run past the budget), special tokens skipped.
        generated = state.ids[0][start0 : start0 + max_new]
        written = first.tokenizer.decode(generated, skip_special_tokens=True)
        return postprocess_generated_text(written, until, None)


def _load(models: list[Any], temperatures: list[float], device, dtype, trust_remote_code) -> list[_Reader]:
    """A ``_Reader`` per model (path, or (LoadedModel, tokenizer)), each with its own tokenizer."""
    from kotara import loading

    if not models:
        raise ValueError("give at least one model")
    target = loading.resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    readers = []
    for i, (m, temperature) in enumerate(zip(models, temperatures)):
        if isinstance(m, str):
            tokenizer = loading.load_tokenizer(m, trust_remote_code)
            model = loading.load_model(m, model_label(i), target, loading.resolve_dtype(dtype, target),
                                       trust_remote_code)  # fmt: skip
        else:
            model, tokenizer = m
        loading.check_vocab([model], len(tokenizer))
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError(f"model {model.name} ({model.path!r}): its tokenizer has neither BOS nor EOS for a prefix")
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        value = getattr(getattr(model.module, "generation_config", None), "eos_token_id", None)
        eos |= set(value) if isinstance(value, list) else ({value} if value is not None else set())
        in_set = words.word_start_mask(tokenizer, len(tokenizer))
        readers.append(_Reader(model, tokenizer, in_set, int(prefix), eos, temperature))
    return readers
