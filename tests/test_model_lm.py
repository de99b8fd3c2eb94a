"""LunarisLM: the contract (LMOutput), causality, KV cache, training signal, dense baseline."""

import pytest
import torch

from model import LMOutput, LunarisLM, ModelConfig
from model.layers import KVCache


def tiny(**overrides) -> ModelConfig:
    base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=48)
    base.update(n_experts=4, top_k=2, kernels="reference")
    base.update(overrides)
    return ModelConfig.from_dict(base)


@pytest.fixture(params=["moc", "dense"])
def config(request) -> ModelConfig:
    return tiny() if request.param == "moc" else tiny(n_experts=0)


def test_output_contract(config):
    lm = LunarisLM(config)
    ids = torch.randint(0, 97, (2, 12))
    targets = torch.randint(0, 97, (2, 12))
    targets[0, :5] = -100
    out = lm(ids, targets)
    assert isinstance(out, LMOutput) and out.logits.shape == (2, 12, 97)
    manual = torch.nn.functional.cross_entropy(out.logits[0, 5:], targets[0, 5:], reduction="sum")
    manual = (manual + torch.nn.functional.cross_entropy(out.logits[1], targets[1], reduction="sum")) / 19
    torch.testing.assert_close(out.loss, manual)
    assert lm(ids).loss is None
    assert out.aux_loss.dim() == 0
    if config.is_moc:
        cfg = config
        expected_aux = sum(
            cfg.aux_loss_weight
            * (
                cfg.balance_coef * out.stats[f"layer{i}/balance_loss"]
                + cfg.diversity_coef * out.stats[f"layer{i}/diversity_loss"]
            )
            for i in range(cfg.n_layers)
        )
        torch.testing.assert_close(out.aux_loss.detach(), expected_aux)
        expected_keys = {
            f"layer{i}/{name}"
            for i in range(2)
            for name in ("expert_load", "router_entropy", "collab_entropy", "balance_loss", "diversity_loss")
        }
        assert set(out.stats) == expected_keys
        assert all(not v.requires_grad for v in out.stats.values())
        assert out.stats["layer1/expert_load"].shape == (4,)
    else:
        assert out.aux_loss.item() == 0.0 and out.stats == {}


def test_tied_embeddings_and_parameter_count(config):
    lm = LunarisLM(config)
    assert lm.lm_head.weight is lm.tok_embeddings.weight
    unique = {id(p): p.numel() for p in lm.parameters()}
    assert lm.num_parameters() == sum(unique.values())
    dense = LunarisLM(tiny(n_experts=0))
    if config.is_moc:  # E experts of 3*D*F each, against one dense FFN
        assert lm.num_parameters() > dense.num_parameters() + 2 * 3 * 64 * config.ffn_hidden * 3


def test_causality(config):
    lm = LunarisLM(config).eval()
    ids = torch.randint(0, 97, (1, 16))
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % 97
    with torch.no_grad():
        a, b = lm(ids).logits, lm(changed).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().amax(-1).min() > 1e-4  # every later position sees the change


def test_kv_cache_matches_full_forward(config):
    lm = LunarisLM(config).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = lm(ids).logits
        cache = KVCache()
        # a prompt, then a multi-token chunk (explicit bottom-right causal mask), then single tokens
        chunks = [lm(ids[:, :7], kv_cache=cache, start_pos=0).logits]
        chunks.append(lm(ids[:, 7:12], kv_cache=cache, start_pos=7).logits)
        for t in range(12, 20):
            chunks.append(lm(ids[:, t : t + 1], kv_cache=cache, start_pos=t).logits)
    assert cache.get_seq_length() == 20
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


def test_loss_falls_on_a_tiny_run(config):
    lm = LunarisLM(config)
    data = torch.randint(0, 97, (2, 17))
    ids, targets = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        out = lm(ids, targets)
        optimizer.zero_grad()
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_bad_inputs_raise():
    lm = LunarisLM(tiny())
    with pytest.raises(ValueError, match="exceed max_seq_len=48"):
        lm(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        lm(torch.zeros(49, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        lm(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_init_scales_residual_projections():
    lm = LunarisLM(tiny(n_layers=8, d_model=128, n_heads=4, n_kv_heads=None))
    residual_std = 0.02 / (2 * 8) ** 0.5
    assert lm.layers[0].attention.wo.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert lm.layers[0].ffn.w2.std().item() == pytest.approx(residual_std, rel=0.1)
    assert lm.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_mixed_precision_paths():
    lm = LunarisLM(tiny())
    ids = torch.randint(0, 97, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm(ids, ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    (out.loss + out.aux_loss).backward()
    assert lm.layers[0].ffn.w13.grad.dtype == torch.float32 and torch.isfinite(lm.layers[0].ffn.w13.grad).all()
    with torch.no_grad():
        reference = lm(ids, ids).loss
        pure = lm.to(torch.bfloat16)(ids, ids)
    assert pure.logits.dtype == torch.bfloat16
    assert abs(pure.loss.item() - reference.item()) < 0.05 * reference.item()
