"""One pass over the text: every model's forward once per window batch, baselines, fusion, similarity.

The models run once; all strategies are computed from the same logits with
``moc_kernels.fused_logit_nll_multi`` (fusion is cheap next to the forwards). Everything is
accumulated as fp64 sums over scored tokens (never means of per-window means), so batches, windows
and ``torchrun`` ranks combine by addition; ranks all-reduce one vector of sums at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
from tqdm import tqdm

import moc_kernels
from kotara.loading import LoadedModel
from kotara.similarity import model_pairs, pearson_from_sums, token_stats
from kotara.steps import FusionSpec, forward_logits, rank_and_world, sync
from kotara.windows import Batch, Window, batches, target_positions
from kotara.words import fuse_tokens


@dataclass
class EvalResult:
    """Totals over the whole text (all ranks). NLL in nats, summed over ``tokens`` scored targets."""

    model_names: list[str]
    strategies: list[str]
    tokens: int
    num_bytes: int
    model_nll: list[float]  # each model alone at temperature 1 (the original tool's baseline)
    strategy_nll: dict[str, float]
    strategy_mean_weights: dict[str, list[float]]
    pairs: list[tuple[int, int]]
    top1_agreement: list[float]
    mean_jsd: list[float]
    nll_pearson: list[float]
    elapsed_s: float
    forward_s: float
    fusion_s: float
    world_size: int = 1
    # Each model alone at its fusion temperature T_i (= model_nll where T_i = 1): how much of a fused
    # gain the temperature alone gives. None: not computed (equal to model_nll).
    model_nll_at_temperature: list[float] | None = None
    # Per-token NLL [tokens] fp32 in text order, keyed by model name and strategy (keep_token_nll only).
    token_nll: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def ppl(self, nll: float) -> float:
        return math.exp(nll / self.tokens)

    def bits_per_byte(self, nll: float) -> float:
        return nll / (math.log(2.0) * self.num_bytes)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else float("nan")


@dataclass
class _Sums:
    """fp64 sums over scored tokens, on CPU: batches, windows and ranks combine by adding them.

    M models, P = M(M-1)/2 pairs (``model_pairs`` order), S strategies.
    """

    tokens: torch.Tensor  # [] scored targets
    model_nll: torch.Tensor  # [M] Σ nll_i (each model alone, temperature 1)
    model_nll_sq: torch.Tensor  # [M] Σ nll_i² (for the Pearson correlations)
    model_nll_tempered: torch.Tensor  # [M] Σ nll_i at the model's fusion temperature
    agree: torch.Tensor  # [P] Σ [argmax p_i == argmax p_j]
    jsd: torch.Tensor  # [P] Σ JS(p_i, p_j), nats
    nll_cross: torch.Tensor  # [P] Σ nll_i · nll_j
    strategy_nll: torch.Tensor  # [S] Σ fused NLL
    strategy_weights: torch.Tensor  # [S, M] Σ the weight each model received
    # [M, T] each model's tempered log p of every target of the text at its place (T = n - 1, or 0 when
    # no sequential strategy asks for them); ranks fill disjoint positions, so the all-reduce adds zeros.
    token_log_p: torch.Tensor

    @classmethod
    def zeros(cls, num_models: int, num_pairs: int, num_strategies: int, num_targets: int = 0) -> _Sums:
        shapes = [(), *[(num_models,)] * 3, *[(num_pairs,)] * 3, (num_strategies,), (num_strategies, num_models)]
        shapes.append((num_models, num_targets))
        return cls(*(torch.zeros(shape, dtype=torch.float64) for shape in shapes))

    def add(
        self, scores: _BatchScores, pairs: list[tuple[int, int]], strategies: list[str], windows: Sequence[Window]
    ) -> None:
        """Add one batch (of ``windows``): per-token statistics and fused NLLs, summed over its tokens in
        fp64, and (when kept) every model's tempered log p of each target at its place in the text."""
        stats, fused = scores.stats, scores.fused
        nll = stats["nll"].double().cpu()
        self.tokens += scores.targets.numel()
        self.model_nll += nll.sum(1)
        self.model_nll_sq += (nll * nll).sum(1)
        self.model_nll_tempered += stats["nll_at_temperature"].double().sum(1).cpu()
        self.agree += stats["agree"].double().sum(1).cpu()
        self.jsd += stats["jsd"].double().sum(1).cpu()
        for k, (i, j) in enumerate(pairs):
            self.nll_cross[k] += (nll[i] * nll[j]).sum()
        for s, strategy in enumerate(strategies):
            self.strategy_nll[s] += fused[strategy].nll.double().sum().cpu()
            self.strategy_weights[s] += fused[strategy].weights.double().sum(1).cpu()
        if self.token_log_p.shape[1]:
            self.token_log_p[:, target_positions(windows) - 1] = -stats["nll_at_temperature"].double().cpu()

    def flat(self) -> torch.Tensor:
        """Every sum in one fp64 vector (one all-reduce), field order; :meth:`from_flat` undoes it."""
        return torch.cat([getattr(self, f.name).flatten() for f in fields(self)])

    def from_flat(self, flat: torch.Tensor) -> _Sums:
        """Sums shaped like ``self`` from a vector :meth:`flat` made."""
        like = [getattr(self, f.name) for f in fields(self)]
        pieces = flat.split([t.numel() for t in like])
        return _Sums(*(piece.view(t.shape) for piece, t in zip(pieces, like)))


class _BatchScores(NamedTuple):
    """One window batch, scored positions only: n targets, M models, on the fusion device."""

    targets: torch.Tensor  # [n] int64
    stats: dict[str, torch.Tensor]  # ``similarity.token_stats``: nll, agree, jsd, nll_at_temperature (fp32)
    fused: dict[str, moc_kernels.FusedNLL]  # per strategy: nll [n], weights [M, n] (fp32)
    forward_s: float  # the models' forwards (device synchronised)
    fusion_s: float  # statistics and fusion


def _score_batch(
    models: Sequence[LoadedModel], batch: Batch, spec: FusionSpec, vocab_size: int, fuse_device: torch.device
) -> _BatchScores:
    """Every model's forward on ``batch``, then per-token statistics and every strategy's fusion of its rows."""
    t0 = time.perf_counter()
    rows = []
    for model in models:
        logits = forward_logits(model, batch.input_ids, vocab_size)
        rows.append(logits[batch.scored.to(model.device)].to(fuse_device))  # [n, V], scored positions only
    targets = batch.targets[batch.scored].to(fuse_device)
    sync(fuse_device)
    t1 = time.perf_counter()

    stats = token_stats(rows, targets, spec.temperatures)
    fused: dict[str, moc_kernels.FusedNLL] = {}
    for group, weights in spec.groups():
        fused.update(moc_kernels.fused_logit_nll_multi(rows, targets, group, spec.temperatures, weights))
    sync(fuse_device)
    return _BatchScores(targets, stats, fused, t1 - t0, time.perf_counter() - t1)


def _all_reduce(
    sums: _Sums, timings: torch.Tensor, fuse_device: torch.device, world: int
) -> tuple[_Sums, torch.Tensor]:
    """Sums added over ranks, timings [elapsed, forward, fusion] their maximum (the slowest rank's)."""
    if world == 1:
        return sums, timings
    flat = sums.flat()
    # nccl reduces CUDA tensors only; gloo reduces CPU tensors.
    comm_device = fuse_device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    flat, timings = flat.to(comm_device), timings.to(comm_device)
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    torch.distributed.all_reduce(timings, op=torch.distributed.ReduceOp.MAX)
    return sums.from_flat(flat.cpu()), timings.cpu()


def _result(
    models: Sequence[LoadedModel],
    spec: FusionSpec,
    num_bytes: int,
    sums: _Sums,
    timings: torch.Tensor,
    world: int,
    token_nll: dict[str, torch.Tensor] | None,
) -> EvalResult:
    """Means, correlations and totals of the text from the (all-reduced) sums."""
    n = float(sums.tokens.item())
    if n == 0:
        raise ValueError("no tokens were scored")
    pairs = model_pairs(len(models))
    model_nll, model_nll_sq = sums.model_nll, sums.model_nll_sq
    pearson = [
        pearson_from_sums(
            n,
            float(model_nll[i]),
            float(model_nll[j]),
            float(model_nll_sq[i]),
            float(model_nll_sq[j]),
            float(sums.nll_cross[k]),
        )
        for k, (i, j) in enumerate(pairs)
    ]
    prior = torch.tensor(spec.weights, dtype=torch.float64)
    sequential = {s: fuse_tokens(sums.token_log_p, s, prior, spec.switch_rate) for s in spec.sequential}
    return EvalResult(
        model_names=[m.name for m in models],
        strategies=list(spec.strategies) + list(sequential),
        tokens=int(n),
        num_bytes=num_bytes,
        model_nll=model_nll.tolist(),
        strategy_nll={s: float(sums.strategy_nll[k]) for k, s in enumerate(spec.strategies)}
        | {s: nll for s, (nll, _) in sequential.items()},
        strategy_mean_weights={s: (sums.strategy_weights[k] / n).tolist() for k, s in enumerate(spec.strategies)}
        | {s: w for s, (_, w) in sequential.items()},
        pairs=pairs,
        top1_agreement=(sums.agree / n).tolist(),
        mean_jsd=(sums.jsd / n).tolist(),
        nll_pearson=pearson,
        elapsed_s=float(timings[0]),
        forward_s=float(timings[1]),
        fusion_s=float(timings[2]),
        world_size=world,
        model_nll_at_temperature=sums.model_nll_tempered.tolist(),
        token_nll=token_nll,
    )


@torch.no_grad()
def evaluate(
    models: Sequence[LoadedModel],
    token_ids: torch.Tensor,
    num_bytes: int,
    windows: Sequence[Window],
    spec: FusionSpec,
    batch_size: int = 1,
    vocab_size: int | None = None,
    pad_id: int = 0,
    progress: bool = False,
    keep_token_nll: bool = False,
) -> EvalResult:
    """Baselines, fusion and similarity of ``models`` on ``token_ids`` ([n] int64) over ``windows``.

    Under ``torch.distributed`` (initialised by the caller) this rank takes every world_size-th
    window and the sums are all-reduced, so every rank returns the totals of the whole text.
    ``vocab_size``: logit columns used (the tokenizer's length); default the first model's width.

    Per batch of windows, ``_score_batch`` (the forwards, statistics and fusion) then ``_Sums.add``;
    after the last, ``_all_reduce`` over ranks and ``_result`` (means and correlations).
    """
    num_models, pairs = len(models), model_pairs(len(models))
    vocab_size = vocab_size or models[0].logit_columns
    fuse_device = models[0].device
    rank, world = rank_and_world()
    if keep_token_nll and world > 1:
        raise ValueError("keep_token_nll needs a single process")
    my_windows = list(windows)[rank::world]

    sums = _Sums.zeros(num_models, len(pairs), len(spec.strategies), len(token_ids) - 1 if spec.sequential else 0)
    kept: dict[str, list[torch.Tensor]] = {k: [] for k in [m.name for m in models] + list(spec.strategies)}
    forward_s = fusion_s = 0.0
    start = time.perf_counter()
    bar = tqdm(total=len(my_windows), desc="kotara", unit="window", disable=not progress or rank != 0)
    for index, batch in enumerate(batches(token_ids, my_windows, batch_size, pad_id)):
        scores = _score_batch(models, batch, spec, vocab_size, fuse_device)
        forward_s += scores.forward_s
        fusion_s += scores.fusion_s
        sums.add(scores, pairs, spec.strategies, my_windows[index * batch_size : (index + 1) * batch_size])
        if keep_token_nll:
            for i, model in enumerate(models):
                kept[model.name].append(scores.stats["nll"][i].cpu())
            for strategy in spec.strategies:
                kept[strategy].append(scores.fused[strategy].nll.cpu())
        bar.update(batch.input_ids.shape[0])
    bar.close()
    elapsed = time.perf_counter() - start

    timings = torch.tensor([elapsed, forward_s, fusion_s], dtype=torch.float64)
    sums, timings = _all_reduce(sums, timings, fuse_device, world)
    token_nll = {k: torch.cat(v) for k, v in kept.items()} if keep_token_nll else None
    return _result(models, spec, num_bytes, sums, timings, world, token_nll)
