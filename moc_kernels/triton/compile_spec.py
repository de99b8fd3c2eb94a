"""What ``python -m moc_kernels.report`` needs to compile one shipped kernel configuration offline.

Each kernel module (``moc_kernels/triton/<op>.py``) keeps its launch-configuration table next to its
kernels and exposes ``compile_specs() -> list[KernelSpec]``: one entry per kernel x shipped config, each made by
:func:`launch_spec` from the argument dict the launcher itself builds (a helper both call) on meta
tensors at a stated shipped shape, so the report compiles exactly what the launchers launch.

The launch build: at a launch, Triton's JIT specialises the kernel on its arguments (an integer equal
to 1 becomes a constant; a pointer or integer divisible by 16 gets ``tt.divisibility = 16``, which
changes vectorisation, pipelining and registers). :func:`jit_specialization` runs the JIT's own
specialization code (its argument binder and ``_pack_args``, the same calls ``JITFunction.run`` makes,
Triton 3.6 to 3.9) on a launch's arguments, so the report compiles the binary a GPU would launch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

# A CUDA tensor's first element: its allocation's start (PyTorch's caching allocator hands out 512-byte
# aligned blocks; only the divisibility by 16 matters to the JIT) plus the view's offset in bytes.
ALLOCATION_START = 1 << 20
LAUNCH_ASSUMED = "launch args at the shipped shape; tensors at 512-B aligned allocations + their view offset"


@dataclass(frozen=True)
class KernelSpec:
    kernel: str  # the @triton.jit function's name, e.g. "_swiglu_up_fwd"
    config: str  # a short label of the config, e.g. "BM64-BN128-BK32-w8-s3-bf16"
    fn: Any  # the triton.JITFunction itself
    signature: dict[str, str]  # every argument: "*fp32", "*bf16", "i32", "i64", "fp32", ... or "constexpr"
    constexprs: dict[Any, Any]  # values of the "constexpr" arguments
    attrs: dict[tuple, list]  # the JIT's per-argument attributes, {(index,): [["tt.divisibility", 16]]}
    num_warps: int = 4
    num_stages: int = 3
    matmul: bool = False  # True when its products should lower to mma (sm_80) / wgmma (sm_90a)
    assumed: str = LAUNCH_ASSUMED  # what the specialization assumed, shown in the report's rows


class _LaunchPointer:
    """What the JIT reads of a tensor argument: its dtype and the address of its first element."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.dtype = tensor.dtype
        self._address = ALLOCATION_START + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


def _cuda_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    # The specialization is the same for every CUDA arch (BaseBackend's rules: "D" = divisible by 16).
    return make_backend(GPUTarget("cuda", 90, 32))


def jit_specialization(fn, args: dict[str, Any]) -> tuple[dict[str, str], dict[tuple, Any], dict[tuple, list]]:
    """(signature, constexprs, attrs) that Triton's JIT derives from a launch of ``fn`` with ``args``
    (every argument by name, constexprs included; tensors may be on the meta device): the binder
    ``JITFunction.run`` builds and its ``_pack_args``, given pointers as a CUDA launch has them."""
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(fn, JITFunction):  # decorated under the interpreter: the same function, for the JIT
        fn = JITFunction(fn.fn)
    backend = _cuda_backend()
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    values = {name: _LaunchPointer(v) if isinstance(v, torch.Tensor) else v for name, v in args.items()}
    bound, specialization, options = binder(**values)
    with warnings.catch_warnings():  # Triton 3.9 warns about its fp-fusion default on every options parse
        warnings.simplefilter("ignore", UserWarning)
        _, signature, constexprs, attrs = fn._pack_args(backend, {}, bound, specialization, options)
    return signature, constexprs, attrs


def divisible_args(fn, attrs: dict[tuple, list]) -> list[str]:
    """Names of the arguments the attributes mark divisible by 16."""
    return [fn.arg_names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr]


def launch_spec(fn, args: dict[str, Any], **spec: Any) -> KernelSpec:
    """The KernelSpec that compiles ``fn`` as a launch with ``args`` (every argument by name, constexprs
    included) would, specialised by the JIT's own code (:func:`jit_specialization`). ``spec``: the
    remaining KernelSpec fields (config, num_warps, num_stages, matmul)."""
    signature, constexprs, attrs = jit_specialization(fn, args)
    return KernelSpec(kernel=fn.__name__, fn=fn, signature=signature, constexprs=constexprs, attrs=attrs, **spec)
