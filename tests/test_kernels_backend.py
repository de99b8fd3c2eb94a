"""The backend switch: env var, set_backend, the context manager and what 'auto' resolves to."""

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
