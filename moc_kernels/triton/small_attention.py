"""Triton ``small_attention``: softmax attention over a short axis (L <= 64) per token and head.

q, k, v: [N, L, H, dh] -> out [N, L, H, dh] and the entropy [N, H, L] fp32 of every softmax row,
both differentiable (the MoC diversity loss trains through the entropy).

Layout of the work: one program per (tile of tokens, head). A tile holds ``BLOCK_M`` rows; a row
is one (token, position) pair, and the L positions of a token are padded to ``L_PAD`` (the next
power of two), so a tile packs ``BLOCK_M // L_PAD`` whole tokens. The scores of a tile are one
``[BLOCK_M, BLOCK_M]`` product ``Q K^T`` with a block-diagonal mask (a row only sees the positions
of its own token), so every product is a ``tl.dot`` of >= 16 (bf16: 64) rows.

Why pack tokens into block-diagonal tiles instead of broadcast-and-reduce for L < 16: the op is
bound by HBM bytes, not FLOPs, so the wasted multiply-adds of the masked blocks are affordable when
they run on tensor cores, and the compile report shows they do (mma on sm_80, wgmma on sm_90 for
every bf16 config, 0 spills). A broadcast-and-reduce ``[tokens, L, L, dh]`` product would run on the
FP32 pipes, hold L times more live values per thread, and need a separate code path per L range; it
was not built, so this is an argument, not a measurement. One kernel serves every L from 1 to 64.

Saved for backward: q, k, v (inputs) and the log-sum-exp [N, H, L] fp32 of each row (4 bytes per
row instead of the L x L softmax); the backward recomputes the scores, the softmax and the entropy.
The log-sum-exp is kept in units of the raw scores q.k (lse of the scaled scores divided by the
scale), because both kernels subtract before they scale: (s - max) * scale and (s - lse) * scale,
never s * scale - max, which a GPU compiler contracts into one fma whose result at the maximal
entry is the rounding error of s * scale instead of 0 (``tests/test_kernels_compiled_code.py``
reads the PTX for it; the interpreter never contracts).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moc_kernels import backend
from moc_kernels.triton.compile_spec import KernelSpec, launch_spec
from moc_kernels.triton.utils import on_device

# Launch configurations: the one place they live (launchers and compile_specs() read this table).
# Keyed by direction, dtype class, then the largest L_PAD (next power of two of L) a tier serves.
# BLOCK_M is the number of rows (token x position) per program, raised to L_PAD for long L.
# bf16/fp16: 64 rows, so that sm_90 lowers the products to wgmma (needs >= 64 rows, 4 warps per
# warpgroup); 8 warps (with 4 the forward spilled 8 B on sm_80 under Triton 3.9 once the maximum was
# subtracted before scaling, the backward ~250 B); the backward needs at least 8 rows per token
# (MIN_L_PAD): with 2 or 4 rows per token ptxas spills 40-64 B on sm_80 (checked), so L <= 8 packs
# 8 tokens per tile (still HBM-bound: ~180 FLOP per byte moved vs ~300 at the H100 ridge).
# fp32 runs exact IEEE products on the FMA pipes, where the masked blocks are real work, so it
# packs only 16 rows.
# The feature axis (dh) is one tile up to BLOCK_D and chunks of CHUNK_D beyond (see the forward
# kernel); fp32 beyond L = 16 uses one token per tile (32 or 64 rows) and narrow chunks, because its
# FMA products of 64x64x64 fp32 tiles spilled 400-6,900 B. bf16 chunks dh > 64 by 32 (forward) and
# 16 (backward): with 64, the forward spilled 8 B on sm_80 (L = 8, dh = 256, Triton 3.9) and the
# backward up to 900 B; with 32 the backward still spilled 8 B on sm_80 at L = 64, dh = 256.
# Checked with `python -m moc_kernels.report --ops small_attention` under Triton 3.6 and 3.9: every
# shipped shape (SHIPPED_SHAPES, dh up to 256, L up to 64) compiles with 0 spills and <= 99 KiB.
CONFIGS: dict[str, dict[str, dict[int, dict[str, int]]]] = {
    "fwd": {
        "bf16": {64: {"BLOCK_M": 64, "BLOCK_D": 64, "CHUNK_D": 32, "num_warps": 8, "num_stages": 1}},
        "fp32": {
            16: {"BLOCK_M": 16, "BLOCK_D": 64, "CHUNK_D": 64, "num_warps": 4, "num_stages": 1},
            32: {"BLOCK_M": 32, "BLOCK_D": 32, "CHUNK_D": 32, "num_warps": 4, "num_stages": 1},
            # 16-wide feature chunks: 32 spilled 8 B on sm_90 at dh 128/256 in the launch build.
            64: {"BLOCK_M": 64, "BLOCK_D": 16, "CHUNK_D": 16, "num_warps": 8, "num_stages": 1},
        },
    },
    "bwd": {
        "bf16": {64: {"BLOCK_M": 64, "MIN_L_PAD": 8, "BLOCK_D": 64, "CHUNK_D": 16, "num_warps": 8, "num_stages": 1}},
        "fp32": {
            # dh > 64 in 32-wide chunks: 64 spilled 8 B on sm_80 at L8-dh128 in the launch build.
            16: {"BLOCK_M": 16, "BLOCK_D": 64, "CHUNK_D": 32, "num_warps": 4, "num_stages": 1},
            32: {"BLOCK_M": 32, "BLOCK_D": 32, "CHUNK_D": 32, "num_warps": 8, "num_stages": 1},
            64: {"BLOCK_M": 64, "BLOCK_D": 16, "CHUNK_D": 16, "num_warps": 8, "num_stages": 1},
        },
    },
}
# (dtype class, L, dh) whose configs the report compiles: collab (L = k = 2) and router (L = E = 8)
# at the GPT-2-small head dim 64, every L tier up to the longest (64), and the wide heads of larger
# models (dh = 128: Llama-7B-like, 256) at L = 8 and 64.
SHIPPED_SHAPES = tuple(
    [
        (dtype_key, length, 64)
        for dtype_key in ("bf16", "fp32")
        for length in (2, 8, 32, 64)
        if (dtype_key, length) != ("bf16", 32)
    ]
    + [(dtype_key, length, head_dim) for dtype_key in ("bf16", "fp32") for length in (8, 64) for head_dim in (128, 256)]
)
MAX_L = 64

_DTYPE_KEY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "bf16"}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an output the kernel overwrites entirely (tests patch this to pre-fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """a @ b with fp32 accumulation. Under Triton 3.9's interpreter, bf16 operands are multiplied as their
    raw uint16 storage, so there both go to fp32 first (exact: bf16 -> fp32 is lossless)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _dot_acc(acc, a, b, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b in fp32 (``_dot`` with an accumulator)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_rows(ptr, token, position, head, d, stride_n, stride_l, stride_h, stride_d, mask):
    """The [BLOCK_M, BLOCK_D] tile of a [N, L, H, dh] tensor at the tile's rows and feature columns d."""
    offsets = token[:, None] * stride_n + position[:, None] * stride_l + head * stride_h + d[None, :] * stride_d
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even like the GPU's cvt.rn. Triton 3.9's interpreter truncates
    fp32 -> bf16, which biases every value by half an ulp; there x is rounded to bf16 precision first."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile_rows(pid_m, N, L, BLOCK_M: tl.constexpr, L_PAD: tl.constexpr):
    """Token index (int64), position, and validity of each of the BLOCK_M rows of tile pid_m."""
    rows = tl.arange(0, BLOCK_M)
    # int64 before multiplying by strides: N * L * H * dh can exceed 2^31.
    token = pid_m.to(tl.int64) * (BLOCK_M // L_PAD) + rows // L_PAD
    position = rows % L_PAD
    row_valid = (token < N) & (position < L)
    # Block-diagonal mask: row r sees column c iff both belong to the same token and c is a real
    # position. Every row keeps >= 1 visible column (L >= 1), so no row's softmax is 0/0.
    col_visible = ((rows[:, None] // L_PAD) == (rows[None, :] // L_PAD)) & (position[None, :] < L)
    return token, position, row_valid, col_visible


@triton.jit
def _small_attention_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    entropy_ptr,
    N,
    L,
    DH,
    stride_qn,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kn,
    stride_kl,
    stride_kh,
    stride_kd,
    stride_vn,
    stride_vl,
    stride_vh,
    stride_vd,
    stride_on,
    stride_ol,
    stride_oh,
    stride_od,
    stride_sn,
    stride_sh,
    stride_sl,
    scale,
    BLOCK_M: tl.constexpr,
    L_PAD: tl.constexpr,
    DH_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    token, position, row_valid, col_visible = _tile_rows(pid_m, N, L, BLOCK_M, L_PAD)
    cols = tl.arange(0, BLOCK_D)

    # The feature axis in BLOCK_D chunks: only [BLOCK_M, BLOCK_D] tiles of q, k, v are live at a time,
    # so dh = 128 or 256 neither spills nor overflows shared memory. The bounds are constexpr: for
    # dh <= BLOCK_D the one-trip loop folds away (a loop to the runtime DH made the bf16 backward spill
    # at dh = 64), and several chunks stay a loop (unrolled, their loads were hoisted and spilled).
    raw = tl.full((BLOCK_M, BLOCK_M), 0.0, tl.float32)  # raw = q.k, unscaled
    for d0 in range(0, DH_PAD, BLOCK_D):
        d = d0 + cols
        mask = row_valid[:, None] & (d < DH)[None, :]
        q = _load_rows(q_ptr, token, position, head, d, stride_qn, stride_ql, stride_qh, stride_qd, mask)
        k = _load_rows(k_ptr, token, position, head, d, stride_kn, stride_kl, stride_kh, stride_kd, mask)
        raw = _dot_acc(raw, q, tl.trans(k), PRECISION, INTERPRET)

    # Single pass: the whole row (<= 64 keys) is in the tile, so max, sum and output need no rescaling.
    # The maximum is taken on the raw scores and subtracted before scaling (module docstring).
    raw = tl.where(col_visible, raw, float("-inf"))
    row_max = tl.max(raw, axis=1)
    shifted = (raw - row_max[:, None]) * scale  # exactly 0 at the maximum; hidden columns -inf
    unnorm = tl.exp(shifted)
    row_sum = tl.sum(unnorm, axis=1)
    probs = unnorm / row_sum[:, None]
    log_row_sum = tl.log(row_sum)
    # Entropy as -sum p log p with log p = shifted - log sum (not lse - sum p s, which cancels when H ~ 0).
    log_probs = tl.where(col_visible, shifted - log_row_sum[:, None], 0.0)
    entropy = -tl.sum(probs * log_probs, axis=1)
    lse = row_max + log_row_sum / scale  # in raw-score units, for the backward's (raw - lse) * scale

    probs = _cast(probs, v_ptr.dtype.element_ty, INTERPRET)
    for d0 in range(0, DH_PAD, BLOCK_D):
        d = d0 + cols
        mask = row_valid[:, None] & (d < DH)[None, :]
        v = _load_rows(v_ptr, token, position, head, d, stride_vn, stride_vl, stride_vh, stride_vd, mask)
        out = _cast(_dot(probs, v, PRECISION, INTERPRET), out_ptr.dtype.element_ty, INTERPRET)
        out_offsets = token[:, None] * stride_on + position[:, None] * stride_ol + head * stride_oh
        tl.store(out_ptr + out_offsets + d[None, :] * stride_od, out, mask=mask)
    row_offset = token * stride_sn + head * stride_sh + position * stride_sl
    tl.store(lse_ptr + row_offset, lse, mask=row_valid)
    tl.store(entropy_ptr + row_offset, entropy, mask=row_valid)


# Backward. With S = scale * Q K^T, P = softmax(S) (rows), O = P V, the entropy of row i
# H_i = -sum_j P_ij log P_ij, and upstream gradients dO (of O) and g (of H):
#   dV = P^T dO
#   dP_ij = (dO V^T)_ij + g_i * dH_i/dP_ij = A_ij - g_i (log P_ij + 1),          A = dO V^T
#   softmax: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)
#   The "- g_i" part of dP is constant along the row and cancels in the softmax backward, so with
#   C_ij = A_ij - g_i log P_ij:
#     dS_ij = P_ij (C_ij - sum_k P_ik C_ik)
#           = P_ij (A_ij - D_i) - g_i P_ij (log P_ij + H_i),                      D_i = sum_k P_ik A_ik
#   i.e. d(H_i)/d(S_ij) = -P_ij (log P_ij + H_i), weighted by g_i, added to the output's term;
#   the kernel forms C and uses one row sum for both.
#   dQ = scale * dS K,  dK = scale * dS^T Q.
# D_i comes from A and P inside the kernel (not rowsum(dO * O)) so O need not be saved, and
# P = exp(S - lse) is recomputed from the saved log-sum-exp. The block-diagonal mask makes P (hence
# dS) zero across tokens, so the tile-wide products only sum within each token.
@triton.jit
def _small_attention_bwd(
    q_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    d_out_ptr,
    d_entropy_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    N,
    L,
    DH,
    stride_qn,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kn,
    stride_kl,
    stride_kh,
    stride_kd,
    stride_vn,
    stride_vl,
    stride_vh,
    stride_vd,
    stride_don,
    stride_dol,
    stride_doh,
    stride_dod,
    stride_sn,
    stride_sh,
    stride_sl,
    stride_dsn,
    stride_dsh,
    stride_dsl,
    stride_gn,
    stride_gl,
    stride_gh,
    stride_gd,
    scale,
    BLOCK_M: tl.constexpr,
    L_PAD: tl.constexpr,
    DH_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    HAS_D_ENTROPY: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    token, position, row_valid, col_visible = _tile_rows(pid_m, N, L, BLOCK_M, L_PAD)
    cols = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + token * stride_sn + head * stride_sh + position * stride_sl, mask=row_valid, other=0.0)

    # Pass 1 over the feature chunks (the forward says why chunks): the scores and A = dO V^T.
    raw = tl.full((BLOCK_M, BLOCK_M), 0.0, tl.float32)
    d_probs = tl.full((BLOCK_M, BLOCK_M), 0.0, tl.float32)
    for d0 in range(0, DH_PAD, BLOCK_D):
        d = d0 + cols
        mask = row_valid[:, None] & (d < DH)[None, :]
        q = _load_rows(q_ptr, token, position, head, d, stride_qn, stride_ql, stride_qh, stride_qd, mask)
        k = _load_rows(k_ptr, token, position, head, d, stride_kn, stride_kl, stride_kh, stride_kd, mask)
        v = _load_rows(v_ptr, token, position, head, d, stride_vn, stride_vl, stride_vh, stride_vd, mask)
        d_out = _load_rows(d_out_ptr, token, position, head, d, stride_don, stride_dol, stride_doh, stride_dod, mask)
        raw = _dot_acc(raw, q, tl.trans(k), PRECISION, INTERPRET)
        d_probs = _dot_acc(d_probs, d_out, tl.trans(v), PRECISION, INTERPRET)

    # Padded rows get P = 0 too, so they add nothing to dK and dV; hidden entries get log P = 0 (finite).
    # lse is in raw-score units: subtract, then scale (at the maximum raw - lse <= 0 under any fma).
    visible = col_visible & row_valid[:, None]
    log_probs = tl.where(visible, (raw - lse[:, None]) * scale, 0.0)
    probs = tl.where(visible, tl.exp(log_probs), 0.0)
    if HAS_D_ENTROPY:
        d_entropy = tl.load(
            d_entropy_ptr + token * stride_dsn + head * stride_dsh + position * stride_dsl,
            mask=row_valid,
            other=0.0,
        ).to(tl.float32)
        d_probs -= d_entropy[:, None] * log_probs  # C = A - g log P
    delta = tl.sum(probs * d_probs, axis=1)  # sum_k P_ik C_ik
    d_scores = _cast(probs * (d_probs - delta[:, None]) * scale, q_ptr.dtype.element_ty, INTERPRET)
    probs = _cast(probs, q_ptr.dtype.element_ty, INTERPRET)

    # Pass 2: dV = P^T dO, dQ = dS K, dK = dS^T Q per chunk (q, k, dO are read again, from L2: this
    # program read them a moment ago). The gradients are contiguous like q: one set of strides.
    for d0 in range(0, DH_PAD, BLOCK_D):
        d = d0 + cols
        mask = row_valid[:, None] & (d < DH)[None, :]
        q = _load_rows(q_ptr, token, position, head, d, stride_qn, stride_ql, stride_qh, stride_qd, mask)
        k = _load_rows(k_ptr, token, position, head, d, stride_kn, stride_kl, stride_kh, stride_kd, mask)
        d_out = _load_rows(d_out_ptr, token, position, head, d, stride_don, stride_dol, stride_doh, stride_dod, mask)
        dv = _dot(tl.trans(probs), d_out, PRECISION, INTERPRET)
        dq = _dot(d_scores, k, PRECISION, INTERPRET)
        dk = _dot(tl.trans(d_scores), q, PRECISION, INTERPRET)
        grad_offset = token[:, None] * stride_gn + position[:, None] * stride_gl + head * stride_gh
        grad_offset += d[None, :] * stride_gd
        tl.store(dq_ptr + grad_offset, _cast(dq, dq_ptr.dtype.element_ty, INTERPRET), mask=mask)
        tl.store(dk_ptr + grad_offset, _cast(dk, dk_ptr.dtype.element_ty, INTERPRET), mask=mask)
        tl.store(dv_ptr + grad_offset, _cast(dv, dv_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _launch_params(q: torch.Tensor, direction: str) -> tuple[dict[str, int], int, int, int, int, str]:
    """(config, BLOCK_M, L_PAD, DH_PAD, BLOCK_D, dot precision) for q [N, L, H, dh]."""
    _, length, _, head_dim = q.shape
    if not 1 <= length <= MAX_L:
        raise ValueError(f"small_attention: L={length} is not supported by the Triton kernel; expected 1 <= L <= 64")
    if q.dtype not in _DTYPE_KEY:
        raise ValueError(f"small_attention: unsupported dtype {q.dtype}; expected float32, bfloat16 or float16")
    return _shape_params(direction, _DTYPE_KEY[q.dtype], length, head_dim)


def _shape_params(
    direction: str, dtype_key: str, length: int, head_dim: int
) -> tuple[dict[str, int], int, int, int, int, str]:
    l_pad = triton.next_power_of_2(length)
    tiers = CONFIGS[direction][dtype_key]
    config = tiers[min(t for t in tiers if t >= l_pad)]
    l_pad = max(l_pad, config.get("MIN_L_PAD", 1))
    # dh rounded up to a power of two (tl.dot needs >= 16): one tile up to the config's BLOCK_D, else
    # chunks of CHUNK_D.
    dh_pad = max(16, triton.next_power_of_2(head_dim))
    block_d = dh_pad if dh_pad <= config["BLOCK_D"] else config["CHUNK_D"]
    block_m = max(config["BLOCK_M"], l_pad)
    precision = "ieee" if dtype_key == "fp32" else "tf32"  # ignored for bf16/fp16 operands
    return config, block_m, l_pad, dh_pad, block_d, precision


def _fwd_launch(q, k, v, out, entropy, lse) -> tuple[tuple[int, int], dict, dict[str, int]]:
    """(grid, every argument by name, config) of the forward kernel's launch on q, k, v [N, L, H, dh]."""
    num_tokens, length, heads, head_dim = q.shape
    config, block_m, l_pad, dh_pad, block_d, precision = _launch_params(q, "fwd")
    values = [q, k, v, out, lse, entropy, num_tokens, length, head_dim]
    values += [*q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), 1.0 / math.sqrt(head_dim)]
    args = dict(zip(_small_attention_fwd.arg_names, values))
    args.update(BLOCK_M=block_m, L_PAD=l_pad, DH_PAD=dh_pad, BLOCK_D=block_d, PRECISION=precision)
    args.update(INTERPRET=backend.interpreting())
    return (triton.cdiv(num_tokens, block_m // l_pad), heads), args, config


def _bwd_launch(q, k, v, lse, d_out, d_entropy, dq, dk, dv) -> tuple[tuple[int, int], dict, dict[str, int]]:
    """(grid, every argument by name, config) of the backward kernel's launch (d_entropy None: unused)."""
    num_tokens, length, heads, head_dim = q.shape
    config, block_m, l_pad, dh_pad, block_d, precision = _launch_params(q, "bwd")
    has_d_entropy = d_entropy is not None
    d_entropy_arg = d_entropy if has_d_entropy else lse  # a valid pointer the kernel never reads
    values = [q, k, v, lse, d_out, d_entropy_arg, dq, dk, dv, num_tokens, length, head_dim]
    values += [*q.stride(), *k.stride(), *v.stride(), *d_out.stride(), *lse.stride(), *d_entropy_arg.stride()]
    values += [*dq.stride(), 1.0 / math.sqrt(head_dim)]
    args = dict(zip(_small_attention_bwd.arg_names, values))
    args.update(BLOCK_M=block_m, L_PAD=l_pad, DH_PAD=dh_pad, BLOCK_D=block_d, PRECISION=precision)
    args.update(INTERPRET=backend.interpreting(), HAS_D_ENTROPY=has_d_entropy)
    return (triton.cdiv(num_tokens, block_m // l_pad), heads), args, config


@torch.library.custom_op("moc_kernels::small_attention_fwd", mutates_args=())
def small_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: q, k, v [N, L, H, dh] (any strides) -> out [N, L, H, dh] (q.dtype), entropy, lse [N, H, L] fp32.

    lse is the log-sum-exp of each row in units of the raw scores q.k (that of the scaled scores / scale).
    """
    num_tokens, length, heads, head_dim = q.shape
    out = _empty((num_tokens, length, heads, head_dim), q.dtype, q.device)
    entropy = _empty((num_tokens, heads, length), torch.float32, q.device)
    lse = _empty((num_tokens, heads, length), torch.float32, q.device)
    if q.numel() == 0:
        return out, entropy, lse
    grid, args, config = _fwd_launch(q, k, v, out, entropy, lse)
    with on_device(q):
        _small_attention_fwd[grid](**args, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out, entropy, lse


@small_attention_fwd.register_fake
def _(q, k, v):
    num_tokens, length, heads, _ = q.shape
    rows = q.new_empty((num_tokens, heads, length), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), rows, torch.empty_like(rows)


@torch.library.custom_op("moc_kernels::small_attention_bwd", mutates_args=())
def small_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    d_entropy: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: gradients of q, k, v [N, L, H, dh] (q.dtype, contiguous) from d_out [N, L, H, dh]
    and d_entropy [N, H, L] (None: the entropy was not used)."""
    num_tokens, length, heads, head_dim = q.shape
    dq, dk, dv = (_empty((num_tokens, length, heads, head_dim), q.dtype, q.device) for _ in range(3))
    if q.numel() == 0:
        return dq, dk, dv
    d_out = d_out.to(q.dtype)  # autograd hands the output's dtype; this only guards odd callers
    grid, args, config = _bwd_launch(q, k, v, lse, d_out, d_entropy, dq, dk, dv)
    with on_device(q):
        _small_attention_bwd[grid](**args, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return dq, dk, dv


@small_attention_bwd.register_fake
def _(q, k, v, lse, d_out, d_entropy):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    _, _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, lse)
    # Unused outputs (lse always, the entropy when the caller drops it) reach the backward as None,
    # not as zero-filled [N, H, L] buffers that autograd would otherwise allocate and the kernel read.
    ctx.set_materialize_grads(False)


def _backward(ctx, d_out, d_entropy, _d_lse):
    q, k, v, lse = ctx.saved_tensors
    if d_out is None and d_entropy is None:
        return None, None, None
    if d_out is None:  # only the entropy is used (no caller does this today): its zeros have q's shape
        d_out = torch.zeros_like(q)
    return small_attention_bwd(q, k, v, lse, d_out, d_entropy)


small_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def small_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each of the L vectors of a token over all L of them, per head.

    q, k, v: [N, L, H, dh] fp32|bf16|fp16, any strides, 1 <= L <= 64, any dh; scale 1/sqrt(dh);
    fp32 accumulation. Returns out [N, L, H, dh] in q's dtype and, with ``return_entropy``, the
    entropy [N, H, L] fp32 (nats) of every softmax row; both differentiable. Saves q, k, v and the
    per-row log-sum-exp [N, H, L] fp32 for backward.
    """
    out, entropy, _ = small_attention_fwd(q, k, v)
    return (out, entropy) if return_entropy else out


def compile_specs() -> list[KernelSpec]:
    """One KernelSpec per kernel x shipped (dtype, L, dh) of SHIPPED_SHAPES, specialised as the JIT
    specialises the launchers' own arguments (``_fwd_launch``, ``_bwd_launch``) at N = 16384 tokens of
    contiguous q, k, v [N, L, H, dh] with H dh = 768 (GPT-2 small), the entropy's gradient in use."""
    specs = []
    for dtype_key, length, head_dim in SHIPPED_SHAPES:
        dtype = next(dt for dt, key in _DTYPE_KEY.items() if key == dtype_key)
        shape = (16384, length, 768 // head_dim, head_dim)
        q, k, v, out, d_out, dq, dk, dv = (torch.empty(shape, dtype=dtype, device="meta") for _ in range(8))
        rows = torch.empty(shape[0], shape[2], length, device="meta")  # [N, H, L] fp32: lse, entropy
        for direction, kernel in (("fwd", _small_attention_fwd), ("bwd", _small_attention_bwd)):
            if direction == "fwd":
                _, args, config = _fwd_launch(q, k, v, out, rows, rows)
            else:
                _, args, config = _bwd_launch(q, k, v, rows, d_out, rows, dq, dk, dv)
            warps, stages = config["num_warps"], config["num_stages"]
            label = f"L{length}-dh{head_dim}-BM{args['BLOCK_M']}-w{warps}-s{stages}-{dtype_key}"
            args["INTERPRET"] = False  # the report compiles for GPUs, never the interpreter
            spec = launch_spec(
                kernel, args, config=label, num_warps=warps, num_stages=stages, matmul=dtype_key != "fp32"
            )
            specs.append(spec)
    # The report's order: every forward config, then every backward one.
    return [spec for name in ("_small_attention_fwd", "_small_attention_bwd") for spec in specs if spec.kernel == name]
