"""Offline compile evidence: every shipped kernel configuration compiled for sm_80 and sm_90.

    python -m moc_kernels.report [--json | --summary] [--ops expert_swiglu,...] [--arch 80,90]

No GPU is needed: ``triton.compile`` targets a ``GPUTarget`` directly, and the ``cuobjdump`` and
``nvdisasm`` bundled in Triton's package read the resulting cubin. For each kernel x config x arch
it reports registers per thread, spilled bytes (stack + local), shared memory (bytes of dynamic
shared memory the launch requests), and whether the matrix products lowered to tensor-core
instructions (``wgmma``: HGMMA in the SASS on sm_90a; ``mma``: HMMA on sm_80).

The kernels must be compiled, not interpreted: on a machine without CUDA, where importing
``moc_kernels`` switches Triton to its interpreter, the command re-runs itself with
``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import multiprocessing
import os
import re
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from moc_kernels import backend
from moc_kernels.backend import KERNEL_OPS as OPS
from moc_kernels.triton.compile_spec import divisible_args

ARCHS = (80, 90)
# Largest dynamic shared memory one block may use (opt-in), per compute capability.
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}
# The package claims every GPU from sm_80 on; the smallest of them, sm_86 and sm_89 (RTX 30xx/40xx,
# A10, A40, L4, L40), allow 99 KiB per block, and their code is the sm_80 code (same ISA family). So
# every shipped config must fit 99 KiB, whatever arch it is compiled for here.
CLAIMED_SHARED_LIMIT_BYTES = 99 * 1024
COLUMNS = ("kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "tensor_cores")


def _tool(name: str) -> Path:
    """``cuobjdump`` or ``nvdisasm`` from Triton's package."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spilled bytes) of a single-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return int(fields["REG"]), int(fields["STACK"]) + int(fields["LOCAL"])


def _machine_code(cubin: bytes) -> bytes:
    """The instructions of a cubin: its ``.text.*`` sections (one per kernel function), read from the
    ELF64 section headers and concatenated."""
    (table,) = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, table + i * entry_size) for i in range(count)]
    names_at = headers[names][4]
    code = b""
    for name_at, _, _, _, offset, size in headers:
        name = cubin[names_at + name_at : cubin.index(b"\0", names_at + name_at)]
        if name.startswith(b".text."):
            code += cubin[offset : offset + size]
    return code


def _disassemble(codes: list[bytes], arch: str) -> list[str]:
    """The SASS of each machine-code blob in ``codes`` (all for ``arch``, e.g. ``sm_90a``), from one
    ``nvdisasm`` run over their concatenation: a run spends ~0.4 s of set-up whatever its input, which
    one run per cubin paid 200 times. Instructions are 16 bytes from sm_70 on, so each blob's
    addresses are a known range of the run's, and every instruction line is given back to its blob."""
    assert all(len(code) % 16 == 0 for code in codes), "sm_70+ instructions are 16 bytes"
    ends = list(itertools.accumulate(len(code) for code in codes))
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b"".join(codes))
        f.flush()
        cmd = [_tool("nvdisasm"), "--binary", arch.replace("sm_", "SM"), f.name]
        sass = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    lines: list[list[str]] = [[] for _ in codes]
    for address, line in re.findall(r"(?m)^\s*/\*([0-9a-f]+)\*/(.*)$", sass):
        lines[bisect.bisect_right(ends, int(address, 16))].append(line)
    return ["\n".join(kernel_lines) for kernel_lines in lines]


def compile_rows(specs: list, cc: int) -> list[dict]:
    """Compile each KernelSpec for compute capability ``cc`` and read its resource use (``cuobjdump``)
    and whether its matrix products use tensor cores (``nvdisasm``, one run for all of ``specs``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = []
    for spec in specs:
        source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        kernels.append(triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options))
    # The arch the code is for, as the PTX names it: cc 90 compiles for sm_90a (wgmma needs it).
    (arch,) = {re.search(r"^\.target\s+(sm_\w+)", k.asm["ptx"], re.M).group(1) for k in kernels}
    sass = _disassemble([_machine_code(k.asm["cubin"]) for k in kernels], arch)
    return [_row(spec, cc, kernel, kernel_sass) for spec, kernel, kernel_sass in zip(specs, kernels, sass)]


def _row(spec, cc: int, kernel, sass: str) -> dict:
    registers, spill_bytes = _resource_usage(kernel.asm["cubin"])
    if re.search(r"\bHGMMA\b", sass):
        tensor_cores = "wgmma"
    elif re.search(r"\bHMMA\b", sass):
        tensor_cores = "mma"
    else:
        tensor_cores = None
    return {
        "kernel": spec.kernel,
        "config": spec.config,
        "arch": f"sm_{cc}",
        "registers": registers,
        "spill_bytes": spill_bytes,
        "shared_bytes": int(kernel.metadata.shared),
        "tensor_cores": tensor_cores,
        "matmul": spec.matmul,
        "specialization": specialization(spec),
    }


def specialization(spec) -> str:
    """What the row's compile assumed of the launch: which arguments are divisible by 16 (and whence)."""
    return f"{spec.assumed}; divisible by 16: {', '.join(divisible_args(spec.fn, spec.attrs)) or 'none'}"


def kernel_specs(ops=OPS) -> list:
    """(op, KernelSpec) for every shipped config of the given ops (needs the real compiler)."""
    if backend.interpreting():
        raise RuntimeError("the compile report needs the real Triton compiler: run with TRITON_INTERPRET=0")
    return [(op, spec) for op in ops for spec in backend.kernel_module(op).compile_specs()]


def _arch_rows(ops: list[str], cc: int) -> list[dict]:
    return compile_rows([spec for _, spec in kernel_specs(ops)], cc)


def collect(ops=OPS, archs=ARCHS) -> list[dict]:
    """One row per (op, spec, arch), in that order. Each arch compiles in a process of its own, side
    by side (the compiler and nvdisasm use one core each); spawned, as this process has imported torch,
    whose threads a fork would not copy. The processes inherit ``TRITON_INTERPRET=0``."""
    specs = kernel_specs(ops)
    with ProcessPoolExecutor(len(archs), mp_context=multiprocessing.get_context("spawn")) as pool:
        by_arch = dict(zip(archs, pool.map(_arch_rows, [list(ops)] * len(archs), archs)))
    return [{"op": op, **by_arch[cc][i]} for i, (op, _) in enumerate(specs) for cc in archs]


def problems(rows: list[dict]) -> list[str]:
    """What a shipped config must not do: spill, need more shared memory than the smallest claimed GPU
    offers (``CLAIMED_SHARED_LIMIT_BYTES``), miss wgmma for a GEMM on sm_90."""
    found = []
    for r in rows:
        name = f"{r['kernel']} [{r['config']}] {r['arch']}"
        cc = int(r["arch"].removeprefix("sm_"))
        if r["spill_bytes"]:
            found.append(f"{name}: spills {r['spill_bytes']} bytes")
        limit = min(SHARED_LIMIT_BYTES[cc], CLAIMED_SHARED_LIMIT_BYTES)
        if r["shared_bytes"] > limit:
            found.append(f"{name}: {r['shared_bytes']} B shared memory > {limit} B (sm_86/sm_89 allow 99 KiB)")
        if r["matmul"] and cc == 90 and r["tensor_cores"] != "wgmma":
            found.append(f"{name}: matrix products did not lower to wgmma")
    return found


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    """One line per kernel and arch: how many configs, register range, spills, largest shared memory."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    lines = [
        "| kernel | arch | configs | registers | spill bytes | max shared KiB | tensor cores |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for (kernel, arch), group in groups.items():
        regs = sorted(r["registers"] for r in group)
        cores = sorted({r["tensor_cores"] or "-" for r in group})
        lines.append(
            f"| {kernel} | {arch} | {len(group)} | {regs[0]}-{regs[-1]} | {sum(r['spill_bytes'] for r in group)} "
            f"| {max(r['shared_bytes'] for r in group) / 1024:.0f} | {', '.join(cores)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moc_kernels.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list of objects")
    parser.add_argument("--summary", action="store_true", help="one line per kernel and arch instead of per config")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops (default: {','.join(OPS)})")
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default: 80,90)")
    args = parser.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    archs = [int(a) for a in args.arch.split(",") if a.strip().isdigit()]
    if unknown or not archs or set(archs) - set(ARCHS):
        print(f"error: --ops must name {', '.join(OPS)} and --arch 80 and/or 90", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # kernels decorated for the interpreter: start afresh
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        cmd = [sys.executable, "-m", "moc_kernels.report", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode
    rows = collect(ops, archs)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_summary(rows) if args.summary else format_table(rows))
        issues = problems(rows)
        print(f"\n{len(rows)} compiled; " + ("all clean" if not issues else "problems:\n  " + "\n  ".join(issues)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
