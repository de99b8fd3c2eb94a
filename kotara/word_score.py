"""``kotara score`` for models whose tokenizers differ: the closed-word mixture of DESIGN §5c.

Each model reads the text with its own tokenizer and its own prefix token and is run over its own
rolling windows exactly as in DESIGN §5 (``kotara.windows``); for every scored position the op
``moc_kernels.target_and_set_log_probs`` gives log p(target) and log S = log p(word-start tokens)
from one pass over V. ``kotara.words`` turns those into per-segment log q_m(s_j) and fuses them.
Everything is kept per position as fp64 and, under ``torchrun``, each rank fills the positions of
its windows and one all-reduce (a sum over disjoint positions) gives every rank the whole text.

The same path runs for models that share a tokenizer with ``--fusion_unit word``, so the two units
can be compared on one pair of models (one model alone gives exactly its token-level bits/byte).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

import moc_kernels
from kotara import words
from kotara.loading import LoadedModel
from kotara.steps import BEATS_MARGIN_NATS_PER_TOKEN, forward_logits, rank_and_world, sync
from kotara.windows import Window, batches, rolling_windows, target_positions


@dataclass
class WordInput:
    """One model and its own reading of the text.

    token_ids: [n] int64, prefix token first; segment: [n - 1] int64, the segment of each scored
    token (text order); in_set: [vocab_size] bool, W_m (the tokens that start a word).
    """

    model: LoadedModel
    token_ids: torch.Tensor
    segment: torch.Tensor
    in_set: torch.Tensor
    vocab_size: int
    pad_id: int = 0
    prefix: str = "bos"
    prefix_id: int | None = None


@dataclass
class WordResult:
    """Totals over the whole text. Log probabilities in nats (fp64 sums)."""

    model_names: list[str]
    strategies: list[str]
    num_bytes: int
    segments: int
    model_tokens: list[int]  # scored tokens of each model (its own tokenizer)
    model_log_prob: list[float]  # each model alone at temperature 1
    model_log_prob_at_temperature: list[float]  # alone at its fusion temperature
    strategy_log_prob: dict[str, float]
    strategy_mean_weights: dict[str, list[float]]  # mean over segments of w_{m,j}
    elapsed_s: float
    forward_s: float
    fusion_s: float
    world_size: int = 1
    # log Q factor per segment [segments] fp64 per strategy (keep_factors only: the tests' causality check).
    factors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def bits_per_byte(self, log_prob: float) -> float:
        return words.bits_per_byte(log_prob, self.num_bytes)


def prepare_input(
    model: LoadedModel, tokenizer: Any, pieces: Sequence[str], prefix_arg: str | None, bounds: Sequence[int]
) -> WordInput:
    """Tokenize the text (``"".join(pieces)``) for ``model``, check its boundaries and find W_m."""
    from kotara.loading import check_vocab, resolve_prefix

    text = "".join(pieces)
    prefix, prefix_id = resolve_prefix(tokenizer, prefix_arg)
    if prefix_id is None:
        raise ValueError(
            f"model {model.name} ({model.path!r}): fusion across tokenizers scores every model's first token, so "
            "each needs a prefix token, and its tokenizer has no BOS; pass --prefix_token eos"
        )
    ids, starts = words.tokenize_with_starts(tokenizer, pieces)
    if not ids:
        raise ValueError(f"model {model.name}: the text has no tokens")
    words.check_token_starts(starts, text, model.name, bounds)
    vocab_size = len(tokenizer)
    check_vocab([model], vocab_size)
    in_set = words.word_start_mask(tokenizer, vocab_size)
    words.check_segment_tokens(ids, starts, text, bounds, in_set, model.name)
    return WordInput(
        model=model,
        token_ids=torch.tensor([prefix_id, *ids], dtype=torch.int64),
        segment=words.target_segments(starts, bounds),
        in_set=in_set,
        vocab_size=vocab_size,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        prefix=prefix,
        prefix_id=prefix_id,
    )


@torch.no_grad()
def position_log_probs(
    item: WordInput,
    windows: Sequence[Window],
    temperatures: Sequence[float],
    batch_size: int = 1,
    progress: bool = False,
) -> tuple[dict[float, tuple[torch.Tensor, torch.Tensor]], float, float]:
    """log p(target) and log S of every scored token of one model, at each temperature.

    Returns ({T: (log_p [n - 1] fp64, log_S [n - 1] fp64)}, forward seconds, op seconds); under
    ``torch.distributed`` this rank scores every world_size-th window and the arrays are summed
    across ranks (positions are disjoint), so every rank returns the whole text's.
    """
    rank, world = rank_and_world()
    model, num_targets = item.model, item.token_ids.numel() - 1
    mine = list(windows)[rank::world]
    out = {t: torch.zeros(2, num_targets, dtype=torch.float64) for t in dict.fromkeys(temperatures)}
    in_set = item.in_set.to(model.device)
    forward_s = op_s = 0.0
    bar = tqdm(total=len(mine), desc=f"kotara {model.name}", unit="window", disable=not progress or rank != 0)
    for start in range(0, len(mine), batch_size):
        group = mine[start : start + batch_size]
        batch = next(batches(item.token_ids, group, batch_size, item.pad_id))
        t0 = time.perf_counter()
        logits = forward_logits(model, batch.input_ids, item.vocab_size)
        scored = batch.scored.to(model.device)
        rows, targets = logits[scored], batch.targets.to(model.device)[scored]
        sync(model.device)
        t1 = time.perf_counter()
        positions = target_positions(group) - 1
        for temperature, arrays in out.items():
            log_p, log_s = moc_kernels.target_and_set_log_probs(rows, targets, in_set, temperature)
            arrays[0, positions] = log_p.double().cpu()
            arrays[1, positions] = log_s.double().cpu()
        forward_s += t1 - t0
        op_s += time.perf_counter() - t1
        bar.update(len(group))
    bar.close()
    if world > 1:
        for temperature, arrays in out.items():
            # nccl reduces CUDA tensors only; gloo reduces CPU tensors.
            on = model.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            reduced = arrays.to(on)
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
            out[temperature] = reduced.cpu()
    return {t: (a[0], a[1]) for t, a in out.items()}, forward_s, op_s


def score_words(
    items: Sequence[WordInput],
    num_bytes: int,
    num_segments: int,
    strategies: Sequence[str],
    temperatures: Sequence[float],
    weights: Sequence[float],
    max_length: int,
    stride: int,
    switch_rate: float = words.DEFAULT_SWITCH_RATE,
    batch_size: int = 1,
    progress: bool = False,
    keep_factors: bool = False,
) -> WordResult:
    """Every model alone and every word-level strategy on one text (M >= 1 models)."""
    start = time.perf_counter()
    alone, tempered, forward_s, op_s = [], [], 0.0, 0.0
    for item, temperature in zip(items, temperatures):
        windows = rolling_windows(item.token_ids.numel(), max_length, stride)
        per_t, f_s, o_s = position_log_probs(item, windows, [1.0, temperature], batch_size, progress)
        forward_s, op_s = forward_s + f_s, op_s + o_s
        for out, t in ((alone, 1.0), (tempered, temperature)):
            out.append(words.segment_log_probs(*per_t[t], item.segment, num_segments))
    t0 = time.perf_counter()
    table = torch.stack(tempered)  # [M, J]
    fixed = torch.tensor(list(weights), dtype=torch.float64)
    fused = {s: words.fuse(table, s, fixed, switch_rate) for s in strategies}
    op_s += time.perf_counter() - t0
    timings = torch.tensor([time.perf_counter() - start, forward_s, op_s], dtype=torch.float64)
    rank, world = rank_and_world()
    if world > 1:
        torch.distributed.all_reduce(timings, op=torch.distributed.ReduceOp.MAX)
    return WordResult(
        model_names=[item.model.name for item in items],
        strategies=list(strategies),
        num_bytes=num_bytes,
        segments=num_segments,
        model_tokens=[item.token_ids.numel() - 1 for item in items],
        model_log_prob=[float(q.sum()) for q in alone],
        model_log_prob_at_temperature=[float(q.sum()) for q in tempered],
        strategy_log_prob={s: float(factors.sum()) for s, (factors, _) in fused.items()},
        strategy_mean_weights={s: w.mean(1).tolist() for s, (_, w) in fused.items()},
        elapsed_s=float(timings[0]),
        forward_s=float(timings[1]),
        fusion_s=float(timings[2]),
        world_size=world,
        factors={s: factors for s, (factors, _) in fused.items()} if keep_factors else None,
    )


def format_word_table(result: WordResult, temperatures: Sequence[float], model_paths: Sequence[str]) -> str:
    """The console report of the word path: each model alone, each strategy; bits/byte (no fused PPL)."""
    names = result.model_names
    header = f"{'':<26}{'tokens':>9}{'-log2 P':>14}{'bits/byte':>11}  " + "".join(f"{'w_' + n:>8}" for n in names)
    rule = "=" * len(header)
    lines = [rule, f"Kotara  ·  fused per word across tokenizers (DESIGN §5c)  ·  {result.num_bytes} bytes, "
             f"{result.segments} segments", rule, header, "-" * len(header)]  # fmt: skip
    rows = [(f"model {n} (T=1)", result.model_tokens[i], result.model_log_prob[i]) for i, n in enumerate(names)]
    rows += [
        (f"model {n} (T={temperatures[i]:g})", result.model_tokens[i], result.model_log_prob_at_temperature[i])
        for i, n in enumerate(names)
        if temperatures[i] != 1.0
    ]
    for label, tokens, log_prob in rows:
        lines.append(f"{label:<26}{tokens:>9}{-log_prob / math.log(2):>14.2f}{result.bits_per_byte(log_prob):>11.4f}")
    best = max(log_prob for _, _, log_prob in rows) + BEATS_MARGIN_NATS_PER_TOKEN * max(result.model_tokens)
    for s in result.strategies:
        log_prob = result.strategy_log_prob[s]
        weights = "".join(f"{w:>8.3f}" for w in result.strategy_mean_weights[s])
        mark = " *" if log_prob > best else ""
        lines.append(
            f"{'fused ' + s:<26}{'-':>9}{-log_prob / math.log(2):>14.2f}{result.bits_per_byte(log_prob):>11.4f}  "
            f"{weights}{mark}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"* fused beats every single-model row by more than {BEATS_MARGIN_NATS_PER_TOKEN:g} nats per scored token "
        "(the rounding of the sums).  w_x: mean weight of model x over segments."
    )
    lines.append("Token perplexity is not defined across tokenizers: fused rows have bits/byte only.")
    lines += [f"model {n}: {p}" for n, p in zip(names, model_paths)]
    lines.append(
        f"time: {result.elapsed_s:.2f} s (forwards {result.forward_s:.2f} s, per-position op + fusion "
        f"{result.fusion_s:.2f} s; {result.world_size} process(es))"
    )
    lines.append(rule)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ each model's own tokenizer


def own_tokenizers(paths: Sequence[str], trust_remote_code: bool) -> list[Any | None]:
    """Each model's own tokenizer (None for a local directory without one)."""
    import os

    from transformers.utils import logging as hf_logging

    from kotara import loading

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizers = []
    for i, path in enumerate(paths):
        loading.check_model_path(path, f"model {loading.model_label(i)}")
        local = os.path.isdir(os.path.expanduser(path))
        has_own = not local or any(
            os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
        )
        tokenizers.append(loading.load_tokenizer(path, trust_remote_code) if has_own else None)
    return tokenizers


def tokenizers_differ(tokenizers: Sequence[Any | None]) -> bool:
    """Whether two of the models' own tokenizers map ids to different tokens. Vocabularies that extend
    one another (one is the other plus added tokens, ``kotara.loading.extends``) do not differ: they
    fuse per token over the smallest."""
    from kotara.loading import tokenizer_extends

    present = sorted((t for t in tokenizers if t is not None), key=len)
    vocabs = [t.get_vocab() for t in present]
    return any(v != vocabs[0] and not tokenizer_extends(t, present[0]) for t, v in zip(present[1:], vocabs[1:]))
