"""routed_swiglu: the reference against a dense formulation, and the Triton kernels against the reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_rel_close
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import moc_kernels as mk
from moc_kernels import backend, reference

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


# ---------------------------------------------------------------- the Triton kernels (interpreter on CPU)

# The ragged shape of the other kernel tests: no dimension is a multiple of any block.
N, D, HIDDEN, E, K = 37, 40, 72, 6, 2
# A smaller ragged shape for the tests of mechanisms (the interpreter's cost grows with programs).
SMALL = (21, 24, 40, 4)
GRADS = ("dx", "dw1", "dw3", "dw2")


@pytest.fixture
def kernel_module(monkeypatch):
    """The Triton module (under the interpreter on CPU), with every buffer it allocates pre-filled
    with NaN so that an element no kernel writes fails the test."""
    module = backend.kernel_module("routed_swiglu")

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(module, "_empty", nan_empty)
    return module


def _weights(dtype, shape, packed=False):
    """(w1, w3, w2, leaves): w1, w3 separate leaves, or (packed) w1 the packed w13 [E, D, 2F] leaf and
    w3 None."""
    _, dim, hidden, experts = shape
    w2 = (torch.randn(experts, hidden, dim) / hidden**0.5).to(dtype).requires_grad_()
    if packed:
        w13 = (torch.randn(experts, dim, 2 * hidden) / dim**0.5).to(dtype).requires_grad_()
        return w13, None, w2, [w13, w2]
    w1, w3 = ((torch.randn(experts, dim, hidden) / dim**0.5).to(dtype).requires_grad_() for _ in range(2))
    return w1, w3, w2, [w1, w3, w2]


def _triton(x, idx, w1, w3, w2):
    with mk.use_backend("triton"):
        return mk.routed_swiglu(x, idx, w1, w3, w2)


def _check_against_reference(x, idx, w1, w3, w2, leaves, dtype, names=GRADS):
    """Forward and every gradient of the Triton path against the reference (fp64 error measure)."""
    dy = torch.randn(x.shape[0], idx.shape[1], x.shape[1]).to(dtype)
    y = _triton(x, idx, w1, w3, w2)
    y_ref = reference.routed_swiglu(x, idx, w1, w3, w2)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_rel_close(y, y_ref, dtype, "Y")
    grads = torch.autograd.grad(y, [x, *leaves], dy)
    grads_ref = torch.autograd.grad(y_ref, [x, *leaves], dy)
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.dtype == dtype
        assert_rel_close(g, g_ref, dtype, name)


def _idx(case: str, n_tokens: int, experts: int) -> torch.Tensor:
    """Routing of each edge case: [n_tokens, k] int64."""
    if case == "unused_expert":  # the last expert gets no token
        return torch.randint(0, experts - 1, (n_tokens, K))
    if case == "one_expert":  # every pair on expert 1: one expert owns all rows, the others none
        return torch.ones(n_tokens, K, dtype=torch.int64)
    if case == "k1":
        return torch.randint(0, experts, (n_tokens, 1))
    if case == "kE":  # each token on every expert, in a random order
        return torch.stack([torch.randperm(experts) for _ in range(n_tokens)])
    assert case == "repeats"  # repeated experts within rows: every slot of token 0 equal, half the rest
    idx = torch.randint(0, experts, (n_tokens, 3))
    idx[0] = 2
    idx[1::2, 1] = idx[1::2, 0]
    return idx


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_grads_match_reference(kernel_module, dtype):
    x = torch.randn(N, D).to(dtype).requires_grad_()
    w1, w3, w2, leaves = _weights(dtype, (N, D, HIDDEN, E))
    _check_against_reference(x, _idx("unused_expert", N, E), w1, w3, w2, leaves, dtype)


@pytest.mark.triton
@pytest.mark.parametrize("case", ["one_expert", "k1", "kE", "repeats"])
def test_routing_edge_cases(kernel_module, case):
    x = torch.randn(SMALL[0], SMALL[1]).requires_grad_()
    w1, w3, w2, leaves = _weights(torch.float32, SMALL)
    _check_against_reference(x, _idx(case, SMALL[0], SMALL[3]), w1, w3, w2, leaves, torch.float32)


@pytest.mark.triton
def test_packed_w13(kernel_module):
    """The packed w13 [E, D, 2F] (w3 None): its halves read by strides without a copy, and dW1, dW3
    written into the right halves of its one gradient."""
    x = torch.randn(N, D).bfloat16().requires_grad_()
    w1, w3, w2, leaves = _weights(torch.bfloat16, (N, D, HIDDEN, E), packed=True)
    assert w3 is None
    _check_against_reference(x, _idx("unused_expert", N, E), w1, w3, w2, leaves, torch.bfloat16, ("dx", "dw13", "dw2"))


@pytest.mark.triton
def test_small_tiles_many_blocks_per_expert(kernel_module, monkeypatch):
    """16x16x16 tiles: experts span several row blocks (the last one ragged), the grid's spare blocks
    return, and every GEMM runs several K iterations (the default tiles cover these shapes in one)."""
    tiny = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1}
    configs = {name: {key: dict(tiny) for key in table} for name, table in kernel_module.CONFIGS.items()}
    monkeypatch.setattr(kernel_module, "CONFIGS", configs)
    x = torch.randn(SMALL[0], SMALL[1]).requires_grad_()
    w1, w3, w2, leaves = _weights(torch.float32, SMALL)
    idx = torch.randint(0, SMALL[3], (SMALL[0], K))
    idx[:, 0] = 0  # expert 0 gets at least N = 21 rows: two blocks of 16
    _check_against_reference(x, idx, w1, w3, w2, leaves, torch.float32)


@pytest.mark.triton
def test_torch_compile_fullgraph(kernel_module):
    x = torch.randn(SMALL[0], SMALL[1]).requires_grad_()
    w1, w3, w2, leaves = _weights(torch.float32, SMALL)
    idx = _idx("unused_expert", SMALL[0], SMALL[3])
    weights = torch.softmax(torch.randn(SMALL[0], K), -1)

    # The public op inside a layer: routing (sort, searchsorted), the backend dispatch and the custom
    # ops (fake + autograd) trace without graph breaks.
    def layer(x, w1, w3, w2):
        return (weights[..., None] * mk.routed_swiglu(x, idx, w1, w3, w2)).sum(1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        out = compiled(x, w1, w3, w2)
        grads = torch.autograd.grad(out.square().sum(), [x, *leaves])
        out_eager = layer(x, w1, w3, w2)
        grads_eager = torch.autograd.grad(out_eager.square().sum(), [x, *leaves])
    assert_rel_close(out, out_eager, torch.float32, "compiled Y")
    for name, g, g_eager in zip(GRADS, grads, grads_eager):
        assert_rel_close(g, g_eager, torch.float32, "compiled " + name)


@pytest.mark.triton
def test_triton_path_never_waits_for_the_device(kernel_module):
    """Routing and launches stay on the device: forward and backward run on fake tensors, which hold
    no values, so no step can need one on the host (a sync on a GPU). The reference cannot: its
    per-expert split sizes are data (which shows the check sees such a step)."""
    with FakeTensorMode():
        x = torch.randn(SMALL[0], SMALL[1]).requires_grad_()
        w1, w3, w2, leaves = _weights(torch.float32, SMALL)
        idx = _idx("unused_expert", SMALL[0], SMALL[3])
        y = kernel_module.routed_swiglu(x, idx, w1, w3, w2)
        grads = torch.autograd.grad(y.sum(), [x, *leaves])
        assert y.shape == (SMALL[0], K, SMALL[1]) and [g.shape for g in grads] == [t.shape for t in (x, *leaves)]
        with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
            reference.routed_swiglu(x, idx, w1, w3, w2)


@pytest.mark.triton
def test_frozen_weights_get_no_gradient_work(kernel_module):
    """Only x needs a gradient: the weight-gradient GEMMs are skipped (the flop count says so) and dx
    still matches the reference."""
    x = torch.randn(SMALL[0], SMALL[1]).requires_grad_()
    w1, w3, w2, _ = _weights(torch.float32, SMALL)
    w1, w3, w2 = (w.detach() for w in (w1, w3, w2))
    idx = _idx("unused_expert", SMALL[0], SMALL[3])
    y = _triton(x, idx, w1, w3, w2)
    with FlopCounterMode(display=False) as counter:
        (dx,) = torch.autograd.grad(y.sum(), [x])
    pairs, (_, dim, hidden) = idx.numel(), w1.shape
    assert counter.get_total_flops() == 3 * 2 * pairs * dim * hidden  # dH and dX's two products
    (dx_ref,) = torch.autograd.grad(reference.routed_swiglu(x, idx, w1, w3, w2).sum(), [x])
    assert_rel_close(dx, dx_ref, torch.float32, "dx")


@pytest.mark.triton
def test_mixed_weight_dtype_is_cast_to_x_dtype(kernel_module):
    """fp32 master weights with bf16 activations (as under autocast): cast, differentiably."""
    x = torch.randn(SMALL[0], SMALL[1]).bfloat16().requires_grad_()
    w1, w3, w2, _ = _weights(torch.float32, SMALL)
    idx = _idx("unused_expert", SMALL[0], SMALL[3])
    y = _triton(x, idx, w1, w3, w2)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert w1.grad is not None and w1.grad.dtype == torch.float32
    assert_rel_close(y, reference.routed_swiglu(x, idx, w1, w3, w2), torch.bfloat16, "Y")


@pytest.mark.triton
def test_zero_tokens(kernel_module):
    x = torch.randn(0, SMALL[1]).requires_grad_()
    w1, w3, w2, leaves = _weights(torch.float32, SMALL)
    y = _triton(x, torch.zeros(0, K, dtype=torch.int64), w1, w3, w2)
    assert y.shape == (0, K, SMALL[1])
    grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


# ---------------------------------------------------------------- sparse compute: the FLOPs of a top-k MoE


def _count_flops(fn, inputs) -> tuple[int, int]:
    """(forward FLOPs, backward FLOPs) of ``fn(*inputs)`` under torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as forward:
        out = fn(*inputs)
    with FlopCounterMode(display=False) as backward:
        out.backward(torch.ones_like(out))
    return forward.get_total_flops(), backward.get_total_flops()


@pytest.mark.parametrize("path", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_flops_are_k_over_e_of_all_experts(path):
    """Each token runs its k experts only: forward and backward FLOPs within 5% of k/E times
    expert_swiglu's (all experts on every token) at the same shapes. The reference's are counted from
    its per-expert GEMMs; the Triton path's from the flop formulas of its custom ops."""
    n_tokens, dim, hidden, experts, top_k = 48, 32, 40, 8, 2
    x = torch.randn(n_tokens, dim, requires_grad=True)
    w1, w3, w2, _ = _weights(torch.float32, (n_tokens, dim, hidden, experts))
    idx = torch.stack([torch.randperm(experts)[:top_k] for _ in range(n_tokens)])
    with mk.use_backend(path):
        routed = _count_flops(mk.routed_swiglu, (x, idx, w1, w3, w2))
    dense = _count_flops(reference.expert_swiglu, (x, w1, w3, w2))
    assert min(routed) > 0
    for phase, got, all_experts in zip(("forward", "backward"), routed, dense):
        ratio = got / (top_k / experts * all_experts)
        assert abs(ratio - 1) <= 0.05, f"{path} {phase}: {got} FLOPs = {ratio:.3f} x k/E x expert_swiglu's"


@pytest.mark.triton
def test_fp16_gate_up_gradients_keep_fp32_range(kernel_module):
    """fp16 under a loss scale: dG and dU exceed fp16's 65,504 while dx does not (frozen weights, small
    gate/up weights). dG, dU are kept fp32, as in the reference, so dx is finite and matches; stored
    in fp16 they would be inf, and so would dx (the GradScaler would skip the step)."""
    n, d, f, e = SMALL
    x = (10 * torch.randn(n, d)).half().requires_grad_()
    w1, w3 = ((0.02 * torch.randn(e, d, f)).half() for _ in range(2))
    w2 = torch.randn(e, f, d).half()
    idx = _idx("unused_expert", n, e)
    dy = (1e4 * torch.randn(n, K, d)).half()  # a scaled upstream gradient, itself within fp16's range
    # Precondition, from the SwiGLU derivative in fp32: some dG is beyond fp16, no dx is near it.
    gate, up = (torch.einsum("nd,nkdf->nkf", x.float(), w[idx].float()) for w in (w1, w3))
    d_hidden = torch.einsum("nkd,nkfd->nkf", dy.float(), w2[idx].float())
    sig = torch.sigmoid(gate)
    assert (d_hidden * up * sig * (1 + gate * (1 - sig))).abs().max() > 65504
    (dx_ref,) = torch.autograd.grad(reference.routed_swiglu(x, idx, w1, w3, w2), x, dy)
    assert dx_ref.abs().max() < 65504 / 2
    (dx,) = torch.autograd.grad(_triton(x, idx, w1, w3, w2), x, dy)
    assert_rel_close(dx, dx_ref, torch.float16, "dx")
