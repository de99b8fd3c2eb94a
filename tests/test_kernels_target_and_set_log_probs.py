"""``target_and_set_log_probs`` (DESIGN §5c's per-position pair): the reference against the definition
written out in fp64, the Triton kernel (interpreter on CPU) against the reference."""

import pytest
import torch

import moc_kernels as mk
from moc_kernels import backend
from tests.conftest import assert_rel_close


@pytest.fixture
def nan_buffers(monkeypatch):
    """Every buffer the launcher allocates starts as NaN, so an element the kernel forgets fails."""
    module = backend.kernel_module("target_and_set_log_probs")

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(module, "_empty", nan_empty)


def make_inputs(rows, vocab, dtype):
    logits = torch.randn(rows, vocab) * 3 + 1
    logits[0] = 0.7  # all equal
    logits[1, 5] = 80.0  # one huge logit, the target of its row and outside the set
    in_set = torch.rand(vocab) < 0.3
    in_set[5] = False
    targets = torch.randint(0, vocab, (rows,))
    targets[1] = 5
    return logits.to(dtype), targets, in_set


def exact(logits, targets, in_set, temperature):
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    return log_p.gather(1, targets[:, None]).squeeze(1), torch.log(log_p.exp()[:, in_set].sum(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reference_matches_the_definition_in_fp64(temperature):
    logits, targets, in_set = make_inputs(7, 333, torch.float64)
    got = mk.reference.target_and_set_log_probs(logits, targets, in_set, temperature)
    for out, ref in zip(got, exact(logits, targets, in_set, temperature)):
        assert out.dtype == torch.float64
        assert (out - ref).abs().max() <= 1e-12


def test_reference_at_temperature_one_is_kotaras_per_token_nll_bit_for_bit():
    from kotara.similarity import token_stats

    logits, targets, in_set = make_inputs(9, 501, torch.float32)
    log_p_target, _ = mk.reference.target_and_set_log_probs(logits, targets, in_set)
    assert torch.equal(-log_p_target, token_stats([logits, logits], targets)["nll"][0])


# V = 50257 (GPT-2) takes the large tiles over a ragged last tile; 4097 one large tile then one
# element; 777 the small config. The interpreter is slow, so few rows.
@pytest.mark.triton
# The interpreter (numpy) warns where the first tile's rescale exp((-FLT_MAX - m) / T) overflows to
# exp(-inf) = 0, which is the intended value (IEEE on the GPU, silently).
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize(
    "vocab,dtype,temperature",
    [(50257, torch.float32, 1.0), (50257, torch.bfloat16, 0.85), (4097, torch.float32, 1.3), (777, torch.float16, 1.0)],
)
def test_triton_matches_reference(nan_buffers, vocab, dtype, temperature):
    logits, targets, in_set = make_inputs(3 if vocab > 5000 else 6, vocab, dtype)
    with mk.use_backend("reference"):
        expected = mk.target_and_set_log_probs(logits, targets, in_set, temperature)
    with mk.use_backend("triton"):
        got = mk.target_and_set_log_probs(logits, targets, in_set, temperature)
    # Both compute in fp32 from the same (possibly bf16/fp16) values, so fp32 tolerance holds.
    for name, out, ref in zip(("log_p_target", "log_p_set"), got, expected):
        assert out.dtype == torch.float32
        assert_rel_close(out, ref, torch.float32, name)
    # The huge logit's row: its target has probability 1 to fp32 rounding, the set almost none.
    assert abs(float(got[0][1])) < 1e-6 and float(got[1][1]) < -50


@pytest.mark.triton
def test_triton_row_strided_view_and_minus_inf_logits(nan_buffers):
    base, targets, in_set = make_inputs(5, 2 * 1500, torch.float32)
    logits = base[:, ::2].contiguous()[:, :1400]
    logits[2, :700] = float("-inf")  # impossible tokens add nothing
    targets = targets % 1400
    targets[2] = 900
    strided = torch.zeros(5, 2000)
    strided[:, :1400] = logits
    view = strided[:, :1400]  # row stride 2000
    with mk.use_backend("reference"):
        expected = mk.target_and_set_log_probs(logits, targets, in_set[:1400])
    with mk.use_backend("triton"):
        got = mk.target_and_set_log_probs(view, targets, in_set[:1400])
    for out, ref in zip(got, expected):
        assert_rel_close(out, ref, torch.float32, "strided")


def test_bad_input_is_a_clear_error():
    logits, targets, in_set = make_inputs(3, 10, torch.float32)
    with pytest.raises(ValueError, match="in_set must be \\[V=10\\]"):
        mk.target_and_set_log_probs(logits, targets, in_set[:9])
    with pytest.raises(ValueError, match="in_set must be bool"):
        mk.target_and_set_log_probs(logits, targets, in_set.int())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mk.target_and_set_log_probs(logits, targets, in_set, 0.0)
    with pytest.raises(RuntimeError, match="target outside"):
        mk.target_and_set_log_probs(logits, torch.tensor([0, 10, 1]), in_set)


def test_compile_specs_cover_the_shipped_configs():
    module = backend.kernel_module("target_and_set_log_probs")
    specs = module.compile_specs()
    for dtype in ("bf16", "fp32"):
        for size in module.CONFIGS:
            assert any(s.config.startswith(size) and s.config.endswith(dtype) for s in specs)
    for spec in specs:  # the JIT's specialization: constants keyed by argument index
        constants = {spec.fn.arg_names[i] for (i,) in spec.constexprs}
        assert constants == {k for k, v in spec.signature.items() if v == "constexpr"}
