"""Triton ``fused_logit_nll``: the NLL of M models' logit-level fusion, never writing a fused [N, V] row.

Same semantics as ``moc_kernels.reference.fused_logit_nll`` (its docstring is the spec: strategies,
non-finite rules, IGNORE_INDEX targets). Two passes over the vocabulary, one program per row:

  pass 1 ``_model_stats_kernel`` (once per model): an online sweep over V in tiles keeps the running
    maximum m of the raw logits x, s = sum exp(z), u = sum exp(z) z, r = s - 1 (the sum without one
    entry at the maximum, so that log s = log1p(r) keeps its precision on peaked rows, where the
    entropy weights need it) and the second-largest logit, with z = (x - m) / T the shifted tempered
    logit; it also reads the target's logit. Out per model and row ([M, N] fp32 each): m, log s,
    entropy, top1-top2 probability gap and z[target] (so lse(x / T) = m / T + log s).
  weights (torch, [M, N], tiny): ``strategy_weights`` of the reference, from those statistics.
    The linear pools (mixture*) are finished here: log q[t] = logsumexp_i(log a_i + z_i[t] - log s_i).
  pass 2 ``_fused_lse_kernel`` (log-linear pools only): the log-sum-exp over V of
    f = sum_i (a_i / T_i) (x_i - m_i) for every requested log-linear strategy at once, reading the M
    models' tiles together (M <= 8 pointers as separate arguments, unrolled with a constexpr M).
    nll = lse(f) - f[t], and f[t] = sum_i a_i z_i[t] comes from pass 1.

Why every kernel subtracts the maximum before it scales, (x - m) / T and never x / T - m: a GPU
compiler contracts x * (1/T) - m into one fma, which rounds once, so at the maximal entry it returns
the rounding error of x / T (up to half an ulp of m, 4e-6 at x = 80) instead of 0, and the entropy of
a confident row came out negative (H + EPS < 0 flips the entropy weights; log of it is NaN). x - m is
exact at the maximum and 0 / T is 0, whatever the compiler contracts; the interpreter never
contracts, so ``tests/test_kernels_compiled_code.py`` reads the PTX for that pattern instead.

Bytes moved: each model's logits are read twice (once if only mixtures are asked for); everything
else is O(M N). Row offsets are int64 (N V may exceed 2^31). Logits may be fp32, bf16 or fp16 and
row-strided (the last dimension must be contiguous; otherwise it is copied).

``fused_log_probs`` (the distribution generation samples from, DESIGN §5a) reuses both passes and
adds a third that writes log q [N, V] fp32, one program per (row, tile of V):
  pass 1 as above (no target), weights a [M, N] in torch as above;
  log-linear pools: pass 2 gives lse(f) for f = sum_i (a_i / T_i) (x_i - m_i), then
    ``_fused_log_probs_kernel`` writes log q = f - lse(f);
  mixtures: ``_fused_log_probs_kernel`` writes log q = logsumexp_i((x_i - m_i) / T_i + log a_i - log s_i)
    per element, with m_i and log s_i from pass 1.
Both are sum_i / logsumexp_i of (coef_i (x_i - m_i) + offset_i) with per-row coef and offset [M, N],
so one kernel with a constexpr switch does both. Rows whose logits hold +inf or NaN (pass 1's log s
is not finite) get offset NaN, hence NaN everywhere, as the reference documents.

No host synchronisation: targets are checked by a device-side assert, and temperatures and weights
reach the device as kernel arguments (scalars, or fills of ``device_vector``), never as a blocking
host-to-device copy (generation calls ``fused_log_probs`` every decoding step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from moc_kernels.reference.fused_logit_nll import (
    IGNORE_INDEX,
    LINEAR_POOLS,
    STRATEGIES,
    FusedNLL,
    strategy_weights,
)
from moc_kernels.triton.compile_spec import KernelSpec, launch_spec
from moc_kernels.triton.utils import TL_NAME, device_vector, on_device

MAX_MODELS = 8  # pass 2 takes the model pointers as separate arguments
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32

# Launch configurations, the one place they live (launchers and compile_specs() read this table).
# Both kernels stream V in BLOCK_V tiles and are memory-bound, so a tile only has to be large
# enough to keep enough loads in flight; pass 2 holds S_PAD x BLOCK_V fp32 partial sums, hence its
# smaller tile. "small" is used when the whole vocabulary fits one tile of it.
CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "stats": {
        "small": {"BLOCK_V": 1024, "num_warps": 4, "num_stages": 1},
        "large": {"BLOCK_V": 4096, "num_warps": 8, "num_stages": 1},
    },
    "fused_lse": {
        "small": {"BLOCK_V": 1024, "num_warps": 4, "num_stages": 1},
        # 16 warps: with 8, M = 8 models x 4 strategies in bf16 spilled 8 B on sm_90 under Triton 3.6
        # once each model's row maximum is subtracted before scaling (module docstring).
        "large": {"BLOCK_V": 2048, "num_warps": 16, "num_stages": 1},
    },
    # One program per (row, tile): no loop, so the tile only sets the grid's granularity; M loads and
    # one fp32 store per element. 8 warps for the large tile: with 4, M = 8 mixtures in fp32 spilled
    # 8 bytes on sm_80 (16 elements per thread, each with a running max and sum).
    "log_probs": {
        "small": {"BLOCK_V": 1024, "num_warps": 4, "num_stages": 1},
        "large": {"BLOCK_V": 2048, "num_warps": 8, "num_stages": 1},
    },
}


def _config(kernel: str, vocab_size: int) -> dict[str, int]:
    small = CONFIGS[kernel]["small"]
    return small if vocab_size <= small["BLOCK_V"] else CONFIGS[kernel]["large"]


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate comes from here (tests monkeypatch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _model_stats_kernel(
    logits_ptr,  # [N, V] fp32|bf16|fp16, row stride row_stride, unit column stride
    row_stride,
    targets_ptr,  # [N] int64
    max_ptr,  # [N] fp32 out: m, the row's largest logit (raw, not divided by T)
    log_sum_exp_ptr,  # [N] fp32 out: log s, s = sum exp(z), z = (logits - m) / T
    entropy_ptr,  # [N] fp32 out: entropy of softmax(z)
    gap_ptr,  # [N] fp32 out: p(top1) - p(top2)
    target_z_ptr,  # [N] fp32 out: z[target] (0 where ignored)
    vocab_size,
    inv_temperature,
    IGNORE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 before multiplying by the row stride
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    # Maxima and the second-largest value are kept on the raw logits; every difference to the
    # maximum is taken before scaling by 1/T (module docstring: exact 0 at the maximum under any fma).
    # The running maximum starts at -FLT_MAX, not -inf: then exp(z) is 0 (not NaN) for x = -inf
    # and for masked lanes, and a row that starts with -inf entries needs no special case.
    # +inf or NaN still poison s (exp(inf - inf), exp(NaN)), which makes every statistic NaN.
    run_max = tl.full((), -FLT_MAX, tl.float32)
    run_second = tl.full((), float("-inf"), tl.float32)
    sum_exp = tl.full((), 0.0, tl.float32)  # s = sum exp(z), z = (x - m) / T
    sum_exp_shift = tl.full((), 0.0, tl.float32)  # u = sum exp(z) z
    sum_exp_rest = tl.full((), 0.0, tl.float32)  # r = s - 1, summed without the running maximum's e^0
    for start in tl.range(0, vocab_size, BLOCK_V):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf")).to(tl.float32)
        # top-2 as a multiset: a tied maximum within the tile is also the tile's second value.
        tile_max = tl.max(x, 0)
        at_max = x == tile_max
        tile_second = tl.max(tl.where(at_max, float("-inf"), x), 0)
        ties = tl.sum(at_max.to(tl.int32), 0)
        tile_second = tl.where(ties > 1, tile_max, tile_second)
        new_max = tl.maximum(run_max, tile_max)
        run_second = tl.maximum(tl.maximum(run_second, tile_second), tl.minimum(run_max, tile_max))
        # Rescaling to the new maximum m' (d = (m - m') / T <= 0):
        #   s' = e^d s + sum_tile e^z'
        #   u' = sum e^z' z' = e^d sum e^z (z + d) = e^d (u + d s) + sum_tile ...
        # d is clamped at -FLT_MAX: the first tile's (-FLT_MAX - m') / T overflows to -inf for T < 1,
        # and -inf * s (s = 0) would be NaN.
        shift = tl.maximum((run_max - new_max) * inv_temperature, -FLT_MAX)
        rescale = tl.exp(shift)
        z_shift = (x - new_max) * inv_temperature
        e = tl.exp(z_shift)
        # x = -inf gives e = 0 and z' = -inf; their product must count as 0, not NaN.
        e_shift = e * tl.where(x == float("-inf"), 0.0, z_shift)
        sum_exp_shift = rescale * (sum_exp_shift + shift * sum_exp) + tl.sum(e_shift, 0)
        sum_exp = rescale * sum_exp + tl.sum(e, 0)
        # r' = e^d r + (the tile without one of its maxima) + e^(old or tile maximum - m'), whichever
        # of the two maxima is not the new one (ties with the running maximum add their e^0 = 1).
        e_tile_max = tl.exp((tile_max - new_max) * inv_temperature)
        tile_rest = tl.sum(tl.where(at_max, 0.0, e), 0) + (ties - 1).to(tl.float32) * e_tile_max
        sum_exp_rest = rescale * sum_exp_rest + tile_rest + tl.where(tile_max > run_max, rescale, e_tile_max)
        run_max = new_max
    # log s = log1p(r) (Kahan's form, exact to rounding for small r); s = 0 (no finite logit) and
    # s = NaN (+inf or NaN logits) keep log s.
    one_plus_rest = 1.0 + sum_exp_rest
    log1p_rest = tl.where(
        one_plus_rest == 1.0, sum_exp_rest, tl.log(one_plus_rest) * (sum_exp_rest / (one_plus_rest - 1.0))
    )
    log_sum_exp = tl.where(sum_exp > 0, log1p_rest, tl.log(sum_exp))
    # H = -sum p log p with p = e^z / s, log p = z - log s:  H = log s - u / s.
    entropy = log_sum_exp - sum_exp_shift / sum_exp
    # p(top1) - p(top2) = (e^0 - e^((second - m) / T)) / s.
    gap = (1.0 - tl.exp((run_second - run_max) * inv_temperature)) / sum_exp
    target = tl.load(targets_ptr + row)
    keep = target != IGNORE
    target_logit = tl.load(row_ptr + target, mask=keep, other=0.0).to(tl.float32)
    target_z = tl.where(keep, (target_logit - run_max) * inv_temperature, 0.0)
    tl.store(max_ptr + row, run_max)
    tl.store(log_sum_exp_ptr + row, log_sum_exp)
    tl.store(entropy_ptr + row, entropy)
    tl.store(gap_ptr + row, gap)
    tl.store(target_z_ptr + row, target_z)


@triton.jit
def _fused_lse_kernel(
    p0,  # the models' logits [N, V] fp32|bf16|fp16, unit column stride; only the first M are read
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    r0,  # their row strides
    r1,
    r2,
    r3,
    r4,
    r5,
    r6,
    r7,
    max_ptr,  # [M, N] fp32: m_i, each model's row maximum (pass 1)
    coef_ptr,  # [S, M, N] fp32: a_i / T_i per strategy, model and row (contiguous)
    out_ptr,  # [S, N] fp32 out: logsumexp over V of f = sum_i coef_i (logits_i - m_i)
    num_rows,
    vocab_size,
    num_strategies,
    M: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # int64: the [S, M, N] offsets (s M + i) N pass 2^31 at N ~ 38 M rows (7 strategies x 8 models).
    strategies = tl.arange(0, S_PAD).to(tl.int64)
    strategy_ok = strategies < num_strategies
    cols = tl.arange(0, BLOCK_V)
    run_max = tl.full((S_PAD,), -FLT_MAX, tl.float32)  # finite start: see _model_stats_kernel
    sum_exp = tl.full((S_PAD,), 0.0, tl.float32)
    for start in tl.range(0, vocab_size, BLOCK_V):
        offs = start + cols
        in_vocab = offs < vocab_size
        # One tile of every fused row this program owns; each model's tile is loaded once for all
        # S strategies: fused[s, v] = sum_i coef[s, i] (logits_i[v] - m_i). Shifting by m_i before
        # scaling makes a token that is every model's maximum exactly 0 under any contraction.
        fused = tl.full((S_PAD, BLOCK_V), 0.0, tl.float32)
        for i in tl.static_range(M):
            # i is a constexpr: the compiler keeps one branch (inline, not a helper function, because
            # the interpreter pays ~ms per nested @jit call).
            if i == 0:
                ptr, stride = p0, r0
            elif i == 1:
                ptr, stride = p1, r1
            elif i == 2:
                ptr, stride = p2, r2
            elif i == 3:
                ptr, stride = p3, r3
            elif i == 4:
                ptr, stride = p4, r4
            elif i == 5:
                ptr, stride = p5, r5
            elif i == 6:
                ptr, stride = p6, r6
            else:
                ptr, stride = p7, r7
            x = tl.load(ptr + row * stride + offs, mask=in_vocab, other=0.0).to(tl.float32)
            x_shift = x - tl.load(max_ptr + (i * num_rows.to(tl.int64) + row))
            # Padding rows get coefficient 1, not 0: 0 * (-inf) would be NaN (harmless, never stored).
            coef = tl.load(coef_ptr + (strategies * M + i) * num_rows + row, mask=strategy_ok, other=1.0)
            fused += coef[:, None] * x_shift[None, :]
        fused = tl.where(in_vocab[None, :], fused, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(fused, 1))
        sum_exp = sum_exp * tl.exp(run_max - new_max) + tl.sum(tl.exp(fused - new_max[:, None]), 1)
        run_max = new_max
    tl.store(out_ptr + strategies * num_rows + row, run_max + tl.log(sum_exp), mask=strategy_ok)


@triton.jit
def _model_row(i: tl.constexpr, row, p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7):
    """Pointer to row ``row`` of model i's logits (i constexpr: the compiler keeps one branch).

    ``_fused_lse_kernel`` inlines the same selection because it runs per tile there, and the
    interpreter pays ~0.5 ms per nested call; ``_fused_log_probs_kernel`` calls this once per model.
    """
    if i == 0:
        ptr, stride = p0, r0
    elif i == 1:
        ptr, stride = p1, r1
    elif i == 2:
        ptr, stride = p2, r2
    elif i == 3:
        ptr, stride = p3, r3
    elif i == 4:
        ptr, stride = p4, r4
    elif i == 5:
        ptr, stride = p5, r5
    elif i == 6:
        ptr, stride = p6, r6
    else:
        ptr, stride = p7, r7
    return ptr + row * stride


@triton.jit
def _fused_log_probs_kernel(
    p0,  # the models' logits [N, V] fp32|bf16|fp16, unit column stride; only the first M are read
    p1,
    p2,
    p3,
    p4,
    p5,
    p6,
    p7,
    r0,  # their row strides
    r1,
    r2,
    r3,
    r4,
    r5,
    r6,
    r7,
    max_ptr,  # [M, N] fp32: m_i, each model's row maximum (pass 1), subtracted before scaling
    coef_ptr,  # [M, N] fp32: the factor of model i's shifted logits in row n
    offset_ptr,  # [M, N] fp32: the term added to it
    out_ptr,  # [N, V] fp32 out: log q, row stride out_stride
    out_stride,
    num_rows,
    vocab_size,
    M: tl.constexpr,
    MIXTURE: tl.constexpr,  # False: log q = sum_i t_i; True: logsumexp_i t_i; t_i = coef_i (x_i - m_i) + offset_i
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offs < vocab_size
    # Log-linear: the running sum. Mixture: an online logsumexp over the M models, its maximum
    # starting at -FLT_MAX (not -inf) so that a -inf term adds exp(-inf) = 0 rather than NaN, and an
    # element that is -inf for every model ends as -FLT_MAX + log(0) = -inf.
    acc = tl.full((BLOCK_V,), 0.0, tl.float32)
    run_max = tl.full((BLOCK_V,), -FLT_MAX, tl.float32)
    for i in tl.static_range(M):
        row_ptr = _model_row(i, row, p0, p1, p2, p3, p4, p5, p6, p7, r0, r1, r2, r3, r4, r5, r6, r7)
        x = tl.load(row_ptr + offs, mask=in_vocab, other=0.0).to(tl.float32)
        x_shift = x - tl.load(max_ptr + (i * num_rows.to(tl.int64) + row))
        # i * num_rows in 32 bits (M * N < 2^31 rows: 268M rows at M = 8); 64-bit here spilled 8 B on
        # sm_80 for M = 8 mixtures in fp32 (row is already int64, so the sum is).
        coef = tl.load(coef_ptr + i * num_rows + row)
        offset = tl.load(offset_ptr + i * num_rows + row)
        term = coef * x_shift + offset  # at a model's maximum: coef * 0 + offset, exactly offset
        if MIXTURE:
            new_max = tl.maximum(run_max, term)
            acc = acc * tl.exp(run_max - new_max) + tl.exp(term - new_max)
            run_max = new_max
        else:
            acc += term
    if MIXTURE:
        acc = run_max + tl.log(acc)
    tl.store(out_ptr + row * out_stride + offs, acc, mask=in_vocab)


# ------------------------------------------------------------------------------------------ launchers


def _stats_launch(logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor, temperature: float):
    """(grid, every argument by name, config) of pass 1's launch on one model's logits [N, V]; ``stats``:
    its [5, N] fp32 outputs (m, log s, entropy, gap, z[target])."""
    num_rows, vocab_size = logits.shape
    config = _config("stats", vocab_size)
    values = [logits, logits.stride(0), targets, *stats, vocab_size, 1.0 / temperature]
    args = dict(zip(_model_stats_kernel.arg_names, values), IGNORE=IGNORE_INDEX, BLOCK_V=config["BLOCK_V"])
    return (num_rows,), args, config


def _model_stats(logits: list[torch.Tensor], targets: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """Pass 1, one launch per model: M x [N, V] -> [5, M, N] fp32 (m, log s, entropy, gap, z[target])."""
    num_rows = logits[0].shape[0]
    out = _empty((5, len(logits), num_rows), torch.float32, logits[0].device)
    with on_device(logits[0]):
        for i, (lg, temperature) in enumerate(zip(logits, temperatures)):
            grid, args, config = _stats_launch(lg, targets, out[:, i], temperature)
            _model_stats_kernel[grid](**args, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def _fused_lse_launch(logits: list[torch.Tensor], row_max: torch.Tensor, coef: torch.Tensor, out: torch.Tensor):
    """(grid, every argument by name, config) of pass 2's launch (``_fused_lse``'s arguments, out [S, N])."""
    num_strategies, num_models, num_rows = coef.shape
    vocab_size = logits[0].shape[1]
    config = _config("fused_lse", vocab_size)
    padded = [*logits] + [logits[0]] * (MAX_MODELS - num_models)  # unused pointer arguments
    values = [*padded, *(lg.stride(0) for lg in padded), row_max, coef, out, num_rows, vocab_size, num_strategies]
    args = dict(zip(_fused_lse_kernel.arg_names, values), M=num_models, BLOCK_V=config["BLOCK_V"])
    args["S_PAD"] = triton.next_power_of_2(num_strategies)
    return (num_rows,), args, config


def _fused_lse(logits: list[torch.Tensor], row_max: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Pass 2: logits M x [N, V], row_max [M, N], coef [S, M, N] fp32 -> [S, N] fp32,
    logsumexp_v(sum_i coef_i (logits_i - row_max_i))."""
    num_strategies, _, num_rows = coef.shape
    out = _empty((num_strategies, num_rows), torch.float32, coef.device)
    grid, args, config = _fused_lse_launch(logits, row_max, coef, out)
    with on_device(coef):
        _fused_lse_kernel[grid](**args, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def _log_probs_launch(
    logits: list[torch.Tensor],
    row_max: torch.Tensor,
    coef: torch.Tensor,
    offset: torch.Tensor,
    out: torch.Tensor,
    mixture: bool,
):
    """(grid, every argument by name, config) of pass 3's launch (``_pool_log_probs``'s arguments, out [N, V])."""
    num_rows, vocab_size = logits[0].shape
    config = _config("log_probs", vocab_size)
    padded = [*logits] + [logits[0]] * (MAX_MODELS - len(logits))  # unused pointer arguments
    values = [*padded, *(lg.stride(0) for lg in padded), row_max, coef, offset, out, out.stride(0)]
    values += [num_rows, vocab_size]
    args = dict(zip(_fused_log_probs_kernel.arg_names, values), M=len(logits), MIXTURE=mixture)
    args["BLOCK_V"] = config["BLOCK_V"]
    return (num_rows, triton.cdiv(vocab_size, config["BLOCK_V"])), args, config


def _pool_log_probs(
    logits: list[torch.Tensor], row_max: torch.Tensor, coef: torch.Tensor, offset: torch.Tensor, mixture: bool
) -> torch.Tensor:
    """Pass 3: logits M x [N, V], row_max/coef/offset [M, N] fp32 -> log q [N, V] fp32 (module docstring)."""
    num_rows, vocab_size = logits[0].shape
    out = _empty((num_rows, vocab_size), torch.float32, coef.device)
    grid, args, config = _log_probs_launch(logits, row_max, coef, offset, out, mixture)
    with on_device(coef):
        _fused_log_probs_kernel[grid](**args, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    """Out-of-range targets would read outside the logits: checked on the device, without waiting for
    it (``bad.any()`` in Python would block the host until the GPU catches up). On a GPU the assert
    fires asynchronously (a CUDA error at the next synchronisation); on the CPU it raises here."""
    valid = (targets == IGNORE_INDEX) | ((targets >= 0) & (targets < vocab_size))
    message = f"fused_logit_nll: a target is out of range; expected {IGNORE_INDEX} or 0..{vocab_size - 1}"
    torch._assert_async(valid.all(), message)


@torch.library.custom_op("moc_kernels::fused_logit_nll_multi", mutates_args=())
def fused_logit_nll_op(
    logits: list[torch.Tensor],
    targets: torch.Tensor,
    strategy_ids: list[int],
    temperatures: list[float],
    weights: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits M x [N, V]; targets [N] int64 -> (nll [S, N], weights [S, M, N], entropy [M, N]), fp32.

    strategy_ids index ``STRATEGIES`` (a custom op's schema has no list of strings).
    """
    strategies = [STRATEGIES[k] for k in strategy_ids]
    num_models, num_rows = len(logits), logits[0].shape[0]
    device = logits[0].device
    if num_rows == 0:  # nothing to launch
        empty = torch.empty((num_models, 0), dtype=torch.float32, device=device)
        return empty.new_empty((len(strategies), 0)), empty.new_empty((len(strategies), num_models, 0)), empty
    vocab_size = logits[0].shape[1]
    _check_targets(targets, vocab_size)  # inside the op, so that torch.compile sees no data-dependent branch
    logits = [lg if lg.stride(1) == 1 else lg.contiguous() for lg in logits]
    targets = targets.contiguous()
    row_max, log_sum_exp, entropy, gap, target_z = _model_stats(logits, targets, temperatures).unbind(0)  # [M, N]
    fixed = device_vector(weights, device)
    alphas = torch.stack([strategy_weights(s, entropy, gap, fixed) for s in strategies])  # [S, M, N]
    nll = _empty((len(strategies), num_rows), torch.float32, device)
    log_linear = [k for k, s in enumerate(strategies) if s not in LINEAR_POOLS]
    for k, strategy in enumerate(strategies):
        if strategy in LINEAR_POOLS:  # q[t] = sum_i a_i p_i[t], in log space; log p_i[t] = z_i[t] - log s_i
            nll[k] = -torch.logsumexp(alphas[k].log() + target_z - log_sum_exp, dim=0)
    if log_linear:
        # f = sum_i a_i z_i = sum_i (a_i / T_i) (logits_i - m_i); nll = lse(f) - f[t], f[t] = sum_i a_i z_i[t].
        # (Rows picked one by one: indexing by a Python list would copy the list to the device.)
        inv_temps = device_vector([1.0 / t for t in temperatures], device)[:, None]
        log_linear_alphas = torch.stack([alphas[k] for k in log_linear])  # [S', M, N]
        fused_lse = _fused_lse(logits, row_max, (log_linear_alphas * inv_temps).contiguous())
        log_linear_nll = fused_lse - (log_linear_alphas * target_z).sum(1)
        for row, k in enumerate(log_linear):
            nll[k] = log_linear_nll[row]
    nll.masked_fill_(targets == IGNORE_INDEX, 0.0)
    return nll, alphas, entropy


@fused_logit_nll_op.register_fake
def _(logits, targets, strategy_ids, temperatures, weights):
    num_models, num_rows, strategies = len(logits), logits[0].shape[0], strategy_ids
    new = logits[0].new_empty
    return (
        new((len(strategies), num_rows), dtype=torch.float32),
        new((len(strategies), num_models, num_rows), dtype=torch.float32),
        new((num_models, num_rows), dtype=torch.float32),
    )


@torch.library.custom_op("moc_kernels::fused_log_probs", mutates_args=())
def fused_log_probs_op(
    logits: list[torch.Tensor], strategy_id: int, temperatures: list[float], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits M x [N, V] -> (log q [N, V], weights [M, N]), fp32; strategy_id indexes ``STRATEGIES``."""
    strategy = STRATEGIES[strategy_id]
    num_models, (num_rows, vocab_size) = len(logits), logits[0].shape
    device = logits[0].device
    if num_rows == 0:  # nothing to launch
        return logits[0].new_empty((0, vocab_size), dtype=torch.float32), logits[0].new_empty(
            (num_models, 0), dtype=torch.float32
        )
    logits = [lg if lg.stride(1) == 1 else lg.contiguous() for lg in logits]
    no_targets = torch.full((num_rows,), IGNORE_INDEX, dtype=torch.int64, device=device)
    row_max, log_sum_exp, entropy, gap, _ = _model_stats(logits, no_targets, temperatures).unbind(0)  # each [M, N]
    alphas = strategy_weights(strategy, entropy, gap, device_vector(weights, device))
    inv_temps = device_vector([1.0 / t for t in temperatures], device)[:, None]
    # A +inf or NaN logit makes its model's log s non-finite: the whole row becomes NaN through the offset.
    poisoned = torch.where(log_sum_exp.isfinite().all(0), 0.0, float("nan"))  # [N]
    if strategy in LINEAR_POOLS:
        # log q[v] = logsumexp_i(log a_i + z_i[v] - log s_i) with z_i = (logits_i - m_i) / T_i.
        coef = inv_temps.expand(num_models, num_rows).contiguous()
        offset = (alphas.log() - log_sum_exp + poisoned).contiguous()
        return _pool_log_probs(logits, row_max, coef, offset, mixture=True), alphas
    # log q[v] = f[v] - lse(f), f = sum_i (a_i / T_i) (logits_i - m_i): pass 2 gives lse(f) (NaN if f has +inf).
    coef = (alphas * inv_temps).contiguous()
    offset = torch.zeros_like(coef)
    offset[0] = poisoned - _fused_lse(logits, row_max, coef[None])[0]
    return _pool_log_probs(logits, row_max, coef, offset, mixture=False), alphas


@fused_log_probs_op.register_fake
def _(logits, strategy_id, temperatures, weights):
    num_rows, vocab_size = logits[0].shape
    return (
        logits[0].new_empty((num_rows, vocab_size), dtype=torch.float32),
        logits[0].new_empty((len(logits), num_rows), dtype=torch.float32),
    )


# ------------------------------------------------------------------------------------------ public API


def fused_logit_nll_multi(
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    strategies: Sequence[str],
    temperatures: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
) -> dict[str, FusedNLL]:
    """``fused_logit_nll`` for several strategies; pass 1 is shared and pass 2 runs once for all of them.

    logits: M (2..8) tensors [N, V] fp32|bf16|fp16; targets: [N] int64, -100 = ignore, else in [0, V).
    Returns {strategy: FusedNLL(nll [N], weights [M, N], entropy [M, N])}, all fp32.
    """
    num_models = len(logits)
    if num_models > MAX_MODELS:
        raise ValueError(f"fused_logit_nll (triton): at most {MAX_MODELS} models, got {num_models}")
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise ValueError(f"fused_logit_nll: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"fused_logit_nll: targets must be int64, got {targets.dtype}")
    temps = [float(t) for t in temperatures] if temperatures is not None else [1.0] * num_models
    fixed = [float(w) for w in weights] if weights is not None else [1.0 / num_models] * num_models
    unique = list(dict.fromkeys(strategies))
    nll, alphas, entropy = fused_logit_nll_op(
        list(logits), targets, [STRATEGIES.index(s) for s in unique], temps, fixed
    )
    return {s: FusedNLL(nll[k], alphas[k], entropy if k == 0 else entropy.clone()) for k, s in enumerate(unique)}


def fused_logit_nll(
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    strategy: str,
    temperatures: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
) -> FusedNLL:
    """NLL of ``targets`` under the fused distribution of M >= 2 models (see ``fused_logit_nll_multi``)."""
    return fused_logit_nll_multi(logits, targets, [strategy], temperatures, weights)[strategy]


def fused_log_probs(
    logits: Sequence[torch.Tensor],
    strategy: str,
    temperatures: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log q [N, V] fp32 of the fused distribution (and the weights [M, N] fp32 with ``return_weights``).

    logits: M (2..8) tensors [N, V] fp32|bf16|fp16. Same math as the reference ``fused_log_probs``.
    """
    num_models = len(logits)
    if num_models > MAX_MODELS:
        raise ValueError(f"fused_log_probs (triton): at most {MAX_MODELS} models, got {num_models}")
    if strategy not in STRATEGIES:
        raise ValueError(f"fused_log_probs: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    temps = [float(t) for t in temperatures] if temperatures is not None else [1.0] * num_models
    fixed = [float(w) for w in weights] if weights is not None else [1.0 / num_models] * num_models
    log_q, alphas = fused_log_probs_op(list(logits), STRATEGIES.index(strategy), temps, fixed)
    return (log_q, alphas) if return_weights else log_q


# ------------------------------------------------------------------------------------------ compile specs


# (rows, vocabulary) the report compiles at: a Kotara window of 2048 tokens of contiguous logits over a
# vocabulary within one "small" tile, GPT-2's 50257 (odd: neither the row stride nor V is divisible by
# 16, so the JIT gives them no hint) and Qwen2's 151936 (both divisible by 16: hinted).
SHIPPED_SHAPES = ((2048, 1000), (2048, 50257), (2048, 151936))


def compile_specs(shapes=SHIPPED_SHAPES) -> list[KernelSpec]:
    """Every kernel x shipped config (bf16 and fp32 logits) for ``python -m moc_kernels.report``, one per
    (rows, vocabulary) of ``shapes``, specialised as the JIT specialises the launchers' own arguments
    (``_stats_launch``, ``_fused_lse_launch``, ``_log_probs_launch``) there."""
    specs = []
    for num_rows, vocab_size in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            size = "small" if vocab_size <= CONFIGS["stats"]["small"]["BLOCK_V"] else "large"
            label = f"{size}-V{vocab_size}"
            logits = [torch.empty(num_rows, vocab_size, dtype=dtype, device="meta") for _ in range(MAX_MODELS)]
            rows = torch.empty(MAX_MODELS, num_rows, device="meta")  # [M, N] fp32
            targets = torch.empty(num_rows, dtype=torch.int64, device="meta")
            stats = torch.empty(5, MAX_MODELS, num_rows, device="meta")[:, 0]
            _, args, config = _stats_launch(logits[0], targets, stats, 1.0)
            warps, stages = config["num_warps"], config["num_stages"]
            name = f"{label}-BV{config['BLOCK_V']}-w{warps}-{TL_NAME[dtype]}"
            specs.append(launch_spec(_model_stats_kernel, args, config=name, num_warps=warps, num_stages=stages))
            # The register-heaviest pass 2 is the most models with all four log-linear strategies.
            for num_models, num_strategies in ((2, 1), (2, 4), (MAX_MODELS, 4)):
                coef = torch.empty(num_strategies, num_models, num_rows, device="meta")
                out = torch.empty(num_strategies, num_rows, device="meta")
                _, args, config = _fused_lse_launch(logits[:num_models], rows[:num_models], coef, out)
                warps, stages = config["num_warps"], config["num_stages"]
                name = f"{label}-BV{config['BLOCK_V']}-M{num_models}-S{args['S_PAD']}-w{warps}-{TL_NAME[dtype]}"
                specs.append(launch_spec(_fused_lse_kernel, args, config=name, num_warps=warps, num_stages=stages))
            for num_models, mixture in ((2, False), (2, True), (MAX_MODELS, False), (MAX_MODELS, True)):
                out = torch.empty(num_rows, vocab_size, device="meta")
                model_rows = rows[:num_models]
                _, args, config = _log_probs_launch(
                    logits[:num_models], model_rows, model_rows, model_rows, out, mixture
                )
                warps, stages = config["num_warps"], config["num_stages"]
                pool = "mix" if mixture else "lin"
                name = f"{label}-BV{config['BLOCK_V']}-M{num_models}-{pool}-w{warps}-{TL_NAME[dtype]}"
                kernel = _fused_log_probs_kernel
                specs.append(launch_spec(kernel, args, config=name, num_warps=warps, num_stages=stages))
    return specs
