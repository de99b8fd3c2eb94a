"""What the ops dispatch, read from a ``TorchDispatchMode`` trace: costs the interpreter cannot show.

Buffers autograd zero-fills for gradients nobody reads, ``slice_backward`` copies of a packed weight,
host synchronisations and host-to-device copies cost nothing visible on the CPU, but on a GPU they are
gigabytes per step (expert_swiglu's [N, E, F] zeros) or a stall per decoding step (the fusion ops).
Each test traces the aten ops one call dispatches and asserts the costly ones are absent.
"""

import importlib

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import moc_kernels as mk
from moc_kernels import backend
from model import LunarisLM, ModelConfig

pytestmark = pytest.mark.triton

# The ops that allocate a filled tensor (how autograd materialises an undefined gradient).
FILLS = {
    "aten.zeros.default",
    "aten.zeros_like.default",
    "aten.new_zeros.default",
    "aten.full.default",
    "aten.full_like.default",
    "aten.new_full.default",
    "aten.fill_.Scalar",
    "aten.zero_.default",
}
# The ops that make the host wait for the device, and the one that builds a tensor from host data
# (``torch.tensor(list, device=...)``, a blocking copy from pageable memory on a GPU).
SYNCS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.item.default"}
HOST_DATA = {"aten.lift_fresh.default", "aten.lift_fresh_copy.default"}


class OpTrace(TorchDispatchMode):
    """Records (op name, output shapes) of every dispatched aten op. With ``inside_custom_ops`` the
    Python bodies of this package's custom ops are traced too (else each is one opaque entry)."""

    def __init__(self, inside_custom_ops: bool = False) -> None:
        super().__init__()
        self.inside_custom_ops = inside_custom_ops
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = OPDEFS.get(func._schema.name) if self.inside_custom_ops else None
        if opdef is not None:
            self.calls.append((str(func), []))
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        outputs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((str(func), [tuple(t.shape) for t in outputs if isinstance(t, torch.Tensor)]))
        return out

    def shapes_of(self, names: set[str]) -> list[tuple[int, ...]]:
        return [shape for name, shapes in self.calls if name in names for shape in shapes]

    def names(self) -> set[str]:
        return {name for name, _ in self.calls}


# ------------------------------------------------------------------ gradients nobody uses (materialised)


def test_expert_swiglu_backward_fills_no_gate_up_gradients():
    """G and U are outputs only to be saved; their gradients must reach the backward as None, not as
    two [N, E, F] zero tensors (1 GiB per layer per step in bf16 at GPT-2-small MoC)."""
    n, d, f, e = 9, 16, 24, 3
    x = torch.randn(n, d, requires_grad=True)
    w1, w3 = ((torch.randn(e, d, f) / d**0.5).requires_grad_() for _ in range(2))
    w2 = (torch.randn(e, f, d) / f**0.5).requires_grad_()
    with mk.use_backend("triton"):
        y = mk.expert_swiglu(x, w1, w3, w2)
    with OpTrace() as trace:
        y.square().sum().backward()
    assert (n, e, f) not in trace.shapes_of(FILLS), trace.calls
    assert all(t.grad is not None for t in (x, w1, w3, w2))


@pytest.mark.parametrize("use_entropy", [False, True])
def test_small_attention_backward_fills_no_lse_or_entropy_gradients(use_entropy):
    """lse (saved for backward) and a discarded entropy (the router's attention drops it) must not
    become zero-filled [N, H, L] gradients."""
    n, length, heads, dh = 5, 3, 2, 16
    q, k, v = (torch.randn(n, length, heads, dh, requires_grad=True) for _ in range(3))
    with mk.use_backend("triton"):
        out, entropy = mk.small_attention(q, k, v, return_entropy=True)
    loss = out.square().sum() + (entropy.sum() if use_entropy else 0)
    with OpTrace() as trace:
        loss.backward()
    assert (n, heads, length) not in trace.shapes_of(FILLS), trace.calls
    assert all(t.grad is not None for t in (q, k, v))


# ------------------------------------------------------------------ the packed w13 and frozen weights


@pytest.mark.parametrize("ffn", ["moc", "moe"])
def test_expert_layer_backward_writes_w13_gradient_without_slice_backward(ffn):
    """The model stores gate and up packed in w13 [E, D, 2F] (MoC's expert_swiglu and the MoE
    baseline's routed_swiglu); two views of it would cost two ``slice_backward`` (each a zero-filled
    [E, D, 2F]) and an add per layer and step."""
    config = ModelConfig.from_dict(
        dict(
            d_model=32, n_layers=1, n_heads=2, vocab_size=31, multiple_of=16, max_seq_len=8, n_experts=3, top_k=2,
            ffn=ffn,
        )
    )  # fmt: skip
    config = ModelConfig.from_dict({**config.to_dict(), "kernels": "triton"})
    lm = LunarisLM(config)
    ids = torch.randint(0, 31, (1, 5))
    out = lm(ids, ids)
    w13_shapes = {tuple(p.shape) for name, p in lm.named_parameters() if name.endswith("w13")}
    assert w13_shapes, "no w13 parameter: the test no longer looks at the expert layer"
    with OpTrace() as trace:
        (out.loss + out.aux_loss).backward()
    assert not set(trace.shapes_of({"aten.slice_backward.default"})) & w13_shapes, "slice_backward of w13"
    assert not set(trace.shapes_of(FILLS)) & w13_shapes


@pytest.mark.parametrize("trainable", ["x", "weights"])
def test_expert_swiglu_backward_runs_only_the_gemms_whose_gradients_are_needed(monkeypatch, trainable):
    """Frozen weights (fine-tuning around them) skip dW13 and dW2; a frozen input skips dx."""
    launch = importlib.import_module(backend.kernel_module("expert_swiglu").__package__ + ".launch")
    launched = []
    run = launch.Launch.run
    monkeypatch.setattr(launch.Launch, "run", lambda plan: launched.append(plan.name) or run(plan))
    n, d, f, e = 7, 16, 16, 2
    x = torch.randn(n, d, requires_grad=trainable == "x")
    weights = [torch.randn(e, d, f) / d**0.5, torch.randn(e, d, f) / d**0.5, torch.randn(e, f, d) / f**0.5]
    weights = [w.requires_grad_(trainable == "weights") for w in weights]
    leaves = [t for t in (x, *weights) if t.requires_grad]
    with mk.use_backend("triton"):
        y = mk.expert_swiglu(x, *weights)
    launched.clear()
    y.sum().backward()
    expected = ["swiglu_grad", "dx"] if trainable == "x" else ["swiglu_grad", "dw13", "dw2"]
    assert launched == expected
    with mk.use_backend("reference"):
        grads_ref = torch.autograd.grad(mk.expert_swiglu(x, *weights).sum(), leaves)
    got = [t.grad for t in leaves]
    for g, g_ref in zip(got, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ host synchronisation in the fusion ops


@pytest.mark.parametrize("op", ["fused_logit_nll_multi", "fused_log_probs:entropy", "fused_log_probs:mixture_gap"])
def test_fusion_ops_never_wait_for_the_device(op):
    """No value read back to the host (``bad.any()`` on targets waited for the GPU) and no tensor built
    from host data (``torch.tensor(temperatures, device=cuda)`` is a blocking copy), inside the ops."""
    logits = [torch.randn(4, 50), torch.randn(4, 50) * 2]
    targets = torch.tensor([1, 2, -100, 49])
    temps, weights = [0.9, 1.3], [0.4, 0.6]
    with mk.use_backend("triton"), OpTrace(inside_custom_ops=True) as trace:
        if op == "fused_logit_nll_multi":
            mk.fused_logit_nll_multi(logits, targets, mk.STRATEGIES, temps, weights)
        else:
            mk.fused_log_probs(logits, op.split(":")[1], temps, weights)
    assert any(name.startswith("moc_kernels.") for name in trace.names()), "the op was not traced"
    assert not trace.names() & SYNCS, sorted(trace.names() & SYNCS)
    assert not trace.names() & HOST_DATA, sorted(trace.names() & HOST_DATA)
