"""What ``python -m moc_kernels.report`` needs to compile one shipped kernel configuration offline.

Each kernel module (``moc_kernels/triton/<op>.py``) keeps its launch-configuration table next to its
kernels and exposes ``compile_specs() -> list[KernelSpec]``: one entry per kernel x shipped config,
built from that same table, so the report compiles exactly what the launchers launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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


_TL_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int32: "i32",
    torch.int64: "i64",
}


def launch_spec(fn, args: dict[str, Any], constexprs: tuple[str, ...], **spec: Any) -> KernelSpec:
    """The KernelSpec that compiles ``fn`` as a launch with ``args`` (every argument by name) would:
    tensors become typed pointers, the ``constexprs`` constants, ints equal to 1 constants too (Triton
    specialises them so at launch), other ints i32 (i64 when they do not fit). ``spec``: the remaining
    KernelSpec fields (config, num_warps, num_stages, matmul)."""
    signature: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name in fn.arg_names:
        value = args[name]
        if name in constexprs or (not isinstance(value, torch.Tensor) and value == 1):
            signature[name] = "constexpr"
            values[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TL_TYPES[value.dtype]
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
    return KernelSpec(kernel=fn.__name__, fn=fn, signature=signature, constexprs=values, **spec)
