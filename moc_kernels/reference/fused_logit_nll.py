"""Per-token logit-level fusion of M causal LMs and the NLL of the fused distribution (DESIGN §5).

Every strategy yields a normalised fused distribution q; the NLL of a token is -log q[target].
Model i's logits are first divided by its temperature T_i: z_i = logits_i / T_i.

log-linear pools, log q = log_softmax(sum_i a_i z_i):
  average          a_i = 1/M
  poe              a_i = beta_i (``weights``, default 1/M); log_softmax(sum beta_i log_softmax(z_i))
                   equals this because each log_softmax differs from z_i by a per-row constant
  entropy          a_i ∝ 1 / (H_i + EPS), H_i the entropy (nats) of softmax(z_i)
  gap              a_i ∝ p_i(top1) - p_i(top2) + EPS  (all gaps 0 -> equal weights)
linear pools (mixtures), q = sum_i a_i softmax(z_i), computed in log space:
  mixture          a_i = fixed ``weights`` normalised to sum 1 (default 1/M)
  mixture_entropy  a_i as in ``entropy``
  mixture_gap      a_i as in ``gap``

Non-finite logits: -inf marks an impossible token (probability 0, allowed as long as a row has a
finite logit); +inf or NaN anywhere in a row makes that row's outputs NaN. Targets equal to
IGNORE_INDEX (-100) get nll 0.

Rows are processed in chunks so that memory stays bounded for V up to 256k and, on CPU, the
temporaries of a chunk stay in cache (measured: 16-row chunks run several times faster than
256-row chunks at V = 50257).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

STRATEGIES = ("average", "poe", "entropy", "gap", "mixture", "mixture_entropy", "mixture_gap")
LINEAR_POOLS = ("mixture", "mixture_entropy", "mixture_gap")
EPS = 1e-6
IGNORE_INDEX = -100


class FusedNLL(NamedTuple):
    nll: torch.Tensor  # [N] fp32, 0 where the target is ignored
    weights: torch.Tensor  # [M, N] fp32, the weight a_i each model received per token
    entropy: torch.Tensor  # [M, N] fp32, entropy (nats) of each model's tempered distribution


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk: ~2^20 elements per temporary on CPU (cache), ~2^26 on GPUs (memory)."""
    budget = 1 << (20 if device.type == "cpu" else 26)
    return max(1, budget // max(vocab_size, 1))


def strategy_weights(strategy: str, entropy: torch.Tensor, gap: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Per-token model weights a: [M, n] fp32 from per-model entropy/gap [M, n] and fixed [M]."""
    if strategy == "average":
        return torch.full_like(entropy, 1.0 / entropy.shape[0])
    if strategy == "poe":
        return fixed[:, None].expand_as(entropy).clone()
    if strategy == "mixture":
        return (fixed / fixed.sum())[:, None].expand_as(entropy).clone()
    if strategy in ("entropy", "mixture_entropy"):
        raw = 1.0 / (entropy + EPS)
    else:  # gap, mixture_gap
        raw = gap + EPS
    return raw / raw.sum(0, keepdim=True)


def _model_stats(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-sum-exp, entropy and top-1/top-2 probability gap of softmax(logits / temperature).

    logits: [n, V] any float dtype; returns three [n] fp32 tensors. The tempered logits z are never
    materialised: with m = max(logits), s = (logits - m) / T is z shifted by its row maximum.
    In-place steps keep this to a handful of passes over V (it is the fusion's hot loop on CPU).
    """
    row_max, argmax = logits.max(-1, keepdim=True)
    shifted = logits - row_max.float()  # fp32 (type promotion), max entry exactly 0
    if temperature != 1.0:
        shifted.mul_(1.0 / temperature)
    shifted.clamp_(min=torch.finfo(torch.float32).min)  # -inf -> finite, so 0 * s below is 0, not NaN
    exp = shifted.exp()
    sum_exp = exp.sum(-1)
    p_dot_s = exp.mul_(shifted).sum(-1) / sum_exp
    log_sum_exp = sum_exp.log()
    entropy = log_sum_exp - p_dot_s  # H = lse(s) - sum p s
    # Second-largest entry without a topk (slow on CPU): hide one maximum and take the max again;
    # a tied maximum then gives second = 0 and gap = 0, as it should.
    second = shifted.scatter_(1, argmax, float("-inf")).amax(-1)
    gap = (1.0 - second.exp()) / sum_exp
    return log_sum_exp + row_max.squeeze(-1).float() / temperature, entropy, gap


def fused_logit_nll(
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    strategy: str,
    temperatures: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
) -> FusedNLL:
    """NLL of ``targets`` under the fused distribution of M >= 2 models.

    logits: M tensors [N, V] fp32|bf16|fp16 (same shape); targets: [N] int64, -100 = ignore.
    temperatures: M floats > 0 (default 1); weights: M floats > 0, the PoE betas or the fixed
    mixture weights (default 1/M). Returns FusedNLL(nll [N], weights [M, N], entropy [M, N]).
    """
    return fused_logit_nll_multi(logits, targets, [strategy], temperatures, weights)[strategy]


def fused_logit_nll_multi(
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    strategies: Sequence[str],
    temperatures: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, FusedNLL]:
    """``fused_logit_nll`` for several strategies at once, sharing the per-model pass over V."""
    num_models, (num_rows, vocab_size) = len(logits), logits[0].shape
    device = logits[0].device
    temps = list(temperatures) if temperatures is not None else [1.0] * num_models
    fixed = torch.tensor(
        weights if weights is not None else [1.0 / num_models] * num_models, dtype=torch.float32, device=device
    )
    ignored = targets == IGNORE_INDEX
    safe_targets = targets.masked_fill(ignored, 0)

    out = {
        s: FusedNLL(
            torch.empty(num_rows, dtype=torch.float32, device=device),
            torch.empty(num_models, num_rows, dtype=torch.float32, device=device),
            torch.empty(num_models, num_rows, dtype=torch.float32, device=device),
        )
        for s in strategies
    }
    step = chunk_rows(vocab_size, device)
    for start in range(0, num_rows, step):
        rows = slice(start, min(start + step, num_rows))
        chunk = [lg[rows] for lg in logits]
        target = safe_targets[rows, None]
        stats = [_model_stats(chunk[i], temps[i]) for i in range(num_models)]
        log_sum_exp, entropy, gap = (torch.stack(s) for s in zip(*stats))  # each [M, n]
        target_z = torch.stack([chunk[i].gather(1, target).squeeze(1).float() / temps[i] for i in range(num_models)])
        for strategy, result in out.items():
            a = strategy_weights(strategy, entropy, gap, fixed)
            if strategy in LINEAR_POOLS:
                # log q[t] = logsumexp_i(log a_i + log softmax(z_i)[t]); q is normalised by construction.
                nll = -torch.logsumexp(a.log() + target_z - log_sum_exp, dim=0)
            else:
                # log q[t] = f[t] - logsumexp(f) with f = sum_i a_i z_i = sum_i (a_i / T_i) logits_i.
                fused = chunk[0].float() * (a[0] / temps[0])[:, None]
                for i in range(1, num_models):
                    fused.addcmul_(chunk[i].float(), (a[i] / temps[i])[:, None])
                fused_max = fused.amax(-1, keepdim=True)
                log_sum_exp_fused = fused.sub_(fused_max).exp_().sum(-1).log() + fused_max.squeeze(-1)
                nll = log_sum_exp_fused - (a * target_z).sum(0)
            result.nll[rows] = nll
            result.weights[:, rows] = a
            result.entropy[:, rows] = entropy
    for result in out.values():
        result.nll.masked_fill_(ignored, 0.0)
    return out
