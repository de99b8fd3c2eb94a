"""Triton ``topk_gather``: S[n, j] = y[n, idx[n, j]], and its backward without atomics.

y: [N, E, D] (any strides), idx: [N, k] int64 distinct within a row -> S: [N, k, D] in y's dtype.

Forward: one program per tile of BLOCK_R output rows (a row is one (token, slot) pair) x BLOCK_D
features; each row reads its index and copies y[n, idx[n, j], d-tile]. Pure data movement: exact.

Backward: dY[n, e] = dS[n, j] if idx[n, j] == e, else 0. Because the k indices of a token are
distinct, at most one slot j feeds each (n, e): each program owns a tile of *dY* rows (token,
expert) and looks its slot up by comparing e against the token's k indices, so every dY element is
written exactly once (zeros included) by one program. No atomics, no zero-fill pass, exact.

Indices outside [0, E) are not read (the forward loads 0 there, the backward drops them): the
kernels never touch memory out of bounds; ``torch.gather`` would raise instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moc_kernels.triton.compile_spec import KernelSpec

# Launch configurations: the one place they live (launchers and compile_specs() read this table).
# Copies are bound by HBM bytes: an 8-row x 256-feature tile with 4 warps gives each thread 16
# contiguous elements (16-byte vector loads/stores for bf16) and 78 registers at most (report);
# a 32 x 128 tile needed 255 registers and spilled on sm_80 (64-bit pointers for 32 elements).
CONFIGS: dict[str, dict[str, int]] = {
    "fwd": {"BLOCK_R": 8, "BLOCK_D": 256, "num_warps": 4, "num_stages": 1},
    "bwd": {"BLOCK_R": 8, "BLOCK_D": 256, "num_warps": 4, "num_stages": 1},
}
# (E, k) whose configs the report compiles: GPT-2-small MoC (E = 8, k = 2) and k = E.
SHIPPED_SHAPES = ((8, 2), (8, 8))
_TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


_UNIT_STRIDES = ("stride_yd", "stride_gd", "stride_od", "stride_ik")


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an output the kernel overwrites entirely (tests patch this to pre-fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _topk_gather_fwd(
    y_ptr,
    idx_ptr,
    out_ptr,
    N,
    E,
    K,
    D,
    stride_yn,
    stride_ye,
    stride_yd,
    stride_in,
    stride_ik,
    stride_on,
    stride_ok,
    stride_od,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 rows: N * k * D (and N * E * D for y) can exceed 2^31.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token = rows // K
    slot = rows % K
    row_valid = token < N
    expert = tl.load(idx_ptr + token * stride_in + slot * stride_ik, mask=row_valid, other=0)
    read = row_valid & (expert >= 0) & (expert < E)
    d_valid = d < D
    values = tl.load(
        y_ptr + token[:, None] * stride_yn + expert[:, None] * stride_ye + d[None, :] * stride_yd,
        mask=read[:, None] & d_valid[None, :],
        other=0.0,
    )
    tl.store(
        out_ptr + token[:, None] * stride_on + slot[:, None] * stride_ok + d[None, :] * stride_od,
        values,
        mask=row_valid[:, None] & d_valid[None, :],
    )


@triton.jit
def _topk_gather_bwd(
    d_out_ptr,
    idx_ptr,
    dy_ptr,
    N,
    E,
    K,
    D,
    stride_gn,
    stride_gk,
    stride_gd,
    stride_in,
    stride_ik,
    stride_yn,
    stride_ye,
    stride_yd,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token = rows // E
    expert = rows % E
    row_valid = token < N
    # The slot j with idx[n, j] == e, if any: compare e with the token's k indices ([BLOCK_R, K_PAD]).
    slots = tl.arange(0, K_PAD)
    indices = tl.load(
        idx_ptr + token[:, None] * stride_in + slots[None, :] * stride_ik,
        mask=row_valid[:, None] & (slots < K)[None, :],
        other=-1,
    )
    # Distinct indices: at most one slot matches, so one sum finds it (slot + 1; 0 = not selected).
    slot_plus_one = tl.sum(tl.where(indices == expert[:, None], slots[None, :] + 1, 0), axis=1)
    selected = slot_plus_one > 0
    slot = slot_plus_one - 1
    d_valid = d < D
    grads = tl.load(
        d_out_ptr + token[:, None] * stride_gn + slot[:, None] * stride_gk + d[None, :] * stride_gd,
        mask=selected[:, None] & d_valid[None, :],
        other=0.0,
    )
    tl.store(
        dy_ptr + token[:, None] * stride_yn + expert[:, None] * stride_ye + d[None, :] * stride_yd,
        grads,
        mask=row_valid[:, None] & d_valid[None, :],
    )


def _block_d(dim: int, config: dict[str, int]) -> int:
    return min(config["BLOCK_D"], triton.next_power_of_2(dim))


@torch.library.custom_op("moc_kernels::topk_gather_fwd", mutates_args=())
def topk_gather_fwd(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y [N, E, D] (any strides), idx [N, k] int64 -> S [N, k, D] contiguous, y's dtype."""
    num_tokens, num_experts, dim = y.shape
    top_k = idx.shape[1]
    out = _empty((num_tokens, top_k, dim), y.dtype, y.device)
    if out.numel() == 0:
        return out
    config = CONFIGS["fwd"]
    block_d = _block_d(dim, config)
    grid = (triton.cdiv(num_tokens * top_k, config["BLOCK_R"]), triton.cdiv(dim, block_d))
    _topk_gather_fwd[grid](
        y,
        idx,
        out,
        num_tokens,
        num_experts,
        top_k,
        dim,
        *y.stride(),
        *idx.stride(),
        *out.stride(),
        BLOCK_R=config["BLOCK_R"],
        BLOCK_D=block_d,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out


@topk_gather_fwd.register_fake
def _(y, idx):
    return y.new_empty((y.shape[0], idx.shape[1], y.shape[2]))


@torch.library.custom_op("moc_kernels::topk_gather_bwd", mutates_args=())
def topk_gather_bwd(d_out: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """d_out [N, k, D] (any strides), idx [N, k] -> dY [N, E, D] contiguous: d_out rows at idx, 0 elsewhere."""
    num_tokens, top_k, dim = d_out.shape
    dy = _empty((num_tokens, num_experts, dim), d_out.dtype, d_out.device)
    if dy.numel() == 0:
        return dy
    config = CONFIGS["bwd"]
    block_d = _block_d(dim, config)
    grid = (triton.cdiv(num_tokens * num_experts, config["BLOCK_R"]), triton.cdiv(dim, block_d))
    _topk_gather_bwd[grid](
        d_out,
        idx,
        dy,
        num_tokens,
        num_experts,
        top_k,
        dim,
        *d_out.stride(),
        *idx.stride(),
        *dy.stride(),
        BLOCK_R=config["BLOCK_R"],
        BLOCK_D=block_d,
        K_PAD=triton.next_power_of_2(max(top_k, 1)),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return dy


@topk_gather_bwd.register_fake
def _(d_out, idx, num_experts):
    return d_out.new_empty((d_out.shape[0], num_experts, d_out.shape[2]))


def _setup_context(ctx, inputs, output):
    y, idx = inputs
    ctx.save_for_backward(idx)
    ctx.num_experts = y.shape[1]


def _backward(ctx, d_out):
    (idx,) = ctx.saved_tensors
    return topk_gather_bwd(d_out, idx, ctx.num_experts), None


topk_gather_fwd.register_autograd(_backward, setup_context=_setup_context)


def topk_gather(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``S[n, j] = y[n, idx[n, j]]``.

    y: [N, E, D] fp32|bf16|fp16, any strides; idx: [N, k] int64, distinct within a row, in [0, E).
    Returns S: [N, k, D] in y's dtype (exact copy). Saves only idx for backward, which writes
    dY [N, E, D] (the rows of dS at idx, zeros elsewhere) without atomics; exact.
    """
    return topk_gather_fwd(y, idx)


def compile_specs() -> list[KernelSpec]:
    """One KernelSpec per kernel x dtype (bf16, fp32), the backward also per shipped k, from CONFIGS."""
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        variants = [("fwd", _topk_gather_fwd, {}, "")]
        variants += [
            ("bwd", _topk_gather_bwd, {"K_PAD": triton.next_power_of_2(k)}, f"E{e}-k{k}-") for e, k in SHIPPED_SHAPES
        ]
        for direction, kernel, extra, shape_label in variants:
            config = CONFIGS[direction]
            constexprs = {"BLOCK_R": config["BLOCK_R"], "BLOCK_D": config["BLOCK_D"], **extra}
            # Unit innermost strides as the launches of contiguous tensors see them (Triton specializes
            # integer arguments equal to 1 into constants, which makes the feature loads vector loads).
            constexprs.update({name: 1 for name in _UNIT_STRIDES if name in kernel.arg_names})
            signature = {}
            for name in kernel.arg_names:
                if name in constexprs:
                    signature[name] = "constexpr"
                elif name == "idx_ptr":
                    signature[name] = "*i64"
                elif name.endswith("_ptr"):
                    signature[name] = "*" + _TL_NAME[dtype]
                else:
                    signature[name] = "i32"
            warps = config["num_warps"]
            specs.append(
                KernelSpec(
                    kernel=kernel.__name__,
                    config=f"{shape_label}BR{config['BLOCK_R']}-BD{config['BLOCK_D']}-w{warps}-{_TL_NAME[dtype]}",
                    fn=kernel,
                    signature=signature,
                    constexprs=constexprs,
                    num_warps=warps,
                    num_stages=config["num_stages"],
                )
            )
    return specs
