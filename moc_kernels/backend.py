"""The one place that decides which implementation of an op runs.

Backends:
  ``reference``  plain PyTorch (``moc_kernels.reference``): the spec, runs anywhere.
  ``triton``     the Triton kernels (``moc_kernels.triton``). On a machine without CUDA they run
                 under Triton's interpreter, which is for tests, not speed.
  ``auto``       Triton for CUDA tensors, the reference for everything else.

The choice comes from, in order: ``use_backend(...)`` / ``set_backend(...)``, the environment
variable ``MOC_KERNELS``, then ``auto``.

Triton decides interpret-or-compile when a function is *decorated*, and its own ``tl.max``,
``tl.sum``... are decorated when ``triton.language`` is first imported. So on a machine without
CUDA, importing ``moc_kernels`` sets ``TRITON_INTERPRET=1`` unless the environment already says
otherwise or Triton was imported first (then the ``triton`` backend explains what to do).

The kernel modules are imported with the package (when Triton is installed), and everything
:func:`resolve` reads is a global or an environment variable, so ``torch.compile`` traces through
the dispatch without graph breaks.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
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


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
KERNEL_OPS = (
    "expert_swiglu",
    "topk_gather",
    "small_attention",
    "fused_logit_nll",
    "routed_swiglu",
    "target_and_set_log_probs",
)


def _version(package: str) -> tuple[int, ...]:
    """(major, minor) of an installed package, (0,) when unknown."""
    try:
        return tuple(int(part) for part in importlib.metadata.version(package).split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0,)


def _interpreter_problem() -> str | None:
    """Switch Triton to its interpreter where there is no GPU; say why kernels cannot run, if so."""
    if not TRITON_INSTALLED:
        return "the triton package is not installed"
    if torch.cuda.is_available():
        return None
    if "TRITON_INTERPRET" not in os.environ and "triton.language" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    if not interpreting():
        return (
            "there is no CUDA GPU and Triton's interpreter is off (TRITON_INTERPRET is not 1, or "
            "triton was imported before moc_kernels); set TRITON_INTERPRET=1 before starting Python"
        )
    # Before 3.9 the interpreter turns 1-element arrays into indices with int(), which NumPy 2 refuses
    # ("only 0-dimensional arrays can be converted to Python scalars"); compiled kernels are unaffected.
    if _version("triton") < (3, 9) and _version("numpy") >= (2,):
        return (
            f"Triton {importlib.metadata.version('triton')}'s interpreter fails under NumPy "
            f"{importlib.metadata.version('numpy')}; on a CPU use triton >= 3.9 (or numpy < 2)"
        )
    return None


def interpreting() -> bool:
    """Whether Triton kernels in this process run under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_problem() -> str | None:
    """Why the Triton kernels cannot run in this process (on the GPU, or interpreted without one); None if they can."""
    return _TRITON_PROBLEM


def resolve(device: torch.device) -> str:
    """The implementation (``triton`` or ``reference``) that runs for tensors on ``device``."""
    name = get_backend()
    if name == "auto":
        return "triton" if device.type == "cuda" and _TRITON_PROBLEM is None else "reference"
    if name == "triton" and _TRITON_PROBLEM is not None:
        raise RuntimeError(f"kernels backend 'triton' requested, but {_TRITON_PROBLEM}")
    return name


def kernel_module(op: str) -> ModuleType:
    """The Triton module ``moc_kernels.triton.<op>`` (imported with the package)."""
    if op not in _KERNEL_MODULES:
        raise RuntimeError(f"no Triton kernels for {op!r}: {_TRITON_PROBLEM or 'unknown op'}")
    return _KERNEL_MODULES[op]


_TRITON_PROBLEM = _interpreter_problem()
_KERNEL_MODULES: dict[str, ModuleType] = (
    {op: importlib.import_module(f"moc_kernels.triton.{op}") for op in KERNEL_OPS} if TRITON_INSTALLED else {}
)
