"""The iso-FLOP dense arm: the dense FFN width whose training FLOPs per token match an MoC model's.

FLOPs come from ``model.info.flops_per_token`` (the project's one FLOPs count: matrix products,
2 per multiply-add, causal attention over (T+1)/2 keys on average); training = 3 x forward (the
backward of a product is two products of the same size). ``tests/test_experiments.py`` checks that
count against ``torch.utils.flop_counter.FlopCounterMode`` on a real forward of both model kinds.
"""

from __future__ import annotations

import dataclasses
import math

from model.config import ModelConfig
from model.info import flops_per_token


def train_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs per training token (3 x ``flops_per_token(...)["total"]``)."""
    return 3.0 * flops_per_token(config, seq_len)["total"]


def iso_flop_dense(target: ModelConfig, base: ModelConfig, seq_len: int | None = None) -> ModelConfig:
    """A dense copy of ``base`` whose FFN is widened until its FLOPs/token best match ``target``'s.

    Only ``ffn_hidden_multiplier`` changes (depth, width, attention, vocabulary and tokens stay the
    dense baseline's); the hidden size stays a multiple of ``base.multiple_of``, and of the two
    nearest multiples the one with the closer total is returned.
    Raises ValueError if ``base`` is not dense.
    """
    if base.is_moc:
        raise ValueError(
            f"iso_flop_dense needs a dense base config (n_experts 0 or null), got n_experts={base.n_experts}"
        )
    want = flops_per_token(target, seq_len)["total"]
    base_flops = flops_per_token(base, seq_len)
    fixed = base_flops["total"] - base_flops["ffn"]
    per_hidden = base.n_layers * 2 * 3 * base.d_model  # dense SwiGLU FLOPs per token per unit of F
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
        gap = abs(flops_per_token(candidate, seq_len)["total"] - want)
        if best is None or gap < best[0]:
            best = (gap, candidate)
    return best[1]
