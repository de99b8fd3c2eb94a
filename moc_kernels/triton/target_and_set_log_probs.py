"""Triton ``target_and_set_log_probs``: log p(target) and log p(W) of every row, in one pass over V.

Same semantics as ``moc_kernels.reference.target_and_set_log_probs`` (its docstring is the spec).
One program per row sweeps the vocabulary in BLOCK_V tiles and keeps, online, the running maximum
m of the *raw* logits, s = sum exp((x - m) / T) and s_W = the same sum over the set's tokens. Then

    log p(target) = (x[target] - m) / T - log s,     log p(W) = log s_W - log s.

The maximum is taken on the raw logits and every exponent is formed as (x - m) * (1 / T): at the
maximum that is exactly 0 whatever the compiler does, whereas x / T - m / T written as an fma can
round differently for the same element on the GPU (the element would then not give exactly e^0).
A logit of -inf adds exp(-inf) = 0 (the maximum starts at -FLT_MAX, not -inf); +inf or NaN make
the row's outputs NaN. Bytes moved: the logits once, the set mask once per row (V bytes, cached),
O(N) else. Row offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moc_kernels.triton.compile_spec import KernelSpec, launch_spec
from moc_kernels.triton.utils import TL_NAME, on_device

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32

# Launch configurations, the one place they live (launcher and compile_specs() read this table).
# Memory-bound streaming over V, as fused_logit_nll's pass 1: "small" when V fits one tile of it.
CONFIGS: dict[str, dict[str, int]] = {
    "small": {"BLOCK_V": 1024, "num_warps": 4, "num_stages": 1},
    "large": {"BLOCK_V": 4096, "num_warps": 8, "num_stages": 1},
}


def _config(vocab_size: int) -> dict[str, int]:
    return CONFIGS["small"] if vocab_size <= CONFIGS["small"]["BLOCK_V"] else CONFIGS["large"]


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launcher allocates comes from here (tests monkeypatch it to fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _target_and_set_kernel(
    logits_ptr,  # [N, V] fp32|bf16|fp16, row stride row_stride, unit column stride
    row_stride,
    targets_ptr,  # [N] int64 in [0, V)
    in_set_ptr,  # [V] int8: 1 for the tokens of W
    log_p_target_ptr,  # [N] fp32 out
    log_p_set_ptr,  # [N] fp32 out
    vocab_size,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 before multiplying by the row stride
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    run_max = tl.full((), -FLT_MAX, tl.float32)  # of the raw logits
    sum_exp = tl.full((), 0.0, tl.float32)  # s = sum exp((x - m) / T)
    sum_exp_set = tl.full((), 0.0, tl.float32)  # s_W
    for start in tl.range(0, vocab_size, BLOCK_V):
        offs = start + cols
        in_vocab = offs < vocab_size
        x = tl.load(row_ptr + offs, mask=in_vocab, other=float("-inf")).to(tl.float32)
        member = tl.load(in_set_ptr + offs, mask=in_vocab, other=0) != 0
        new_max = tl.maximum(run_max, tl.max(x, 0))
        rescale = tl.exp((run_max - new_max) * inv_temperature)
        e = tl.exp((x - new_max) * inv_temperature)
        sum_exp = rescale * sum_exp + tl.sum(e, 0)
        sum_exp_set = rescale * sum_exp_set + tl.sum(tl.where(member, e, 0.0), 0)
        run_max = new_max
    log_sum_exp = tl.log(sum_exp)  # s >= 1: the maximum contributes e^0
    target_x = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32)
    tl.store(log_p_target_ptr + row, (target_x - run_max) * inv_temperature - log_sum_exp)
    tl.store(log_p_set_ptr + row, tl.log(sum_exp_set) - log_sum_exp)


def _launch(logits, targets, members, log_p_target, log_p_set, temperature: float):
    """(grid, every argument by name, config) of the kernel's launch on logits [N, V] (unit column
    stride), targets [N] int64, members [V] int8 and the two [N] fp32 outputs."""
    num_rows, vocab_size = logits.shape
    config = _config(vocab_size)
    values = [logits, logits.stride(0), targets, members, log_p_target, log_p_set, vocab_size, 1.0 / temperature]
    return (num_rows,), dict(zip(_target_and_set_kernel.arg_names, values), BLOCK_V=config["BLOCK_V"]), config


@torch.library.custom_op("moc_kernels::target_and_set_log_probs", mutates_args=())
def target_and_set_log_probs_op(
    logits: torch.Tensor, targets: torch.Tensor, in_set: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V], targets [N] int64, in_set [V] bool -> (log_p_target [N], log_p_set [N]) fp32."""
    num_rows, vocab_size = logits.shape
    log_p_target = _empty((num_rows,), torch.float32, logits.device)
    log_p_set = _empty((num_rows,), torch.float32, logits.device)
    if num_rows == 0:
        return log_p_target, log_p_set
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    members = in_set.to(device=logits.device, dtype=torch.int8).contiguous()
    grid, args, config = _launch(logits, targets.contiguous(), members, log_p_target, log_p_set, temperature)
    with on_device(logits):
        _target_and_set_kernel[grid](**args, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return log_p_target, log_p_set


@target_and_set_log_probs_op.register_fake
def _(logits, targets, in_set, temperature):
    num_rows = logits.shape[0]
    return logits.new_empty((num_rows,), dtype=torch.float32), logits.new_empty((num_rows,), dtype=torch.float32)


def target_and_set_log_probs(
    logits: torch.Tensor, targets: torch.Tensor, in_set: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [N], log p(set) [N]) fp32 of logits [N, V] fp32|bf16|fp16 at ``temperature``."""
    if logits.dtype not in TL_NAME:
        raise ValueError(f"target_and_set_log_probs (triton): unsupported logits dtype {logits.dtype}")
    return target_and_set_log_probs_op(logits, targets, in_set, float(temperature))


# (rows, vocabulary) the report compiles at, as fused_logit_nll's: a Kotara window of 2048 tokens of
# contiguous logits over a vocabulary within one "small" tile, GPT-2's 50257 (odd: the row stride and V
# get no divisibility hint) and Qwen2's 151936 (divisible by 16: hinted).
SHIPPED_SHAPES = ((2048, 1000), (2048, 50257), (2048, 151936))


def compile_specs(shapes=SHIPPED_SHAPES) -> list[KernelSpec]:
    """The kernel x shipped config (bf16 and fp32 logits) for ``python -m moc_kernels.report``, one per
    (rows, vocabulary) of ``shapes``, specialised as the JIT specialises the launcher's arguments (``_launch``)."""
    specs = []
    for num_rows, vocab_size in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            logits = torch.empty(num_rows, vocab_size, dtype=dtype, device="meta")
            targets = torch.empty(num_rows, dtype=torch.int64, device="meta")
            members = torch.empty(vocab_size, dtype=torch.int8, device="meta")
            out = torch.empty(num_rows, device="meta")
            _, args, config = _launch(logits, targets, members, out, out, 1.0)
            size = "small" if config is CONFIGS["small"] else "large"
            warps, stages = config["num_warps"], config["num_stages"]
            label = f"{size}-V{vocab_size}-BV{config['BLOCK_V']}-w{warps}-{TL_NAME[dtype]}"
            specs.append(launch_spec(_target_and_set_kernel, args, config=label, num_warps=warps, num_stages=stages))
    return specs
