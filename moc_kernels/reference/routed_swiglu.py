"""Each token's k routed experts' SwiGLU, computed sparsely (the top-k MoE baseline's experts)."""

import torch
import torch.nn.functional as F


def routed_swiglu(
    x: torch.Tensor, idx: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor
) -> torch.Tensor:
    """``Y[n, j] = (silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e]`` with ``e = idx[n, j]``.

    x: [N, D]; idx: [N, k] int64 in [0, E); w1, w3: [E, D, F], or w3 None and w1 the packed w13
    [E, D, 2F] (w1 = w13[..., :F], w3 = w13[..., F:]); w2: [E, F, D]; fp32|bf16|fp16,
    math in fp32 (fp64 inputs stay fp64, for gradcheck). Returns Y: [N, k, D] in x's dtype.
    Each (token, slot) pair is computed on its own, so an expert repeated within a token's row just
    gives that slot the same output again (and its gradients add up).

    The N * k (token, slot) pairs are sorted by expert on the device (a stable sort, so within an
    expert the rows stay in token order), the token rows gathered into that order, and each expert
    runs three GEMMs over its contiguous block of rows; the outputs are scattered back to (token,
    slot) order. The loop is over the E experts, never over tokens: the FLOPs are k/E of
    ``expert_swiglu``'s.

    Host sync: one, ``counts.tolist()``. Splitting the sorted rows into per-expert blocks needs the
    block sizes as Python ints (PyTorch shapes live on the host); everything before it (sort,
    searchsorted, gather) is queued on the device. The Triton kernels have no such sync (their grid
    does not depend on the counts).
    """
    if w3 is None:
        w1, w3 = w1.split(w2.shape[1], dim=-1)
    math_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    n_tokens, top_k = idx.shape
    num_experts = w1.shape[0]
    # Pairs p = n * k + j sorted by expert; each expert's count from the sorted experts (bincount
    # would wait for the device too: it sizes its output by the largest index).
    sorted_experts, order = torch.sort(idx.reshape(-1), stable=True)
    experts = torch.arange(num_experts + 1, device=idx.device, dtype=sorted_experts.dtype)
    counts = torch.searchsorted(sorted_experts, experts).diff()
    rows = x.to(math_dtype)[order // top_k]  # [N * k, D], expert-sorted
    outputs = []
    for expert, expert_rows in enumerate(rows.split(counts.tolist())):
        gate = expert_rows @ w1[expert].to(math_dtype)
        up = expert_rows @ w3[expert].to(math_dtype)
        outputs.append((F.silu(gate) * up) @ w2[expert].to(math_dtype))
    sorted_outputs = torch.cat(outputs) if outputs else rows
    # Row i of the sorted outputs belongs to pair order[i]: scatter it back (out of place, differentiable).
    pair_outputs = sorted_outputs.new_empty(sorted_outputs.shape).index_copy(0, order, sorted_outputs)
    return pair_outputs.view(n_tokens, top_k, w2.shape[2]).to(x.dtype)
