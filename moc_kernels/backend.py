"""The one place that decides which implementation of an op runs.

Backends:
  ``reference``  plain PyTorch (``moc_kernels.reference``): the spec, runs anywhere.
  ``triton``     the Triton kernels (``moc_kernels.triton``). On a machine without CUDA they run
                 under Triton's interpreter, which is for tests, not speed.
  ``auto``       Triton for CUDA tensors, the reference for everything else.

The choice comes from, in order: ``use_backend(...)`` / ``set_backend(...)``, the environment
variable ``MOC_KERNELS``, then ``auto``.

Triton decides interpret-or-compile when a kernel is *decorated*, i.e. when the kernel module is
first imported. So kernel modules are only ever imported through :func:`kernel_module`, which sets
``TRITON_INTERPRET=1`` first when there is no GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "MOC_KERNELS"

_selected: str | None = None  # set by set_backend/use_backend; None means "ask the environment"


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernels backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The requested backend name: ``auto``, ``triton`` or ``reference``."""
    if _selected is not None:
        return _selected
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Select the backend for every later op call in this process."""
    global _selected
    _selected = _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager selecting the backend inside its block, restoring the previous one after."""
    global _selected
    previous = _selected
    _selected = _check(name)
    try:
        yield
    finally:
        _selected = previous


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def resolve(device: torch.device) -> str:
    """The implementation (``triton`` or ``reference``) that runs for tensors on ``device``."""
    name = get_backend()
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if name == "triton" and not triton_available():
        raise RuntimeError("kernels backend 'triton' requested but the triton package is not installed")
    return name


def interpreting() -> bool:
    """Whether Triton kernels in this process run under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_module(op: str) -> ModuleType:
    """Import ``moc_kernels.triton.<op>``, switching Triton to its interpreter when there is no GPU."""
    name = f"moc_kernels.triton.{op}"
    if name not in sys.modules and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        raise NotImplementedError(f"no Triton kernel for {op!r} yet; use the 'reference' backend") from None
