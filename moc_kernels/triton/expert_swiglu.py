"""Triton ``expert_swiglu``: every expert's SwiGLU on every token, forward and backward.

x [N, D], w13 [E, D, 2F] (gate w1 = w13[..., :F] and up w3 = w13[..., F:], read as strided views of
the one tensor), w2 [E, F, D] -> Y [N, E, D]. Separate w1, w3 are concatenated into such a w13 first.

Forward, two grouped GEMMs (a grid axis per expert e):
  1. ``_expert_dual_matmul`` (epilogue "swiglu"): G_e = x W1_e and U_e = x W3_e accumulated in the
     same K loop, so each x tile is loaded once for both; ``H = silu(G) * U`` is formed in registers
     and only H is written (plus G, U when they are saved for backward).
  2. ``_expert_matmul``: Y[:, e] = H_e W2_e, stored straight into token-major [N, E, D] by strides.

Backward (dY [N, E, D]):
  3. ``_swiglu_grad``: dH_e = dY_e W2_e^T with silu' fused in its epilogue -> dG, dU, and H again
     (for dW2). In recompute mode the same K loop over D also accumulates G = x W1_e, U = x W3_e.
  4. ``_dx``: dx = sum_e dG_e W1_e^T + dU_e W3_e^T, one program per output tile, no atomics.
  5. ``_expert_dual_matmul`` (epilogue "plain"): dW1_e = x^T dG_e and dW3_e = x^T dU_e share x^T;
     they are written by strides into the two halves of one [E, D, 2F] gradient of w13 (no
     slice_backward, no zero-filled [E, D, 2F] per half, no add).
  6. ``_expert_matmul``: dW2_e = H_e^T dY_e.
Steps 4-6 run only for the inputs whose gradient autograd asks for (frozen weights skip their GEMMs).
Autograd hands None, not zeros, for the unused G, U outputs (``set_materialize_grads(False)``): two
[N, E, F] zero tensors per layer and step otherwise.

Saved for backward (besides the inputs x, w1, w3, w2, which autograd keeps anyway):
  * default (``RECOMPUTE_GATE_UP = False``): G and U, [N, E, F] each in x's dtype:
    2 * N * E * F * itemsize bytes (bf16 GPT-2-small MoC, N=16384, E=8, F=2048: 1 GiB per layer);
  * ``RECOMPUTE_GATE_UP = True``: nothing more (0 bytes); the backward recomputes G and U from x
    inside the dH GEMM (two more GEMMs of the forward's size, sharing that kernel's K loop).
The reference's autograd keeps gate, silu(gate), up and hidden in fp32 (4 * N * E * F * 4 bytes).

All products accumulate in fp32; G, U, H, dG, dU are stored in x's dtype (the precision the
tensor-core GEMMs consume), except dG and dU of fp16 data, stored in fp32 (``grad_dtype``): under a
GradScaler's loss scale (65,536 at the start) they can exceed fp16's 65,504 where dx and dW do not,
which would turn the step's gradients into inf (the cost: the backward's two transient [N, E, F]
buffers are twice as large). Their GEMMs (dx, dW1/dW3) then run tf32 products,
fp16's precision with fp32's range (fp16 -> tf32 is exact). G, U, H are forward activations, not
scaled. bf16 (the trainer's CUDA default) has fp32's range. fp32 inputs use exact fp32 products
(``input_precision="ieee"``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moc_kernels.triton.compile_spec import KernelSpec
from moc_kernels.triton.launch import Launch, check_strides, meta_args, plan_spec, table_config, tile_grid
from moc_kernels.triton.utils import on_device

# Launch configurations: the one place they live. Launchers read them (block sizes are clamped to
# the problem for small shapes), and compile_specs() compiles exactly these for the report.
# "bf16" also serves fp16 where no "fp16" entry is given. Tiles were chosen by compiling candidates
# for sm_80 and sm_90 at SHIPPED_SHAPE (`python -m moc_kernels.report --ops expert_swiglu`): every
# bf16 config has 0 spill bytes, fits shared memory on both, and lowers to wgmma on sm_90 / mma on
# sm_80. Spilling candidates that were rejected: two 128x64 accumulators with BK=64 (gate_up: 96 B
# on sm_80 and sm_90), 128x64 dH with its G/U epilogue (96-128 B), 64x64 with BK=64 at 4 warps (all
# kernels: 100-2800 B).
# The report compiles the launch build (the JIT's divisibility-by-16 specialization of the arguments at
# SHIPPED_SHAPE); one table serves every GPU from sm_80 on, so every config fits sm_86/89's 99 KiB.
# Every grid runs column tile fastest (``tile_grid``): resident blocks share the left operand's tiles.
# fp32 runs exact (ieee) products on the FMA pipes, so its tiles are small.
CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    # G/U = x W1/W3 (M = N tokens, N = F, K = D) and dW1/dW3 = x^T dG/dU (M = D, N = F, K = tokens).
    "gate_up": {
        "bf16": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    },
    # fp16 reads fp32 dG/dU tiles here and in "dx" (``grad_dtype``): bf16's tiles would need 104-112 KB
    # of shared memory (and dx spilled 16-24 B), so its K blocks are halved.
    "dw13": {
        "bf16": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        "fp16": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    },
    # Y_e = H_e W2_e (M = N tokens, N = D, K = F) and dW2_e = H_e^T dY_e (M = F, N = D, K = tokens).
    "down": {
        "bf16": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    },
    "dw2": {
        "bf16": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    },
    # dH = dY_e W2_e^T (M = N tokens, N = F, K = D), optionally with G, U recomputed (3 accumulators).
    "swiglu_grad": {
        "bf16": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    },
    "swiglu_grad_recompute": {
        "bf16": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 8, "num_stages": 2},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2},
    },
    # dx = sum_e dG_e W1_e^T + dU_e W3_e^T (M = N tokens, N = D, K = E * F). fp32 unpipelined: with 2
    # stages Triton 3.6 spilled 8 B on sm_90 (128 registers; 3.9 did not), with 1 both compile clean.
    # 16-bit: 128x128 tiles (1 block per SM at 230-240 registers): the whole W1|W3 (50 MB) is read
    # again by every wave, and 128x64 tiles made twice the waves (bf16 128x64x32 also needed 104 KiB
    # of shared memory on sm_90 in the launch build).
    "dx": {
        "bf16": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "num_warps": 8, "num_stages": 4},
        "fp16": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3},
        "fp32": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
    },
}
# The shape whose configs the compile report checks: GPT-2-small MoC (N = batch * seq).
SHIPPED_SHAPE = {"N": 16384, "D": 768, "E": 8, "F": 2048}

# Save G and U for backward (False) or recompute them from x in the backward (True); see above.
RECOMPUTE_GATE_UP = False


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the backward's dG, dU buffers: x's, but fp32 for fp16 data (a loss-scaled dG or dU
    can exceed fp16's 65,504 where dx and dW do not; bf16 has fp32's range)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a buffer the kernels overwrite entirely (tests patch this to pre-fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


# Kernels use only builtins of triton.language, not its @jit library functions (tl.zeros,
# tl.sigmoid): those are decorated when triton is first imported, possibly before
# TRITON_INTERPRET=1 is set, and then refuse to run under the interpreter.
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _store(ptrs, value, mask, UPCAST: tl.constexpr):
    """Store fp32 ``value`` in the pointers' dtype, rounding to nearest even. Under the interpreter
    (UPCAST), Triton 3.9 truncates fp32 -> bf16 (GPUs round to nearest even), which doubles bf16
    errors; there the rounding is done explicitly on the bits first (then truncation is exact)."""
    if UPCAST and ptrs.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _mma(acc, a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST (interpreter only): Triton 3.9's interpreter multiplies the raw
    16-bit storage of bf16 operands, so there both go to fp32 first (bf16 -> fp32 is exact)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype != b.dtype:
        # fp16 data with fp32 dG/dU (``grad_dtype``): both to fp32, tf32 products. fp16 -> tf32 is
        # exact (same 10-bit mantissa) and dG/dU keep fp16's precision but fp32's range. The tensor
        # cores' tf32 input drops the low 13 mantissa bits (truncation: no cvt.rna.tf32 is emitted,
        # triton-lang/triton#4574), which shrinks every product by ~3.5e-4 on average; rounding to
        # nearest first leaves the truncation exact. (Assigned, not returned: code after a static
        # if's return is still compiled.)
        a = _round_to_tf32(a.to(tl.float32))
        b = _round_to_tf32(b.to(tl.float32))
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _round_to_tf32(x):
    """fp32 ``x`` rounded to tf32's 10-bit mantissa, to nearest (ties away from zero, as cvt.rna.tf32):
    half a tf32 ulp (bit 12) added to the magnitude bits, the 13 bits below tf32's cleared. A carry
    into the exponent is the correct rounding, and inf stays inf; NaN is passed as it is (the GPU's
    canonical NaN, 0x7FFFFFFF, would carry out into -0.0)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where(x == x, ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True), x)


@triton.jit
def _tile_ids(rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_FASTEST: tl.constexpr):
    """(row block, column tile) of this program: grid axis 0 numbers them column tile fastest
    (``launch.tile_grid``), so the blocks resident together share row blocks of the left operand;
    ROWS_FASTEST the other way round, for the GEMMs whose right operand is the large one (dW13)."""
    pid = tl.program_id(0)
    if ROWS_FASTEST:
        row_blocks = (rows + BLOCK_M - 1) // BLOCK_M
        return pid % row_blocks, pid // row_blocks
    column_tiles = (cols + BLOCK_N - 1) // BLOCK_N
    return pid // column_tiles, pid % column_tiles


@triton.jit
def _expert_matmul(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_ae, stride_am, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_ce, stride_cm, stride_cn,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C_e = A_e @ B_e for expert e = program_id(2); every operand addressed by strides (A [M, K],
    B [K, N], C [M, N] per expert), so transposes and token-major layouts cost nothing."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, False)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_valid = rm < M - pid_m * BLOCK_M
    n_valid = rn < N - pid_n * BLOCK_N
    # Tile origins in 64-bit scalars (N * E * F can exceed 2^31); offsets inside a tile stay 32-bit
    # (64-bit per-element offsets cost registers and spill).
    expert = tl.program_id(2).to(tl.int64)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    a_ptrs = a_ptr + (expert * stride_ae + row0 * stride_am) + (rm[:, None] * stride_am + rk[None, :] * stride_ak)
    b_ptrs = b_ptr + (expert * stride_be + col0 * stride_bn) + (rk[:, None] * stride_bk + rn[None, :] * stride_bn)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = rk < K - k0
        a = tl.load(a_ptrs, mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        acc = _mma(acc, a, b, PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = (
        c_ptr
        + (expert * stride_ce + row0 * stride_cm + col0 * stride_cn)
        + (rm[:, None] * stride_cm + rn[None, :] * stride_cn)
    )
    _store(c_ptrs, acc, m_valid[:, None] & n_valid[None, :], UPCAST)


@triton.jit
def _expert_dual_matmul(
    a_ptr, b1_ptr, b2_ptr, c1_ptr, c2_ptr, h_ptr,
    M, N, K,
    stride_ae, stride_am, stride_ak,
    stride_b1e, stride_b1k, stride_b1n,
    stride_b2e, stride_b2k, stride_b2n,
    stride_ce, stride_cm, stride_cn,
    SWIGLU: tl.constexpr, STORE_C: tl.constexpr, ROWS_FASTEST: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C1_e = A_e @ B1_e and C2_e = A_e @ B2_e in one K loop: each A tile is loaded once for both.

    SWIGLU: also store H = silu(C1) * C2 at h_ptr (the forward's gate/up GEMM; C1, C2 are G, U and
    are stored only when STORE_C, i.e. when saved for backward). C1, C2 and H share one layout.
    Without SWIGLU it is dW1_e = x^T dG_e, dW3_e = x^T dU_e (A = x^T by strides).
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, ROWS_FASTEST)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_valid = rm < M - pid_m * BLOCK_M
    n_valid = rn < N - pid_n * BLOCK_N
    expert = tl.program_id(2).to(tl.int64)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    a_ptrs = a_ptr + (expert * stride_ae + row0 * stride_am) + (rm[:, None] * stride_am + rk[None, :] * stride_ak)
    b1_ptrs = b1_ptr + (expert * stride_b1e + col0 * stride_b1n) + (rk[:, None] * stride_b1k + rn[None, :] * stride_b1n)
    b2_ptrs = b2_ptr + (expert * stride_b2e + col0 * stride_b2n) + (rk[:, None] * stride_b2k + rn[None, :] * stride_b2n)
    acc1 = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc2 = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_valid = rk < K - k0
        a = tl.load(a_ptrs, mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        b_mask = k_valid[:, None] & n_valid[None, :]
        b1 = tl.load(b1_ptrs, mask=b_mask, other=0.0)
        b2 = tl.load(b2_ptrs, mask=b_mask, other=0.0)
        acc1 = _mma(acc1, a, b1, PRECISION, UPCAST)
        acc2 = _mma(acc2, a, b2, PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b1_ptrs += BLOCK_K * stride_b1k
        b2_ptrs += BLOCK_K * stride_b2k
    c_offs = (expert * stride_ce + row0 * stride_cm + col0 * stride_cn) + (
        rm[:, None] * stride_cm + rn[None, :] * stride_cn
    )
    c_mask = m_valid[:, None] & n_valid[None, :]
    if STORE_C:
        _store(c1_ptr + c_offs, acc1, c_mask, UPCAST)
        _store(c2_ptr + c_offs, acc2, c_mask, UPCAST)
    if SWIGLU:
        # silu(g) = g * sigmoid(g), computed from the fp32 accumulator (never from a rounded G).
        hidden = acc1 * _sigmoid(acc1) * acc2
        _store(h_ptr + c_offs, hidden, c_mask, UPCAST)


@triton.jit
def _swiglu_grad(
    dy_ptr, w2_ptr, x_ptr, w1_ptr, w3_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr,
    N, D, F,
    stride_dyn, stride_dye, stride_dyd,
    stride_w2e, stride_w2f, stride_w2d,
    stride_xn, stride_xd,
    stride_w1e, stride_w1d, stride_w1f,
    stride_w3e, stride_w3d, stride_w3f,
    stride_hn, stride_he, stride_hf,
    RECOMPUTE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dH_e = dY_e @ W2_e^T for a [tokens, F] tile of expert e, then the SwiGLU derivative.

    With H = silu(G) * U and silu(g) = g * s, s = sigmoid(g):
        silu'(g) = s + g * s * (1 - s) = s * (1 + g * (1 - s))
        dU = dH * silu(G)            (from dH/dU = silu(G))
        dG = dH * U * silu'(G)       (from dH/dG = U * silu'(G))
    Writes dG, dU and H (the dW2 GEMM's operand) in the layout of G/U/H ([N, E, F] by strides).
    RECOMPUTE: G = x W1_e, U = x W3_e are accumulated in the same K loop over D as dH (both GEMMs
    have K = D), so nothing but the inputs had to be saved; otherwise G, U are loaded.
    """
    pid_m, pid_n = _tile_ids(N, F, BLOCK_M, BLOCK_N, False)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_valid = rm < N - pid_m * BLOCK_M
    n_valid = rn < F - pid_n * BLOCK_N
    expert = tl.program_id(2).to(tl.int64)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    dy_ptrs = dy_ptr + (row0 * stride_dyn + expert * stride_dye) + (rm[:, None] * stride_dyn + rk[None, :] * stride_dyd)
    # W2_e^T [D, F]: element (d, f) = w2[e, f, d].
    w2t_ptrs = (
        w2_ptr + (expert * stride_w2e + col0 * stride_w2f) + (rk[:, None] * stride_w2d + rn[None, :] * stride_w2f)
    )
    acc_dh = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if RECOMPUTE:
        x_ptrs = x_ptr + row0 * stride_xn + (rm[:, None] * stride_xn + rk[None, :] * stride_xd)
        w1_ptrs = (
            w1_ptr + (expert * stride_w1e + col0 * stride_w1f) + (rk[:, None] * stride_w1d + rn[None, :] * stride_w1f)
        )
        w3_ptrs = (
            w3_ptr + (expert * stride_w3e + col0 * stride_w3f) + (rk[:, None] * stride_w3d + rn[None, :] * stride_w3f)
        )
        acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_valid = rk < D - k0
        a_mask = m_valid[:, None] & k_valid[None, :]
        b_mask = k_valid[:, None] & n_valid[None, :]
        dy = tl.load(dy_ptrs, mask=a_mask, other=0.0)
        w2t = tl.load(w2t_ptrs, mask=b_mask, other=0.0)
        acc_dh = _mma(acc_dh, dy, w2t, PRECISION, UPCAST)
        dy_ptrs += BLOCK_K * stride_dyd
        w2t_ptrs += BLOCK_K * stride_w2d
        if RECOMPUTE:
            x = tl.load(x_ptrs, mask=a_mask, other=0.0)
            w1 = tl.load(w1_ptrs, mask=b_mask, other=0.0)
            w3 = tl.load(w3_ptrs, mask=b_mask, other=0.0)
            acc_g = _mma(acc_g, x, w1, PRECISION, UPCAST)
            acc_u = _mma(acc_u, x, w3, PRECISION, UPCAST)
            x_ptrs += BLOCK_K * stride_xd
            w1_ptrs += BLOCK_K * stride_w1d
            w3_ptrs += BLOCK_K * stride_w3d
    h_offs = (row0 * stride_hn + expert * stride_he + col0 * stride_hf) + (
        rm[:, None] * stride_hn + rn[None, :] * stride_hf
    )
    mask = m_valid[:, None] & n_valid[None, :]
    if RECOMPUTE:
        gate = acc_g
        up = acc_u
    else:
        gate = tl.load(g_ptr + h_offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(u_ptr + h_offs, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(gate)
    silu = gate * sig
    d_gate = acc_dh * up * (sig * (1.0 + gate * (1.0 - sig)))
    d_up = acc_dh * silu
    _store(dg_ptr + h_offs, d_gate, mask, UPCAST)
    _store(du_ptr + h_offs, d_up, mask, UPCAST)
    _store(h_ptr + h_offs, silu * up, mask, UPCAST)


@triton.jit
def _dx(
    dg_ptr, du_ptr, w1_ptr, w3_ptr, dx_ptr,
    N, D, F, E,
    stride_hn, stride_he, stride_hf,
    stride_w1e, stride_w1d, stride_w1f,
    stride_w3e, stride_w3d, stride_w3f,
    stride_dxn, stride_dxd,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dx = sum_e dG_e @ W1_e^T + dU_e @ W3_e^T for a [tokens, D] tile: G_e = x W1_e gives
    dx += dG_e W1_e^T (same for U). The K loop runs over (expert, F) so each program owns its output
    tile and no atomics are needed."""
    pid_m, pid_n = _tile_ids(N, D, BLOCK_M, BLOCK_N, False)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_valid = rm < N - pid_m * BLOCK_M
    n_valid = rn < D - pid_n * BLOCK_N
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    a_offs = row0 * stride_hn + (rm[:, None] * stride_hn + rk[None, :] * stride_hf)
    dg_ptrs = dg_ptr + a_offs
    du_ptrs = du_ptr + a_offs
    # W1_e^T [F, D]: element (f, d) = w1[e, d, f].
    w1t_ptrs = w1_ptr + col0 * stride_w1d + (rk[:, None] * stride_w1f + rn[None, :] * stride_w1d)
    w3t_ptrs = w3_ptr + col0 * stride_w3d + (rk[:, None] * stride_w3f + rn[None, :] * stride_w3d)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    k_steps = (F + BLOCK_K - 1) // BLOCK_K
    for _ in range(0, E):
        for k0 in range(0, F, BLOCK_K):
            k_valid = rk < F - k0
            a_mask = m_valid[:, None] & k_valid[None, :]
            b_mask = k_valid[:, None] & n_valid[None, :]
            dg = tl.load(dg_ptrs, mask=a_mask, other=0.0)
            du = tl.load(du_ptrs, mask=a_mask, other=0.0)
            w1t = tl.load(w1t_ptrs, mask=b_mask, other=0.0)
            w3t = tl.load(w3t_ptrs, mask=b_mask, other=0.0)
            acc = _mma(acc, dg, w1t, PRECISION, UPCAST)
            acc = _mma(acc, du, w3t, PRECISION, UPCAST)
            dg_ptrs += BLOCK_K * stride_hf
            du_ptrs += BLOCK_K * stride_hf
            w1t_ptrs += BLOCK_K * stride_w1f
            w3t_ptrs += BLOCK_K * stride_w3f
        # Next expert: rewind the K advance and step by the expert stride (pointer arithmetic is
        # 64-bit, and the loop index is not a tensor under the interpreter).
        dg_ptrs += stride_he - k_steps * BLOCK_K * stride_hf
        du_ptrs += stride_he - k_steps * BLOCK_K * stride_hf
        w1t_ptrs += stride_w1e - k_steps * BLOCK_K * stride_w1f
        w3t_ptrs += stride_w3e - k_steps * BLOCK_K * stride_w3f
    dx_ptrs = dx_ptr + (row0 * stride_dxn + col0 * stride_dxd) + (rm[:, None] * stride_dxn + rn[None, :] * stride_dxd)
    _store(dx_ptrs, acc, m_valid[:, None] & n_valid[None, :], UPCAST)


# ----------------------------------------------------------------------------------------------
# Launch plans: one description per launch, used both to launch and to build compile specs
# ----------------------------------------------------------------------------------------------


def _plan(fn, name, dtype, m, n, k, batch, args) -> Launch:
    """The launch of ``fn`` with the table's config for ``name`` and ``dtype`` on an (m, n, k) GEMM per
    batch entry (expert), its grid column tile fastest (``tile_grid``)."""
    cfg = table_config(CONFIGS[name], dtype, (m, n, k))
    check_strides("expert_swiglu", args, cfg)
    grid = tile_grid(triton.cdiv(m, cfg["BLOCK_M"]), cfg, n, batch)  # its order: the kernel's _tile_ids
    return Launch(fn, name, grid, {**args, **meta_args(dtype, cfg)}, cfg["num_warps"], cfg["num_stages"])


def _plan_gate_up(x, w1, w3, g, u, h, store_gate_up: bool) -> Launch:
    n_tokens, dim = x.shape
    num_experts, _, hidden = w1.shape
    assert w1.stride() == w3.stride(), "w1 and w3 strides must match"  # checked by the public function
    args = dict(
        a_ptr=x, b1_ptr=w1, b2_ptr=w3, c1_ptr=g, c2_ptr=u, h_ptr=h,
        M=n_tokens, N=hidden, K=dim,
        stride_ae=0, stride_am=x.stride(0), stride_ak=x.stride(1),
        stride_b1e=w1.stride(0), stride_b1k=w1.stride(1), stride_b1n=w1.stride(2),
        stride_b2e=w3.stride(0), stride_b2k=w3.stride(1), stride_b2n=w3.stride(2),
        stride_ce=h.stride(1), stride_cm=h.stride(0), stride_cn=h.stride(2),
        SWIGLU=True, STORE_C=store_gate_up, ROWS_FASTEST=False,
    )  # fmt: skip
    return _plan(_expert_dual_matmul, "gate_up", x.dtype, n_tokens, hidden, dim, num_experts, args)


def _plan_down(h, w2, y) -> Launch:
    n_tokens, num_experts, hidden = h.shape
    dim = w2.shape[2]
    args = dict(
        a_ptr=h, b_ptr=w2, c_ptr=y,
        M=n_tokens, N=dim, K=hidden,
        stride_ae=h.stride(1), stride_am=h.stride(0), stride_ak=h.stride(2),
        stride_be=w2.stride(0), stride_bk=w2.stride(1), stride_bn=w2.stride(2),
        stride_ce=y.stride(1), stride_cm=y.stride(0), stride_cn=y.stride(2),
    )  # fmt: skip
    return _plan(_expert_matmul, "down", h.dtype, n_tokens, dim, hidden, num_experts, args)


def _plan_swiglu_grad(dy, x, w1, w3, w2, g, u, dg, du, h, recompute: bool) -> Launch:
    n_tokens, dim = x.shape
    num_experts, _, hidden = w1.shape
    args = dict(
        dy_ptr=dy, w2_ptr=w2, x_ptr=x, w1_ptr=w1, w3_ptr=w3, g_ptr=g, u_ptr=u, dg_ptr=dg, du_ptr=du, h_ptr=h,
        N=n_tokens, D=dim, F=hidden,
        stride_dyn=dy.stride(0), stride_dye=dy.stride(1), stride_dyd=dy.stride(2),
        stride_w2e=w2.stride(0), stride_w2f=w2.stride(1), stride_w2d=w2.stride(2),
        stride_xn=x.stride(0), stride_xd=x.stride(1),
        stride_w1e=w1.stride(0), stride_w1d=w1.stride(1), stride_w1f=w1.stride(2),
        stride_w3e=w3.stride(0), stride_w3d=w3.stride(1), stride_w3f=w3.stride(2),
        stride_hn=h.stride(0), stride_he=h.stride(1), stride_hf=h.stride(2),
        RECOMPUTE=recompute,
    )  # fmt: skip
    name = "swiglu_grad_recompute" if recompute else "swiglu_grad"
    return _plan(_swiglu_grad, name, x.dtype, n_tokens, hidden, dim, num_experts, args)


def _plan_dx(dg, du, w1, w3, dx) -> Launch:
    n_tokens, num_experts, hidden = dg.shape
    dim = w1.shape[1]
    args = dict(
        dg_ptr=dg, du_ptr=du, w1_ptr=w1, w3_ptr=w3, dx_ptr=dx,
        N=n_tokens, D=dim, F=hidden, E=num_experts,
        stride_hn=dg.stride(0), stride_he=dg.stride(1), stride_hf=dg.stride(2),
        stride_w1e=w1.stride(0), stride_w1d=w1.stride(1), stride_w1f=w1.stride(2),
        stride_w3e=w3.stride(0), stride_w3d=w3.stride(1), stride_w3f=w3.stride(2),
        stride_dxn=dx.stride(0), stride_dxd=dx.stride(1),
    )  # fmt: skip
    return _plan(_dx, "dx", w1.dtype, n_tokens, dim, hidden, 1, args)


def _plan_dw13(x, dg, du, dw1, dw3) -> Launch:
    n_tokens, dim = x.shape
    num_experts, _, hidden = dw1.shape
    # A = x^T [D, tokens] (shared by every expert), B1/B2 = dG_e/dU_e [tokens, F], C = dW1_e/dW3_e [D, F].
    args = dict(
        a_ptr=x, b1_ptr=dg, b2_ptr=du, c1_ptr=dw1, c2_ptr=dw3, h_ptr=dw1,
        M=dim, N=hidden, K=n_tokens,
        stride_ae=0, stride_am=x.stride(1), stride_ak=x.stride(0),
        stride_b1e=dg.stride(1), stride_b1k=dg.stride(0), stride_b1n=dg.stride(2),
        stride_b2e=du.stride(1), stride_b2k=du.stride(0), stride_b2n=du.stride(2),
        stride_ce=dw1.stride(0), stride_cm=dw1.stride(1), stride_cn=dw1.stride(2),
        SWIGLU=False, STORE_C=True, ROWS_FASTEST=True,
    )  # fmt: skip
    assert dw1.stride() == dw3.stride()
    return _plan(_expert_dual_matmul, "dw13", x.dtype, dim, hidden, n_tokens, num_experts, args)


def _plan_dw2(h, dy, dw2) -> Launch:
    n_tokens, num_experts, hidden = h.shape
    dim = dy.shape[2]
    # A = H_e^T [F, tokens], B = dY_e [tokens, D], C = dW2_e [F, D].
    args = dict(
        a_ptr=h, b_ptr=dy, c_ptr=dw2,
        M=hidden, N=dim, K=n_tokens,
        stride_ae=h.stride(1), stride_am=h.stride(2), stride_ak=h.stride(0),
        stride_be=dy.stride(1), stride_bk=dy.stride(0), stride_bn=dy.stride(2),
        stride_ce=dw2.stride(0), stride_cm=dw2.stride(1), stride_cn=dw2.stride(2),
    )  # fmt: skip
    return _plan(_expert_matmul, "dw2", h.dtype, hidden, dim, n_tokens, num_experts, args)


# ----------------------------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------------------------


def _forward_plans(x, w1, w3, w2, recompute: bool):
    """Buffers and launches of the forward: returns (y, g, u, plans). g, u are empty when recomputed."""
    n_tokens, _ = x.shape
    num_experts, dim, hidden = w1.shape
    h = _empty((n_tokens, num_experts, hidden), x.dtype, x.device)
    if recompute:
        g, u = h.new_empty(0), h.new_empty(0)
    else:
        g = _empty((n_tokens, num_experts, hidden), x.dtype, x.device)
        u = _empty((n_tokens, num_experts, hidden), x.dtype, x.device)
    y = _empty((n_tokens, num_experts, dim), x.dtype, x.device)
    # When G, U are not stored the kernel's G/U pointers are never written; pass h as a stand-in.
    plans = [
        _plan_gate_up(x, w1, w3, h if recompute else g, h if recompute else u, h, not recompute),
        _plan_down(h, w2, y),
    ]
    return y, g, u, plans


def _backward_plans(dy, x, w1, w3, w2, g, u, recompute: bool, needs=(True, True, True)):
    """Buffers and launches of the backward: ((dx, dw13, dw2), plans). ``needs`` says which of x, w13,
    w2 want a gradient; the others get a 0-element tensor and their GEMM is not planned."""
    n_tokens, dim = x.shape
    num_experts, _, hidden = w1.shape
    shape_h = (n_tokens, num_experts, hidden)
    dg = _empty(shape_h, grad_dtype(x.dtype), x.device)
    du = _empty(shape_h, grad_dtype(x.dtype), x.device)
    h = _empty(shape_h, x.dtype, x.device)
    if recompute:
        g = u = h  # never read when RECOMPUTE
    need_dx, need_dw13, need_dw2 = needs
    dx = _empty((n_tokens, dim) if need_dx else (0,), x.dtype, x.device)
    dw13 = _empty((num_experts, dim, 2 * hidden) if need_dw13 else (0,), w1.dtype, w1.device)
    dw2 = _empty(tuple(w2.shape) if need_dw2 else (0,), w2.dtype, w2.device)
    plans = [_plan_swiglu_grad(dy, x, w1, w3, w2, g, u, dg, du, h, recompute)]
    if need_dx:
        plans.append(_plan_dx(dg, du, w1, w3, dx))
    if need_dw13:
        plans.append(_plan_dw13(x, dg, du, dw13[..., :hidden], dw13[..., hidden:]))
    if need_dw2:
        plans.append(_plan_dw2(h, dy, dw2))
    return (dx, dw13, dw2), plans


def _gate_up_views(w13: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, D, 2F] -> (w1, w3), its two [E, D, F] halves as views (same strides)."""
    hidden = w13.shape[2] // 2
    return w13[..., :hidden], w13[..., hidden:]


@torch.library.custom_op("moc_kernels::expert_swiglu_fwd", mutates_args=())
def _expert_swiglu_fwd(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, recompute: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y [N, E, D], G [N, E, F], U [N, E, F]); G and U are 0-element when ``recompute``."""
    y, g, u, plans = _forward_plans(x, *_gate_up_views(w13), w2, recompute)
    with on_device(x):
        for plan in plans:
            plan.run()
    return y, g, u


@_expert_swiglu_fwd.register_fake
def _(x, w13, w2, recompute):
    num_experts, hidden, dim = w2.shape
    y = x.new_empty((x.shape[0], num_experts, dim))
    if recompute:
        return y, x.new_empty(0), x.new_empty(0)
    return y, x.new_empty((x.shape[0], num_experts, hidden)), x.new_empty((x.shape[0], num_experts, hidden))


@torch.library.custom_op("moc_kernels::expert_swiglu_bwd", mutates_args=())
def _expert_swiglu_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    recompute: bool,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [N, D], dw13 [E, D, 2F], dw2 [E, F, D]) from dY [N, E, D]; 0-element where ``needs`` (for x,
    w13, w2) is False."""
    grads, plans = _backward_plans(dy, x, *_gate_up_views(w13), w2, g, u, recompute, tuple(needs))
    with on_device(x):
        for plan in plans:
            plan.run()
    return grads


@_expert_swiglu_bwd.register_fake
def _(dy, x, w13, w2, g, u, recompute, needs):
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip((x, w13, w2), needs))


def _setup_context(ctx, inputs, output) -> None:
    x, w13, w2, recompute = inputs
    _, g, u = output
    ctx.recompute = recompute
    ctx.mark_non_differentiable(g, u)
    ctx.save_for_backward(x, w13, w2, g, u)
    # G and U are outputs only to be saved: autograd passes None for them, not [N, E, F] zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dg, _du):
    needs = list(ctx.needs_input_grad[:3])
    if dy is None or not any(needs):
        return None, None, None, None
    x, w13, w2, g, u = ctx.saved_tensors
    grads = _expert_swiglu_bwd(dy, x, w13, w2, g, u, ctx.recompute, needs)
    return *(grad if need else None for grad, need in zip(grads, needs)), None


_expert_swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def expert_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor | None, w2: torch.Tensor) -> torch.Tensor:
    """``Y[n, e] = (silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e]`` for every token n and expert e.

    x: [N, D]; w1, w3: [E, D, F], or w3 None and w1 the packed w13 [E, D, 2F] (w1 = w13[..., :F],
    w3 = w13[..., F:]: one tensor, one gradient, the layout the model stores); w2: [E, F, D];
    fp32|bf16|fp16. Separate w1, w3 are concatenated into a w13 (a copy of the weights). Weights of
    another dtype are cast to x's (differentiably, like autocast). Returns Y: [N, E, D] in x's dtype,
    token-major. Differentiable in all inputs. Saved for backward: G and U ([N, E, F], x's dtype)
    unless ``RECOMPUTE_GATE_UP`` is set.
    """
    w13 = w1 if w3 is None else torch.cat([w1, w3], dim=-1)
    y, _, _ = _expert_swiglu_fwd(x, w13.to(x.dtype), w2.to(x.dtype), RECOMPUTE_GATE_UP)
    return y


# ----------------------------------------------------------------------------------------------
# Compile specs for `python -m moc_kernels.report`
# ----------------------------------------------------------------------------------------------


def compile_specs() -> list[KernelSpec]:
    """One KernelSpec per kernel x shipped config (bf16 and fp32) at ``SHIPPED_SHAPE``, built by the
    launchers' own planning code on meta tensors (contiguous weights, w1/w3 as views of one packed
    [E, D, 2F] as the model stores them), so the report compiles exactly what would be launched."""
    specs = []
    n_tokens, dim, num_experts, hidden = (SHIPPED_SHAPE[k] for k in ("N", "D", "E", "F"))
    # fp16: its forward compiles bf16's configs with another 16-bit type; its backward differs (fp32
    # dG/dU, ``grad_dtype``), so only the backward is listed for it.
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        meta = {"dtype": dtype, "device": "meta"}
        x = torch.empty(n_tokens, dim, **meta)
        packed = torch.empty(num_experts, dim, 2 * hidden, **meta)
        w1, w3 = packed[..., :hidden], packed[..., hidden:]
        w2 = torch.empty(num_experts, hidden, dim, **meta)
        _, g, u, forward = _forward_plans(x, w1, w3, w2, recompute=False)
        dy = torch.empty(n_tokens, num_experts, dim, **meta)
        _, backward = _backward_plans(dy, x, w1, w3, w2, g, u, recompute=False)
        _, recomputed = _backward_plans(dy, x, w1, w3, w2, g, u, recompute=True)
        for plan in [*forward, *backward, recomputed[0]][2 if dtype == torch.float16 else 0 :]:
            specs.append(plan_spec(plan, dtype))
    return specs
