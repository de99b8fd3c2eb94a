"""Triton fused_logit_nll (interpreter on CPU) against the reference: every strategy, M = 2 and 3."""

import pytest
import torch

import moc_kernels as mk
from moc_kernels import backend
from tests.conftest import TOLERANCE, assert_rel_close

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element a kernel forgets fails."""
    module = backend.kernel_module("fused_logit_nll")

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(module, "_empty", nan_empty)
    return module


def make_inputs(num_models, rows, vocab, dtype):
    logits = [torch.randn(rows, vocab) * (2 + i) + i for i in range(num_models)]
    logits[0][1] = 0.7  # all equal: gap 0, maximal entropy
    logits[-1][2, 5] = 80.0  # one huge logit: entropy ~ 0
    targets = torch.randint(0, vocab, (rows,))
    targets[0] = mk.IGNORE_INDEX
    targets[2] = 5  # the huge logit's own token
    return [lg.to(dtype) for lg in logits], targets


def run_both(logits, targets, temps, betas, strategies=mk.STRATEGIES):
    with mk.use_backend("reference"):
        expected = mk.fused_logit_nll_multi(logits, targets, strategies, temps, betas)
    with mk.use_backend("triton"):
        got = mk.fused_logit_nll_multi(logits, targets, strategies, temps, betas)
    return got, expected


# V = 50257 (GPT-2) takes the large tiles over a ragged last tile; 1031 is one large tile, mostly
# masked; 777 uses the small config. The interpreter is slow, so few rows.
@pytest.mark.parametrize(
    "num_models,vocab,dtype",
    [
        (2, 50257, torch.float32),
        (3, 50257, torch.bfloat16),
        (3, 1031, torch.float32),
        (2, 1031, torch.bfloat16),
        (3, 777, torch.float16),
    ],
)
def test_every_strategy_matches_reference(num_models, vocab, dtype):
    logits, targets = make_inputs(num_models, 3 if vocab > 4096 else 6, vocab, dtype)
    temps, betas = [0.85, 1.1, 1.3][:num_models], [0.7, 1.4, 0.5][:num_models]
    got, expected = run_both(logits, targets, temps, betas)
    # Both compute in fp32 from the same (possibly bf16/fp16) values, so fp32 tolerance holds.
    for strategy in mk.STRATEGIES:
        for field in ("nll", "weights", "entropy"):
            out, ref = getattr(got[strategy], field), getattr(expected[strategy], field)
            assert out.dtype == torch.float32
            assert_rel_close(out, ref, torch.float32, f"{strategy}.{field}")
        assert got[strategy].nll[0] == 0  # ignored target
    # The edge rows mean what they should: a flat row gets gap weight ~0, a peaked row entropy ~0.
    assert got["gap"].weights[0, 1] < 1e-3
    assert got["entropy"].entropy[-1, 2] < 1e-6
    assert TOLERANCE[torch.float32] <= TOLERANCE[dtype]


def test_single_strategy_and_row_strided_views():
    """Logits as column slices of wider buffers (row stride > V, no copy) and a transposed one (copied)."""
    rows, vocab = 5, 1500
    wide = [torch.randn(rows, vocab + 37) * 3, torch.randn(rows, vocab + 5) * 2]
    logits = [wide[0][:, 3 : 3 + vocab], wide[1][:, :vocab]]
    logits.append(torch.randn(vocab, rows).t())  # column stride != 1: the launcher copies it
    targets = torch.randint(0, vocab, (rows,))
    for strategy in ("poe", "mixture_gap"):
        with mk.use_backend("triton"):
            got = mk.fused_logit_nll(logits, targets, strategy, [1.2, 0.7, 1.0], [0.5, 1.0, 2.0])
        expected = mk.fused_logit_nll(logits, targets, strategy, [1.2, 0.7, 1.0], [0.5, 1.0, 2.0])
        for field in ("nll", "weights", "entropy"):
            assert_rel_close(getattr(got, field), getattr(expected, field), torch.float32, f"{strategy}.{field}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
def test_non_finite_logits_follow_the_documented_rules():
    """-inf is an impossible token (row stays finite); +inf or NaN make that row NaN, as the reference."""
    rows, vocab = 5, 300
    logits = [torch.randn(rows, vocab) * 2, torch.randn(rows, vocab)]
    logits[0][0, :150] = float("-inf")  # a whole leading stretch: the online max starts on -inf
    logits[1][0, 7] = float("-inf")
    logits[0][1, 9] = float("nan")
    logits[1][2, 299] = float("inf")
    targets = torch.tensor([200, 3, 4, 5, 6])
    got, expected = run_both(logits, targets, [0.9, 1.1], None)
    finite_rows = [0, 3, 4]
    for strategy in mk.STRATEGIES:
        for field in ("nll", "weights", "entropy"):
            out, ref = getattr(got[strategy], field), getattr(expected[strategy], field)
            assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{strategy}.{field}: NaN pattern differs"
            assert_rel_close(out[..., finite_rows], ref[..., finite_rows], torch.float32, f"{strategy}.{field}")
        assert torch.isnan(got[strategy].nll[[1, 2]]).all()


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_entropy_of_peaked_rows_is_accurate(backend_name):
    """Entropies from 1e-5 nats up, each within 1e-5 relative of fp64. log(sum exp) computed as
    log(1 + rest) lost ~6e-8 nats absolute (~1% here), which the entropy weights 1/(H + EPS) amplify."""
    rows, vocab = 24, 3000
    logits = torch.randn(rows, vocab)
    top = torch.randint(0, vocab, (rows,))
    logits[torch.arange(rows), top] += torch.linspace(8.0, 21.0, rows)
    logits[5, (top[5] + 1) % vocab] = logits[5, top[5]]  # a tied maximum
    p = torch.softmax(logits.double() / 0.9, -1)
    exact = -(p * p.clamp_min(1e-300).log()).sum(-1)
    assert exact.min() < 2e-5
    with mk.use_backend(backend_name):
        got = mk.fused_logit_nll([logits, logits.flip(0)], torch.zeros(rows, dtype=torch.int64), "entropy", [0.9, 1.0])
    rel = ((got.entropy[0].double() - exact).abs() / exact).max()
    assert rel <= 1e-5, f"entropy relative error {rel:.2e}"


def test_compiles_fullgraph_without_graph_breaks():
    logits, targets = make_inputs(2, 4, 333, torch.float32)

    # The public op: the backend dispatch and the custom op trace without breaks.
    def nll_sum(a, b, t):
        out = mk.fused_logit_nll_multi([a, b], t, ["entropy", "mixture"], [0.9, 1.2])
        return out["entropy"].nll + out["mixture"].nll, out["entropy"].weights

    compiled = torch.compile(nll_sum, fullgraph=True, backend="aot_eager")
    with mk.use_backend("triton"):
        got = compiled(*logits, targets)
        expected = nll_sum(*logits, targets)
    for out, ref in zip(got, expected):
        assert_rel_close(out, ref, torch.float32, "compiled")


def test_bad_input_is_a_clear_error():
    logits = [torch.randn(3, 10), torch.randn(3, 10)]
    with mk.use_backend("triton"), pytest.raises(ValueError, match="at most 8 models"):
        mk.fused_logit_nll(logits * 5, torch.tensor([1, 2, 2]), "average")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the check is a device-side assert: it ends the context")
def test_out_of_range_target_is_a_device_side_assert():
    """Checked without a host sync (``torch._assert_async``): on the CPU it raises at the call."""
    logits = [torch.randn(3, 10), torch.randn(3, 10)]
    with mk.use_backend("triton"), pytest.raises(RuntimeError, match="target is out of range"):
        mk.fused_logit_nll(logits, torch.tensor([1, 10, 2]), "average")


def test_compile_specs_cover_the_shipped_configs():
    module = backend.kernel_module("fused_logit_nll")
    specs = module.compile_specs()
    kernels = {"_model_stats_kernel": "stats", "_fused_lse_kernel": "fused_lse", "_fused_log_probs_kernel": "log_probs"}
    for kernel, table in kernels.items():
        for dtype in ("bf16", "fp32"):
            for size in module.CONFIGS[table]:
                assert any(s.kernel == kernel and s.config.startswith(size) and dtype in s.config for s in specs)
    for spec in specs:  # the JIT's specialization: constants keyed by argument index
        constants = {spec.fn.arg_names[i] for (i,) in spec.constexprs}
        assert constants == {k for k, v in spec.signature.items() if v == "constexpr"}
