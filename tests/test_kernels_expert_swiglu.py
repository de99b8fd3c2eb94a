"""Triton expert_swiglu (interpreter on CPU) against the reference: forward and all four gradients."""

import pytest
import torch
from conftest import assert_rel_close

import moc_kernels as mk
from moc_kernels import backend, reference

pytestmark = pytest.mark.triton

# The ragged shape of the issue: no dimension is a multiple of any block.
N, D, F, E = 37, 40, 72, 6
# A smaller ragged shape for the tests of mechanisms (the interpreter's cost grows with programs).
SMALL = (21, 24, 40, 2)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def kernel_module(monkeypatch):
    """The Triton module (imported through the backend, so under the interpreter on CPU), with every
    buffer it allocates pre-filled with NaN so that an element no kernel writes fails the test."""
    module = backend.kernel_module("expert_swiglu")

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(module, "_empty", nan_empty)
    return module


def _inputs(dtype, packed=False, shape=(N, D, F, E)):
    N, D, F, E = shape
    x = torch.randn(N, D)
    if packed:
        w13 = (torch.randn(E, D, 2 * F) / D**0.5).to(dtype).requires_grad_()
        w1, w3 = w13[..., :F], w13[..., F:]
        leaves = [x, w13]
    else:
        w1 = (torch.randn(E, D, F) / D**0.5).to(dtype).requires_grad_()
        w3 = (torch.randn(E, D, F) / D**0.5).to(dtype).requires_grad_()
        leaves = [x, w1, w3]
    w2 = (torch.randn(E, F, D) / F**0.5).to(dtype).requires_grad_()
    x = x.to(dtype).requires_grad_()
    leaves[0] = x
    return x, w1, w3, w2, [*leaves, w2]


def _run(fn, x, w1, w3, w2, leaves, dy):
    y = fn(x, w1, w3, w2)
    grads = torch.autograd.grad(y, leaves, dy)
    return y, grads


def _triton(x, w1, w3, w2):
    with mk.use_backend("triton"):
        return mk.expert_swiglu(x, w1, w3, w2)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
def test_forward_and_grads_match_reference(kernel_module, dtype):
    x, w1, w3, w2, leaves = _inputs(dtype)
    dy = torch.randn(N, E, D).to(dtype)
    y, grads = _run(_triton, x, w1, w3, w2, leaves, dy)
    y_ref, grads_ref = _run(reference.expert_swiglu, x, w1, w3, w2, leaves, dy)
    assert y.dtype == dtype and y.shape == (N, E, D)
    assert_rel_close(y, y_ref, dtype, "Y")
    for name, g, g_ref in zip(("dx", "dw1", "dw3", "dw2"), grads, grads_ref):
        assert g.dtype == dtype
        assert_rel_close(g, g_ref, dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_packed_w1_w3_views(kernel_module, dtype):
    """w1, w3 as the two halves of one [E, D, 2F] tensor: strided loads, and the two per-view
    gradients land in the right halves of the packed gradient."""
    x, w1, w3, w2, leaves = _inputs(dtype, packed=True)
    assert not w1.is_contiguous()
    dy = torch.randn(N, E, D).to(dtype)
    y, grads = _run(_triton, x, w1, w3, w2, leaves, dy)
    y_ref, grads_ref = _run(reference.expert_swiglu, x, w1, w3, w2, leaves, dy)
    assert_rel_close(y, y_ref, dtype, "Y")
    for name, g, g_ref in zip(("dx", "dw13", "dw2"), grads, grads_ref):
        assert_rel_close(g, g_ref, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32])
def test_recompute_gives_same_grads_and_saves_nothing(kernel_module, monkeypatch, dtype):
    x, w1, w3, w2, leaves = _inputs(dtype)
    dy = torch.randn(N, E, D).to(dtype)
    y_saved, grads_saved = _run(_triton, x, w1, w3, w2, leaves, dy)

    saved_numel = []

    def pack(t):
        saved_numel.append(t.numel())
        return t

    monkeypatch.setattr(kernel_module, "RECOMPUTE_GATE_UP", True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = _triton(x, w1, w3, w2)
    grads = torch.autograd.grad(y, leaves, dy)
    # Only the inputs (and two empty placeholders) are saved; the default also saves G and U.
    assert sum(saved_numel) == sum(t.numel() for t in (x, w1, w3, w2))
    assert torch.equal(y, y_saved)
    grads_ref = torch.autograd.grad(reference.expert_swiglu(x, w1, w3, w2), leaves, dy)
    for name, g, g_saved, g_ref in zip(("dx", "dw1", "dw3", "dw2"), grads, grads_saved, grads_ref):
        assert_rel_close(g, g_saved, dtype, name + " recompute vs saved")
        assert_rel_close(g, g_ref, dtype, name + " recompute vs reference")


def test_default_saves_gate_and_up(kernel_module):
    n, _, f, e = SMALL
    x, w1, w3, w2, _ = _inputs(torch.float32, shape=SMALL)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        _triton(x, w1, w3, w2)
    assert saved.count(torch.Size((n, e, f))) == 2


def test_small_tiles_multi_block_k_loops(kernel_module, monkeypatch):
    """16x16x16 tiles: every GEMM runs several K iterations with a ragged last one, and several
    output tiles in each direction (the default tiles cover these small shapes in one or two)."""
    tiny = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1}
    configs = {name: {key: dict(tiny) for key in table} for name, table in kernel_module.CONFIGS.items()}
    monkeypatch.setattr(kernel_module, "CONFIGS", configs)
    x, w1, w3, w2, leaves = _inputs(torch.float32, shape=SMALL)
    dy = torch.randn(SMALL[0], SMALL[3], SMALL[1])
    y, grads = _run(_triton, x, w1, w3, w2, leaves, dy)
    y_ref, grads_ref = _run(reference.expert_swiglu, x, w1, w3, w2, leaves, dy)
    assert_rel_close(y, y_ref, torch.float32, "Y")
    for name, g, g_ref in zip(("dx", "dw1", "dw3", "dw2"), grads, grads_ref):
        assert_rel_close(g, g_ref, torch.float32, name)


def test_torch_compile_fullgraph(kernel_module):
    x, w1, w3, w2, leaves = _inputs(torch.float32, shape=SMALL)
    dy = torch.randn(SMALL[0], SMALL[3], SMALL[1])

    # The public op: the backend dispatch and the custom op (fake + autograd) trace without breaks.
    def layer(x, w1, w3, w2):
        return mk.expert_swiglu(x, w1, w3, w2).sum(dim=1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        out, grads = _run(compiled, x, w1, w3, w2, leaves, dy.sum(dim=1))
        out_eager, grads_eager = _run(layer, x, w1, w3, w2, leaves, dy.sum(dim=1))
    assert_rel_close(out, out_eager, torch.float32, "compiled Y")
    for name, g, g_eager in zip(("dx", "dw1", "dw3", "dw2"), grads, grads_eager):
        assert_rel_close(g, g_eager, torch.float32, "compiled " + name)


def test_mixed_weight_dtype_is_cast_to_x_dtype(kernel_module):
    """fp32 master weights with bf16 activations (as under autocast): cast, differentiably."""
    x, w1, w3, w2, _ = _inputs(torch.float32, shape=SMALL)
    xb = x.detach().bfloat16().requires_grad_()
    y = _triton(xb, w1, w3, w2)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert w1.grad is not None and w1.grad.dtype == torch.float32
    assert_rel_close(y, reference.expert_swiglu(xb, w1, w3, w2), torch.bfloat16, "Y")


def test_zero_tokens(kernel_module):
    x, w1, w3, w2, leaves = _inputs(torch.float32, shape=(0, *SMALL[1:]))
    y = _triton(x, w1, w3, w2)
    assert y.shape == (0, SMALL[3], SMALL[1])
    grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
    assert all(torch.count_nonzero(g) == 0 for g in grads[1:])


def test_fp16_gate_up_gradients_keep_fp32_range(kernel_module):
    """fp16 under a loss scale: dG and dU exceed fp16's 65,504 while dx does not (frozen weights, small
    gate/up weights). The kernels keep dG, dU in fp32, as the reference does, so dx is finite and
    matches; stored in fp16 they would be inf, and so would dx (the GradScaler would skip the step)."""
    n, d, f, e = SMALL
    x = (10 * torch.randn(n, d)).half().requires_grad_()
    w1, w3 = ((0.02 * torch.randn(e, d, f)).half() for _ in range(2))
    w2 = torch.randn(e, f, d).half()
    dy = (1e4 * torch.randn(n, e, d)).half()  # a scaled upstream gradient, itself within fp16's range
    # Precondition, from the SwiGLU derivative in fp32: some dG is beyond fp16, no dx is near it.
    gate, up = (torch.einsum("nd,edf->nef", x.float(), w.float()) for w in (w1, w3))
    d_hidden = torch.einsum("ned,efd->nef", dy.float(), w2.float())
    sig = torch.sigmoid(gate)
    assert (d_hidden * up * sig * (1 + gate * (1 - sig))).abs().max() > 65504
    (dx_ref,) = torch.autograd.grad(reference.expert_swiglu(x, w1, w3, w2), x, dy)
    assert dx_ref.abs().max() < 65504 / 2
    (dx,) = torch.autograd.grad(_triton(x, w1, w3, w2), x, dy)
    assert_rel_close(dx, dx_ref, torch.float16, "dx")


_kernel_mma = None


def test_fp16_backward_rounds_its_tf32_operands_to_nearest():
    """fp16 data's fp32 dG/dU meet fp16 weights in tf32 products (``_mma``'s mixed branch), whose
    tensor-core input truncates the fp32 operand to 10 mantissa bits: every product shrinks, a bias of
    -3.4e-4 at K = 2048 (shrinking dx, dW1, dW3). The operands are now rounded to nearest first (after
    which the hardware's truncation is exact). The interpreter does not truncate, so the kernel's product
    must be exactly that of the rounded operand, and that product's bias (its regression slope on the
    exact product, minus 1) must be below 1e-5, against -3.4e-4 with truncation."""
    import triton
    import triton.language as tl

    global _kernel_mma  # a global, as the interpreter resolves a kernel's names (no closures)
    _kernel_mma = backend.kernel_module("expert_swiglu")._mma

    @triton.jit
    def product(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
        rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
        acc = _kernel_mma(tl.full((M, N), 0.0, tl.float32), a, b, "tf32", False)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)

    M, K, N = 16, 2048, 16
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g).half()
    c = torch.empty(M, N)
    product[(1,)](a, b, c, M, K, N)
    exact = a.double() @ b.double()
    bits = a.view(torch.int32)
    nearest = ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double() @ b.double()
    truncated = (bits & ~0x1FFF).view(torch.float32).double() @ b.double()

    def bias(p):
        return ((p * exact).sum() / (exact * exact).sum() - 1).item()

    assert (c.double() - nearest).abs().max() < 1e-4 < (c.double() - exact).abs().max() / 100
    assert abs(bias(c.double())) < 1e-5 and bias(truncated) < -3e-4
