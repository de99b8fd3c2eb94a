"""Shared test helpers: the one tolerance table and the relative-error measure (DESIGN §4)."""

import pytest
import torch

import moc_kernels  # noqa: F401  first: on a machine without CUDA it switches Triton to its interpreter

# ||out - ref|| / ||ref|| computed in fp64. One table for every kernel test.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
