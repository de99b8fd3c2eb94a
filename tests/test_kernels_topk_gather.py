"""Triton topk_gather vs its reference: forward and backward are exact copies (interpreter on CPU)."""

import pytest
import torch

import moc_kernels as mk
from moc_kernels import backend, reference
from tests.conftest import assert_rel_close

pytestmark = pytest.mark.triton

NUM_TOKENS, NUM_EXPERTS, DIM = 37, 6, 40


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element the kernel leaves unwritten fails."""
    module = backend.kernel_module("topk_gather")

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(module, "_empty", nan_empty)


def random_indices(num_tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    """[N, k] int64, distinct within each row, in random order (not sorted like torch.topk's)."""
    return torch.rand(num_tokens, num_experts).argsort(dim=1)[:, :top_k].contiguous()


def check_exact(y: torch.Tensor, idx: torch.Tensor) -> None:
    y = y.detach().requires_grad_()
    with mk.use_backend("triton"):
        out = mk.topk_gather(y, idx)
    ref = reference.topk_gather(y, idx)
    assert out.dtype == y.dtype and out.shape == ref.shape
    assert torch.equal(out, ref)
    grad_out = torch.randn(ref.shape, dtype=y.dtype)
    (grad,) = torch.autograd.grad(out, y, grad_out)
    (ref_grad,) = torch.autograd.grad(ref, y, grad_out)
    assert grad.dtype == y.dtype
    assert torch.equal(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("top_k", [1, 3, NUM_EXPERTS], ids=["k1", "k3", "kE"])
def test_forward_and_backward_are_exact(nan_outputs, top_k, dtype):
    y = torch.randn(NUM_TOKENS, NUM_EXPERTS, DIM, dtype=dtype)
    check_exact(y, random_indices(NUM_TOKENS, NUM_EXPERTS, top_k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_repeated_indices_sum_their_gradients(nan_outputs, dtype):
    """A row may repeat an index (the public op allows it): the backward adds the slots' gradients,
    as the reference's scatter-add does, and never reads or writes outside the token's rows."""
    idx = torch.randint(0, NUM_EXPERTS, (NUM_TOKENS, 4))
    idx[0] = 2  # all four slots on one expert
    idx[1, :2] = idx[1, 2:] = torch.tensor([5, 0])
    assert any(len(set(row.tolist())) < 4 for row in idx)
    y = torch.randn(NUM_TOKENS, NUM_EXPERTS, DIM, dtype=dtype, requires_grad=True)
    with mk.use_backend("triton"):
        out = mk.topk_gather(y, idx)
    ref = reference.topk_gather(y, idx)
    assert torch.equal(out, ref)
    grad_out = torch.randn(ref.shape, dtype=dtype)
    (grad,) = torch.autograd.grad(out, y, grad_out)
    expected = torch.zeros(y.shape, dtype=torch.float64)  # the sum, in fp64, independently of both
    expected.scatter_add_(1, idx[..., None].expand(-1, -1, DIM), grad_out.double())
    assert_rel_close(grad, expected, dtype, "dy with repeated indices")
    assert_rel_close(grad[0, 2], grad_out[0].double().sum(0), dtype, "four slots on one expert")
    assert (grad[0, [0, 1, 3, 4, 5]] == 0).all()


def test_strided_inputs_and_wide_rows(nan_outputs):
    # y as a [N, E, D] view with a non-unit feature stride; D = 300 spans several feature tiles.
    storage = torch.randn(NUM_TOKENS, NUM_EXPERTS, 300, 2)
    y = storage[..., 0]
    idx = random_indices(NUM_TOKENS, NUM_EXPERTS, 3)
    assert not y.is_contiguous()
    check_exact(y, idx.t().contiguous().t())  # idx with column-major strides too


def test_gradient_of_a_non_contiguous_upstream_grad(nan_outputs):
    y = torch.randn(NUM_TOKENS, NUM_EXPERTS, DIM).requires_grad_()
    idx = random_indices(NUM_TOKENS, NUM_EXPERTS, 3)
    grad_out = torch.randn(DIM, 3, NUM_TOKENS).permute(2, 1, 0)  # [N, k, D] view, transposed strides
    with mk.use_backend("triton"):
        out = mk.topk_gather(y, idx)
    (grad,) = torch.autograd.grad(out, y, grad_out)
    (ref_grad,) = torch.autograd.grad(reference.topk_gather(y, idx), y, grad_out)
    assert torch.equal(grad, ref_grad)


def test_torch_compile_fullgraph_matches_eager():
    y = torch.randn(9, NUM_EXPERTS, DIM).requires_grad_()
    idx = random_indices(9, NUM_EXPERTS, 2)

    # The public op: the backend dispatch and the custom op (fake + autograd) trace without breaks.
    def loss_fn(y, idx):
        return (mk.topk_gather(y, idx) ** 2).sum()

    with mk.use_backend("triton"):
        eager_loss = loss_fn(y, idx)
        (eager_grad,) = torch.autograd.grad(eager_loss, y)
        compiled_loss = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(y, idx)
        (compiled_grad,) = torch.autograd.grad(compiled_loss, y)
    assert torch.equal(compiled_loss, eager_loss)
    assert torch.equal(compiled_grad, eager_grad)


def gather_matmul_reference(y: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return reference.topk_gather(y, idx).float() @ w.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("top_k", [1, 3, NUM_EXPERTS], ids=["k1", "k3", "kE"])
def test_gather_matmul_forward_and_backward_match_reference(nan_outputs, top_k, dtype):
    # gather_matmul is an extra of the Triton module (no reference backend): fetched through the backend.
    gather_matmul = backend.kernel_module("topk_gather").gather_matmul
    features = 72
    y = torch.randn(NUM_TOKENS, NUM_EXPERTS, DIM, dtype=dtype).requires_grad_()
    w = (torch.randn(DIM, features, dtype=dtype) / DIM**0.5).requires_grad_()
    idx = random_indices(NUM_TOKENS, NUM_EXPERTS, top_k)
    out = gather_matmul(y, idx, w)
    y_ref, w_ref = (t.detach().float().requires_grad_() for t in (y, w))
    ref = gather_matmul_reference(y_ref, idx, w_ref)
    assert out.dtype == dtype
    assert_rel_close(out, ref, dtype, "out")
    grad_out = torch.randn(ref.shape).to(dtype)
    dy, dw = torch.autograd.grad(out, (y, w), grad_out)
    ref_dy, ref_dw = torch.autograd.grad(ref, (y_ref, w_ref), grad_out.float())
    assert dy.dtype == dtype and dw.dtype == dtype
    assert_rel_close(dy, ref_dy, dtype, "dy")
    assert torch.equal(dy[ref_dy == 0], torch.zeros_like(dy[ref_dy == 0]))  # unselected experts: exact 0
    assert_rel_close(dw, ref_dw, dtype, "dw")


def test_gather_matmul_strided_weight_and_bad_weight(nan_outputs):
    gather_matmul = backend.kernel_module("topk_gather").gather_matmul
    y = torch.randn(NUM_TOKENS, NUM_EXPERTS, DIM)
    idx = random_indices(NUM_TOKENS, NUM_EXPERTS, 2)
    w = torch.randn(50, DIM).t()  # [D, F] with transposed strides
    assert_rel_close(gather_matmul(y, idx, w), gather_matmul_reference(y, idx, w), torch.float32, "out")
    with pytest.raises(ValueError, match="gather_matmul: w must be"):
        gather_matmul(y, idx, torch.randn(DIM + 1, 8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the check is a device-side assert: it ends the context")
@pytest.mark.parametrize("bad", [-1, NUM_EXPERTS])
def test_indices_out_of_range_are_an_error(bad):
    y = torch.randn(4, NUM_EXPERTS, DIM)
    idx = torch.tensor([[0, 1]] * 4)
    idx[2, 1] = bad
    for name in ("triton", "reference"):
        with mk.use_backend(name), pytest.raises(RuntimeError, match=r"idx outside \[0, E=6\)"):
            mk.topk_gather(y, idx)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the check is a device-side assert: it ends the context")
def test_gather_matmul_refuses_repeated_indices():
    """Its dY stores assume distinct indices (two rows storing into one dY row would race): refused."""
    gather_matmul = backend.kernel_module("topk_gather").gather_matmul
    y, w = torch.randn(4, NUM_EXPERTS, DIM), torch.randn(DIM, 8)
    idx = torch.tensor([[0, 1, 2]] * 4)
    gather_matmul(y, idx, w)  # distinct: fine
    idx[3] = torch.tensor([4, 1, 4])
    with pytest.raises(RuntimeError, match="gather_matmul: idx repeats an expert within a row"):
        gather_matmul(y, idx, w)
