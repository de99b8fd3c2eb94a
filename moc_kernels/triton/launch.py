"""What the two SwiGLU ops (``expert_swiglu``, ``routed_swiglu``) share to plan and describe a launch:
the per-dtype lookup in a config table, the 32-bit in-tile offset check, the launch record, and the
KernelSpec (for ``python -m moc_kernels.report``) of a planned launch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton

from moc_kernels import backend
from moc_kernels.triton.compile_spec import KernelSpec, launch_spec
from moc_kernels.triton.utils import TL_NAME

META = ("PRECISION", "UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_K")


def table_config(table: dict[str, dict[str, int]], dtype: torch.dtype, dims: tuple[int, int, int]) -> dict[str, int]:
    """The config of ``table`` for ``dtype`` ("fp16" falls back to "bf16": same sizes, same tiles),
    blocks shrunk (not below 16, tl.dot's minimum) to the problem's (M, N, K) = ``dims`` so small shapes
    do not run mostly-masked tiles."""
    name = TL_NAME[dtype]
    cfg = dict(table.get(name) or table["bf16" if name == "fp16" else name])
    for key, size in zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), dims):
        cfg[key] = min(cfg[key], max(16, triton.next_power_of_2(size)))
    return cfg


def check_strides(op: str, args: dict[str, Any], cfg: dict[str, int]) -> None:
    """Offsets inside a tile are 32-bit (tile origins and expert offsets 64-bit): a row/column stride
    times a block size must stay below 2^31. Expert strides (names ending in "e") are exempt."""
    limit = 2**31 // max(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"])
    for arg, value in args.items():
        if arg.startswith("stride_") and not arg.endswith("e") and abs(value) >= limit:
            raise ValueError(f"{op}: {arg}={value} is too large for 32-bit in-tile offsets (< {limit})")


def meta_args(dtype: torch.dtype, cfg: dict[str, int]) -> dict[str, Any]:
    """The constexprs every SwiGLU GEMM takes: product precision, interpreter upcast, block sizes."""
    return {
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": backend.interpreting() and dtype != torch.float32,
        **{key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
    }


def tile_grid(row_blocks: int, cfg: dict[str, int], cols: int, batch: int = 1) -> tuple[int, int, int]:
    """The grid of a GEMM-like kernel: axis 0 numbers (row block, column tile) pairs, which the kernel
    (``expert_swiglu._tile_ids``) reads column tile fastest, so the blocks resident at one time share
    their row blocks' left-operand tiles and read them from HBM once (or row block fastest where the
    right operand is the larger one); axis 2 is the batch (expert). One axis: no 65,535 limit."""
    return (row_blocks * triton.cdiv(cols, cfg["BLOCK_N"]), 1, batch)


@dataclass
class Launch:
    fn: Any  # the triton.JITFunction
    name: str  # the config table's key
    grid: tuple[int, ...]
    args: dict[str, Any]  # every argument by name: tensors, ints, and constexpr values
    num_warps: int
    num_stages: int

    def run(self) -> None:
        if all(self.grid):
            self.fn[self.grid](**self.args, num_warps=self.num_warps, num_stages=self.num_stages)


def plan_label(plan: Launch, dtype: torch.dtype) -> str:
    """The report's config label of a plan: ``name-BM..-BN..-BK..-w..-s..-dtype``."""
    blocks = "-".join(f"B{key[-1]}{plan.args[key]}" for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return f"{plan.name}-{blocks}-w{plan.num_warps}-s{plan.num_stages}-{TL_NAME[dtype]}"


def plan_spec(plan: Launch, dtype: torch.dtype) -> KernelSpec:
    """The KernelSpec that compiles what ``plan`` launches (the JIT's specialization of its arguments),
    labelled by ``plan_label``. Exact fp32 (ieee) products run on the FMA pipes by design: no tensor
    cores to expect there."""
    return launch_spec(
        plan.fn, {**plan.args, "UPCAST": False}, config=plan_label(plan, dtype), num_warps=plan.num_warps,
        num_stages=plan.num_stages, matmul=dtype != torch.float32,
    )  # fmt: skip
