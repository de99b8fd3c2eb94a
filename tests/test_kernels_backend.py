"""The backend switch: env var, set_backend, the context manager and what 'auto' resolves to."""

import os
import subprocess
import sys

import pytest
import torch

import moc_kernels as mk
from moc_kernels import backend


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
