"""A functional MoC layer (DESIGN §2) built on the public ops, for the benchmarks and probes; the model's
MoC and top-k MoE modules at a benchmark shape.

It follows DESIGN §2 step by step and calls ``moc_kernels``' public ops for the four hot paths, so
the backend switch (``moc_kernels.use_backend``) picks reference or Triton exactly as in the model.
It exists here because the benchmarks, the cost model (meta device) and the activation-memory probe
need the layer as one plain function of (x, params); ``per_expert_loop_swiglu`` is the baseline the
vectorised reference is compared with: one ``for e in range(E)`` loop, the way an ``nn.ModuleList``
of expert FFNs runs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

import moc_kernels
from benchmarks.shapes import BenchShape


def init_params(shape: BenchShape, device: torch.device | str, requires_grad: bool = True) -> dict[str, torch.Tensor]:
    """Random parameters of one MoC layer, in ``shape.dtype``; ``w13`` is w1 and w3 packed as one [E, D, 2F]."""
    D, E, F_, dtype = shape.dim, shape.experts, shape.hidden, shape.dtype

    def rand(*size: int, fan_in: int) -> torch.Tensor:
        t = torch.randn(*size, device=device, dtype=torch.float32) / math.sqrt(fan_in)
        return t.to(dtype)

    params = {
        "w13": rand(E, D, 2 * F_, fan_in=D),
        "w2": rand(E, F_, D, fan_in=F_),
        "router_qkv": rand(D, 3 * D, fan_in=D),
        "router_out": rand(D, D, fan_in=D),
        "router_norm": torch.ones(D, device=device, dtype=dtype),
        "gate": rand(D, E, fan_in=D),
        "gate_bias": torch.zeros(E, device=device, dtype=dtype),
        "collab_qkv": rand(D, 3 * D, fan_in=D),
        "collab_out": rand(D, D, fan_in=D),
        "collab_norm": torch.ones(D, device=device, dtype=dtype),
        "ffn_in": rand(D, 2 * D, fan_in=D),
        "ffn_in_bias": torch.zeros(2 * D, device=device, dtype=dtype),
        "ffn_out": rand(2 * D, D, fan_in=2 * D),
        "ffn_out_bias": torch.zeros(D, device=device, dtype=dtype),
        "out": rand(D, D, fan_in=D),
    }
    for p in params.values():
        p.requires_grad_(requires_grad)
    return params


def per_expert_loop_swiglu(
    x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor
) -> torch.Tensor:
    """``expert_swiglu`` as a Python loop over experts: x [N, D] -> Y [N, E, D] in x's dtype.

    Same signature as ``moc_kernels.expert_swiglu``: w1/w3 [E, D, F], or ``w3=None`` and w1 the packed
    w13 [E, D, 2F] (gate = w13[..., :F], up = w13[..., F:]), which is how the model calls it.
    """
    if w3 is None:
        w1, w3 = w1.split(w2.shape[1], dim=-1)
    outputs = [(F.silu(x @ w1[e]) * (x @ w3[e])) @ w2[e] for e in range(w2.shape[0])]
    return torch.stack(outputs, dim=1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _attention_block(
    vectors: torch.Tensor, qkv_weight: torch.Tensor, out_weight: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head self-attention among the L vectors of each token: [N, L, D] -> ([N, L, D], entropy [N, H, L])."""
    n, length, dim = vectors.shape
    q, k, v = (vectors @ qkv_weight).view(n, length, 3, heads, dim // heads).unbind(2)
    context, entropy = moc_kernels.small_attention(q, k, v, return_entropy=True)
    return context.reshape(n, length, dim) @ out_weight, entropy


def moc_layer(
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    shape: BenchShape,
    temperature: float = 1.0,
    loop_experts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoC layer: x [N, D] -> (out [N, D] in x's dtype, aux loss [] fp32) (DESIGN §2, c_bal = c_div = 1).

    ``loop_experts`` computes step 1 with :func:`per_expert_loop_swiglu` instead of ``expert_swiglu``.
    """
    E, k, H = shape.experts, shape.top_k, shape.heads
    swiglu = per_expert_loop_swiglu if loop_experts else moc_kernels.expert_swiglu
    expert_outputs = swiglu(x, params["w13"], None, params["w2"])  # [N, E, D]; w13 packed, as in the model

    # Router contextualisation: attention among the E expert outputs of each token.
    attended, _ = _attention_block(expert_outputs, params["router_qkv"], params["router_out"], H)
    summary = _rms_norm(attended + expert_outputs, params["router_norm"]).mean(1)  # [N, D]
    route_logits = ((summary @ params["gate"] + params["gate_bias"]).float()) / temperature  # [N, E]
    route_probs = route_logits.softmax(-1)
    top_logits, top_idx = route_logits.topk(k, dim=-1)
    top_weights = top_logits.softmax(-1)  # [N, k]

    selected = moc_kernels.topk_gather(expert_outputs, top_idx)  # [N, k, D]
    fused, collab_entropy = _attention_block(selected, params["collab_qkv"], params["collab_out"], H)
    refined = _rms_norm(fused + selected, params["collab_norm"])
    hidden = F.relu(refined @ params["ffn_in"] + params["ffn_in_bias"])
    refined = refined + hidden @ params["ffn_out"] + params["ffn_out_bias"]
    out = (top_weights.to(refined.dtype)[..., None] * refined).sum(1) @ params["out"]

    load = F.one_hot(top_idx, E).float().sum((0, 1)) / top_idx.numel()  # f_e over N*k assignments
    balance = E * (load * route_probs.mean(0)).sum()
    diversity = -collab_entropy.float().mean() / math.log(k) if k > 1 else route_logits.new_zeros(())
    return out, balance + diversity


def model_config(shape: BenchShape, **overrides: Any) -> Any:
    """The model's ModelConfig whose MoC layer has ``shape``'s D, H, E, k and F."""
    from model.config import ModelConfig

    config = ModelConfig(
        d_model=shape.dim,
        n_heads=shape.heads,
        n_experts=shape.experts,
        top_k=shape.top_k,
        multiple_of=64,
        ffn_hidden_multiplier=4.0,
        **overrides,
    )
    assert config.ffn_hidden == shape.hidden, (config.ffn_hidden, shape.hidden)
    return config


def build_moc_module(shape: BenchShape, device: torch.device | str) -> torch.nn.Module:
    """The model's CollaborativeExpertsModule at ``shape``, random weights (std 0.02), in ``shape.dtype``."""
    from model.moc import CollaborativeExpertsModule

    return _random_weights(CollaborativeExpertsModule(model_config(shape)), shape, device)


def build_moe_module(shape: BenchShape, device: torch.device | str) -> torch.nn.Module:
    """The model's top-k MoE layer (``ffn: moe``: the same E, k, F and expert weights as MoC's) at ``shape``."""
    from model.moe import TopKMoEModule

    return _random_weights(TopKMoEModule(model_config(shape, ffn="moe")), shape, device)


def _random_weights(module: torch.nn.Module, shape: BenchShape, device: torch.device | str) -> torch.nn.Module:
    module = module.to(device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return module.to(shape.dtype)
