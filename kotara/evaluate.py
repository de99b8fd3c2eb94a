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
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import moc_kernels
from kotara.loading import LoadedModel
from kotara.similarity import model_pairs, pearson_from_sums, token_stats
from kotara.windows import Window, batches, target_positions
from kotara.words import fuse_tokens


@dataclass
class FusionSpec:
    """What to fuse and how. Lists have one entry per model, in model order."""

    strategies: list[str]
    temperatures: list[float]
    weights: list[float]  # fixed mixture weights (normalised to sum 1 by the kernel)
    poe_betas: list[float]  # PoE exponents β_i (not normalised: Σβ ≠ 1 sharpens or flattens q)
    # Per-token weights learnt from the past tokens (kotara.words.fuse_tokens): not one row at a time,
    # so computed from every token's tempered log-probabilities after the pass, not by the kernel.
    sequential: list[str] = field(default_factory=list)
    switch_rate: float = 0.01

    def groups(self) -> list[tuple[list[str], list[float]]]:
        """Strategies grouped by the ``weights`` argument they need, so each group is one kernel call."""
        others = [s for s in self.strategies if s != "poe"]
        if "poe" not in self.strategies:
            return [(others, self.weights)] if others else []
        if self.poe_betas == self.weights:
            return [(list(self.strategies), self.weights)]
        return [g for g in ((others, self.weights), (["poe"], self.poe_betas)) if g[0]]


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


def _forward_logits(model: LoadedModel, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits [B, T, vocab_size] in the model's dtype; columns past the tokenizer are padding, dropped."""
    out = model.module(input_ids=input_ids.to(model.device))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[..., :vocab_size]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """
    num_models, pairs = len(models), model_pairs(len(models))
    vocab_size = vocab_size or models[0].logit_columns
    fuse_device = models[0].device
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if keep_token_nll and world > 1:
        raise ValueError("keep_token_nll needs a single process")
    my_windows = list(windows)[rank::world]

    # fp64 accumulators on CPU: [tokens, nll_i, nll_i^2, agree_p, jsd_p, nll_i*nll_j (p), strategy nll, weights].
    tokens = torch.zeros((), dtype=torch.float64)
    model_nll = torch.zeros(num_models, dtype=torch.float64)
    model_nll_sq = torch.zeros(num_models, dtype=torch.float64)
    model_nll_tempered = torch.zeros(num_models, dtype=torch.float64)
    agree = torch.zeros(len(pairs), dtype=torch.float64)
    jsd = torch.zeros(len(pairs), dtype=torch.float64)
    nll_cross = torch.zeros(len(pairs), dtype=torch.float64)
    strategy_nll = torch.zeros(len(spec.strategies), dtype=torch.float64)
    strategy_weights = torch.zeros(len(spec.strategies), num_models, dtype=torch.float64)
    kept: dict[str, list[torch.Tensor]] = {k: [] for k in [m.name for m in models] + list(spec.strategies)}
    sequential_log_p = torch.zeros(num_models, len(token_ids) - 1 if spec.sequential else 0, dtype=torch.float64)

    forward_s = fusion_s = 0.0
    start = time.perf_counter()
    bar = tqdm(total=len(my_windows), desc="kotara", unit="window", disable=not progress or rank != 0)
    for index, batch in enumerate(batches(token_ids, my_windows, batch_size, pad_id)):
        t0 = time.perf_counter()
        rows = []
        for model in models:
            logits = _forward_logits(model, batch.input_ids, vocab_size)
            rows.append(logits[batch.scored.to(model.device)].to(fuse_device))  # [n, V], scored positions only
        targets = batch.targets[batch.scored].to(fuse_device)
        _sync(fuse_device)
        t1 = time.perf_counter()

        stats = token_stats(rows, targets, spec.temperatures)
        fused: dict[str, moc_kernels.FusedNLL] = {}
        for group, weights in spec.groups():
            fused.update(moc_kernels.fused_logit_nll_multi(rows, targets, group, spec.temperatures, weights))
        _sync(fuse_device)
        forward_s += t1 - t0
        fusion_s += time.perf_counter() - t1

        nll = stats["nll"].double().cpu()
        if spec.sequential:  # every token's tempered log p, at its place in the text (ranks fill disjoint ones)
            positions = target_positions(my_windows[index * batch_size : (index + 1) * batch_size]) - 1
            sequential_log_p[:, positions] = -stats["nll_at_temperature"].double().cpu()
        tokens += targets.numel()
        model_nll += nll.sum(1)
        model_nll_sq += (nll * nll).sum(1)
        model_nll_tempered += stats["nll_at_temperature"].double().sum(1).cpu()
        agree += stats["agree"].double().sum(1).cpu()
        jsd += stats["jsd"].double().sum(1).cpu()
        for k, (i, j) in enumerate(pairs):
            nll_cross[k] += (nll[i] * nll[j]).sum()
        for s, strategy in enumerate(spec.strategies):
            strategy_nll[s] += fused[strategy].nll.double().sum().cpu()
            strategy_weights[s] += fused[strategy].weights.double().sum(1).cpu()
        if keep_token_nll:
            for i, model in enumerate(models):
                kept[model.name].append(stats["nll"][i].cpu())
            for strategy in spec.strategies:
                kept[strategy].append(fused[strategy].nll.cpu())
        bar.update(batch.input_ids.shape[0])
    bar.close()
    elapsed = time.perf_counter() - start

    parts = [tokens[None], model_nll, model_nll_sq, model_nll_tempered, agree, jsd, nll_cross, strategy_nll]
    parts += [strategy_weights.flatten(), sequential_log_p.flatten()]
    sums = torch.cat(parts)
    timings = torch.tensor([elapsed, forward_s, fusion_s], dtype=torch.float64)
    if world > 1:
        # nccl reduces CUDA tensors only; gloo reduces CPU tensors.
        comm_device = fuse_device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        sums, timings = sums.to(comm_device), timings.to(comm_device)
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        torch.distributed.all_reduce(timings, op=torch.distributed.ReduceOp.MAX)
        sums, timings = sums.cpu(), timings.cpu()
    sizes = [p.numel() for p in parts]
    (tokens, model_nll, model_nll_sq, model_nll_tempered, agree, jsd, nll_cross, strategy_nll, strategy_weights) = (
        sums.split(sizes)[:-1]
    )
    sequential_log_p = sums.split(sizes)[-1].view(num_models, -1)
    prior = torch.tensor(spec.weights, dtype=torch.float64)
    sequential = {s: fuse_tokens(sequential_log_p, s, prior, spec.switch_rate) for s in spec.sequential}
    strategy_weights = strategy_weights.view(len(spec.strategies), num_models)
    n = float(tokens.item())
    if n == 0:
        raise ValueError("no tokens were scored")
    pearson = [
        pearson_from_sums(
            n,
            float(model_nll[i]),
            float(model_nll[j]),
            float(model_nll_sq[i]),
            float(model_nll_sq[j]),
            float(nll_cross[k]),
        )
        for k, (i, j) in enumerate(pairs)
    ]
    return EvalResult(
        model_names=[m.name for m in models],
        strategies=list(spec.strategies) + list(sequential),
        tokens=int(n),
        num_bytes=num_bytes,
        model_nll=model_nll.tolist(),
        strategy_nll={s: float(strategy_nll[k]) for k, s in enumerate(spec.strategies)}
        | {s: nll for s, (nll, _) in sequential.items()},
        strategy_mean_weights={s: (strategy_weights[k] / n).tolist() for k, s in enumerate(spec.strategies)}
        | {s: w for s, (_, w) in sequential.items()},
        pairs=pairs,
        top1_agreement=(agree / n).tolist(),
        mean_jsd=(jsd / n).tolist(),
        nll_pearson=pearson,
        elapsed_s=float(timings[0]),
        forward_s=float(timings[1]),
        fusion_s=float(timings[2]),
        world_size=world,
        model_nll_at_temperature=model_nll_tempered.tolist(),
        token_nll={k: torch.cat(v) for k, v in kept.items()} if keep_token_nll else None,
    )
