"""``model.double()`` on the reference backend: MoC, MoE and dense models forward and backward in fp64.

The reference ops are plain PyTorch, so fp64 is how a researcher checks numerics; the Triton kernels
refuse fp64 with a message that names the backend that takes it.
"""

import pytest
import torch

import moc_kernels as mk
from model import LunarisLM, ModelConfig

VARIANTS = {
    "moc": dict(n_experts=6, top_k=3),
    "moe": dict(n_experts=6, top_k=2, ffn="moe"),
    "dense": dict(n_experts=0),
}


def tiny(**overrides) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=53, multiple_of=16, max_seq_len=32)
    return ModelConfig.from_dict({**base, "kernels": "reference", **overrides})


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("variant", VARIANTS)
def test_double_forward_and_backward(variant):
    torch.manual_seed(0)
    lm = LunarisLM(tiny(**VARIANTS[variant]))
    ids = torch.randint(0, 53, (2, 10))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        logits32 = lm(inputs).logits
    lm.double()
    out = lm(inputs, targets)
    assert out.logits.dtype == out.loss.dtype == torch.float64
    torch.testing.assert_close(out.logits, logits32.double(), rtol=0, atol=1e-5)
    (out.loss + out.aux_loss).backward()
    assert all(p.grad.dtype == torch.float64 and bool(p.grad.isfinite().all()) for p in lm.parameters())

    # The main loss's backward agrees with its central difference along a random direction. Every model
    # computes in fp64 throughout (routers included, model.layers.math_dtype): a step of 1e-6 (small
    # enough to keep every top-k choice) leaves ~1e-8 relative.
    params = list(lm.parameters())
    grads = torch.autograd.grad(lm(inputs, targets).loss, params)
    direction = [torch.randn_like(p) for p in params]
    predicted = sum((g * d).sum() for g, d in zip(grads, direction, strict=True)).item()
    eps, rel = 1e-6, 1e-7
    losses = []
    with torch.no_grad():
        for sign in (1, -1):
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
            losses.append(lm(inputs, targets).loss.item())
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
    measured = (losses[0] - losses[1]) / (2 * eps)
    assert measured == pytest.approx(predicted, rel=rel), (measured, predicted)


@pytest.mark.skipif(mk.backend.triton_problem() is not None, reason="the Triton kernels cannot run here")
def test_triton_backend_refuses_fp64_and_names_the_reference():
    x = torch.randn(4, 8, dtype=torch.float64)
    w13, w2 = torch.randn(3, 8, 2 * 16, dtype=torch.float64), torch.randn(3, 16, 8, dtype=torch.float64)
    with mk.use_backend("reference"):
        assert mk.expert_swiglu(x, w13, None, w2).dtype == torch.float64
    with (
        mk.use_backend("triton"),
        pytest.raises(ValueError, match="float64 on the triton backend; fp64 runs on the reference"),
    ):
        mk.expert_swiglu(x, w13, None, w2)
    q = torch.randn(4, 3, 2, 4, dtype=torch.float64)
    with mk.use_backend("triton"), pytest.raises(ValueError, match="small_attention: unsupported dtype torch.float64"):
        mk.small_attention(q, q, q)
