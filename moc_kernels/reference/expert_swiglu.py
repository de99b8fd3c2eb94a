"""All experts' SwiGLU on every token (DESIGN §2 step 1)."""

import torch
import torch.nn.functional as F


def expert_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor) -> torch.Tensor:
    """``Y[n, e] = (silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e]`` for every token n and expert e.

    x: [N, D]; w1, w3: [E, D, F], or w3 None and w1 the packed w13 [E, D, 2F] (w1 = w13[..., :F],
    w3 = w13[..., F:]); w2: [E, F, D]; all fp32|bf16|fp16, math in fp32.
    Returns Y: [N, E, D] in x's dtype, token-major (the layout the router attention reads).
    """
    if w3 is None:
        w1, w3 = w1.split(w2.shape[1], dim=-1)
    math_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    # One batched GEMM per projection, batch = expert: every expert sees all N tokens (x is expanded,
    # not copied). On CPU this beats einsum's permuted copies and a per-expert loop (measured).
    tokens = x.to(math_dtype).expand(w1.shape[0], *x.shape)  # [E, N, D]
    gate = torch.bmm(tokens, w1.to(math_dtype))  # [E, N, F]
    up = torch.bmm(tokens, w3.to(math_dtype))
    hidden = F.silu(gate) * up
    return torch.bmm(hidden, w2.to(math_dtype)).transpose(0, 1).contiguous().to(x.dtype)  # [N, E, D]
