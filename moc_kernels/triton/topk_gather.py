"""Triton ``topk_gather``: S[n, j] = y[n, idx[n, j]], and its backward without atomics.

y: [N, E, D] (any strides), idx: [N, k] int64 in [0, E) -> S: [N, k, D] in y's dtype.

Forward: one program per tile of BLOCK_R output rows (a row is one (token, slot) pair) x BLOCK_D
features; each row reads its index and copies y[n, idx[n, j], d-tile]. Pure data movement: exact.

Backward: dY[n, e] = sum of dS[n, j] over the slots j with idx[n, j] == e (0 when none). Each
program owns a tile of *dY* rows (token, expert) and sums, over the token's k slots, the gradient
rows whose index equals its expert, so every dY element is written exactly once (zeros included) by
one program: no atomics, no zero-fill pass. The model's indices come from ``topk`` and never repeat
(one slot matches at most, and the sum is an exact copy); repeated indices add up, as the
reference's scatter-add does.

Indices outside [0, E) are not read (the forward loads 0 there, the backward drops them): the
kernels never touch memory out of bounds; ``torch.gather`` would raise instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moc_kernels import backend
from moc_kernels.triton.compile_spec import KernelSpec, launch_spec

# The interpreter-safe product and rounding helpers (see there); shared with small_attention.
from moc_kernels.triton.small_attention import _cast, _dot
from moc_kernels.triton.utils import TL_NAME, on_device

# Launch configurations: the one place they live (launchers and compile_specs() read this table).
# Copies are bound by HBM bytes: an 8-row x 256-feature tile with 4 warps gives each thread 16
# contiguous elements (16-byte vector loads/stores for bf16) and 78 registers at most (report);
# a 32 x 128 tile needed 255 registers and spilled on sm_80 (64-bit pointers for 32 elements).
CONFIGS: dict[str, dict[str, int]] = {
    "fwd": {"BLOCK_R": 8, "BLOCK_D": 256, "num_warps": 4, "num_stages": 1},
    "bwd": {"BLOCK_R": 8, "BLOCK_D": 256, "num_warps": 4, "num_stages": 1},
}


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
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token = rows // E
    expert = rows % E
    row_valid = token < N
    d_valid = d < D
    # dY[n, e] = sum of dS[n, j] over the slots j with idx[n, j] == e: one pass over the k slots, each
    # a load masked to the rows that chose e, so a repeated index adds its gradients (as the
    # reference's scatter-add does) and an unselected expert gets 0, without atomics.
    grads = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for j in range(K):
        chosen = tl.load(idx_ptr + token * stride_in + j * stride_ik, mask=row_valid, other=-1) == expert
        grads += tl.load(
            d_out_ptr + token[:, None] * stride_gn + j * stride_gk + d[None, :] * stride_gd,
            mask=chosen[:, None] & d_valid[None, :],
            other=0.0,
        ).to(tl.float32)
    tl.store(
        dy_ptr + token[:, None] * stride_yn + expert[:, None] * stride_ye + d[None, :] * stride_yd,
        grads.to(dy_ptr.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )


def _block_d(dim: int, config: dict[str, int]) -> int:
    return min(config["BLOCK_D"], triton.next_power_of_2(dim))


def _copy_launch(direction: str, src, idx, dst) -> tuple[tuple[int, int], dict, dict[str, int]]:
    """(grid, every argument by name, config) of the gather kernel's launch in ``direction``: "fwd" reads
    y [N, E, D] into S [N, k, D], "bwd" reads dS [N, k, D] into dY [N, E, D]; idx [N, k]. One program per
    tile of BLOCK_R rows of ``dst`` x BLOCK_D features."""
    kernel = _topk_gather_fwd if direction == "fwd" else _topk_gather_bwd
    num_tokens, top_k = idx.shape
    num_experts, dim = (src if direction == "fwd" else dst).shape[1], src.shape[2]
    config = CONFIGS[direction]
    block_d = _block_d(dim, config)
    values = [src, idx, dst, num_tokens, num_experts, top_k, dim, *src.stride(), *idx.stride(), *dst.stride()]
    args = dict(zip(kernel.arg_names, values), BLOCK_R=config["BLOCK_R"], BLOCK_D=block_d)
    return (triton.cdiv(dst.shape[0] * dst.shape[1], config["BLOCK_R"]), triton.cdiv(dim, block_d)), args, config


@torch.library.custom_op("moc_kernels::topk_gather_fwd", mutates_args=())
def topk_gather_fwd(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y [N, E, D] (any strides), idx [N, k] int64 -> S [N, k, D] contiguous, y's dtype."""
    num_tokens, num_experts, dim = y.shape
    top_k = idx.shape[1]
    out = _empty((num_tokens, top_k, dim), y.dtype, y.device)
    if out.numel() == 0:
        return out
    grid, args, config = _copy_launch("fwd", y, idx, out)
    with on_device(y):
        _topk_gather_fwd[grid](**args, num_warps=config["num_warps"], num_stages=config["num_stages"])
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
    grid, args, config = _copy_launch("bwd", d_out, idx, dy)
    with on_device(d_out):
        _topk_gather_bwd[grid](**args, num_warps=config["num_warps"], num_stages=config["num_stages"])
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

    y: [N, E, D] fp32|bf16|fp16, any strides; idx: [N, k] int64 in [0, E) (repeats allowed).
    Returns S: [N, k, D] in y's dtype (exact copy). Saves only idx for backward, which writes
    dY [N, E, D] (the sum of the rows of dS at each index, zeros elsewhere) without atomics.
    """
    return topk_gather_fwd(y, idx)


# ---------------------------------------------------------------------------------------------
# gather_matmul: topk_gather fused into the loads of the GEMM that consumes it.
#   out[n, j] = y[n, idx[n, j]] @ w        y [N, E, D], idx [N, k], w [D, F] -> out [N, k, F]
# The [N, k, D] gather is never written: the A-tile loads read y's rows through idx.
# Backward, with rows r = (n, j) and A_r = y[n, idx[n, j]]:
#   dW = sum_r A_r^T dOut_r   (a GEMM whose reduction runs over the rows, A^T loaded through idx)
#   dY[n, idx[n, j]] = dOut_r @ w^T, dY = 0 on unselected experts. With indices distinct per token
#   each dY row receives at most one product: plain stores into a zeroed dY, no atomics. Summing
#   repeats exactly would cost E times the work (or atomics), so gather_matmul refuses them.
# ---------------------------------------------------------------------------------------------
# Launch configurations of the three GEMMs (chosen by compiling, `python -m moc_kernels.report`):
# the gathered operands need one 64-bit row pointer per element, so tiles are smaller than a plain
# GEMM's. bf16: 64-row tiles (wgmma on sm_90); 64x128x64 tiles spilled 400-4000 B, and dY (whose
# w^T loads are transposed and whose stores scatter) needs 8 warps to stay spill-free. fp32: IEEE
# products on the FMA pipes, 32x32x32 (32x64x32 spilled on sm_80).
GEMM_CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "fwd": {
        "bf16": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
    },
    "dw": {
        "bf16": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
    },
    "dy": {
        "bf16": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 2},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
    },
}


@triton.jit
def _gather_matmul_fwd(
    y_ptr,
    idx_ptr,
    w_ptr,
    out_ptr,
    N,
    E,
    K,
    D,
    F,
    stride_yn,
    stride_ye,
    stride_yd,
    stride_in,
    stride_ik,
    stride_wd,
    stride_wf,
    stride_or,
    stride_of,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    token = rows // K
    row_valid = token < N
    expert = tl.load(idx_ptr + token * stride_in + (rows % K) * stride_ik, mask=row_valid, other=0)
    read = row_valid & (expert >= 0) & (expert < E)
    a_rows = y_ptr + token * stride_yn + expert * stride_ye  # the gather: row pointers through idx
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows[:, None] + kk[None, :] * stride_yd, mask=read[:, None] & (kk < D)[None, :], other=0.0)
        b = tl.load(
            w_ptr + kk[:, None] * stride_wd + cols[None, :] * stride_wf,
            mask=(kk < D)[:, None] & (cols < F)[None, :],
            other=0.0,
        )
        acc += _dot(a, b, PRECISION, INTERPRET)
    tl.store(
        out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_of,
        _cast(acc, out_ptr.dtype.element_ty, INTERPRET),
        mask=row_valid[:, None] & (cols < F)[None, :],
    )


@triton.jit
def _gather_matmul_dw(
    y_ptr,
    idx_ptr,
    d_out_ptr,
    dw_ptr,
    N,
    E,
    K,
    D,
    F,
    stride_yn,
    stride_ye,
    stride_yd,
    stride_in,
    stride_ik,
    stride_gr,
    stride_gf,
    stride_wd,
    stride_wf,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # dW[d, f] = sum over rows r of A[r, d] dOut[r, f]: M = D, N = F, the reduction runs over rows.
    dd = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, N * K, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
        token = rows // K
        row_valid = token < N
        expert = tl.load(idx_ptr + token * stride_in + (rows % K) * stride_ik, mask=row_valid, other=0)
        read = row_valid & (expert >= 0) & (expert < E)
        a_t = tl.load(
            y_ptr + (token * stride_yn + expert * stride_ye)[None, :] + dd[:, None] * stride_yd,
            mask=read[None, :] & (dd < D)[:, None],
            other=0.0,
        )
        g = tl.load(
            d_out_ptr + rows[:, None] * stride_gr + cols[None, :] * stride_gf,
            mask=row_valid[:, None] & (cols < F)[None, :],
            other=0.0,
        )
        acc += _dot(a_t, g, PRECISION, INTERPRET)
    tl.store(
        dw_ptr + dd[:, None] * stride_wd + cols[None, :] * stride_wf,
        _cast(acc, dw_ptr.dtype.element_ty, INTERPRET),
        mask=(dd < D)[:, None] & (cols < F)[None, :],
    )


@triton.jit
def _gather_matmul_dy(
    d_out_ptr,
    idx_ptr,
    w_ptr,
    dy_ptr,
    N,
    E,
    K,
    D,
    F,
    stride_gr,
    stride_gf,
    stride_in,
    stride_ik,
    stride_wd,
    stride_wf,
    stride_yn,
    stride_ye,
    stride_yd,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # dS[r, d] = sum_f dOut[r, f] w[d, f], stored straight into dY[n, idx[n, j], d] (the scatter).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    token = rows // K
    row_valid = token < N
    expert = tl.load(idx_ptr + token * stride_in + (rows % K) * stride_ik, mask=row_valid, other=0)
    write = row_valid & (expert >= 0) & (expert < E)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_K):
        ff = f0 + tl.arange(0, BLOCK_K)
        g = tl.load(
            d_out_ptr + rows[:, None] * stride_gr + ff[None, :] * stride_gf,
            mask=row_valid[:, None] & (ff < F)[None, :],
            other=0.0,
        )
        w_t = tl.load(
            w_ptr + dd[None, :] * stride_wd + ff[:, None] * stride_wf,
            mask=(dd < D)[None, :] & (ff < F)[:, None],
            other=0.0,
        )
        acc += _dot(g, w_t, PRECISION, INTERPRET)
    tl.store(
        dy_ptr + (token * stride_yn + expert * stride_ye)[:, None] + dd[None, :] * stride_yd,
        _cast(acc, dy_ptr.dtype.element_ty, INTERPRET),
        mask=write[:, None] & (dd < D)[None, :],
    )


def _gemm_params(kind: str, dtype: torch.dtype) -> tuple[dict[str, int], str]:
    key = "fp32" if dtype == torch.float32 else "bf16"
    return GEMM_CONFIGS[kind][key], "ieee" if key == "fp32" else "tf32"


def _gemm_launch(kind: str, y, idx, w, d_out=None, out=None) -> tuple[tuple[int, int], dict, dict[str, int]]:
    """(grid, every argument by name, config) of one gather_matmul GEMM's launch (``kind``: fwd, dy or dw)
    on y [N, E, D], idx [N, k], w [D, F]; ``out`` is what it writes (fwd: [N, k, F], dy: [N, E, D],
    dw: [D, F]) and ``d_out`` the [N k, F] gradient the backward GEMMs read."""
    num_tokens, num_experts, dim = y.shape
    top_k, features = idx.shape[1], w.shape[1]
    config, precision = _gemm_params(kind, y.dtype)
    sizes = [num_tokens, num_experts, top_k, dim, features]
    if kind == "fwd":
        kernel, rows, cols = _gather_matmul_fwd, num_tokens * top_k, features
        values = [y, idx, w, out, *sizes, *y.stride(), *idx.stride(), *w.stride(), out.stride(1), out.stride(2)]
    elif kind == "dy":
        kernel, rows, cols = _gather_matmul_dy, num_tokens * top_k, dim
        values = [d_out, idx, w, out, *sizes, *d_out.stride(), *idx.stride(), *w.stride(), *out.stride()]
    else:
        kernel, rows, cols = _gather_matmul_dw, dim, features
        values = [y, idx, d_out, out, *sizes, *y.stride(), *idx.stride(), *d_out.stride(), *out.stride()]
    args = dict(zip(kernel.arg_names, values), PRECISION=precision, INTERPRET=backend.interpreting())
    args.update({name: config[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")})
    return (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(cols, config["BLOCK_N"])), args, config


_GEMM_KERNELS = {"fwd": _gather_matmul_fwd, "dy": _gather_matmul_dy, "dw": _gather_matmul_dw}


def _launch_gemm(kind: str, y, idx, w, d_out=None, out=None) -> None:
    grid, args, config = _gemm_launch(kind, y, idx, w, d_out, out)
    with on_device(y):
        _GEMM_KERNELS[kind][grid](**args, num_warps=config["num_warps"], num_stages=config["num_stages"])


@torch.library.custom_op("moc_kernels::gather_matmul_fwd", mutates_args=())
def gather_matmul_fwd(y: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y [N, E, D], idx [N, k], w [D, F] (any strides) -> [N, k, F] contiguous in y's dtype."""
    num_tokens, top_k, features = y.shape[0], idx.shape[1], w.shape[1]
    out = _empty((num_tokens, top_k, features), y.dtype, y.device)
    if out.numel() == 0:
        return out
    _launch_gemm("fwd", y, idx, w, out=out)
    return out


@gather_matmul_fwd.register_fake
def _(y, idx, w):
    return y.new_empty((y.shape[0], idx.shape[1], w.shape[1]))


@torch.library.custom_op("moc_kernels::gather_matmul_bwd", mutates_args=())
def gather_matmul_bwd(
    y: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, d_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dY [N, E, D] zeros off idx, dW [D, F]) from d_out [N, k, F]; both contiguous, in y's / w's dtype."""
    num_tokens, num_experts, dim = y.shape
    top_k, features = idx.shape[1], w.shape[1]
    # dY rows that no slot selects must be 0: allocated zeroed, the kernel writes only selected rows.
    dy = torch.zeros((num_tokens, num_experts, dim), dtype=y.dtype, device=y.device)
    dw = _empty((dim, features), w.dtype, w.device)
    d_out = d_out.to(y.dtype).reshape(num_tokens * top_k, features)  # a view when d_out is contiguous
    if d_out.numel() == 0:
        return dy, dw.zero_()
    _launch_gemm("dy", y, idx, w, d_out=d_out, out=dy)
    _launch_gemm("dw", y, idx, w, d_out=d_out, out=dw)
    return dy, dw


@gather_matmul_bwd.register_fake
def _(y, idx, w, d_out):
    return torch.empty_like(y, memory_format=torch.contiguous_format), torch.empty_like(
        w, memory_format=torch.contiguous_format
    )


def _gm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gm_backward(ctx, d_out):
    y, idx, w = ctx.saved_tensors
    dy, dw = gather_matmul_bwd(y, idx, w, d_out)
    return dy, None, dw


gather_matmul_fwd.register_autograd(_gm_backward, setup_context=_gm_setup_context)


def gather_matmul(y: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``topk_gather(y, idx) @ w`` without writing the gathered [N, k, D] tensor.

    y: [N, E, D] fp32|bf16|fp16, idx: [N, k] int64 distinct per row, w: [D, F] (same dtype, any
    strides) -> [N, k, F] in y's dtype, fp32 accumulation. Saves y, idx, w for backward (no gathered
    copy); the backward writes dY without atomics and dW as one GEMM over the gathered rows.
    A repeated index in a row is an error (a device-side assert on CUDA: no host sync).
    """
    if w.dim() != 2 or w.shape[0] != y.shape[2] or w.dtype != y.dtype:
        raise ValueError(
            f"gather_matmul: w must be [D={y.shape[2]}, F] of dtype {y.dtype}, got {tuple(w.shape)} {w.dtype}"
        )
    if idx.shape[1] > 1:  # the backward's plain stores need distinct indices per row
        distinct = (idx.sort(dim=1).values.diff(dim=1) != 0).all()
        torch._assert_async(distinct, "gather_matmul: idx repeats an expert within a row; indices must be distinct")
    return gather_matmul_fwd(y, idx, w)


# The shape the report compiles at: GPT-2 small's MoE/MoC layer (16384 tokens of 768 features, E = 8
# experts, k = 2 of them per token, expert hidden size F = 2048), contiguous tensors.
SHIPPED_SHAPE = {"N": 16384, "E": 8, "k": 2, "D": 768, "F": 2048}


def compile_specs(shape: dict[str, int] = SHIPPED_SHAPE) -> list[KernelSpec]:
    """One KernelSpec per kernel x dtype (bf16, fp32), specialised as the JIT specialises the launchers'
    own arguments (``_copy_launch``, ``_gemm_launch``) at ``shape`` (N, E, k, D, F)."""
    n, e, k, d, f = (shape[key] for key in ("N", "E", "k", "D", "F"))
    idx = torch.empty(n, k, dtype=torch.int64, device="meta")
    specs = []
    for dtype in (torch.bfloat16, torch.float32):
        y, dy, gathered = (torch.empty(size, dtype=dtype, device="meta") for size in ((n, e, d), (n, e, d), (n, k, d)))
        for kernel, (_, args, config) in (
            (_topk_gather_fwd, _copy_launch("fwd", y, idx, gathered)),
            (_topk_gather_bwd, _copy_launch("bwd", gathered, idx, dy)),
        ):
            warps = config["num_warps"]
            label = f"BR{config['BLOCK_R']}-BD{args['BLOCK_D']}-w{warps}-{TL_NAME[dtype]}"
            specs.append(launch_spec(kernel, args, config=label, num_warps=warps, num_stages=config["num_stages"]))
    for kind, kernel in _GEMM_KERNELS.items():
        for dtype in (torch.bfloat16, torch.float32):
            sizes = {"y": (n, e, d), "w": (d, f), "d_out": (n * k, f), "fwd": (n, k, f), "dy": (n, e, d), "dw": (d, f)}
            meta = {name: torch.empty(size, dtype=dtype, device="meta") for name, size in sizes.items()}
            _, args, config = _gemm_launch(kind, meta["y"], idx, meta["w"], meta["d_out"], out=meta[kind])
            args["INTERPRET"] = False  # the report compiles for GPUs, never the interpreter
            warps, stages = config["num_warps"], config["num_stages"]
            tile = "-".join(f"{name[6:]}{config[name]}" for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            label = f"{tile}-w{warps}-s{stages}-{TL_NAME[dtype]}"
            matmul = dtype != torch.float32  # fp32 runs IEEE products on the FMA pipes
            specs.append(launch_spec(kernel, args, config=label, num_warps=warps, num_stages=stages, matmul=matmul))
    return specs
