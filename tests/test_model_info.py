"""python -m model.info: exact parameter count, FLOPs consistent with the parameters, CLI errors."""

from dataclasses import replace

import pytest

from model import LunarisLM, ModelConfig
from model.info import activation_bytes_per_token, count_parameters, flops_per_token, main


def tiny(**overrides) -> ModelConfig:
    base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=16, max_seq_len=32)
    base.update(n_experts=6, top_k=3, moc_heads=2, kernels="reference")
    base.update(overrides)
    return ModelConfig.from_dict(base)


@pytest.mark.parametrize("experts", [6, 0])
def test_flops_are_twice_the_matmul_parameters_plus_attention_cores(experts):
    # Every weight matrix is used once per vector it is applied to (the tied embedding once, as the
    # LM head): 2 x (parameters - norm weights - biases), plus E-1 more uses of the router attention
    # (E vectors per token) and k-1 more of the collab attention and FFN (k vectors), plus the
    # parameter-free attention cores.
    config = tiny(n_experts=experts)
    lm = LunarisLM(config)
    assert count_parameters(config) == lm.num_parameters()
    vectors = sum(p.numel() for name, p in lm.named_parameters() if p.dim() == 1)  # norms, biases
    seq, dim, k = 32, 64, config.top_k
    parameter_free = config.n_layers * 2 * 2 * (seq + 1) / 2 * dim  # causal QK^T and AV
    if experts:
        parameter_free += config.n_layers * (2 * 2 * dim * (experts**2 + k**2) + 2 * k * dim)
        moc = lm.layers[0].ffn
        matrices = lambda module: sum(p.numel() for p in module.parameters() if p.dim() == 2)  # noqa: E731
        reused = (experts - 1) * matrices(moc.router_attn) + (k - 1) * (
            matrices(moc.collab_attn) + matrices(moc.collab_ffn)
        )
        parameter_free += config.n_layers * 2 * reused
    assert flops_per_token(config, seq)["total"] == pytest.approx(2 * (lm.num_parameters() - vectors) + parameter_free)


def test_activation_bytes_grow_with_experts():
    small, large = tiny(n_experts=2, top_k=1), tiny(n_experts=8, top_k=2)
    dense = replace(small, n_experts=0)
    per_token = [activation_bytes_per_token(c, 16, "fp32") for c in (dense, small, large)]
    assert 0 < per_token[0] < per_token[1] < per_token[2]
    # The expert pass alone saves at least x, gate, up and hidden [E, F] per expert in fp32.
    assert per_token[2] - per_token[1] > 6 * 3 * large.ffn_hidden * 4 * large.n_layers


def test_cli_prints_the_comparison(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  d_model: 64\n  n_layers: 1\n  n_heads: 4\n  vocab_size: 50\n  multiple_of: 16\n"
        "  max_seq_len: 16\n  n_experts: 4\n  top_k: 2\nlearning_rate: 1.0e-3\n"
    )
    assert main([str(path), "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "dense baseline" in out and "FLOPs/token training (3x)" in out and "activation bytes/token" in out
    assert "runs all 4 experts on every token" in out


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        (None, [], "does not exist"),
        ("model: [1, 2\n", [], "is not valid YAML"),
        ("", [], "is empty or not a mapping"),
        ("model:\n  n_layer: 2\n", [], "unknown model key 'n_layer' (did you mean 'n_layers'?)"),
        ("model:\n  max_seq_len: 8\n  vocab_size: 10\n", ["--seq-len", "9"], "--seq-len must be in [1, max_seq_len=8]"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, text, args, message):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    assert main([str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
