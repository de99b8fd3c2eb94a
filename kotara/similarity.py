"""Per-model baselines and how similar the models are, accumulated as sums over tokens.

The research question behind Kotara is that fusion helps when models are similar but not
identical, so next to each model's NLL we measure, for every pair of models (i, j):
  top-1 agreement      fraction of tokens where argmax p_i == argmax p_j
  Jensen-Shannon div.  mean over tokens of JS(p_i, p_j) in nats (0 = identical, ln 2 = disjoint)
  NLL correlation      Pearson correlation of the two models' per-token NLL
All on the models' own distributions (temperature 1): similarity is a property of the models,
not of a fusion setting. Everything is kept as sums (and sums of squares/products for Pearson)
so that windows, batches and ranks combine by addition.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch

LN2 = math.log(2.0)


def model_pairs(num_models: int) -> list[tuple[int, int]]:
    """All pairs (i, j), i < j, in a fixed order."""
    return list(combinations(range(num_models), 2))


def _chunk_rows(vocab_size: int, device: torch.device) -> int:
    # Bounded temporaries: ~4 MiB of fp32 per [rows, V] tensor on CPU (cache), ~1 GiB on GPUs.
    budget = 1 << (20 if device.type == "cpu" else 28)
    return max(1, budget // max(vocab_size, 1))


@torch.no_grad()
def token_stats(
    logits: list[torch.Tensor], targets: torch.Tensor, temperatures: list[float] | None = None
) -> dict[str, torch.Tensor]:
    """Per-token statistics of M models' scored rows.

    logits: M tensors [n, V] (any float dtype, one device); targets: [n] int64.
    Returns fp32 tensors: ``nll`` [M, n] (fp32 log-softmax cross-entropy), ``agree`` [P, n]
    (1.0 where the pair's argmax agree), ``jsd`` [P, n] (nats), with P = M(M-1)/2 pairs in
    ``model_pairs`` order. With ``temperatures`` (one per model) also ``nll_at_temperature`` [M, n]:
    each model alone at its fusion temperature (the same tensor as ``nll`` where that is 1).
    """
    num_models, (num_rows, vocab_size) = len(logits), logits[0].shape
    pairs = model_pairs(num_models)
    device = logits[0].device
    nll = torch.empty(num_models, num_rows, dtype=torch.float32, device=device)
    agree = torch.empty(len(pairs), num_rows, dtype=torch.float32, device=device)
    jsd = torch.empty(len(pairs), num_rows, dtype=torch.float32, device=device)
    tempered = [i for i, t in enumerate(temperatures or []) if t != 1.0]
    # Each row is filled below: the tempered models' at their temperature, the others' copied from nll.
    nll_tempered = torch.empty_like(nll) if tempered else nll
    step = _chunk_rows(vocab_size, device)
    for start in range(0, num_rows, step):
        rows = slice(start, min(start + step, num_rows))
        target = targets[rows, None]
        for i in tempered:
            log_p = torch.log_softmax(logits[i][rows].float() / temperatures[i], dim=-1)
            nll_tempered[i, rows] = -log_p.gather(1, target).squeeze(1)
        log_probs = [torch.log_softmax(lg[rows].float(), dim=-1) for lg in logits]
        for i, lp in enumerate(log_probs):
            nll[i, rows] = -lp.gather(1, target).squeeze(1)  # inf for an impossible (-inf logit) target
            lp.clamp_(min=torch.finfo(torch.float32).min)  # -inf -> finite, so p * log p below is 0, not NaN
            if tempered and i not in tempered:
                nll_tempered[i, rows] = nll[i, rows]
        probs = [lp.exp() for lp in log_probs]
        # Row sums in fp64: the JS divergence below is a difference of entropies (~ln V each).
        neg_entropy = [(p * lp).sum(-1, dtype=torch.float64) for p, lp in zip(probs, log_probs)]
        top1 = [lg[rows].argmax(-1) for lg in logits]
        for k, (i, j) in enumerate(pairs):
            agree[k, rows] = (top1[i] == top1[j]).float()
            # JS(p_i, p_j) = H(m) - (H(p_i) + H(p_j)) / 2 with m = (p_i + p_j) / 2: one log pass per pair
            # (xlogy gives 0 log 0 = 0) instead of KL terms that need log m and two more products.
            mid = (probs[i] + probs[j]).mul_(0.5)
            entropy_mid = -torch.xlogy(mid, mid).sum(-1, dtype=torch.float64)
            jsd[k, rows] = (entropy_mid + 0.5 * (neg_entropy[i] + neg_entropy[j])).clamp_min(0.0).float()
    out = {"nll": nll, "agree": agree, "jsd": jsd}
    if temperatures is not None:
        out["nll_at_temperature"] = nll_tempered
    return out


def pearson_from_sums(n: float, sum_x: float, sum_y: float, sum_xx: float, sum_yy: float, sum_xy: float) -> float:
    """Pearson correlation from running sums (fp64); NaN when either variable is constant."""
    cov = sum_xy - sum_x * sum_y / n
    var_x = sum_xx - sum_x * sum_x / n
    var_y = sum_yy - sum_y * sum_y / n
    if var_x <= 0 or var_y <= 0:
        return float("nan")
    return cov / math.sqrt(var_x * var_y)
