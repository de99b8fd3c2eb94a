"""The standard top-k Mixture-of-Experts layer (Switch/Mixtral), the baseline MoC claims to beat (DESIGN §2b).

The router sees only the token's own hidden state, each token runs only its k experts
(``moc_kernels.routed_swiglu``: expert FLOPs per token are k/E of MoC's all-expert pass), and the
chosen outputs are combined by a plain weighted sum: no attentions, no output projection. Its
parameters are named and shaped as MoC's where the two share them (``w13``, ``w2``, ``gate``), so
the same initialisation, optimiser groups and checkpoint tooling apply to both.
"""

from __future__ import annotations

import torch
from torch import nn

import moc_kernels as mk
from model.config import ModelConfig
from model.layers import math_dtype
from model.moc import (
    MoCOutput,
    autocast_operands,
    even_routed_swiglu,
    expert_fractions,
    gate_logits,
    switch_balance_loss,
)


class TopKMoEModule(nn.Module):
    """Top-k MoE FFN: ``r = (x Wg + bg) / τ``, ``idx = topk(r, k)``, ``w = softmax(r[idx])``,
    ``out = Σ_j w_j · SwiGLU_{idx_j}(x)``.

    Parameters: ``w13`` [E, D, 2F] (gate w1 = w13[..., :F], up w3 = w13[..., F:]), ``w2`` [E, F, D],
    ``gate`` = Linear(D, E) with bias: the same names, shapes and init as :class:`CollaborativeExpertsModule`'s.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim, hidden, experts = config.d_model, config.ffn_hidden, config.n_experts
        self.num_experts, self.top_k, self.hidden = experts, config.top_k, hidden
        self.temperature = config.router_temperature
        self.w13 = nn.Parameter(torch.empty(experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.gate = nn.Linear(dim, experts, bias=True)

    def forward(self, x: torch.Tensor) -> MoCOutput:
        """x: [B, T, D] fp32|bf16|fp16 -> MoCOutput (losses and stats fp32).

        ``diversity_loss`` is a constant 0 (there is no collaboration to diversify) and
        ``collab_entropy`` is None, so the model logs no collab entropy for this layer.
        """
        batch, seq, dim = x.shape
        tokens = x.reshape(batch * seq, dim)
        route_logits = gate_logits(self.gate, tokens, self.temperature)  # [N, E] fp32, autocast off
        top_logits, top_idx = route_logits.topk(self.top_k, dim=-1)  # [N, k]
        top_weights = torch.softmax(top_logits, dim=-1)
        log_probs = torch.log_softmax(route_logits, dim=-1)
        probs = log_probs.exp()

        # Sparse compute: slot j of token n is SwiGLU_{idx[n, j]}(x[n]) only, never the other E - k.
        tokens, w13, w2 = autocast_operands(x.device.type, tokens, self.w13, self.w2)
        routed = even_routed_swiglu if tokens.is_meta else mk.routed_swiglu
        slots = routed(tokens, top_idx, w13, None, w2)  # [N, k, D]; w13 packed: one gradient, no slices
        combined = (top_weights.unsqueeze(-1) * slots.to(math_dtype(x.dtype))).sum(dim=1)
        out = combined.to(x.dtype).view(batch, seq, dim)

        expert_load = expert_fractions(top_idx, self.num_experts)
        balance_loss = switch_balance_loss(expert_load, probs)
        router_entropy = -(probs * log_probs).sum(dim=-1).mean()
        no_diversity = balance_loss.new_zeros(())
        return MoCOutput(out, balance_loss, no_diversity, expert_load.detach(), router_entropy.detach(), None)
