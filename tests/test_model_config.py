"""ModelConfig: defaults, the FFN-size formula, did-you-mean for unknown keys, validation messages."""

import math

import pytest

import moc_kernels as mk
from model import ModelConfig
from model.config import KERNEL_BACKENDS


def test_defaults_and_derived_sizes():
    config = ModelConfig()
    config.validate()
    assert config.is_moc and config.n_experts == 8 and config.top_k == 2
    assert config.kv_heads == config.n_heads == 12 and config.collab_heads == 12
    # F = 256 * ceil((2/3 * 4 * 768) / 256) = 256 * ceil(2048 / 256) = 2048
    assert config.ffn_hidden == 2048
    odd = ModelConfig(d_model=100, multiple_of=64, ffn_hidden_multiplier=3.0, n_heads=5)
    assert odd.ffn_hidden == 64 * math.ceil(200 / 64) == 256
    assert (config.norm_eps, config.moc_attn_bias, config.ffn_hidden_rule) == (1e-6, False, "design")


@pytest.mark.parametrize(
    ("d_model", "multiplier", "multiple_of", "design", "original"),
    [
        (768, 4.0, 256, 2048, 2048),  # the original's GPT-2-small shape: both rules agree
        (4, 4.0, 2, 12, 10),  # int(2 * 16 / 3) = 10 is already a multiple of 2; 2/3 * 16 = 10.67 rounds up to 12
        (32, 8 / 3, 8, 64, 56),  # int(8/3 * 32) = 85, int(170 / 3) = 56; 2/3 * 85.33 = 56.9 rounds up to 64
    ],
)
def test_ffn_hidden_rules(d_model, multiplier, multiple_of, design, original):
    keys = dict(d_model=d_model, n_heads=2, ffn_hidden_multiplier=multiplier, multiple_of=multiple_of)
    assert ModelConfig(**keys).ffn_hidden == design
    assert ModelConfig(**keys, ffn_hidden_rule="original").ffn_hidden == original


@pytest.mark.parametrize("experts", [0, None])
def test_dense_baseline_is_not_moc(experts):
    assert not ModelConfig(n_experts=experts).is_moc


def test_kernel_backends_match_moc_kernels():
    assert KERNEL_BACKENDS == mk.BACKENDS


def test_from_dict_roundtrip_and_yaml_null():
    config = ModelConfig.from_dict({"d_model": 64, "n_heads": 4, "n_kv_heads": None, "n_experts": None})
    assert config.d_model == 64 and config.kv_heads == 4 and not config.is_moc
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ValueError, match=r"unknown model key 'n_layer' \(did you mean 'n_layers'\?\)"):
        ModelConfig.from_dict({"n_layer": 2})
    with pytest.raises(ValueError, match="unknown model key 'zzz'; valid keys: d_model"):
        ModelConfig.from_dict({"zzz": 1})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"top_k": 9}, "top_k=9 must be <= n_experts=8"),
        ({"d_model": 100, "n_heads": 12}, "d_model=100 must be divisible by n_heads=12"),
        ({"n_kv_heads": 5}, "n_heads=12 must be divisible by n_kv_heads=5"),
        ({"d_model": 36, "n_heads": 12}, "head dim d_model/n_heads = 3 must be even"),
        ({"moc_heads": 7}, "d_model=768 must be divisible by moc_heads=7"),
        ({"kernels": "cuda"}, "'kernels' must be one of auto, triton, reference, got 'cuda'"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"d_model": 0}, "'d_model' must be >= 1, got 0"),
        ({"n_layers": "2"}, "'n_layers' must be an integer, got '2'"),
        ({"top_k": 0}, "'top_k' must be >= 1, got 0"),
        ({"n_experts": -1}, "'n_experts' must be >= 0, got -1"),
        ({"router_temperature": 0.0}, "'router_temperature' must be > 0, got 0.0"),
        ({"aux_loss_weight": -0.1}, "'aux_loss_weight' must be >= 0, got -0.1"),
        ({"rope_theta": float("nan")}, "'rope_theta' must be a finite number"),
        ({"n_heads": True}, "'n_heads' must be an integer, got True"),
        ({"norm_eps": 0.0}, "'norm_eps' must be > 0, got 0.0"),
        ({"moc_attn_bias": "yes"}, "'moc_attn_bias' must be true or false, got 'yes'"),
        ({"ffn_hidden_rule": "llama"}, "'ffn_hidden_rule' must be one of design, original, got 'llama'"),
    ],
)
def test_impossible_values_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(overrides)


def test_dense_model_ignores_moe_only_keys():
    # top_k > n_experts only matters when there are experts.
    ModelConfig.from_dict({"n_experts": 0, "top_k": 4}).validate()
