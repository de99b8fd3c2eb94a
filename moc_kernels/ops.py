"""The public ops: check arguments once, then dispatch to the reference or the Triton kernel.

The model and Kotara call only these functions; which implementation runs is decided by
``moc_kernels.backend`` for the device of the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moc_kernels import backend, reference
from moc_kernels.reference.fused_logit_nll import STRATEGIES, FusedNLL

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_float(op: str, dtype: torch.dtype, device: torch.device) -> None:
    """fp32|bf16|fp16 on every backend; fp64 too on the reference, which is plain PyTorch (a model put in
    fp64 with ``.double()`` to check numerics runs there). The Triton kernels refuse fp64."""
    if dtype == torch.float64:
        _require(
            backend.resolve(device) == "reference",
            f"{op}: unsupported dtype torch.float64 on the triton backend; fp64 runs on the reference "
            "backend (kernels: reference, or moc_kernels.use_backend('reference'))",
        )
    else:
        _require(dtype in FLOAT_DTYPES, f"{op}: unsupported dtype {dtype}")


def _implementation(op: str, device: torch.device, function: str | None = None):
    """The function ``function`` (default: ``op``) of the reference or of ``moc_kernels.triton.<op>``."""
    if backend.resolve(device) == "reference":
        return getattr(reference, function or op)
    return getattr(backend.kernel_module(op), function or op)


def _check_experts(op: str, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor) -> None:
    """The shapes and dtype both SwiGLU ops take: x [N, D]; w1, w3 [E, D, F] or w3 None and w1 the
    packed w13 [E, D, 2F]; w2 [E, F, D]."""
    _require(x.dim() == 2, f"{op}: x must be [N, D], got shape {tuple(x.shape)}")
    if w3 is None:
        _require(
            w1.dim() == 3 and w1.shape[2] % 2 == 0, f"{op}: packed w13 must be [E, D, 2F], got shape {tuple(w1.shape)}"
        )
        num_experts, dim, hidden = w1.shape[0], w1.shape[1], w1.shape[2] // 2
    else:
        _require(
            w1.dim() == 3 and w1.shape == w3.shape,
            f"{op}: w1 and w3 must be the same [E, D, F], got {tuple(w1.shape)} and {tuple(w3.shape)}",
        )
        num_experts, dim, hidden = w1.shape
    _require(x.shape[1] == dim, f"{op}: x has D={x.shape[1]} but w1 expects D={dim}")
    _require(
        tuple(w2.shape) == (num_experts, hidden, dim),
        f"{op}: w2 must be [E, F, D] = {(num_experts, hidden, dim)}, got {tuple(w2.shape)}",
    )
    _require_float(op, x.dtype, x.device)


def expert_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor) -> torch.Tensor:
    """All E experts' SwiGLU on every token: x [N, D], w1/w3 [E, D, F], w2 [E, F, D] -> Y [N, E, D].

    ``Y[n, e] = (silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e]``; fp32|bf16|fp16, fp32 accumulation,
    output in x's dtype (fp64 too on the reference backend, in fp64). With ``w3=None``, w1 is the packed
    w13 [E, D, 2F] (gate = w13[..., :F], up = w13[..., F:]): pass it packed rather than as two views,
    so that its gradient is written as one [E, D, 2F] tensor instead of two zero-padded halves that
    autograd adds.
    """
    _check_experts("expert_swiglu", x, w1, w3, w2)
    return _implementation("expert_swiglu", x.device)(x, w1, w3, w2)


def routed_swiglu(
    x: torch.Tensor, idx: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor
) -> torch.Tensor:
    """Each token's k routed experts' SwiGLU: x [N, D], idx [N, k] int64 in [0, E), w1/w3 [E, D, F],
    w2 [E, F, D] -> Y [N, k, D].

    ``Y[n, j] = (silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e]`` with ``e = idx[n, j]``: k/E of
    ``expert_swiglu``'s FLOPs. fp32|bf16|fp16 (fp64 too on the reference), fp32 accumulation, output
    in x's dtype. With ``w3=None``, w1 is the packed w13 [E, D, 2F], as in ``expert_swiglu`` (one
    gradient, no zero-padded halves). An expert repeated within a row is computed again for that slot (gradients
    add up). Differentiable in x and the weights.
    """
    _check_experts("routed_swiglu", x, w1, w3, w2)
    _require(
        idx.dim() == 2 and idx.shape[0] == x.shape[0],
        f"routed_swiglu: idx must be [N, k] with N={x.shape[0]}, got {tuple(idx.shape)}",
    )
    _require(idx.dtype == torch.int64, f"routed_swiglu: idx must be int64, got {idx.dtype}")
    num_experts = w2.shape[0]
    # Out-of-range indices would read other experts' weights: check on the device (no host sync).
    torch._assert_async(((idx >= 0) & (idx < num_experts)).all(), f"routed_swiglu: idx outside [0, E={num_experts})")
    return _implementation("routed_swiglu", x.device)(x, idx, w1, w3, w2)


def topk_gather(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Selected experts' outputs: y [N, E, D], idx [N, k] int64 in [0, E) -> [N, k, D].

    The backward scatters the gradient back into dy (zeros for unselected experts; an index
    repeated within a row receives the sum of its slots' gradients).
    """
    _require(y.dim() == 3, f"topk_gather: y must be [N, E, D], got shape {tuple(y.shape)}")
    _require(
        idx.dim() == 2 and idx.shape[0] == y.shape[0],
        f"topk_gather: idx must be [N, k] with N={y.shape[0]}, got {tuple(idx.shape)}",
    )
    _require(idx.dtype == torch.int64, f"topk_gather: idx must be int64, got {idx.dtype}")
    _require(idx.shape[1] <= y.shape[1], f"topk_gather: k={idx.shape[1]} exceeds E={y.shape[1]}")
    # The kernel would read out of bounds: check on the device, without waiting for it (no host sync).
    torch._assert_async(((idx >= 0) & (idx < y.shape[1])).all(), f"topk_gather: idx outside [0, E={y.shape[1]})")
    return _implementation("topk_gather", y.device)(y, idx)


def small_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention among the L vectors of each token: q, k, v [N, L, H, dh] -> [N, L, H, dh]
    fp32|bf16|fp16 (fp64 too on the reference).

    Scale 1/sqrt(dh). With ``return_entropy`` also returns the entropy [N, H, L] fp32 (nats) of
    every softmax row; it is differentiable (the MoC diversity loss trains through it).
    """
    _require(q.dim() == 4, f"small_attention: q must be [N, L, H, dh], got shape {tuple(q.shape)}")
    _require(
        q.shape == k.shape == v.shape,
        f"small_attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
    )
    _require_float("small_attention", q.dtype, q.device)
    # One dtype for all three: the kernel's tl.dot of bf16 by fp32 does not compile on a GPU.
    _require(
        q.dtype == k.dtype == v.dtype,
        f"small_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype",
    )
    return _implementation("small_attention", q.device)(q, k, v, return_entropy)


def _check_fusion_args(
    op: str,
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor | None,
    strategies: Sequence[str],
    temperatures: Sequence[float] | None,
    weights: Sequence[float] | None,
) -> None:
    """The checks shared by the fusion ops (``targets`` None for ``fused_log_probs``).

    ``weights`` means something only to two strategies, so its sign is checked by what it means
    there: fixed mixture weights are probabilities (> 0); PoE betas are exponents, and a negative one
    subtracts a model (contrastive decoding / model arithmetic) while q stays normalised, so they
    need only be finite with at least one > 0. The other strategies ignore ``weights``.
    """
    num_models = len(logits)
    _require(num_models >= 2, f"{op}: needs logits of at least 2 models, got {num_models}")
    shape = tuple(logits[0].shape)
    _require(len(shape) == 2, f"{op}: logits must be [N, V], got shape {shape}")
    for lg in logits:
        _require(tuple(lg.shape) == shape, f"{op}: logits shapes differ: {shape} vs {tuple(lg.shape)}")
        _require(lg.device == logits[0].device, f"{op}: all logits must be on one device")
        _require(lg.dtype in FLOAT_DTYPES, f"{op}: unsupported logits dtype {lg.dtype}")
    if targets is not None:
        _require(tuple(targets.shape) == shape[:1], f"{op}: targets must be [N={shape[0]}], got {tuple(targets.shape)}")
    for strategy in strategies:
        _require(
            strategy in STRATEGIES, f"{op}: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}"
        )
    for name, values in (("temperatures", temperatures), ("weights", weights)):
        if values is not None:
            _require(len(values) == num_models, f"{op}: {len(values)} {name} for {num_models} models")
            _require(all(math.isfinite(float(x)) for x in values), f"{op}: {name} must be finite, got {list(values)}")
    if temperatures is not None:
        _require(all(float(x) > 0 for x in temperatures), f"{op}: temperatures must be > 0, got {list(temperatures)}")
    if weights is not None:
        if "mixture" in strategies:
            _require(
                all(float(x) > 0 for x in weights),
                f"{op}: mixture weights are probabilities and must be > 0, got {list(weights)}",
            )
        if "poe" in strategies:
            _require(
                any(float(x) > 0 for x in weights),
                f"{op}: poe needs at least one beta > 0 (a negative beta subtracts a model), got {list(weights)}",
            )


def fused_logit_nll(
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    strategy: str,
    temperatures: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
) -> FusedNLL:
    """NLL of targets under the logit-level fusion of M >= 2 models (DESIGN §5).

    logits: M tensors [N, V]; targets [N] int64 (-100 = ignored, nll 0); strategy one of
    ``STRATEGIES``; temperatures: M floats > 0 (default 1); weights: PoE betas (may be negative, at
    least one > 0) / fixed mixture weights (> 0), default 1/M. Returns FusedNLL(nll [N], weights [M, N],
    entropy [M, N]), all fp32.
    """
    return fused_logit_nll_multi(logits, targets, [strategy], temperatures, weights)[strategy]


def fused_logit_nll_multi(
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    strategies: Sequence[str],
    temperatures: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, FusedNLL]:
    """``fused_logit_nll`` for several strategies from one pass over each model's logits."""
    _check_fusion_args("fused_logit_nll", logits, targets, strategies, temperatures, weights)
    return _implementation("fused_logit_nll", logits[0].device, "fused_logit_nll_multi")(
        logits, targets, list(strategies), temperatures, weights
    )


def fused_log_probs(
    logits: Sequence[torch.Tensor],
    strategy: str,
    temperatures: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The fused next-token distribution of M >= 2 models (DESIGN §5a): log q [N, V] fp32.

    logits: M tensors [N, V] fp32|bf16|fp16 on one device; strategy one of ``STRATEGIES``;
    temperatures: M floats > 0 (default 1); weights: PoE betas (finite, at least one > 0; negative
    = contrastive) or fixed mixture weights (> 0), default 1/M. The same q as ``fused_logit_nll``:
    ``fused_logit_nll(...).nll == -fused_log_probs(...).gather(1, targets[:, None]).squeeze(1)``.
    With ``return_weights`` returns ``(log_q, weights [M, N] fp32)``, the weight each model received.
    """
    _check_fusion_args("fused_log_probs", logits, None, [strategy], temperatures, weights)
    return _implementation("fused_logit_nll", logits[0].device, "fused_log_probs")(
        logits, strategy, temperatures, weights, return_weights
    )


def target_and_set_log_probs(
    logits: torch.Tensor, targets: torch.Tensor, in_set: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, log p(target) and log sum_{t in set} p(t) of softmax(logits / temperature), in one pass over V.

    logits [N, V] fp32|bf16|fp16 (fp64 on the reference); targets [N] int64 in [0, V); in_set [V]
    bool; temperature > 0. Returns (log_p_target [N], log_p_set [N]) fp32 (fp64 for fp64 logits on
    the reference). Kotara's fusion across tokenizers (DESIGN §5c) calls it with the set of tokens
    that start a word.
    """
    op = "target_and_set_log_probs"
    _require(logits.dim() == 2, f"{op}: logits must be [N, V], got shape {tuple(logits.shape)}")
    num_rows, vocab_size = logits.shape
    _require(logits.dtype in FLOAT_DTYPES + (torch.float64,), f"{op}: unsupported logits dtype {logits.dtype}")
    _require(tuple(targets.shape) == (num_rows,), f"{op}: targets must be [N={num_rows}], got {tuple(targets.shape)}")
    _require(targets.dtype == torch.int64, f"{op}: targets must be int64, got {targets.dtype}")
    _require(tuple(in_set.shape) == (vocab_size,), f"{op}: in_set must be [V={vocab_size}], got {tuple(in_set.shape)}")
    _require(in_set.dtype == torch.bool, f"{op}: in_set must be bool, got {in_set.dtype}")
    _require(math.isfinite(temperature) and temperature > 0, f"{op}: temperature must be > 0, got {temperature}")
    # The kernel would read out of bounds: check on the device, without waiting for it (no host sync).
    torch._assert_async(((targets >= 0) & (targets < vocab_size)).all(), f"{op}: target outside [0, V={vocab_size})")
    return _implementation(op, logits.device)(logits, targets, in_set, temperature)
