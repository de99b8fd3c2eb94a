"""Training FLOPs per token of a ``ModelConfig``, and the dense FFN width that matches an MoC model.

The count is analytic, term by term from DESIGN §2 and ``model/``, and
``tests/test_experiments.py`` checks its matrix-product part against
``torch.utils.flop_counter.FlopCounterMode`` on a real forward, so a change to the model that this
file does not follow fails a test instead of silently skewing the iso-FLOP arm.

Convention: one multiply-add = 2 FLOPs; matrix products only (norms, softmax, SiLU, RoPE are a few
FLOPs per element, far below the products at these widths); training = 3 x forward (the backward
of a product is two products of the same size, which FlopCounterMode confirms on this model).
"""

from __future__ import annotations

import dataclasses
import math

from model.config import ModelConfig


def forward_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs per token, by part.

    Args:
        config: the model.
        seq_len: tokens per training sequence (default ``config.max_seq_len``); only the causal
            attention-score term depends on it (mean context (T+1)/2 keys per query).
    Returns:
        dict with ``attention_proj``, ``attention_scores``, ``ffn`` (all layers), ``lm_head`` and
        ``total``; ``matmul_counted`` is the total minus ``attention_scores`` (the part that
        FlopCounterMode sees on CPU, where SDPA's CPU kernel is not counted).
    """
    d, layers, vocab = config.d_model, config.n_layers, config.vocab_size
    seq = seq_len or config.max_seq_len
    kv_dim = config.kv_heads * config.head_dim
    # q and o are D x D, k and v are D x (kv_heads * head_dim).
    attention_proj = layers * 2 * (2 * d * d + 2 * d * kv_dim)
    # QK^T and PV: 2 products of D multiply-adds per (query, key) pair, causal: (T+1)/2 keys on average.
    attention_scores = layers * 2 * 2 * d * (seq + 1) / 2
    f = config.ffn_hidden
    if config.is_moc:
        e, k = config.n_experts, config.top_k
        experts = e * 2 * 3 * d * f  # every expert on every token: w1, w3 [D, F], w2 [F, D]
        router = e * 2 * 4 * d * d + 2 * 2 * e * e * d + 2 * d * e  # q/k/v/o on E vectors, E x E scores, gate
        collab = k * 2 * 4 * d * d + 2 * 2 * k * k * d  # q/k/v/o on k vectors, k x k scores
        collab_ffn = k * 2 * (d * 2 * d + 2 * d * d)  # Linear(D, 2D), Linear(2D, D) on k vectors
        out_proj = 2 * d * d
        ffn = layers * (experts + router + collab + collab_ffn + out_proj)
    else:
        ffn = layers * 2 * 3 * d * f
    lm_head = 2 * d * vocab
    total = attention_proj + attention_scores + ffn + lm_head
    return {
        "attention_proj": float(attention_proj),
        "attention_scores": float(attention_scores),
        "ffn": float(ffn),
        "lm_head": float(lm_head),
        "total": float(total),
        "matmul_counted": float(total - attention_scores),
    }


def train_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs per training token (3 x forward)."""
    return 3.0 * forward_flops_per_token(config, seq_len)["total"]


def iso_flop_dense(target: ModelConfig, base: ModelConfig, seq_len: int | None = None) -> ModelConfig:
    """A dense copy of ``base`` whose FFN is widened until its FLOPs/token best match ``target``'s.

    Only ``ffn_hidden_multiplier`` changes (so depth, width, attention, vocabulary and tokens stay
    those of the dense baseline); the hidden size stays a multiple of ``base.multiple_of``, and of
    the two nearest multiples the one with the closer total is returned.
    Raises ValueError if ``base`` is not dense.
    """
    if base.is_moc:
        raise ValueError(
            f"iso_flop_dense needs a dense base config (n_experts 0 or null), got n_experts={base.n_experts}"
        )
    want = forward_flops_per_token(target, seq_len)["total"]
    fixed = forward_flops_per_token(base, seq_len)["total"] - forward_flops_per_token(base, seq_len)["ffn"]
    per_hidden = base.n_layers * 2 * 3 * base.d_model  # dense FFN FLOPs per token per unit of F
    exact = max(want - fixed, per_hidden) / per_hidden
    step = base.multiple_of
    candidates = {max(step, step * math.floor(exact / step)), max(step, step * math.ceil(exact / step))}
    best = None
    for hidden in sorted(candidates):
        # ffn_hidden = multiple_of * ceil(2/3 * mult * D / multiple_of): aim half a unit below `hidden`
        # so float rounding can never push the ceil up to the next multiple.
        mult = (hidden - 0.5) * 3 / (2 * base.d_model)
        candidate = dataclasses.replace(base, ffn_hidden_multiplier=mult)
        if candidate.ffn_hidden != hidden:  # pragma: no cover - guards the formula above
            raise AssertionError(f"ffn_hidden {candidate.ffn_hidden} != {hidden}")
        gap = abs(forward_flops_per_token(candidate, seq_len)["total"] - want)
        if best is None or gap < best[0]:
            best = (gap, candidate)
    return best[1]
