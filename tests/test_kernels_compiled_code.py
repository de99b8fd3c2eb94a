"""What only the compiled kernels show: their sm_90 PTX, read on a machine without a GPU.

Triton's interpreter evaluates every operation as written; a GPU compiler contracts ``a * b - c``
into one fma, rounded once. In a softmax that scales before it subtracts the maximum,
``x * (1 / T) - max`` becomes ``fma(x, 1 / T, -max)``, and at the maximal entry it returns the
rounding error of x / T (up to half an ulp of the maximum) instead of 0: the fused entropy of a
confident row went negative on GPUs (H = -2.9e-6 for one logit of 80 at T = 1.1) while every
interpreter test passed. The kernels now subtract first, ``(x - max) * (1 / T)``, which is exact at
the maximum whatever the compiler contracts; these tests read the PTX so the pattern cannot return.

Compiled in a subprocess with TRITON_INTERPRET=0 (this process runs Triton under its interpreter).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (op, kernel, config prefix, config suffix): one compiled config per softmax-like kernel and dtype class.
SOFTMAX_KERNELS = [
    ("fused_logit_nll", "_model_stats_kernel", "small-", "-fp32"),
    ("fused_logit_nll", "_model_stats_kernel", "large-", "-bf16"),
    ("fused_logit_nll", "_fused_lse_kernel", "small-", "M2-S4-w4-fp32"),
    ("fused_logit_nll", "_fused_log_probs_kernel", "small-", "M2-mix-w4-fp32"),
    ("fused_logit_nll", "_fused_log_probs_kernel", "small-", "M2-lin-w4-fp32"),
    ("small_attention", "_small_attention_fwd", "L8-dh64-", "-fp32"),
    ("small_attention", "_small_attention_fwd", "L8-dh64-", "-bf16"),
    ("small_attention", "_small_attention_bwd", "L8-dh64-", "-fp32"),
    ("small_attention", "_small_attention_bwd", "L8-dh64-", "-bf16"),
]

_COMPILE = textwrap.dedent(
    """
    import json, sys, torch, triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from moc_kernels import backend
    from moc_kernels.triton.compile_spec import launch_spec

    @triton.jit
    def scale_then_subtract(x_ptr, y_ptr, inv_t, BLOCK: tl.constexpr):
        z = tl.load(x_ptr + tl.arange(0, BLOCK)) * inv_t
        tl.store(y_ptr + tl.arange(0, BLOCK), tl.exp(z - tl.max(z, 0)))

    def ptx(spec):
        # The launch build where the spec carries the JIT's specialization (attrs), as the report.
        source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    x = torch.empty(256, device="meta")
    control = launch_spec(scale_then_subtract, {"x_ptr": x, "y_ptr": x, "inv_t": 0.5, "BLOCK": 256},
                          config="control", num_warps=4, num_stages=1)
    out = {"control": ptx(control)}
    for op, kernel, prefix, suffix in json.loads(sys.argv[1]):
        spec = next(s for s in backend.kernel_module(op).compile_specs()
                    if s.kernel == kernel and s.config.startswith(prefix) and s.config.endswith(suffix))
        out[f"{kernel} [{spec.config}]"] = ptx(spec)
    print(json.dumps(out))
    """
)

_INSTRUCTION = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+([^;]*);", re.M)
_SIGN_BIT = {"-2147483648", "0x80000000", "0f80000000"}


def contracted_subtractions(ptx: str) -> list[str]:
    """Every ``fma.rn.f32 d, a, b, c`` whose addend c is a negated register: the compiled form of
    ``a * b - x`` (PTX's fma has no negated operand, so x is flipped first, by ``neg.f32`` or by
    an ``xor.b32`` of the sign bit)."""
    negated = set()
    for opcode, operands in _INSTRUCTION.findall(ptx):
        regs = [o.strip() for o in operands.split(",")]
        if opcode.startswith("neg.f32") or (opcode.startswith("xor.b32") and regs[-1] in _SIGN_BIT):
            negated.add(regs[0])
    return [
        f"{opcode} {operands}"
        for opcode, operands in _INSTRUCTION.findall(ptx)
        if opcode.startswith("fma.rn") and ".f32" in opcode and operands.split(",")[-1].strip() in negated
    ]


@pytest.fixture(scope="module")
def compiled_ptx() -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT)}
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"moc_compile_ptx_{os.getpid()}.py"
    script.write_text(_COMPILE)  # @triton.jit needs its source in a file
    try:
        proc = subprocess.run(
            [sys.executable, str(script), json.dumps(SOFTMAX_KERNELS)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
    finally:
        script.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_detector_finds_a_scale_then_subtract_softmax(compiled_ptx):
    """The positive control: ``x * inv_t - max`` compiles to fma(x, inv_t, -max) on sm_90."""
    assert contracted_subtractions(compiled_ptx["control"]), "the compiler no longer contracts: revisit this test"


def test_no_softmax_kernel_contracts_a_product_with_a_subtraction(compiled_ptx):
    """In these kernels every subtraction is of a row's shift (its maximum or log-sum-exp); none may be
    fused with a product, or the largest entry stops being exactly 0 (see the module docstring)."""
    assert len(compiled_ptx) == len(SOFTMAX_KERNELS) + 1
    found = {
        name: fmas[:3]
        for name, ptx in compiled_ptx.items()
        if name != "control" and (fmas := contracted_subtractions(ptx))
    }
    assert not found, "product then subtraction contracted into an fma (subtract first, then scale):\n" + "\n".join(
        f"{name}: {fmas}" for name, fmas in found.items()
    )
