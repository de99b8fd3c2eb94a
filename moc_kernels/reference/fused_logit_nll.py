"""Per-token logit-level fusion of M causal LMs: the fused distribution and its NLL (DESIGN §5, §5a).

Every strategy yields a normalised fused distribution q: ``fused_log_probs`` returns log q itself
(what generation samples from), ``fused_logit_nll`` the NLL of a token, -log q[target], without
materialising q. Model i's logits are first divided by its temperature T_i: z_i = logits_i / T_i.

log-linear pools, log q = log_softmax(sum_i a_i z_i):
  average          a_i = 1/M
  poe              a_i = beta_i (``weights``, default 1/M); log_softmax(sum beta_i log_softmax(z_i))
                   equals this because each log_softmax differs from z_i by a per-row constant.
                   A beta may be negative (1.5, -0.5: contrastive decoding / model arithmetic): q stays
                   normalised; at least one beta must be positive (checked in ``moc_kernels.ops``)
  entropy          a_i ∝ 1 / (H_i + EPS), H_i the entropy (nats) of softmax(z_i)
  gap              a_i ∝ p_i(top1) - p_i(top2) + EPS  (all gaps 0 -> equal weights)
linear pools (mixtures), q = sum_i a_i softmax(z_i), computed in log space:
  mixture          a_i = fixed ``weights`` normalised to sum 1 (default 1/M)
  mixture_entropy  a_i as in ``entropy``
  mixture_gap      a_i as in ``gap``

Non-finite logits: -inf marks an impossible token (probability 0, allowed as long as a row has a
finite logit); +inf or NaN anywhere in a row makes that row's outputs NaN. So does a -inf logit of a
model with a negative beta (it would make the fused logit +inf). Targets equal to IGNORE_INDEX
(-100) get nll 0.

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
    """Rows per chunk: ~2^19 elements per temporary on CPU, ~2^26 on GPUs (memory).

    On CPU a chunk's temporaries should stay in cache (every pass after the first over a model's
    logits then runs from cache), but each chunk also costs a few dozen small ops. Measured at
    V = 50257, 2 models, 512 rows (best of 3, one thread): 2^17 elements per temporary 3.1x
    log_softmax for ``entropy``, 2^18 2.1x, 2^19 1.7x, 2^20 1.9x; 256-row chunks were several
    times slower than 16-row ones.
    """
    budget = 1 << (19 if device.type == "cpu" else 26)
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


# Blocks for the top-2 search (see _top2); any partition of the row into blocks works.
TOP2_BLOCKS = 256


def _top2(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest and second-largest entry of every row (a tied maximum counts twice), and a column
    holding the largest: logits [n, V] -> [n] fp32, [n] fp32, [n, 1] int64.

    ``topk``, ``max(dim)`` and ``argmax`` are slow on CPU (~150 ms per 2048 x 50257) while ``amax``
    is fast, so: split each row into TOP2_BLOCKS strided blocks (block j = columns j, j + B, j + 2B,
    ...), take the blocks' maxima with one ``amax`` pass, then the top two of the block maxima and
    the top two inside the best block (both small). The row's second entry is the larger of the
    second block maximum and the best block's own second entry.
    """
    rows, vocab = logits.shape
    if vocab < 2:
        second = torch.full((rows,), float("-inf"), device=logits.device)
        return logits.float().squeeze(1), second, torch.zeros(rows, 1, dtype=torch.int64, device=logits.device)
    blocks = max(1, min(TOP2_BLOCKS, vocab // 2))
    per_block = vocab // blocks  # >= 2; columns past per_block * blocks (< blocks of them) are the tail
    main = per_block * blocks
    block_max = logits[:, :main].unflatten(1, (per_block, blocks)).amax(1).float()  # [n, blocks]
    tail = vocab - main
    if tail:
        block_max[:, :tail] = torch.maximum(block_max[:, :tail], logits[:, main:].float())
    best2 = block_max.topk(2, dim=1)
    best = best2.indices[:, :1]  # [n, 1]
    members = best + torch.arange(0, main, blocks, device=logits.device)  # [n, per_block]
    if tail:  # the best block's tail column, or a repeat of its first one (harmless for a top-2)
        members = torch.cat([members, torch.where(best < tail, best + main, best)], dim=1)
    inside = logits.gather(1, members).float()
    if tail:  # a repeated first column must not count as a tie
        inside[:, -1].masked_fill_(best.squeeze(1) >= tail, float("-inf"))
    inside2 = inside.topk(2, dim=1)
    argmax = members.gather(1, inside2.indices[:, :1])
    return block_max.amax(1), torch.maximum(best2.values[:, 1], inside2.values[:, 1]), argmax


def _model_stats(
    logits: torch.Tensor, temperature: float, shifted: torch.Tensor, exp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row maximum, log-sum-exp, entropy and top-1/top-2 probability gap of softmax(logits / temperature).

    logits: [n, V] any float dtype. shifted: [n, V] fp32 out, s = (logits - max) / T (the tempered
    logits z shifted by their row maximum; the log-linear pools reuse it). exp: [n, V] fp32
    scratch. Returns four [n] fp32 tensors. Preallocated buffers and in-place steps keep this to a
    handful of passes over V, all but the first from cache (it is the fusion's hot loop on CPU).
    """
    row_max, second, argmax = _top2(logits)
    torch.sub(logits, row_max[:, None], out=shifted)  # fp32 (type promotion), max entry exactly 0
    if temperature != 1.0:
        shifted.mul_(1.0 / temperature)
    # sum exp(s) = 1 + rest, rest summed without one maximum's e^0 = 1: log1p(rest) keeps the precision
    # that log(1 + rest) loses on peaked rows (entropy ~ rest there, and the entropy weights divide by it).
    rest = torch.exp(shifted, out=exp).scatter_(1, argmax, 0.0).sum(-1)
    rest.masked_fill_(row_max == float("inf"), float("nan"))  # its e^(inf - inf) was just overwritten
    sum_exp = 1.0 + rest
    p_dot_s = exp.mul_(shifted).sum(-1)  # sum p s, unnormalised (the maximum's s is 0 anyway)
    # A -inf logit makes 0 * (-inf) = NaN in that sum. Such rows are rare: redo them with s clamped
    # to a finite minimum (exp is 0 there) rather than clamping every row. Rows whose maximum is
    # NaN or +inf stay NaN, as documented. (Checked on the [n] result: one sync, no pass over V.)
    poisoned = p_dot_s.isnan() & row_max.isfinite()
    if poisoned.any():
        clamped = shifted[poisoned].clamp_(min=torch.finfo(torch.float32).min)
        p_dot_s[poisoned] = (clamped.exp() * clamped).sum(-1)
    log_sum_exp = rest.log1p()
    entropy = log_sum_exp - p_dot_s / sum_exp  # H = lse(s) - sum p s
    gap = (1.0 - ((second - row_max) / temperature).exp()) / sum_exp  # (e^0 - e^(s_2)) / sum e^s
    return row_max, log_sum_exp + row_max / temperature, entropy, gap


def _fused_log_sum_exp(shifted: torch.Tensor, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(sum_i a_i s_i): shifted [M, n, V] fp32 (s_i = z_i - max z_i), a [M, n] -> [n] fp32.

    out: [n, V] fp32 scratch. f = sum_i a_i z_i = sum_i a_i s_i + sum_i a_i max(z_i), and with every
    a_i > 0 each s_i <= 0, so exp(sum_i a_i s_i) <= 1 cannot overflow: no max pass over f is needed.
    If the models disagree so much that max(f) lies far below the bound the sum could underflow;
    those (rare) rows are redone with logsumexp, which shifts by max(f). A negative a_i (poe's
    contrastive betas) lifts the bound and the sum may overflow: such rows are redone too.
    """
    torch.mul(shifted[0], a[0, :, None], out=out)
    for i in range(1, shifted.shape[0]):
        out.addcmul_(shifted[i], a[i, :, None])
    sum_exp = out.exp_().sum(-1)
    log_sum_exp = sum_exp.log()
    # Below 1e-20 the largest term may be < 1e-25 and terms 1e-13 times smaller would be denormal.
    lost = (sum_exp < 1e-20) | (sum_exp == float("inf"))
    if lost.any():
        log_sum_exp[lost] = torch.logsumexp((shifted[:, lost] * a[:, lost, None]).sum(0), -1)
    # +inf in f (a -inf logit under a negative a_i) is a NaN row, like a +inf logit (module docstring).
    return log_sum_exp.masked_fill_(log_sum_exp == float("inf"), float("nan"))


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
    step = max(1, min(chunk_rows(vocab_size, device), num_rows))
    # Scratch reused by every chunk (fresh chunk-size temporaries cost page faults and cache misses):
    # each model's shifted logits, and one more buffer for exp / the fused row.
    scratch = torch.empty(num_models + 1, step, vocab_size, dtype=torch.float32, device=device)
    inv_temps = torch.tensor([1.0 / t for t in temps], dtype=torch.float32, device=device)[:, None]
    for start in range(0, num_rows, step):
        rows = slice(start, min(start + step, num_rows))
        shifted, work = scratch[:num_models, : rows.stop - start], scratch[num_models, : rows.stop - start]
        chunk = [lg[rows] for lg in logits]
        target = safe_targets[rows, None]
        stats = [_model_stats(chunk[i], temps[i], shifted[i], work) for i in range(num_models)]
        row_max, log_sum_exp, entropy, gap = (torch.stack(s) for s in zip(*stats))  # each [M, n]
        target_z = torch.stack([chunk[i].gather(1, target).squeeze(1).float() / temps[i] for i in range(num_models)])
        fused_done = []  # (a, logsumexp f): poe with the default betas is average, for example
        for strategy, result in out.items():
            a = strategy_weights(strategy, entropy, gap, fixed)
            if strategy in LINEAR_POOLS:
                # log q[t] = logsumexp_i(log a_i + log softmax(z_i)[t]); q is normalised by construction.
                nll = -torch.logsumexp(a.log() + target_z - log_sum_exp, dim=0)
            else:
                # log q[t] = f[t] - logsumexp(f) with f = sum_i a_i z_i and z_i = s_i + max(z_i).
                same = [lse for done, lse in fused_done if torch.equal(done, a)]
                log_sum_exp_fused = same[0] if same else _fused_log_sum_exp(shifted, a, work)
                fused_done.append((a, log_sum_exp_fused))
                log_sum_exp_fused = log_sum_exp_fused + (a * row_max * inv_temps).sum(0)
                nll = log_sum_exp_fused - (a * target_z).sum(0)
            result.nll[rows] = nll
            result.weights[:, rows] = a
            result.entropy[:, rows] = entropy
    for result in out.values():
        result.nll.masked_fill_(ignored, 0.0)
    return out


# Strategies whose weights depend on the logits (they need each model's entropy or top-2 gap).
ADAPTIVE = ("entropy", "gap", "mixture_entropy", "mixture_gap")


def fused_log_probs(
    logits: Sequence[torch.Tensor],
    strategy: str,
    temperatures: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The fused distribution itself: log q [N, V] fp32 for M >= 2 models (what generation samples from).

    logits: M tensors [N, V] fp32|bf16|fp16 (same shape); strategy, temperatures and weights as in
    ``fused_logit_nll`` (weights: PoE betas, which may be negative, or fixed mixture weights), so
    ``fused_logit_nll(...).nll == -fused_log_probs(...).gather(1, targets[:, None])``. With
    ``return_weights`` also returns the weights a [M, N] fp32 each model received.
    """
    num_models, (num_rows, vocab_size) = len(logits), logits[0].shape
    device = logits[0].device
    temps = list(temperatures) if temperatures is not None else [1.0] * num_models
    fixed = torch.tensor(
        weights if weights is not None else [1.0 / num_models] * num_models, dtype=torch.float32, device=device
    )
    log_q = torch.empty(num_rows, vocab_size, dtype=torch.float32, device=device)
    alphas = torch.empty(num_models, num_rows, dtype=torch.float32, device=device)
    step = max(1, min(chunk_rows(vocab_size, device), num_rows))
    for start in range(0, num_rows, step):
        rows = slice(start, min(start + step, num_rows))
        z = [lg[rows].float() if t == 1.0 else lg[rows].float() / t for lg, t in zip(logits, temps)]
        # amax is the cheapest pass that sees a +inf (it is the maximum) or a NaN (amax propagates it).
        valid = torch.stack([zi.amax(-1) < float("inf") for zi in z]).all(0)
        if strategy in ADAPTIVE:
            scratch = torch.empty(2, z[0].shape[0], vocab_size, dtype=torch.float32, device=device)
            stats = [_model_stats(zi, 1.0, scratch[0], scratch[1])[2:] for zi in z]
            entropy, gap = (torch.stack(s) for s in zip(*stats))
        else:  # fixed weights: the statistics are not needed
            entropy = gap = torch.zeros(num_models, z[0].shape[0], device=device)
        a = strategy_weights(strategy, entropy, gap, fixed)
        if strategy in LINEAR_POOLS:
            # q = sum_i a_i softmax(z_i)  ->  log q = logsumexp_i(log a_i + log_softmax(z_i)), per token,
            # accumulated with logaddexp: one elementwise pass per model (logsumexp over a stacked
            # [M, n, V] was 5x slower on CPU at V = 50257, where generation pays it every step).
            out = torch.log_softmax(z[0], -1).add_(a[0].log()[:, None])
            for i in range(1, num_models):
                torch.logaddexp(out, torch.log_softmax(z[i], -1).add_(a[i].log()[:, None]), out=out)
        else:
            # q = softmax(f), f = sum_i a_i z_i (log_softmax shifts by max f: any sign of a_i is safe).
            fused = z[0] * a[0, :, None]
            for i in range(1, num_models):
                fused.addcmul_(z[i], a[i, :, None])
            valid &= fused.amax(-1) < float("inf")  # +inf only from a -inf logit under a negative beta
            out = torch.log_softmax(fused, -1)
        if not bool(valid.all()):  # (rare) rows with +inf or NaN logits are NaN: the documented rule
            out.masked_fill_(~valid[:, None], float("nan"))
        log_q[rows] = out
        alphas[:, rows] = a
    return (log_q, alphas) if return_weights else log_q
