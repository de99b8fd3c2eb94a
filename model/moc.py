"""The Mixture of Collaborative Experts layer (DESIGN §2), on the public ``moc_kernels`` ops only.

Every expert runs on every token (``expert_swiglu``), so there is no Python loop over experts and no
token dispatch: the layer costs about E dense FFNs, in exchange for a router that sees every
expert's answer before it chooses. The sparse variant (DESIGN §2c, ``ffn: moc_sparse``) runs only
each token's k routed experts (``routed_swiglu``) and keeps the collaboration among them; its router
reads the token itself or a cheap preview of every expert.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import moc_kernels as mk
from model.config import ModelConfig
from model.layers import RMSNorm, math_dtype


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
        return -collab_entropy.to(math_dtype(collab_entropy.dtype)).mean() / math.log(k)
    return collab_entropy.to(math_dtype(collab_entropy.dtype)).sum() * 0.0


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
    ``collaboration: false`` no ``collab_attn``/``collab_ffn`` (and no ``collab_norm`` either with
    ``ablation_keeps_norm: false``, the ablation as saved before DESIGN §2b's fix).
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
        self.ablation_keeps_norm = config.ablation_keeps_norm
        self.gate = nn.Linear(dim, experts, bias=True)
        _collab_modules(self, config)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> MoCOutput:
        """x: [B, T, D] fp32|bf16|fp16 -> MoCOutput (losses and stats fp32)."""
        batch, seq, dim = x.shape
        tokens = x.reshape(batch * seq, dim)

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
        route_logits = gate_logits(self.gate, summary, self.temperature)

        # 3-4. top-k, then the k chosen raw outputs S = Y[n, idx]
        top_idx = route_logits.topk(self.top_k, dim=-1).indices
        selected = mk.topk_gather(expert_outputs, top_idx)  # [N, k, D]
        return self.collaborate_and_combine(x, route_logits, top_idx, selected)

    def collaborate_and_combine(
        self, x: torch.Tensor, route_logits: torch.Tensor, top_idx: torch.Tensor, selected: torch.Tensor
    ) -> MoCOutput:
        """Steps 3 and 5-7 of DESIGN §2 from the routing logits [N, E] fp32, the top-k [N, k] and S [N, k, D]."""
        batch, seq, dim = x.shape
        k = self.top_k
        # w renormalises over the chosen k, p (all E) feeds the balance loss
        top_weights = torch.softmax(route_logits.gather(-1, top_idx), dim=-1)  # [N, k]
        log_probs = torch.log_softmax(route_logits, dim=-1)
        probs = log_probs.exp()

        # 5. the k chosen outputs attend to each other, then refine. collaboration: false keeps only the
        # RMSNorm, R = RMSNorm(S) (DESIGN §2b); ablation_keeps_norm: false is the older ablation, R = S.
        if self.collaboration:
            collab_context, collab_entropy = self.collab_attn(selected)  # entropy [N, H, k]
            refined = self.collab_norm(collab_context + selected)
            refined = refined + self.collab_ffn(refined)
            diversity_loss = normalised_diversity_loss(collab_entropy, k)
            mean_collab_entropy = collab_entropy.float().mean().detach()
        else:
            refined = self.collab_norm(selected) if self.ablation_keeps_norm else selected
            mean_collab_entropy = None
            diversity_loss = route_logits.new_zeros(())

        # 6. weighted combination of the k refined outputs, then the output projection
        combined = (top_weights.unsqueeze(-1) * refined.to(math_dtype(x.dtype))).sum(dim=1).to(x.dtype)
        out = self.out_proj(combined).view(batch, seq, dim)

        # 7. auxiliary losses and stats
        expert_load = expert_fractions(top_idx, self.num_experts)
        balance_loss = switch_balance_loss(expert_load, probs)
        router_entropy = -(probs * log_probs).sum(dim=-1).mean()
        return MoCOutput(
            out, balance_loss, diversity_loss, expert_load.detach(), router_entropy.detach(), mean_collab_entropy
        )


class PreviewAttention(nn.Module):
    """The preview router's self-attention over the E expert previews of each token, in width p (DESIGN §2c).

    q, k, v: Linear(D, p) without bias, ``heads`` heads of p / heads; no output projection (the gate
    reads the mean of the p-wide outputs directly).
    """

    def __init__(self, dim: int, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, width, bias=False)
        self.k_proj = nn.Linear(dim, width, bias=False)
        self.v_proj = nn.Linear(dim, width, bias=False)

    def forward(self, previews: torch.Tensor) -> torch.Tensor:
        """previews: [N, E, D] -> token summary s [N, p] (mean over the E attention outputs)."""
        n, length, _ = previews.shape
        width = self.q_proj.out_features
        shape = (n, length, self.heads, width // self.heads)
        q, k, v = (proj(previews).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return mk.small_attention(q, k, v).reshape(n, length, width).mean(dim=1)


class SparseCollaborativeExpertsModule(CollaborativeExpertsModule):
    """Sparse MoC FFN (DESIGN §2c): router -> top-k -> only the k chosen experts -> collaboration -> combine.

    Router: the token itself, ``r = (x Wg + bg)/τ`` (``router_context: false``), or the preview router
    (``router_context: preview``): ``P_e = (silu(x W1_e[:, :r]) ⊙ x W3_e[:, :r]) W2_e[:r, :]`` from each
    expert's own first r hidden units, a self-attention over the E previews in width p, s = the mean of
    its outputs, ``route = (s Wg + bg)/τ`` with ``gate`` = Linear(p, E). Then
    ``S = [SwiGLU_{idx_j}(x)]_j`` (``routed_swiglu``: k/E of the expert FLOPs) and steps 5-7 of §2.
    Parameters are named as :class:`CollaborativeExpertsModule`'s (``w13``, ``w2``, ``gate``,
    ``collab_*``, ``out_proj``), plus ``preview_attn`` for the preview router.
    """

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        dim, hidden, experts = config.d_model, config.ffn_hidden, config.n_experts
        self.num_experts, self.top_k, self.hidden = experts, config.top_k, hidden
        self.temperature = config.router_temperature
        self.w13 = nn.Parameter(torch.empty(experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.router_context, self.collaboration = config.router_context, config.collaboration
        self.ablation_keeps_norm = config.ablation_keeps_norm
        if self.router_context == "preview":
            self.preview_rank = config.preview_rank
            self.preview_attn = PreviewAttention(dim, config.preview_width, config.preview_heads)
            self.gate = nn.Linear(config.preview_width, experts, bias=True)
        else:
            self.gate = nn.Linear(dim, experts, bias=True)
        _collab_modules(self, config)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> MoCOutput:
        """x: [B, T, D] fp32|bf16|fp16 -> MoCOutput (losses and stats fp32)."""
        batch, seq, dim = x.shape
        tokens, w13, w2 = autocast_operands(x.device.type, x.reshape(batch * seq, dim), self.w13, self.w2)
        if self.router_context == "preview":
            r, hidden = self.preview_rank, self.hidden
            # slices of the experts' own weights: the preview is what each expert starts to say
            previews = mk.expert_swiglu(tokens, w13[..., :r], w13[..., hidden : hidden + r], w2[:, :r])  # [N, E, D]
            summary = self.preview_attn(previews)  # [N, p]
        else:
            summary = x.reshape(batch * seq, dim)
        route_logits = gate_logits(self.gate, summary, self.temperature)
        top_idx = route_logits.topk(self.top_k, dim=-1).indices
        routed = even_routed_swiglu if tokens.is_meta else mk.routed_swiglu
        selected = routed(tokens, top_idx, w13, None, w2)  # [N, k, D]: slot j = SwiGLU_{idx_j}(x), w13 packed
        return self.collaborate_and_combine(x, route_logits, top_idx, selected)


def _collab_modules(layer: nn.Module, config: ModelConfig) -> None:
    """Step 5's modules on ``layer``: the collab attention, RMSNorm and FFN, or for ``collaboration: false``
    the RMSNorm alone (none with ``ablation_keeps_norm: false``)."""
    dim = config.d_model
    if config.collaboration:
        layer.collab_attn = SmallMHA(dim, config.collab_heads, bias=config.moc_attn_bias)
        layer.collab_norm = RMSNorm(dim, config.norm_eps)
        layer.collab_ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
    elif config.ablation_keeps_norm:
        layer.collab_norm = RMSNorm(dim, config.norm_eps)


def gate_logits(gate: nn.Linear, summary: torch.Tensor, temperature: float) -> torch.Tensor:
    """Routing logits ``(s Wg + bg) / τ`` [N, E] fp32 (fp64 for an fp64 gate), the gate run with autocast
    off: under bf16 autocast a bf16 gate would tie tokens at the top-k boundary and route some differently
    from the fp32 gate (E columns: free). The gate runs in its weights' dtype (fp32 when training under
    autocast), as a module call so that its hooks see it."""
    device_type = summary.device.type
    off = torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()
    with off:
        return gate(summary.to(gate.weight.dtype)).to(math_dtype(gate.weight.dtype)) / temperature


def even_routed_swiglu(
    x: torch.Tensor, idx: torch.Tensor, w13: torch.Tensor, _: None, w2: torch.Tensor
) -> torch.Tensor:
    """``routed_swiglu``'s shapes and GEMMs on the meta device, the N * k rows split evenly among experts.

    ``python -m model.info`` measures activations on meta tensors, which have no values to route
    by (the reference sizes its per-expert blocks from the routing on the host). The saved tensors
    depend on the number of rows, not on which expert gets them, so an even split saves what any
    routing would. x: [N, D], idx: [N, k], w13 packed [E, D, 2F] -> [N, k, D] (meta).
    """
    w1, w3 = w13.split(w2.shape[1], dim=-1)
    n_tokens, top_k = idx.shape
    rows = x.float().repeat_interleave(top_k, dim=0)  # [N * k, D]
    blocks = rows.tensor_split(w1.shape[0])
    out = torch.cat([(F.silu(r @ w1[e].float()) * (r @ w3[e].float())) @ w2[e].float() for e, r in enumerate(blocks)])
    return out.view(n_tokens, top_k, -1).to(x.dtype)
