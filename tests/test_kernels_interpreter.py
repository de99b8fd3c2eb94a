"""What the test processes change in Triton's interpreter (``tests/conftest.py``) to run faster: a
``@triton.jit`` helper called inside a launch runs on the language the launch swapped in, instead of
swapping it in again at every call."""

import pytest
import torch

from moc_kernels import backend

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not backend.interpreting(), reason="a cost of Triton's interpreter; compiled code inlines"),
]


@triton.jit
def _scaled(x, scale):
    return x * scale


@triton.jit
def _two_helpers_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, _scaled(x, 2.0) + _scaled(x, 3.0))


def test_a_launch_swaps_the_language_in_once_and_its_helpers_compute_the_same(monkeypatch):
    from triton.runtime import interpreter

    swaps = []
    swap = interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: swaps.append(fn.__name__) or swap(fn))
    load, tensor_add = tl.load, tl.tensor.__add__
    x = torch.randn(4 * 8)
    out = torch.empty_like(x)
    _two_helpers_kernel[(4,)](x, out, BLOCK=8)
    # Triton's own path would swap 1 + 4 programs x 2 helper calls = 9 times.
    assert swaps == ["_two_helpers_kernel"]
    torch.testing.assert_close(out, x * 2.0 + x * 3.0, rtol=0, atol=0)  # fp32, rounded as the kernel rounds
    # After the launch the language is Triton's own again.
    assert tl.load is load and tl.tensor.__add__ is tensor_add
