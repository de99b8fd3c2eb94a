"""The implementations a benchmark case can time: reference, torch.compile(reference), Triton (CUDA).

``implementation(fn_name, impl, device)`` returns a callable with the public op's signature or
skips the case (``pytest.skip``) with the reason, so a skipped cell always says why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

import moc_kernels
from moc_kernels import reference

IMPLS = ("reference", "compile", "triton")
INTERPRETER_SKIP = "Triton on CPU runs under its interpreter, which is not a speed: not timed (CUDA only)"


@functools.cache
def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One ``torch.compile`` wrapper per function, shared by every case (compile once per shape)."""
    return torch.compile(fn, dynamic=False)


def with_backend(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with ``moc_kernels``' backend set to ``name`` for the duration of each call."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with moc_kernels.use_backend(name):
            return fn(*args, **kwargs)

    return run


def require_triton(device: torch.device) -> None:
    """Skip unless the Triton kernels can be timed here (on CUDA)."""
    if device.type != "cuda":
        pytest.skip(INTERPRETER_SKIP)
    problem = moc_kernels.backend.triton_problem()
    if problem:
        pytest.skip(f"Triton kernels unavailable: {problem}")


def implementation(fn_name: str, impl: str, device: torch.device) -> Callable[..., Any]:
    """The public op ``fn_name`` (e.g. ``expert_swiglu``, ``fused_logit_nll_multi``) as ``impl``."""
    if impl == "reference":
        return getattr(reference, fn_name)
    if impl == "compile":
        return compiled(getattr(reference, fn_name))
    if impl == "triton":
        require_triton(device)
        return with_backend("triton", getattr(moc_kernels, fn_name))
    raise ValueError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")
