"""The backend switch: env var, set_backend, the context manager and what 'auto' resolves to."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moc_kernels as mk
from moc_kernels import backend

ROOT = Path(__file__).resolve().parents[1]


def test_env_var_then_set_backend_then_context_manager(monkeypatch):
    monkeypatch.setattr(backend, "_selected", None)
    monkeypatch.setenv("MOC_KERNELS", "reference")
    assert mk.get_backend() == "reference"
    monkeypatch.setenv("MOC_KERNELS", "TRITON ")
    assert mk.get_backend() == "triton"
    mk.set_backend("auto")
    assert mk.get_backend() == "auto"  # explicit choice wins over the environment
    with mk.use_backend("reference"):
        assert mk.get_backend() == "reference"
        with mk.use_backend("triton"):
            assert mk.get_backend() == "triton"
        assert mk.get_backend() == "reference"
    assert mk.get_backend() == "auto"


def test_bad_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernels backend 'cuda'"):
        mk.set_backend("cuda")
    monkeypatch.setattr(backend, "_selected", None)
    monkeypatch.setenv("MOC_KERNELS", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        mk.get_backend()


@pytest.mark.triton  # asks for the triton backend on this machine
def test_auto_resolves_to_reference_on_cpu_and_triton_is_honoured():
    with mk.use_backend("auto"):
        assert backend.resolve(torch.device("cpu")) == "reference"
        assert backend.resolve(torch.device("cuda")) == "triton"
    with mk.use_backend("triton"):
        assert backend.resolve(torch.device("cpu")) == "triton"
    with mk.use_backend("reference"):
        assert backend.resolve(torch.device("cuda")) == "reference"


@pytest.mark.triton  # on a GPU its tensors go to CUDA (tests/conftest.py)
def test_triton_runs_here_and_dispatch_compiles_without_graph_breaks():
    # On a machine without CUDA, importing moc_kernels switched Triton to its interpreter.
    assert backend.triton_problem() is None
    x, w1, w3, w2 = torch.randn(5, 8), torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 16, 8)

    def f(x):
        return mk.expert_swiglu(x, w1, w3, w2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for name in ("reference", "triton"):  # the backend is read at trace time and guarded on
        with mk.use_backend(name):
            torch.testing.assert_close(compiled(x), f(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter matters only without CUDA")
def test_triton_imported_first_without_interpreter_is_a_clear_error():
    code = (
        "import triton.language, torch, moc_kernels as mk\n"
        "assert not torch.cuda.is_available()\n"
        "mk.set_backend('triton')\n"
        "mk.topk_gather(torch.randn(2, 3, 4), torch.zeros(2, 1, dtype=torch.long))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "RuntimeError: kernels backend 'triton' requested, but there is no CUDA GPU" in proc.stderr


IMPORT_FIRST = {
    # Each package imported first in a fresh process, before moc_kernels and with TRITON_INTERPRET unset:
    # both import transformers (and so triton.language), which must not lock the interpreter out.
    "model": (
        "import model, torch\n"
        "cfg = model.ModelConfig.from_dict({'d_model': 32, 'n_layers': 1, 'n_heads': 2, 'vocab_size': 64,\n"
        "    'multiple_of': 16, 'n_experts': 4, 'top_k': 2, 'moc_heads': 2, 'kernels': 'triton'})\n"
        "torch.manual_seed(0)\n"
        "lm = model.LunarisLM(cfg)\n"
        "ids = torch.randint(0, 64, (2, 9))\n"
        "out = lm(ids[:, :-1], targets=ids[:, 1:])\n"
        "lm.config.kernels = 'reference'\n"
        "ref = lm(ids[:, :-1], targets=ids[:, 1:])\n"
        "err = float((out.logits - ref.logits).norm() / ref.logits.norm())\n"
        "assert err <= 1e-5 and abs(float(out.loss - ref.loss)) <= 1e-5, err\n"
    ),
    "kotara": (
        "import kotara, torch, moc_kernels as mk\n"
        "logits, targets = [torch.randn(6, 1031), torch.randn(6, 1031)], torch.randint(0, 1031, (6,))\n"
        "with mk.use_backend('triton'):\n"
        "    out = mk.fused_logit_nll(logits, targets, 'entropy').nll\n"
        "with mk.use_backend('reference'):\n"
        "    ref = mk.fused_logit_nll(logits, targets, 'entropy').nll\n"
        "assert float((out - ref).norm() / ref.norm()) <= 1e-5\n"
    ),
}


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter matters only without CUDA")
@pytest.mark.parametrize("package", sorted(IMPORT_FIRST))
def test_kernels_run_whichever_package_is_imported_first(package):
    code = "import sys\nassert 'triton.language' not in sys.modules\n" + IMPORT_FIRST[package] + "print('ok')\n"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOC_KERNELS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _launch_sites(tree) -> list:
    """Every ``kernel[grid](...)`` call in a module whose kernel is a ``@triton.jit`` function of it."""
    import ast

    jitted = {
        f.name
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in f.decorator_list)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Subscript)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in jitted
    ]


@pytest.mark.parametrize("op", backend.KERNEL_OPS)
def test_every_kernel_launch_runs_on_its_inputs_device(op):
    """Triton launches on the current CUDA device, not the inputs': each launch site sits in a
    ``with on_device(...)`` block (inputs on cuda:1 under a current cuda:0 would otherwise get
    pointers into another GPU). ``expert_swiglu`` launches through plans, guarded where they run."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(backend.kernel_module(op)))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def guarded(node) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.With) and any("on_device(" in ast.unparse(i.context_expr) for i in node.items):
                return True
        return False

    sites = _launch_sites(tree) + [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("plan.run")
    ]
    assert sites, f"{op}: found no kernel launch"
    unguarded = [f"line {n.lineno}: {ast.unparse(n.func)}" for n in sites if not guarded(n)]
    assert not unguarded, f"{op}: launches outside on_device: {unguarded}"


def test_on_device_selects_the_tensors_cuda_device(monkeypatch):
    from moc_kernels.triton.utils import on_device

    selected = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: selected.append(device) or contextlib.nullcontext())
    with on_device(torch.empty(0, device="meta")):
        pass
    assert selected == []  # nothing to select off CUDA

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    with on_device(OnSecondGpu()):
        pass
    assert selected == [torch.device("cuda", 1)]


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ops_on_the_second_gpu_while_the_first_is_current():
    from tests.conftest import assert_rel_close

    torch.cuda.set_device(0)
    y = torch.randn(37, 6, 40, device="cuda:1", requires_grad=True)
    idx = torch.stack([torch.randperm(6, device="cuda:1")[:3] for _ in range(37)])
    logits = [torch.randn(37, 1031, device="cuda:1") for _ in range(2)]
    targets = torch.randint(0, 1031, (37,), device="cuda:1")
    with mk.use_backend("triton"):
        out = mk.topk_gather(y, idx)
        fused = mk.fused_logit_nll(logits, targets, "entropy")
    with mk.use_backend("reference"):
        ref = mk.topk_gather(y, idx)
        ref_fused = mk.fused_logit_nll(logits, targets, "entropy")
    assert out.device == torch.device("cuda", 1)
    assert_rel_close(out, ref, torch.float32, "topk_gather on cuda:1")
    assert_rel_close(fused.nll, ref_fused.nll, torch.float32, "fused_logit_nll on cuda:1")
