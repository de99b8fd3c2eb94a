"""routed_swiglu: the reference against a dense formulation, and the Triton kernels against the reference."""

import pytest
import torch
import torch.nn.functional as F

import moc_kernels as mk
from moc_kernels import reference

# ---------------------------------------------------------------- the reference (the spec)


def test_reference_equals_each_slot_computed_on_its_own():
    """Y[n, j] is expert idx[n, j]'s SwiGLU of x[n], repeated experts within a row included."""
    x = torch.randn(23, 16, dtype=torch.float64)
    w13 = torch.randn(5, 16, 2 * 24, dtype=torch.float64)
    w1, w3 = w13[..., :24], w13[..., 24:]
    w2 = torch.randn(5, 24, 16, dtype=torch.float64)
    idx = torch.randint(0, 4, (23, 3))  # expert 4 gets no token
    idx[0] = 2  # one token repeats an expert in every slot
    y = reference.routed_swiglu(x, idx, w1, w3, w2)
    assert y.shape == (23, 3, 16) and y.dtype == torch.float64
    for n in range(23):
        for j in range(3):
            e = idx[n, j]
            expected = (F.silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e]
            torch.testing.assert_close(y[n, j], expected, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck_fp64():
    d = dict(dtype=torch.float64, requires_grad=True)
    x, w13, w2 = torch.randn(7, 6, **d), torch.randn(4, 6, 2 * 5, **d), torch.randn(4, 5, 6, **d)
    idx = torch.tensor([[0, 2], [2, 0], [2, 2], [1, 0], [0, 0], [2, 1], [1, 1]])  # expert 3 unused

    def fn(x, w13, w2):
        return reference.routed_swiglu(x, idx, w13[..., :5], w13[..., 5:], w2)

    assert torch.autograd.gradcheck(fn, (x, w13, w2))


def test_argument_errors_are_clear():
    x, w, w2 = torch.randn(3, 4), torch.randn(2, 4, 5), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="idx must be int64"):
        mk.routed_swiglu(x, torch.zeros(3, 1, dtype=torch.int32), w, w, w2)
    with pytest.raises(ValueError, match=r"idx must be \[N, k\] with N=3"):
        mk.routed_swiglu(x, torch.zeros(2, 1, dtype=torch.int64), w, w, w2)
    with pytest.raises(ValueError, match="w2 must be"):
        mk.routed_swiglu(x, torch.zeros(3, 1, dtype=torch.int64), w, w, w)
    with pytest.raises(RuntimeError, match=r"idx outside \[0, E=2\)"):
        mk.routed_swiglu(x, torch.full((3, 1), 2, dtype=torch.int64), w, w, w2)
