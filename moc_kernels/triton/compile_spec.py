"""What ``python -m moc_kernels.report`` needs to compile one shipped kernel configuration offline.

Each kernel module (``moc_kernels/triton/<op>.py``) keeps its launch-configuration table next to its
kernels and exposes ``compile_specs() -> list[KernelSpec]``: one entry per kernel x shipped config,
built from that same table, so the report compiles exactly what the launchers launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    kernel: str  # the @triton.jit function's name, e.g. "_swiglu_up_fwd"
    config: str  # a short label of the config, e.g. "BM64-BN128-BK32-w8-s3-bf16"
    fn: Any  # the triton.JITFunction itself
    signature: dict[str, str]  # every argument: "*fp32", "*bf16", "i32", "i64", "fp32", ... or "constexpr"
    constexprs: dict[str, Any] = field(default_factory=dict)  # values of the "constexpr" arguments
    num_warps: int = 4
    num_stages: int = 3
    matmul: bool = False  # True when its products should lower to mma (sm_80) / wgmma (sm_90a)
