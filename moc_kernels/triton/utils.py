"""Helpers every kernel module shares."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

# Triton's name of each data dtype (config-table keys, compile signatures, report labels).
TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context in which to launch kernels on ``tensor``: its CUDA device made current.

    Triton launches on the *current* CUDA device, whatever device its pointer arguments live on;
    without this, inputs on ``cuda:1`` under a current ``cuda:0`` (Kotara's per-model devices, a
    rank that forgot ``set_device``) would launch on the wrong GPU with foreign pointers. On the
    CPU (the interpreter) there is nothing to select.
    """
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def device_vector(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Python floats -> [len(values)] fp32 on ``device`` without a host-to-device copy.

    ``torch.tensor(values, device="cuda")`` copies from pageable host memory, which blocks the host
    until the copy is done (twice per decoding step in Kotara's generation). Here each value travels
    as the scalar argument of a fill kernel, queued like any other launch.
    """
    return torch.stack([torch.full((), float(v), dtype=torch.float32, device=device) for v in values])
