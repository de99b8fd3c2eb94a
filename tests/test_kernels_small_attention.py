"""Triton small_attention vs its reference: forward, entropy, and q/k/v gradients (interpreter on CPU)."""

import pytest
import torch

import moc_kernels as mk
from moc_kernels import backend, reference
from tests.conftest import assert_rel_close

pytestmark = pytest.mark.triton

NUM_TOKENS, HEADS = 37, 3


@pytest.fixture
def nan_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element the kernel leaves unwritten fails."""
    module = backend.kernel_module("small_attention")

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(module, "_empty", nan_empty)


def make_qkv(length: int, head_dim: int, dtype: torch.dtype, num_tokens: int = NUM_TOKENS):
    return [torch.randn(num_tokens, length, HEADS, head_dim, dtype=dtype).requires_grad_() for _ in range(3)]


def loss_of(out: torch.Tensor, entropy: torch.Tensor | None, out_weight, entropy_weight) -> torch.Tensor:
    loss = (out.float() * out_weight).sum()
    if entropy is not None:
        loss = loss + (entropy * entropy_weight).sum()
    return loss


def check_against_reference(q, k, v, return_entropy: bool, dtype: torch.dtype, mode: str = "eager") -> None:
    with mk.use_backend("triton"):
        result = mk.small_attention(q, k, v, return_entropy=return_entropy)
    expected = reference.small_attention(q, k, v, return_entropy=return_entropy)
    out, entropy = result if return_entropy else (result, None)
    ref_out, ref_entropy = expected if return_entropy else (expected, None)
    assert out.dtype == dtype
    assert_rel_close(out, ref_out, dtype, f"{mode} out")
    if return_entropy:
        assert entropy.dtype == torch.float32 and entropy.shape == (q.shape[0], q.shape[2], q.shape[1])
        assert_rel_close(entropy, ref_entropy, dtype, f"{mode} entropy")
    # Random weights on both outputs: the gradients must combine the output and the entropy paths.
    out_weight = torch.randn(out.shape)
    entropy_weight = torch.randn(ref_out.shape[0], ref_out.shape[2], ref_out.shape[1])
    grads = torch.autograd.grad(loss_of(out, entropy, out_weight, entropy_weight), (q, k, v))
    ref_grads = torch.autograd.grad(loss_of(ref_out, ref_entropy, out_weight, entropy_weight), (q, k, v))
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert grad.dtype == dtype
        assert_rel_close(grad, ref_grad, dtype, f"{mode} d{name}")


# fp32 packs 16 rows per program (bf16: 64), and the interpreter pays per program: the slow fp32
# L=6 (router-like) case is covered by bf16 and the strided test instead.
CASES = [
    (torch.float32, 1, 20),
    (torch.float32, 3, 40),
    (torch.float32, 8, 20),
    (torch.bfloat16, 1, 20),
    (torch.bfloat16, 3, 40),
    (torch.bfloat16, 8, 20),
    (torch.bfloat16, 6, 40),
]


@pytest.mark.parametrize("dtype, length, head_dim", CASES, ids=lambda x: str(x).removeprefix("torch."))
def test_forward_entropy_and_gradients_match_reference(nan_outputs, length, head_dim, dtype):
    q, k, v = make_qkv(length, head_dim, dtype)
    check_against_reference(q, k, v, return_entropy=True, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_longest_rows_one_token_per_tile(nan_outputs, dtype):
    # L = 64 (and dh = 24 padded to 32): one token fills a whole tile.
    q, k, v = make_qkv(64, 24, dtype, num_tokens=3)
    check_against_reference(q, k, v, return_entropy=True, dtype=dtype)


# Feature chunks (dh above the config's BLOCK_D: several chunks, the last ragged or fully masked) and
# fp32 rows longer than 16 (the 32- and 64-row tiers), which the GPU shapes dh = 128/256 and the
# router of a 32/64-expert model take.
@pytest.mark.parametrize(
    "dtype, length, head_dim, num_tokens",
    [
        (torch.bfloat16, 3, 160, 5),
        (torch.float32, 2, 80, 9),
        (torch.float32, 20, 40, 3),
        (torch.float32, 33, 24, 2),
    ],
    ids=["bf16-L3-dh160", "fp32-L2-dh80", "fp32-L20-dh40", "fp32-L33-dh24"],
)
def test_feature_chunks_and_long_fp32_rows(nan_outputs, dtype, length, head_dim, num_tokens):
    q, k, v = make_qkv(length, head_dim, dtype, num_tokens=num_tokens)
    check_against_reference(q, k, v, return_entropy=True, dtype=dtype)


def test_mixed_qkv_dtypes_are_a_clear_error():
    """A bf16 x fp32 tl.dot runs in the interpreter but does not compile for a GPU: one dtype for all."""
    q, k, v = (t.detach() for t in make_qkv(3, 16, torch.bfloat16, num_tokens=2))
    for backend_name in ("triton", "reference"):
        with mk.use_backend(backend_name), pytest.raises(ValueError, match="q, k, v dtypes differ"):
            mk.small_attention(q, k.float(), v)


def test_compile_specs_cover_wide_heads_and_long_fp32_rows():
    """The report compiles what GPUs will launch: dh = 64, 128, 256, and fp32 beyond L = 16."""
    module = backend.kernel_module("small_attention")
    shipped = set(module.SHIPPED_SHAPES)
    for dtype_key in ("bf16", "fp32"):
        assert {dh for key, _, dh in shipped if key == dtype_key} >= {64, 128, 256}, dtype_key
    assert max(length for key, length, _ in shipped if key == "fp32") == module.MAX_L
    assert len(module.compile_specs()) == 2 * len(shipped)  # one forward and one backward per shape


@pytest.mark.parametrize("dtype, length", [(torch.float32, 3), (torch.bfloat16, 6)], ids=["fp32-L3", "bf16-L6"])
def test_without_entropy_and_strided_inputs(nan_outputs, dtype, length):
    # q, k, v as views of one packed [N, L, 3, H, dh] projection (what a fused qkv matmul gives).
    packed = torch.randn(NUM_TOKENS, length, 3, HEADS, 40, dtype=dtype).requires_grad_()
    q, k, v = packed.unbind(2)
    assert not q.is_contiguous()
    check_against_reference(q, k, v, return_entropy=False, dtype=dtype)


def test_single_dominant_score_gives_zero_entropy(nan_outputs):
    q, k, v = (t.detach() for t in make_qkv(3, 40, torch.float32, num_tokens=5))
    k[:, 0] = q[:, 0] * 1e3  # token 0's query is huge along its own key: softmax ~ one-hot
    with mk.use_backend("triton"):
        out, entropy = mk.small_attention(q, k, v, return_entropy=True)
    ref_out, ref_entropy = reference.small_attention(q, k, v, return_entropy=True)
    assert torch.isfinite(entropy).all()
    assert entropy[:, :, 0].abs().max() < 1e-6
    assert_rel_close(out, ref_out, torch.float32, "out")
    assert_rel_close(entropy, ref_entropy, torch.float32, "entropy")


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = make_qkv(3, 20, torch.float32, num_tokens=9)

    # The public op: the backend dispatch and the custom op (fake + autograd) trace without breaks.
    def loss_fn(q, k, v):
        out, entropy = mk.small_attention(q, k, v, return_entropy=True)
        return (out * out).sum() - entropy.mean()

    with mk.use_backend("triton"):
        eager_loss = loss_fn(q, k, v)
        eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
        compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
        compiled_loss = compiled(q, k, v)
        compiled_grads = torch.autograd.grad(compiled_loss, (q, k, v))
    assert_rel_close(compiled_loss, eager_loss, torch.float32, "loss")
    for grad, eager_grad in zip(compiled_grads, eager_grads):
        assert_rel_close(grad, eager_grad, torch.float32, "grad")


def test_rows_longer_than_64_are_a_clear_error():
    q, k, v = (t.detach() for t in make_qkv(65, 16, torch.float32, num_tokens=1))
    with mk.use_backend("triton"), pytest.raises(ValueError, match="L=65"):
        mk.small_attention(q, k, v)
