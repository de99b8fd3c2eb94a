"""Unmasked multi-head attention over a short axis of L vectors per token (DESIGN §2 steps 2, 5)."""

import math

import torch


def small_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each of the L vectors of a token over all L of them, per head.

    q, k, v: [N, L, H, dh] fp32|bf16|fp16 (math in fp32); scale 1/sqrt(dh); no mask.
    Returns out: [N, L, H, dh] in q's dtype, and with ``return_entropy`` also
    entropy: [N, H, L] fp32 (fp64 for fp64 inputs), the Shannon entropy (nats) of each softmax row, differentiable.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    math_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    qf, kf, vf = (t.to(math_dtype).transpose(1, 2) for t in (q, k, v))  # [N, H, L, dh]
    scores = (qf @ kf.transpose(-1, -2)) * scale  # [N, H, L, L]
    log_probs = torch.log_softmax(scores, dim=-1)
    probs = log_probs.exp()
    out = (probs @ vf).transpose(1, 2).to(q.dtype)
    if not return_entropy:
        return out
    entropy = -(probs * log_probs).sum(-1)
    return out, entropy
