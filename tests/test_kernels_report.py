"""The offline compile report: every shipped config compiles for sm_80/sm_90 without spills.

Runs in subprocesses with TRITON_INTERPRET=0: the report needs the real Triton compiler, while this
process (no GPU) runs Triton under its interpreter.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moc_kernels.report import OPS, SHARED_LIMIT_BYTES, format_summary, problems

ROOT = Path(__file__).resolve().parents[1]


def run_python(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_report_reads_registers_and_tensor_cores_of_a_known_gemm(tmp_path):
    # A 64x64x32 bf16 tile GEMM: tl.dot must become HMMA on sm_80 and HGMMA (wgmma) on sm_90.
    code = textwrap.dedent(
        """
        import json, torch, triton, triton.language as tl
        from moc_kernels.report import compile_rows
        from moc_kernels.triton.compile_spec import launch_spec

        @triton.jit
        def tile_gemm(a, b, c, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
            rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
            acc = tl.dot(tl.load(a + rm[:, None] * BK + rk[None, :]), tl.load(b + rk[:, None] * BN + rn[None, :]))
            tl.store(c + rm[:, None] * BN + rn[None, :], acc)

        @triton.jit
        def copy(x, y, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            tl.store(y + o, tl.load(x + o))

        def empty(*size, dtype=torch.float32):
            return torch.empty(size, dtype=dtype, device="meta")

        a, b = empty(64, 32, dtype=torch.bfloat16), empty(32, 64, dtype=torch.bfloat16)
        gemm_args = {"a": a, "b": b, "c": empty(64, 64), "BM": 64, "BN": 64, "BK": 32}
        gemm = launch_spec(tile_gemm, gemm_args, config="64x64x32", num_warps=4, matmul=True)
        plain = launch_spec(copy, {"x": empty(1024), "y": empty(1024), "BLOCK": 1024}, config="1024")
        # One nvdisasm run per arch, as in the report: the GEMM between two copies, so SASS given to a
        # neighbour (either side) shows up as a copy with tensor cores.
        print(json.dumps([row for cc in (80, 90) for row in compile_rows([plain, gemm, plain], cc)]))
        """
    )
    script = tmp_path / "known_kernels.py"  # @triton.jit needs its source in a file
    script.write_text(code)
    proc = run_python([str(script)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert [(r["kernel"], r["arch"]) for r in rows] == [
        (kernel, arch) for arch in ("sm_80", "sm_90") for kernel in ("copy", "tile_gemm", "copy")
    ]
    expected = {("tile_gemm", "sm_80"): "mma", ("tile_gemm", "sm_90"): "wgmma"}
    for row in rows:
        assert row["tensor_cores"] == expected.get((row["kernel"], row["arch"])), row
        assert 0 < row["registers"] <= 255 and row["spill_bytes"] == 0


def test_problems_flags_spills_shared_overflow_and_missing_wgmma():
    good = dict(kernel="k", config="c", arch="sm_90", registers=128, spill_bytes=0, shared_bytes=1024)
    assert problems([{**good, "tensor_cores": "wgmma", "matmul": True}]) == []
    assert problems([{**good, "tensor_cores": None, "matmul": False}]) == []
    found = problems(
        [
            {**good, "tensor_cores": "wgmma", "matmul": True, "spill_bytes": 264},
            {**good, "tensor_cores": "mma", "matmul": True},
            {
                **good,
                "tensor_cores": None,
                "matmul": False,
                "arch": "sm_80",
                "shared_bytes": SHARED_LIMIT_BYTES[80] + 1,
            },
        ]
    )
    assert len(found) == 3
    assert "spills 264" in found[0] and "wgmma" in found[1] and "shared memory" in found[2]


def test_problems_flags_shared_memory_beyond_the_smallest_claimed_gpu():
    """sm_86/sm_89 GPUs allow 99 KiB per block: a config that fits sm_90's 227 KiB may still not launch there."""
    row = dict(kernel="k", config="c", arch="sm_90", registers=128, spill_bytes=0, shared_bytes=99 * 1024)
    row |= dict(tensor_cores="wgmma", matmul=True)
    assert problems([row]) == []
    for arch in ("sm_80", "sm_90"):
        found = problems([{**row, "arch": arch, "shared_bytes": 99 * 1024 + 1}])
        assert len(found) == 1 and "shared memory" in found[0], found


@pytest.mark.slow
def test_every_shipped_config_compiles_clean_for_sm80_and_sm90():
    proc = run_python(["-m", "moc_kernels.report", "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    for op in OPS:
        assert (ROOT / f"moc_kernels/triton/{op}.py").exists(), f"no Triton module for {op}"
        assert any(r["op"] == op for r in rows), f"{op}: no shipped config in the report"
    archs = {r["arch"] for r in rows}
    assert archs == {"sm_80", "sm_90"}
    assert {(r["kernel"], r["config"]) for r in rows if r["arch"] == "sm_80"} == {
        (r["kernel"], r["config"]) for r in rows if r["arch"] == "sm_90"
    }
    assert problems(rows) == []
    assert any(r["matmul"] for r in rows), "no GEMM-shaped kernel declared"
    # The traffic model's residency comes from these rows: its table must be today's sm_90 build.
    from benchmarks.traffic_model import LAUNCH_BUILD_SM90

    built = {(r["kernel"], r["config"]): (r["registers"], r["shared_bytes"]) for r in rows if r["arch"] == "sm_90"}
    assert {key: built.get(key) for key in LAUNCH_BUILD_SM90} == LAUNCH_BUILD_SM90


def test_summary_aggregates_per_kernel_and_arch():
    def row(kernel, arch, registers, spill, shared, cores):
        return dict(
            kernel=kernel,
            config="c",
            arch=arch,
            registers=registers,
            spill_bytes=spill,
            shared_bytes=shared,
            tensor_cores=cores,
            matmul=True,
        )

    rows = [
        row("k1", "sm_90", 96, 0, 2048, "wgmma"),
        row("k1", "sm_90", 168, 8, 65536, "wgmma"),
        row("k1", "sm_80", 128, 0, 1024, "mma"),
        row("k2", "sm_80", 40, 0, 0, None),
    ]
    lines = format_summary(rows).splitlines()[2:]
    assert lines == [
        "| k1 | sm_90 | 2 | 96-168 | 8 | 64 | wgmma |",
        "| k1 | sm_80 | 1 | 128-128 | 0 | 1 | mma |",
        "| k2 | sm_80 | 1 | 40-40 | 0 | 0 | - |",
    ]


def test_fused_lse_offsets_into_strategy_major_buffers_are_64_bit(tmp_path):
    """``_fused_lse_kernel`` indexes [S, M, N] and [S, N] buffers by (s M + i) N + row: in int32 that
    overflows past ~38 M rows, which no CPU test can allocate, so read the compiled IR instead: with
    bf16 logits, the fp32 pointers are those two buffers', and no offset added to them may be 32-bit."""
    code = textwrap.dedent(
        """
        import re, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from moc_kernels.triton import fused_logit_nll as f

        spec = next(s for s in f.compile_specs() if s.kernel == "_fused_lse_kernel" and s.config.endswith("S4-w4-bf16"))
        source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
        options = {"num_warps": spec.num_warps}
        ttir = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ttir"]
        for line in re.findall(r"tt\\.addptr .*ptr<f32>.*", ttir):
            print(line.split(" loc(")[0])
        """
    )
    script = tmp_path / "fused_lse_ir.py"
    script.write_text(code)
    proc = run_python([str(script)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    offsets = proc.stdout.splitlines()
    assert len(offsets) >= 2, "expected pointer arithmetic on coef and out: the IR pattern changed"
    assert not [line for line in offsets if "i32" in line], "\n".join(offsets)


def test_report_compiles_the_specialization_the_jit_gives_the_launch(tmp_path):
    """Issue 27: the report compiled without the JIT's launch specialization (tt.divisibility = 16 on
    aligned pointers and integers divisible by 16), a different binary from the one that launches.
    Each SwiGLU launch at the shipped shape is run through ``JITFunction.run`` itself, with a stand-in
    driver and a ``jit_cache_hook`` that records what the JIT would compile and stops it there; the
    report's KernelSpec of the same plan must carry the same signature, constants and attributes.
    The launchers of topk_gather / gather_matmul, fused_logit_nll and target_and_set_log_probs (their
    specs were written by hand, with neither integer hints nor the launch's integer types) run the
    same way at their modules' shipped shapes, and must give exactly the specs of their
    ``compile_specs()``; and no row of the report may be a hand-written spec (every pointer of every
    spec is marked aligned, as the JIT marks a launch's tensors)."""
    code = textwrap.dedent(
        """
        import json, torch, triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from moc_kernels.triton import expert_swiglu as es, routed_swiglu as rs
        from moc_kernels.triton.launch import plan_spec

        class Driver:  # what JITFunction.run asks of the driver before it compiles
            def get_current_device(self): return 0
            def get_current_stream(self, device): return 0
            def get_current_target(self): return GPUTarget("cuda", 90, 32)
            def get_active_torch_device(self): return torch.device("meta")

        def described(signature, constants, attrs):
            return {"signature": signature, "constants": {str(k): str(v) for k, v in constants.items()},
                    "attrs": {str(k): v for k, v in (attrs or {}).items()}}  # None: a hand-written spec

        seen, named = [], []
        def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
            seen.append(described(compile["signature"], compile["constants"], compile["configs"][0]))
            named.append([fn.name, seen[-1]])
            return True  # no compile: the specialization is all that is wanted

        triton.runtime.driver.set_active(Driver())
        knobs.runtime.jit_cache_hook = hook
        meta = {"dtype": torch.bfloat16, "device": "meta"}
        N, D, E, F, k = (rs.SHIPPED_SHAPE[key] for key in ("N", "D", "E", "F", "k"))
        packed = torch.empty(E, D, 2 * F, **meta)
        w1, w3, w2, x = packed[..., :F], packed[..., F:], torch.empty(E, F, D, **meta), torch.empty(N, D, **meta)
        int32 = {"dtype": torch.int32, "device": "meta"}
        routing = (torch.empty(N * k, **int32), torch.empty(E + 1, **int32), k)
        _, g, u, forward = rs._forward_plans(x, w1, w3, w2, routing)
        _, backward = rs._backward_plans(torch.empty(N * k, D, **meta), x, w1, w3, w2, routing, g, u, (True,) * 3)
        _, g, u, moc_forward = es._forward_plans(x, w1, w3, w2, recompute=False)
        _, moc_backward = es._backward_plans(torch.empty(N, E, D, **meta), x, w1, w3, w2, g, u, recompute=False)
        result = []
        for plan in [*forward, *backward, *moc_forward, *moc_backward]:
            plan.args["UPCAST"] = False
            seen.clear()
            plan.run()
            spec = plan_spec(plan, torch.bfloat16)
            result.append([plan.name, list(seen), [described(spec.signature, spec.constexprs, spec.attrs)]])

        # The other modules' launchers, run as the ops run them (custom ops' own functions on meta tensors).
        from moc_kernels.report import kernel_specs
        from moc_kernels.triton import fused_logit_nll as fl, target_and_set_log_probs as ts, topk_gather as tg
        from moc_kernels.triton.compile_spec import divisible_args

        def empty(*size, dtype=torch.float32):
            return torch.empty(size, dtype=dtype, device="meta")

        named.clear()
        N, E, k, D, F = (tg.SHIPPED_SHAPE[key] for key in ("N", "E", "k", "D", "F"))
        idx = empty(N, k, dtype=torch.int64)
        for dtype in (torch.bfloat16, torch.float32):
            y, w = empty(N, E, D, dtype=dtype), empty(D, F, dtype=dtype)
            tg.topk_gather_fwd._init_fn(y, idx)
            tg.topk_gather_bwd._init_fn(empty(N, k, D, dtype=dtype), idx, E)
            tg.gather_matmul_fwd._init_fn(y, idx, w)
            tg.gather_matmul_bwd._init_fn(y, idx, w, empty(N, k, F, dtype=dtype))
        for rows, vocab in fl.SHIPPED_SHAPES:
            for dtype in (torch.bfloat16, torch.float32):
                logits, row_max = [empty(rows, vocab, dtype=dtype) for _ in range(8)], empty(8, rows)
                fl._model_stats(logits[:1], empty(rows, dtype=torch.int64), [0.7])
                for models, strategies in ((2, 1), (2, 4), (8, 4)):
                    fl._fused_lse(logits[:models], row_max[:models], empty(strategies, models, rows))
                for models, mixture in ((2, False), (2, True), (8, False), (8, True)):
                    coef = offset = row_max[:models]
                    fl._pool_log_probs(logits[:models], row_max[:models], coef, offset, mixture)
        for rows, vocab in ts.SHIPPED_SHAPES:
            for dtype in (torch.bfloat16, torch.float32):
                targets, in_set = empty(rows, dtype=torch.int64), empty(vocab, dtype=torch.bool)
                ts.target_and_set_log_probs_op._init_fn(empty(rows, vocab, dtype=dtype), targets, in_set, 0.7)
        specs = [s for module in (tg, fl, ts) for s in module.compile_specs()]
        reported = [[s.kernel, described(s.signature, s.constexprs, s.attrs)] for s in specs]
        unhinted = [
            f"{op} {s.kernel} [{s.config}]"
            for op, s in kernel_specs()
            if s.attrs is None
            or {a for a, t in s.signature.items() if t.startswith("*")} - set(divisible_args(s.fn, s.attrs))
        ]
        print(json.dumps({"swiglu": result, "launches": named, "reported": reported, "unhinted": unhinted}))
        """
    )
    script = tmp_path / "jit_specialization.py"
    script.write_text(code)
    proc = run_python([str(script)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    result = out["swiglu"]
    assert len(result) == 12
    for name, jit, report in result:
        assert len(jit) == 1 and jit == report, name
        assert ["tt.divisibility", 16] in [a for attrs in jit[0]["attrs"].values() for a in attrs], name
    # 10 topk_gather / gather_matmul launches, 3 x 2 x 8 fused_logit_nll, 3 x 2 target_and_set_log_probs.
    assert len(out["launches"]) == 10 + 48 + 6
    key = json.dumps
    assert sorted(out["launches"], key=key) == sorted(out["reported"], key=key)
    assert out["unhinted"] == []
