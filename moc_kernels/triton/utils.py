"""Helpers every kernel module shares."""

from __future__ import annotations

import contextlib

import torch


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context in which to launch kernels on ``tensor``: its CUDA device made current.

    Triton launches on the *current* CUDA device, whatever device its pointer arguments live on;
    without this, inputs on ``cuda:1`` under a current ``cuda:0`` (Kotara's per-model devices, a
    rank that forgot ``set_device``) would launch on the wrong GPU with foreign pointers. On the
    CPU (the interpreter) there is nothing to select.
    """
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()
