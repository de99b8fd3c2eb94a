"""Triton ``routed_swiglu``: each token's k routed experts' SwiGLU as grouped GEMMs, forward and backward.

x [N, D], idx [N, k] int64, w13 [E, D, 2F] (gate w1 = w13[..., :F] and up w3 = w13[..., F:], read
as strided views of the one tensor), w2 [E, F, D] -> Y [N, k, D] with Y[n, j] = SwiGLU_{idx[n, j]}(x[n]).

Routing, on the device, no host sync: the P = N * k (token, slot) pairs (pair p = n * k + j) sorted by
expert (``order``: sorted row -> pair; stable, so an expert's rows stay in token order) and
``expert_offsets`` [E + 1] (searchsorted), each expert's range of sorted rows. No separate gather or
scatter pass (ScatterMoE's scatter2scatter idea): GEMMs reading token rows load x[order[i] // k] (or
dY[order[i]]) directly, and the GEMM producing per-pair rows stores them at row order[i].
The grid needs no per-expert count on the host: row blocks are numbered expert by expert
(ceil(rows_e / BLOCK_M) for expert e), at most ceil(P / BLOCK_M) + E in all, so that is the grid; a
program finds its expert by walking the E offsets (scalar loads from cache), spare programs return.

Forward:
  1. ``_routed_gate_up``: G = X W1_e and U = X W3_e (X: a block of expert e's gathered x rows) in one
     K loop, H = silu(G) * U; H, G, U stored in sorted order [P, F].
  2. ``_routed_rows_matmul``: Y[order[i]] = H[i] W2_e, scattered by the stores.
Backward (dY [N, k, D]):
  3. ``_routed_swiglu_grad``: dH = dY[order[i]] W2_e^T with silu' in its epilogue -> dG, dU, H.
  4. ``_routed_rows_matmul`` (two products): dX_pair[order[i]] = dG[i] W1_e^T + dU[i] W3_e^T in fp32,
     then dx[n] = sum_j dX_pair[n, j] (a token's k slots sit in k places of the sorted order).
  5. ``_routed_weight_grad``: dW1_e = X_e^T dG_e and dW3_e = X_e^T dU_e, one program per [D, F] tile
     of one expert, its K loop over that expert's rows, written by strides into the two halves of one
     [E, D, 2F] gradient of w13 (no slice_backward); 6. the same for dW2_e = H_e^T dY_e.

Repeated experts within a token's row are handled: every pair is its own row, so a repeat is one more
row of that expert (its output equals the first's; its gradients add up in dx and dW).
Saved for backward: G and U, [P, F] each in x's dtype (k/E of ``expert_swiglu``'s), ``order`` and
``expert_offsets`` (int32). Products accumulate in fp32; G, U, H, dG, dU are stored in x's dtype,
except dG, dU of fp16 data, kept fp32 (as in ``expert_swiglu``, whose docstring says why).
Gradients autograd does not need are not computed.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from moc_kernels.triton.compile_spec import KernelSpec

# The interpreter-safe product, rounding store, sigmoid and launch record; shared with expert_swiglu.
from moc_kernels.triton.expert_swiglu import _gate_up_views, _mma, _sigmoid, _store, _tile_ids, grad_dtype
from moc_kernels.triton.launch import Launch, check_strides, meta_args, plan_spec, table_config, tile_grid
from moc_kernels.triton.utils import on_device

# Launch configurations: the one place they live (launchers read them, block sizes clamped to small
# problems; compile_specs() compiles exactly these for the report). "bf16" also serves fp16 where no
# "fp16" entry is given. One table serves every GPU from sm_80 on (its sm_80 build runs on sm_86/89
# too), so each config fits their 99 KiB of shared memory. Chosen from the launch build (the JIT's
# divisibility-by-16 specialization of the arguments at SHIPPED_SHAPE): `python -m moc_kernels.report
# --ops routed_swiglu`, Triton 3.9: 0 spills on sm_80 and sm_90, wgmma / mma. gate_up and swiglu_grad
# run 128x64x32 (8 warps, 3 stages: 128 / 238 registers on sm_80, 0 spills): 64x64 tiles cap their
# arithmetic intensity near 43 FLOP per L2 byte. Every grid runs column tile fastest (``tile_grid``).
CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    # G/U = x_rows W1_e/W3_e (rows = sorted pairs, N = F, K = D), two accumulators.
    "gate_up": {
        "bf16": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    },
    # Y[order] = H W2_e (N = D, K = F). fp32: unpipelined it spilled 8 B on sm_80 in the launch build.
    "down": {
        "bf16": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    },
    # dH = dY[order] W2_e^T (N = F, K = D) with the SwiGLU derivative in the epilogue.
    "swiglu_grad": {
        "bf16": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
        # fp16 stores fp32 dG/dU (``grad_dtype``): at 128x64 its epilogue took 253-255 registers under
        # Triton 3.9 and spilled 24-32 B under 3.6 (the GPU image's); 64x64: 124-128, 0 spills, both.
        "fp16": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    },
    # dX_pair[order] = dG W1_e^T + dU W3_e^T (N = D, K = F, two products into one accumulator).
    # fp16 reads fp32 dG/dU tiles here and in "dw13" (``grad_dtype``), so its K blocks are halved.
    "dx": {
        "bf16": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
        "fp16": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
    },
    # dW1_e/dW3_e = X_e^T dG_e/dU_e (M = D, N = F, K = the expert's rows), two accumulators.
    "dw13": {
        "bf16": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        "fp16": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    },
    # dW2_e = H_e^T dY_e (M = F, N = D, K = the expert's rows).
    "dw2": {
        "bf16": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    },
}
# The shape whose configs the compile report checks: a GPT-2-small top-2-of-8 MoE (N = batch * seq).
SHIPPED_SHAPE = {"N": 16384, "D": 768, "E": 8, "F": 2048, "k": 2}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a buffer the kernels overwrite entirely (tests patch this to pre-fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Kernels (only builtins of triton.language: see expert_swiglu for why)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _expert_block(pid, expert_offsets_ptr, E, BLOCK_M: tl.constexpr):
    """(expert, first sorted row, end of the expert's rows) of row block ``pid``; blocks are numbered
    expert by expert, ceil(rows_e / BLOCK_M) for expert e. expert is -1 for spare blocks."""
    expert = pid * 0 - 1
    row0 = pid * 0
    row_end = pid * 0
    first = pid * 0  # the first block of expert e
    for e in range(0, E):
        start = tl.load(expert_offsets_ptr + e)
        end = tl.load(expert_offsets_ptr + e + 1)
        blocks = (end - start + BLOCK_M - 1) // BLOCK_M
        hit = (pid >= first) & (pid < first + blocks)
        expert = tl.where(hit, e, expert)
        row0 = tl.where(hit, start + (pid - first) * BLOCK_M, row0)
        row_end = tl.where(hit, end, row_end)
        first += blocks
    return expert, row0, row_end


@triton.jit
def _tile_offsets(row0, col0, rm, rn, stride_m, stride_n):
    """Offsets of the [rm, rn] tile at (row0, col0): a 64-bit origin (P * F can exceed 2^31) plus
    32-bit offsets inside the tile (64-bit offsets per element cost registers and spill)."""
    return (row0.to(tl.int64) * stride_m + col0.to(tl.int64) * stride_n) + (
        rm[:, None] * stride_m + rn[None, :] * stride_n
    )


@triton.jit
def _routed_gate_up(
    x_ptr, w1_ptr, w3_ptr, g_ptr, u_ptr, h_ptr, order_ptr, expert_offsets_ptr,
    E, D, F, TOP_K,
    stride_xn, stride_xd,
    stride_we, stride_wd, stride_wf,
    stride_hm, stride_hf,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """G = X W1_e, U = X W3_e for one block of expert e's sorted rows (X: the rows' tokens of x,
    gathered in the loads), H = silu(G) * U; H, G and U stored at the sorted rows.
    w1 and w3 share strides (the launcher ensures it), so one offset tile addresses both."""
    pid_m, pid_n = _tile_ids(0, F, BLOCK_M, BLOCK_N, False)
    expert, row0, row_end = _expert_block(pid_m, expert_offsets_ptr, E, BLOCK_M)
    if expert < 0:
        return
    rm, rn, rk = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    row_valid = rm < row_end - row0
    n_valid = rn < F - pid_n * BLOCK_N
    tokens = tl.load(order_ptr + row0 + rm, mask=row_valid, other=0) // TOP_K
    # 64-bit row origins (N * D can exceed 2^31); in-tile offsets stay 32-bit.
    x_rows = x_ptr + tokens.to(tl.int64) * stride_xn  # [BLOCK_M] pointers: the gathered rows of x
    w_offs = (expert.to(tl.int64) * stride_we + (pid_n * BLOCK_N).to(tl.int64) * stride_wf) + (
        rk[:, None] * stride_wd + rn[None, :] * stride_wf
    )
    w1_ptrs = w1_ptr + w_offs
    w3_ptrs = w3_ptr + w_offs
    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_valid = rk < D - k0
        x = tl.load(
            x_rows[:, None] + (k0 + rk)[None, :] * stride_xd, mask=row_valid[:, None] & k_valid[None, :], other=0.0
        )
        w_mask = k_valid[:, None] & n_valid[None, :]
        acc_g = _mma(acc_g, x, tl.load(w1_ptrs, mask=w_mask, other=0.0), PRECISION, UPCAST)
        acc_u = _mma(acc_u, x, tl.load(w3_ptrs, mask=w_mask, other=0.0), PRECISION, UPCAST)
        w1_ptrs += BLOCK_K * stride_wd
        w3_ptrs += BLOCK_K * stride_wd
    h_offs = _tile_offsets(row0, pid_n * BLOCK_N, rm, rn, stride_hm, stride_hf)
    mask = row_valid[:, None] & n_valid[None, :]
    _store(g_ptr + h_offs, acc_g, mask, UPCAST)
    _store(u_ptr + h_offs, acc_u, mask, UPCAST)
    # silu(g) = g * sigmoid(g), from the fp32 accumulator (never from a rounded G).
    _store(h_ptr + h_offs, acc_g * _sigmoid(acc_g) * acc_u, mask, UPCAST)


@triton.jit
def _routed_rows_matmul(
    a_ptr, a2_ptr, b_ptr, b2_ptr, c_ptr, order_ptr, expert_offsets_ptr,
    E, N, K,
    stride_am, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_cm, stride_cn,
    DUAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[order[i]] = A[i] B_e (+ A2[i] B2_e when DUAL) for one block of expert e's sorted rows i:
    the result is scattered to (token, slot) order by the stores. A, A2 share a layout, B, B2
    share strides (B_e [K, N] by strides, so W^T costs nothing)."""
    pid_m, pid_n = _tile_ids(0, N, BLOCK_M, BLOCK_N, False)
    expert, row0, row_end = _expert_block(pid_m, expert_offsets_ptr, E, BLOCK_M)
    if expert < 0:
        return
    rm, rn, rk = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    row_valid = rm < row_end - row0
    n_valid = rn < N - pid_n * BLOCK_N
    a_offs = row0.to(tl.int64) * stride_am + (rm[:, None] * stride_am + rk[None, :] * stride_ak)
    b_offs = (expert.to(tl.int64) * stride_be + (pid_n * BLOCK_N).to(tl.int64) * stride_bn) + (
        rk[:, None] * stride_bk + rn[None, :] * stride_bn
    )
    a_ptrs = a_ptr + a_offs
    b_ptrs = b_ptr + b_offs
    if DUAL:
        a2_ptrs = a2_ptr + a_offs
        b2_ptrs = b2_ptr + b_offs
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = rk < K - k0
        a_mask = row_valid[:, None] & k_valid[None, :]
        b_mask = k_valid[:, None] & n_valid[None, :]
        acc = _mma(
            acc, tl.load(a_ptrs, mask=a_mask, other=0.0), tl.load(b_ptrs, mask=b_mask, other=0.0), PRECISION, UPCAST
        )
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        if DUAL:
            a2 = tl.load(a2_ptrs, mask=a_mask, other=0.0)
            acc = _mma(acc, a2, tl.load(b2_ptrs, mask=b_mask, other=0.0), PRECISION, UPCAST)
            a2_ptrs += BLOCK_K * stride_ak
            b2_ptrs += BLOCK_K * stride_bk
    pairs = tl.load(order_ptr + row0 + rm, mask=row_valid, other=0)
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + ((pid_n * BLOCK_N + rn) * stride_cn)[None, :]
    _store(c_ptrs, acc, row_valid[:, None] & n_valid[None, :], UPCAST)


@triton.jit
def _routed_swiglu_grad(
    dy_ptr, w2_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, order_ptr, expert_offsets_ptr,
    E, D, F,
    stride_dym, stride_dyd,
    stride_w2e, stride_w2f, stride_w2d,
    stride_hm, stride_hf,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dH = dY[order[i]] W2_e^T for a block of expert e's sorted rows i (dY rows gathered in the
    loads), then the SwiGLU derivative. With H = silu(G) * U, s = sigmoid(G):
        silu'(g) = s * (1 + g * (1 - s)),  dU = dH * silu(G),  dG = dH * U * silu'(G).
    Writes dG, dU and H (the dW2 GEMM's operand) at the sorted rows ([P, F] by strides)."""
    pid_m, pid_n = _tile_ids(0, F, BLOCK_M, BLOCK_N, False)
    expert, row0, row_end = _expert_block(pid_m, expert_offsets_ptr, E, BLOCK_M)
    if expert < 0:
        return
    rm, rn, rk = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    row_valid = rm < row_end - row0
    n_valid = rn < F - pid_n * BLOCK_N
    pairs = tl.load(order_ptr + row0 + rm, mask=row_valid, other=0)
    dy_ptrs = dy_ptr + pairs.to(tl.int64)[:, None] * stride_dym + rk[None, :] * stride_dyd
    # W2_e^T [D, F]: element (d, f) = w2[e, f, d].
    w2t_ptrs = (
        w2_ptr
        + (expert.to(tl.int64) * stride_w2e + (pid_n * BLOCK_N).to(tl.int64) * stride_w2f)
        + (rk[:, None] * stride_w2d + rn[None, :] * stride_w2f)
    )
    acc_dh = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_valid = rk < D - k0
        dy = tl.load(dy_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w2t = tl.load(w2t_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        acc_dh = _mma(acc_dh, dy, w2t, PRECISION, UPCAST)
        dy_ptrs += BLOCK_K * stride_dyd
        w2t_ptrs += BLOCK_K * stride_w2d
    h_offs = _tile_offsets(row0, pid_n * BLOCK_N, rm, rn, stride_hm, stride_hf)
    mask = row_valid[:, None] & n_valid[None, :]
    gate = tl.load(g_ptr + h_offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(u_ptr + h_offs, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(gate)
    silu = gate * sig
    _store(dg_ptr + h_offs, acc_dh * up * (sig * (1.0 + gate * (1.0 - sig))), mask, UPCAST)
    _store(du_ptr + h_offs, acc_dh * silu, mask, UPCAST)
    _store(h_ptr + h_offs, silu * up, mask, UPCAST)


@triton.jit
def _routed_weight_grad(
    a_ptr, b1_ptr, b2_ptr, c1_ptr, c2_ptr, order_ptr, expert_offsets_ptr,
    M, N, TOP_K,
    stride_ar, stride_ac,
    stride_br, stride_bc,
    stride_ce, stride_cm, stride_cn,
    A_BY_TOKEN: tl.constexpr, B_BY_PAIR: tl.constexpr, DUAL: tl.constexpr, ROWS_FASTEST: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C1_e = A_e^T B1_e (and C2_e = A_e^T B2_e when DUAL) for expert e = program_id(2), a [M, N]
    tile; the K loop runs over the expert's sorted rows r (none: the tile is zeros). Row r of A is
    x[order[r] // k] when A_BY_TOKEN (else A[r]); row r of B is B[order[r]] when B_BY_PAIR."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, ROWS_FASTEST)
    expert = tl.program_id(2)
    start = tl.load(expert_offsets_ptr + expert)
    end = tl.load(expert_offsets_ptr + expert + 1)
    rm, rn, rk = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    m_valid = rm < M - pid_m * BLOCK_M
    n_valid = rn < N - pid_n * BLOCK_N
    # Tile origins in 64-bit scalars, offsets inside a tile 32-bit (as in expert_swiglu).
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    a_cols = a_ptr + row0 * stride_ac + rm * stride_ac  # [M] pointers: column m of A
    b_cols = col0 * stride_bc + rn * stride_bc
    acc1 = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc2 = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + rk
        r_valid = rows < end
        if A_BY_TOKEN or B_BY_PAIR:
            pairs = tl.load(order_ptr + rows, mask=r_valid, other=0)
        a_rows = pairs // TOP_K if A_BY_TOKEN else rows
        b_rows = pairs if B_BY_PAIR else rows
        # A^T tile [M, rows]: element (m, r) = A[a_rows[r], m].
        a_t = tl.load(
            a_cols[:, None] + a_rows.to(tl.int64)[None, :] * stride_ar,
            mask=m_valid[:, None] & r_valid[None, :],
            other=0.0,
        )
        b_offs = b_rows.to(tl.int64)[:, None] * stride_br + b_cols[None, :]
        b_mask = r_valid[:, None] & n_valid[None, :]
        acc1 = _mma(acc1, a_t, tl.load(b1_ptr + b_offs, mask=b_mask, other=0.0), PRECISION, UPCAST)
        if DUAL:
            acc2 = _mma(acc2, a_t, tl.load(b2_ptr + b_offs, mask=b_mask, other=0.0), PRECISION, UPCAST)
    c_offs = (expert.to(tl.int64) * stride_ce + row0 * stride_cm + col0 * stride_cn) + (
        rm[:, None] * stride_cm + rn[None, :] * stride_cn
    )
    c_mask = m_valid[:, None] & n_valid[None, :]
    _store(c1_ptr + c_offs, acc1, c_mask, UPCAST)
    if DUAL:
        _store(c2_ptr + c_offs, acc2, c_mask, UPCAST)


# ----------------------------------------------------------------------------------------------
# Launch plans
# ----------------------------------------------------------------------------------------------


def _plan(fn, name: str, dtype: torch.dtype, args: dict[str, Any], dims, grid_m=None, batch: int = 1) -> Launch:
    """The launch of ``fn`` with the table's config for ``name`` and the data's ``dtype`` (x's), blocks
    shrunk to ``dims`` = (M, N, K). Its row blocks number ``grid_m(BLOCK_M)``, by default the routed
    kernels': sum_e ceil(rows_e / BLOCK_M) <= ceil(P / BLOCK_M) + E; the grid runs column tile fastest
    (``tile_grid``)."""
    if grid_m is None:
        pairs, num_experts = args["order_ptr"].shape[0], args["expert_offsets_ptr"].shape[0] - 1
        grid_m = lambda block_m: triton.cdiv(pairs, block_m) + num_experts  # noqa: E731
    cfg = table_config(CONFIGS[name], dtype, dims)
    check_strides("routed_swiglu", args, cfg)
    grid = tile_grid(grid_m(cfg["BLOCK_M"]), cfg, dims[1], batch)
    return Launch(fn, name, grid, {**args, **meta_args(dtype, cfg)}, cfg["num_warps"], cfg["num_stages"])


def _plan_gate_up(x, w1, w3, routing, g, u, h) -> Launch:
    order, offsets, top_k = routing
    (pairs, hidden), (num_experts, dim, _) = h.shape, w1.shape
    assert w1.stride() == w3.stride(), "w1 and w3 strides must match"  # ensured by routed_swiglu()
    args = dict(
        x_ptr=x, w1_ptr=w1, w3_ptr=w3, g_ptr=g, u_ptr=u, h_ptr=h, order_ptr=order, expert_offsets_ptr=offsets,
        E=num_experts, D=dim, F=hidden, TOP_K=top_k,
        stride_xn=x.stride(0), stride_xd=x.stride(1),
        stride_we=w1.stride(0), stride_wd=w1.stride(1), stride_wf=w1.stride(2),
        stride_hm=h.stride(0), stride_hf=h.stride(1),
    )  # fmt: skip
    return _plan(_routed_gate_up, "gate_up", x.dtype, args, (pairs, hidden, dim))


def _plan_rows(name, a, a2, b, b2, out, routing) -> Launch:
    """C[order[i]] = A[i] B_e (+ A2[i] B2_e): B, B2 [E, K, N] weights by strides (transposed views
    welcome), in the data's dtype (A may be fp32 dG/dU)."""
    order, offsets, _ = routing
    (pairs, inner), (num_experts, _, cols) = a.shape, b.shape
    assert b.stride() == b2.stride() and a.stride() == a2.stride()
    args = dict(
        a_ptr=a, a2_ptr=a2, b_ptr=b, b2_ptr=b2, c_ptr=out, order_ptr=order, expert_offsets_ptr=offsets,
        E=num_experts, N=cols, K=inner,
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_be=b.stride(0), stride_bk=b.stride(1), stride_bn=b.stride(2),
        stride_cm=out.stride(0), stride_cn=out.stride(1),
        DUAL=a2 is not a,
    )  # fmt: skip
    return _plan(_routed_rows_matmul, name, b.dtype, args, (pairs, cols, inner))


def _plan_swiglu_grad(dy, w2, routing, g, u, dg, du, h) -> Launch:
    order, offsets, _ = routing
    (pairs, hidden), (num_experts, _, dim) = h.shape, w2.shape
    args = dict(
        dy_ptr=dy, w2_ptr=w2, g_ptr=g, u_ptr=u, dg_ptr=dg, du_ptr=du, h_ptr=h,
        order_ptr=order, expert_offsets_ptr=offsets,
        E=num_experts, D=dim, F=hidden,
        stride_dym=dy.stride(0), stride_dyd=dy.stride(1),
        stride_w2e=w2.stride(0), stride_w2f=w2.stride(1), stride_w2d=w2.stride(2),
        stride_hm=h.stride(0), stride_hf=h.stride(1),
    )  # fmt: skip
    return _plan(_routed_swiglu_grad, "swiglu_grad", dy.dtype, args, (pairs, hidden, dim))


def _plan_weight_grad(name, a, b1, b2, c1, c2, routing, a_by_token: bool, b_by_pair: bool) -> Launch:
    """C1_e = A_e^T B1_e (+ C2_e = A_e^T B2_e): A [rows, M] (x when a_by_token), B [rows, N], C [E, M, N]."""
    order, offsets, top_k = routing
    num_experts, rows, cols = c1.shape
    assert c1.stride() == c2.stride() and b1.stride() == b2.stride()
    args = dict(
        a_ptr=a, b1_ptr=b1, b2_ptr=b2, c1_ptr=c1, c2_ptr=c2, order_ptr=order, expert_offsets_ptr=offsets,
        M=rows, N=cols, TOP_K=top_k,
        stride_ar=a.stride(0), stride_ac=a.stride(1),
        stride_br=b1.stride(0), stride_bc=b1.stride(1),
        stride_ce=c1.stride(0), stride_cm=c1.stride(1), stride_cn=c1.stride(2),
        A_BY_TOKEN=a_by_token, B_BY_PAIR=b_by_pair, DUAL=c2 is not c1,
        ROWS_FASTEST=a_by_token,  # dW13: the dG|dU tiles (right) outweigh x's (left): share them
    )  # fmt: skip
    grid_m = lambda block_m: triton.cdiv(rows, block_m)  # noqa: E731
    return _plan(_routed_weight_grad, name, c1.dtype, args, (rows, cols, order.shape[0]), grid_m, num_experts)


# ----------------------------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------------------------


def _route(idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [N * k] int32: sorted position -> pair, expert_offsets [E + 1] int32), all on the device
    (a sort and a searchsorted: no host sync). Expert e's rows are order[offsets[e]:offsets[e + 1]]."""
    sorted_experts, order = torch.sort(idx.reshape(-1), stable=True)
    experts = torch.arange(num_experts + 1, device=idx.device, dtype=sorted_experts.dtype)
    return order.to(torch.int32), torch.searchsorted(sorted_experts, experts, out_int32=True)


def _forward_plans(x, w1, w3, w2, routing):
    """Buffers and launches of the forward: returns (y [N, k, D], g, u [P, F], plans)."""
    (pairs,), (_, dim, hidden), top_k = routing[0].shape, w1.shape, routing[2]
    g, u, h = (_empty((pairs, hidden), x.dtype, x.device) for _ in range(3))
    y = _empty((x.shape[0], top_k, dim), x.dtype, x.device)
    down = _plan_rows("down", h, h, w2, w2, y.view(pairs, dim), routing)
    return y, g, u, [_plan_gate_up(x, w1, w3, routing, g, u, h), down]


def _backward_plans(dy, x, w1, w3, w2, routing, g, u, needs: tuple[bool, bool, bool]):
    """Buffers and launches of the backward from dY [P, D]: returns ((dX_pair [P, D] fp32, dw13
    [E, D, 2F], dw2), plans); the outputs of gradients not in ``needs`` (dx, dw13, dw2) are 0-element.
    dG, dU are fp32 for fp16 data (``grad_dtype``: a loss-scaled dG may exceed fp16's range)."""
    pairs, hidden = g.shape
    dg, du = (_empty((pairs, hidden), grad_dtype(x.dtype), x.device) for _ in range(2))
    h = _empty((pairs, hidden), x.dtype, x.device)
    plans = [_plan_swiglu_grad(dy, w2, routing, g, u, dg, du, h)]
    dx_pairs, dw13, dw2 = (x.new_empty(0) for _ in range(3))  # distinct: custom-op outputs may not alias
    if needs[0]:
        # fp32: a token's k slot gradients are summed afterwards, rounded once to x's dtype.
        dx_pairs = _empty((pairs, x.shape[1]), torch.float32, x.device)
        plans.append(_plan_rows("dx", dg, du, w1.transpose(1, 2), w3.transpose(1, 2), dx_pairs, routing))
    if needs[1]:
        # dW1, dW3 written by strides into the two halves of one gradient of the packed w13.
        dw13 = _empty((w1.shape[0], w1.shape[1], 2 * hidden), w1.dtype, x.device)
        dw1, dw3 = _gate_up_views(dw13)
        plans.append(_plan_weight_grad("dw13", x, dg, du, dw1, dw3, routing, a_by_token=True, b_by_pair=False))
    if needs[2]:
        dw2 = _empty(tuple(w2.shape), w2.dtype, x.device)
        plans.append(_plan_weight_grad("dw2", h, dy, dy, dw2, dw2, routing, a_by_token=False, b_by_pair=True))
    return (dx_pairs, dw13, dw2), plans


@torch.library.custom_op("moc_kernels::routed_swiglu_fwd", mutates_args=())
def _routed_swiglu_fwd(
    x: Tensor, w13: Tensor, w2: Tensor, order: Tensor, expert_offsets: Tensor, top_k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(Y [N, k, D], G [P, F], U [P, F]) with G, U in expert-sorted row order (saved for backward)."""
    y, g, u, plans = _forward_plans(x, *_gate_up_views(w13), w2, (order, expert_offsets, top_k))
    with on_device(x):
        for plan in plans:
            plan.run()
    return y, g, u


@_routed_swiglu_fwd.register_fake
def _(x, w13, w2, order, expert_offsets, top_k):
    pairs, hidden = order.shape[0], w2.shape[1]
    return x.new_empty((x.shape[0], top_k, w13.shape[1])), x.new_empty((pairs, hidden)), x.new_empty((pairs, hidden))


@torch.library.custom_op("moc_kernels::routed_swiglu_bwd", mutates_args=())
def _routed_swiglu_bwd(
    dy: Tensor, x: Tensor, w13: Tensor, w2: Tensor, order: Tensor, expert_offsets: Tensor,
    g: Tensor, u: Tensor, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx [N, D], dw13 [E, D, 2F], dw2 [E, F, D]) from dY [N, k, D]; a gradient not in ``needs``
    (dx, dw13, dw2) comes back 0-element and is not computed."""
    n_tokens, top_k, dim = dy.shape
    routing = (order, expert_offsets, top_k)
    w1, w3 = _gate_up_views(w13)
    (dx_pairs, dw13, dw2), plans = _backward_plans(dy.reshape(-1, dim), x, w1, w3, w2, routing, g, u, tuple(needs))
    with on_device(x):
        for plan in plans:
            plan.run()
    dx = dx_pairs.view(n_tokens, top_k, dim).sum(1).to(x.dtype) if needs[0] else dx_pairs
    return dx, dw13, dw2


@_routed_swiglu_bwd.register_fake
def _(dy, x, w13, w2, order, expert_offsets, g, u, needs):
    return tuple(t.new_empty(t.shape if wanted else 0) for t, wanted in zip((x, w13, w2), needs))


def _setup_context(ctx, inputs, output) -> None:
    x, w13, w2, order, expert_offsets, _ = inputs
    _, g, u = output
    ctx.mark_non_differentiable(g, u)
    ctx.set_materialize_grads(False)  # no zero-filled [P, F] gradients for G and U, which nobody reads
    ctx.save_for_backward(x, w13, w2, order, expert_offsets, g, u)


def _backward(ctx, dy, _dg, _du):
    if dy is None:
        return (None,) * 6
    x, w13, w2, order, expert_offsets, g, u = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])  # x, w13, w2
    grads = _routed_swiglu_bwd(dy, x, w13, w2, order, expert_offsets, g, u, needs)
    return (*(grad if wanted else None for grad, wanted in zip(grads, needs)), None, None, None)


_routed_swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


# torch.utils.flop_counter sees a custom op only through a formula: 2 * rows * inner * cols per product
# (tile padding excluded), as the reference's per-expert GEMMs count (both tested against k/E x expert_swiglu).
@register_flop_formula(torch.ops.moc_kernels.routed_swiglu_fwd)
def _forward_flops(x_shape, w13_shape, w2_shape, order_shape, offsets_shape, top_k, **kwargs) -> int:
    dim, hidden = w13_shape[1], w2_shape[1]
    return 3 * 2 * order_shape[0] * dim * hidden  # gate, up, down


@register_flop_formula(torch.ops.moc_kernels.routed_swiglu_bwd)
def _backward_flops(dy_shape, x_shape, w13_shape, w2_shape, order_shape, *saved_and_needs, **kwargs) -> int:
    dim, hidden = w13_shape[1], w2_shape[1]
    need_dx, need_dw13, need_dw2 = saved_and_needs[-1]
    gemms = 1 + 2 * need_dx + 2 * need_dw13 + need_dw2  # dH, dX (two), dW1 + dW3, dW2
    return gemms * 2 * order_shape[0] * dim * hidden


def routed_swiglu(x: Tensor, idx: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor) -> Tensor:
    """``Y[n, j] = (silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e]`` with ``e = idx[n, j]``.

    x: [N, D]; idx: [N, k] int64 in [0, E) (repeats within a row allowed); w1, w3: [E, D, F], or w3
    None and w1 the packed w13 [E, D, 2F] (w1 = w13[..., :F], w3 = w13[..., F:]: one tensor, one
    gradient, the layout the model stores); w2: [E, F, D]; fp32|bf16|fp16. Separate w1, w3 are
    concatenated into a w13 (a copy of the weights). Weights of another dtype are cast to x's
    (differentiably, like autocast). Returns Y: [N, k, D] in x's dtype, differentiable in x and the
    weights (saved for backward: G, U [N * k, F] in x's dtype, the routing)."""
    w13 = w1 if w3 is None else torch.cat([w1, w3], dim=-1)
    order, expert_offsets = _route(idx, w13.shape[0])
    y, _, _ = _routed_swiglu_fwd(x, w13.to(x.dtype), w2.to(x.dtype), order, expert_offsets, idx.shape[1])
    return y


# ----------------------------------------------------------------------------------------------
# Compile specs for `python -m moc_kernels.report`
# ----------------------------------------------------------------------------------------------


def compile_specs() -> list[KernelSpec]:
    """One KernelSpec per kernel x shipped config (bf16 and fp32) at ``SHIPPED_SHAPE``, planned by the
    launchers' own code on meta tensors (w1/w3 views of one packed [E, D, 2F], as the model stores
    them), so the report compiles exactly what would be launched."""
    specs = []
    n_tokens, dim, num_experts, hidden, top_k = (SHIPPED_SHAPE[key] for key in ("N", "D", "E", "F", "k"))
    pairs, int32 = n_tokens * top_k, {"dtype": torch.int32, "device": "meta"}
    # fp16: its forward compiles bf16's configs with another 16-bit type; its backward differs (fp32
    # dG/dU, ``grad_dtype``), so only the backward is listed for it.
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        meta: dict[str, Any] = {"dtype": dtype, "device": "meta"}
        x = torch.empty(n_tokens, dim, **meta)
        packed = torch.empty(num_experts, dim, 2 * hidden, **meta)
        w1, w3 = packed[..., :hidden], packed[..., hidden:]
        w2 = torch.empty(num_experts, hidden, dim, **meta)
        routing = (torch.empty(pairs, **int32), torch.empty(num_experts + 1, **int32), top_k)
        _, g, u, forward = _forward_plans(x, w1, w3, w2, routing)
        _, backward = _backward_plans(torch.empty(pairs, dim, **meta), x, w1, w3, w2, routing, g, u, (True,) * 3)
        for plan in backward if dtype == torch.float16 else [*forward, *backward]:
            specs.append(plan_spec(plan, dtype))
    return specs
