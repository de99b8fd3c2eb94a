"""The iso-FLOP arms: the FFN width whose training FLOPs per token match another arm's.

FLOPs come from ``model.info.flops_per_token`` (the project's one FLOPs count: matrix products,
2 per multiply-add, causal attention over (T+1)/2 keys on average); training = 3 x forward (the
backward of a product is two products of the same size). ``tests/test_experiments.py`` checks that
count against ``torch.utils.flop_counter.FlopCounterMode`` on a real forward of every model kind.
"""

from __future__ import annotations

import dataclasses
import math

from model.config import ModelConfig
from model.info import flops_per_token


def train_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs per training token (3 x ``flops_per_token(...)["total"]``)."""
    return 3.0 * flops_per_token(config, seq_len)["total"]


def iso_flop_width(target: ModelConfig, base: ModelConfig, seq_len: int | None = None) -> ModelConfig:
    """A copy of ``base`` (dense, MoE or sparse MoC) widened until its FLOPs/token best match ``target``'s.

    Only ``ffn_hidden_multiplier`` changes (depth, width, attention, experts, vocabulary and tokens
    stay ``base``'s): a dense FFN's F, or every routed expert's F (an MoE or sparse-MoC token runs k of
    them, so one unit of F costs k times a dense one; a preview whose r follows F grows too). The hidden
    size stays a multiple of ``base.multiple_of``, and of the two nearest multiples the one with the closer
    total is returned.
    Raises ValueError if ``base`` is a MoC model (its width also sets the router's and collab's inputs).
    """
    if base.is_moc:
        raise ValueError(
            f"iso_flop_width needs a dense or MoE base config, got a MoC one (n_experts={base.n_experts}, ffn=moc)"
        )
    want = flops_per_token(target, seq_len)["total"]
    base_flops = flops_per_token(base, seq_len)
    fixed = base_flops["total"] - base_flops["ffn"]
    step = base.multiple_of
    # FLOPs per token per unit of F, measured on the count itself (SwiGLU of the experts that run, and a
    # preview that follows F); the FFN count is affine in F, so one step of F gives the slope exactly
    wider = dataclasses.replace(base, ffn_hidden_multiplier=(base.ffn_hidden + step - 0.5) * 3 / (2 * base.d_model))
    per_hidden = (flops_per_token(wider, seq_len)["ffn"] - base_flops["ffn"]) / (wider.ffn_hidden - base.ffn_hidden)
    width_independent = base_flops["ffn"] - per_hidden * base.ffn_hidden
    exact = max(want - fixed - width_independent, per_hidden) / per_hidden
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
