"""The Mixture of Collaborative Experts layer (DESIGN §2), on the public ``moc_kernels`` ops only.

Every expert runs on every token (``expert_swiglu``), so there is no Python loop over experts and no
token dispatch: the layer costs about E dense FFNs, in exchange for a router that sees every
expert's answer before it chooses.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

import moc_kernels as mk
from model.config import ModelConfig
from model.layers import RMSNorm


class MoCOutput(NamedTuple):
    out: torch.Tensor  # [B, T, D], x's dtype
    balance_loss: torch.Tensor  # scalar fp32, L_bal (1 when perfectly balanced)
    diversity_loss: torch.Tensor  # scalar fp32, L_div in [-1, 0] (0 for k = 1)
    expert_load: torch.Tensor  # [E] fp32, f_e: fraction of the N*k assignments that chose e (detached)
    router_entropy: torch.Tensor  # scalar fp32, mean entropy (nats) of p = softmax(r) (detached)
    # scalar fp32, mean entropy (nats) of the collab attention rows (detached); None without collaboration
    # (collaboration: false, or the MoE layer of model.moe)
    collab_entropy: torch.Tensor | None


def expert_fractions(top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """f_e: fraction of the N*k (token, slot) assignments that chose expert e.

    top_idx: [N, k] int64 -> [E] fp32. Counted with scatter_add (bincount would sync with the host
    to size its output).
    """
    counts = torch.zeros(num_experts, device=top_idx.device, dtype=torch.float32)
    counts.scatter_add_(0, top_idx.reshape(-1), torch.ones(top_idx.numel(), device=top_idx.device))
    return counts / max(top_idx.numel(), 1)


def switch_balance_loss(expert_load: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """L_bal = E * sum_e f_e * P_e with P_e = mean_n p[n, e] (Switch Transformer).

    expert_load: [E] fp32 (no gradient flows through f, as in Switch); probs: [N, E] fp32 rows of
    softmax(route_logits). Scalar fp32; 1 when p is uniform, larger when load and probability
    concentrate on the same experts.
    """
    return probs.shape[-1] * (expert_load * probs.mean(dim=0)).sum()


def normalised_diversity_loss(collab_entropy: torch.Tensor, k: int) -> torch.Tensor:
    """L_div = -mean(collab attention entropy) / log k, in [-1, 0]; 0 for k = 1.

    collab_entropy: [N, H, k] (nats) of every collab softmax row. Minimising L_div pushes the k
    collaborators to attend broadly to each other. For k = 1 the only row is [1] (entropy 0) and
    log k = 0, so the loss is defined as 0 (kept attached to the graph for a uniform code path).
    """
    if k > 1:
        return -collab_entropy.float().mean() / math.log(k)
    return collab_entropy.float().sum() * 0.0


def autocast_operands(device_type: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` cast to the autocast dtype when autocast is on for ``device_type``, else unchanged.

    The kernels are custom ops that autocast does not know: the expert layers cast by hand, as
    autocast would for a matmul, so the expert pass (most of the layer's FLOPs) runs in bf16/fp16.
    The meta device (model.info) has no autocast state to ask.
    """
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


class SmallMHA(nn.Module):
    """Multi-head self-attention among the L vectors of each token (its own q/k/v/o projections).

    With ``bias`` the four projections carry biases: then it computes what ``torch.nn.MultiheadAttention``
    (eval mode) does, its ``in_proj_weight``/``in_proj_bias`` being the rows of q, k, v stacked.
    """

    def __init__(self, dim: int, heads: int, bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, L, D] -> (out [N, L, D] in x's dtype, entropy [N, H, L] fp32 of each softmax row)."""
        n, length, dim = x.shape
        shape = (n, length, self.heads, dim // self.heads)
        q, k, v = (proj(x).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        context, entropy = mk.small_attention(q, k, v, return_entropy=True)
        return self.o_proj(context.reshape(n, length, dim)), entropy


class CollaborativeExpertsModule(nn.Module):
    """MoC FFN: all experts -> contextualised router -> top-k -> collaborative fusion -> combine.

    Parameters: ``w13`` [E, D, 2F] packs the gate (w1 = w13[..., :F]) and up (w3 = w13[..., F:])
    projections so one tensor feeds both (the kernel takes it packed), ``w2`` [E, F, D].
    The ablations of DESIGN §2b drop the modules they do not use (so DDP sees no unused parameter
    and the parameter count is honest): ``router_context: false`` has no ``router_attn``/``router_norm``,
    ``collaboration: false`` no ``collab_attn``/``collab_norm``/``collab_ffn``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim, hidden, experts = config.d_model, config.ffn_hidden, config.n_experts
        self.num_experts, self.top_k, self.hidden = experts, config.top_k, hidden
        self.temperature = config.router_temperature
        self.w13 = nn.Parameter(torch.empty(experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.router_context, self.collaboration = config.router_context, config.collaboration
        if self.router_context:
            self.router_attn = SmallMHA(dim, config.collab_heads, bias=config.moc_attn_bias)
            self.router_norm = RMSNorm(dim, config.norm_eps)
        self.gate = nn.Linear(dim, experts, bias=True)
        if self.collaboration:
            self.collab_attn = SmallMHA(dim, config.collab_heads, bias=config.moc_attn_bias)
            self.collab_norm = RMSNorm(dim, config.norm_eps)
            self.collab_ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> MoCOutput:
        """x: [B, T, D] fp32|bf16|fp16 -> MoCOutput (losses and stats fp32)."""
        batch, seq, dim = x.shape
        tokens = x.reshape(batch * seq, dim)
        k = self.top_k

        # 1. every expert on every token: [N, E, D]
        tokens, w13, w2 = autocast_operands(x.device.type, tokens, self.w13, self.w2)
        expert_outputs = mk.expert_swiglu(tokens, w13, None, w2)  # w13 packed: one [E, D, 2F] gradient

        # 2. router contextualised by attention among the E expert outputs of each token
        # (router_context: false routes on the token itself, s = x, as a standard MoE router does)
        if self.router_context:
            attended, _ = self.router_attn(expert_outputs)
            summary = self.router_norm(attended + expert_outputs).mean(dim=1)  # [N, D]
        else:
            summary = x.reshape(batch * seq, dim)
        route_logits = self.gate(summary).float() / self.temperature  # [N, E] fp32: softmax/top-k precision

        # 3. top-k; w renormalises over the chosen k, p (all E) feeds the balance loss
        top_logits, top_idx = route_logits.topk(k, dim=-1)
        top_weights = torch.softmax(top_logits, dim=-1)  # [N, k]
        log_probs = torch.log_softmax(route_logits, dim=-1)
        probs = log_probs.exp()

        # 4-5. the k chosen raw outputs attend to each other, then refine
        # (collaboration: false combines the raw outputs S_j: no collab attention, FFN or diversity loss)
        selected = mk.topk_gather(expert_outputs, top_idx)  # [N, k, D]
        if self.collaboration:
            collab_context, collab_entropy = self.collab_attn(selected)  # entropy [N, H, k]
            refined = self.collab_norm(collab_context + selected)
            refined = refined + self.collab_ffn(refined)
            diversity_loss = normalised_diversity_loss(collab_entropy, k)
            mean_collab_entropy = collab_entropy.float().mean().detach()
        else:
            refined, mean_collab_entropy = selected, None
            diversity_loss = route_logits.new_zeros(())

        # 6. weighted combination of the k refined outputs, then the output projection
        combined = (top_weights.unsqueeze(-1) * refined.float()).sum(dim=1).to(x.dtype)
        out = self.out_proj(combined).view(batch, seq, dim)

        # 7. auxiliary losses and stats
        expert_load = expert_fractions(top_idx, self.num_experts)
        balance_loss = switch_balance_loss(expert_load, probs)
        router_entropy = -(probs * log_probs).sum(dim=-1).mean()
        return MoCOutput(
            out, balance_loss, diversity_loss, expert_load.detach(), router_entropy.detach(), mean_collab_entropy
        )
