"""model.convert_original: a checkpoint of the original LunarisCodex-MoC code becomes ours, same function.

The original's forward below is written from the original code's layout (issue 15), not from model/:
per-expert FFN modules, ``torch.nn.MultiheadAttention`` for the router and collab attentions, rotary
embeddings on interleaved pairs by complex multiplication, RMSNorm eps 1e-5, the original's FFN-width
rounding. Its weights are random, with non-zero biases and non-unit norms.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import rel_err
from torch import nn
from transformers import AutoModelForCausalLM

from model import LunarisForCausalLM, LunarisLM, ModelConfig
from model.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from model.convert_original import main
from model.train_config import ConfigError, config_from_dict

REPO = Path(__file__).resolve().parents[1]
VOCAB = 97
# d_model 32, multiplier 8/3, multiple_of 8: the original's FFN width is 56 where DESIGN §2's rule gives 64.
BASE = dict(d_model=32, n_layers=2, n_heads=4, vocab_size=VOCAB, multiple_of=8, ffn_hidden_multiplier=8 / 3)
BASE |= dict(max_seq_len=32, rope_theta=10000.0, dropout=0.0, aux_loss_weight=0.01, router_temperature=0.7)
EPS = 1e-5


# --------------------------------------------------------------------------------------------------
# The original model, from its layout


def original_ffn_width(d_model: int, multiplier: float, multiple_of: int) -> int:
    hidden = int(2 * int(multiplier * d_model) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class OriginalRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * self.weight


class OriginalFeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def interleaved_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, dh]; pairs (2j, 2j+1) are complex numbers multiplied by freqs_cis [T, dh/2]."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis).flatten(3).type_as(x)


class OriginalAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = interleaved_rotary(q, freqs_cis), interleaved_rotary(k, freqs_cis)
        repeat = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, c))


class OriginalMoC(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_experts: int, top_k: int, hidden: int, temperature: float):
        super().__init__()
        self.n_experts, self.top_k, self.temperature = n_experts, top_k, temperature
        self.experts = nn.ModuleList(OriginalFeedForward(d_model, hidden) for _ in range(n_experts))
        self.router_self_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.router_norm = OriginalRMSNorm(d_model)
        self.router_gate = nn.Linear(d_model, n_experts)
        self.collab_cross_attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.collab_norm = OriginalRMSNorm(d_model)
        self.collab_ffn = nn.Sequential(
            nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Dropout(0.0), nn.Linear(2 * d_model, d_model)
        )
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        every = torch.stack([expert(x) for expert in self.experts], dim=2).view(-1, self.n_experts, d)
        context, _ = self.router_self_attn(every, every, every)
        summary = self.router_norm(context + every).mean(dim=1)
        logits = self.router_gate(summary) / self.temperature
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)
        weights = F.softmax(top_logits, dim=-1, dtype=torch.float32)
        chosen = every[torch.arange(every.shape[0])[:, None], top_idx]  # [N, k, D]
        collab, _ = self.collab_cross_attn(chosen, chosen, chosen)
        collab = self.collab_norm(collab + chosen)
        refined = self.collab_ffn(collab) + collab
        return self.o_proj((refined * weights.unsqueeze(-1)).sum(dim=1)).view(b, t, d)


class OriginalBlock(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        d, hidden = cfg["d_model"], original_ffn_width(cfg["d_model"], cfg["ffn_hidden_multiplier"], cfg["multiple_of"])
        self.attention = OriginalAttention(d, cfg["n_heads"], cfg["n_kv_heads"])
        self.attention_norm = OriginalRMSNorm(d)
        self.ffn_norm = OriginalRMSNorm(d)
        if cfg["n_experts"]:
            self.feed_forward = OriginalMoC(
                d, cfg["n_heads"], cfg["n_experts"], cfg["top_k"], hidden, cfg["router_temperature"]
            )
        else:
            self.feed_forward = OriginalFeedForward(d, hidden)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class OriginalLM(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg["vocab_size"], cfg["d_model"]),
                h=nn.ModuleList(OriginalBlock(cfg) for _ in range(cfg["n_layers"])),
                ln_f=OriginalRMSNorm(cfg["d_model"]),
            )
        )
        self.lm_head = nn.Linear(cfg["d_model"], cfg["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        head_dim = cfg["d_model"] // cfg["n_heads"]
        freqs = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(cfg["max_seq_len"], dtype=torch.float32), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)
        self.randomize()

    @torch.no_grad()
    def randomize(self) -> None:
        """Weights ~ N(0, 1/fan_in), norms 1 + N(0, 0.3) (non-unit), biases N(0, 0.1) (non-zero)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 1 / math.sqrt(p.shape[1]))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: [B, T] -> logits [B, T, V] (every position)."""
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x, self.freqs_cis[: idx.shape[1]])
        return self.lm_head(self.transformer.ln_f(x))


def original_greedy(model: OriginalLM, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def original_config(moc: bool, gqa: bool) -> dict:
    cfg = dict(BASE, n_kv_heads=2 if gqa else 4)
    return cfg | (dict(n_experts=5, top_k=3) if moc else dict(n_experts=None, top_k=2))


def pickled_dataclass_config(cfg: dict):
    """An instance of a config dataclass of a module that will not exist when the checkpoint is read."""
    module = types.ModuleType("model_moc_of_the_original")
    fields = [(k, type(v) if v is not None else object) for k, v in cfg.items()]
    cls = dataclasses.make_dataclass("LunarisCodexConfig", fields)
    cls.__module__ = module.__name__
    module.LunarisCodexConfig = cls
    return module, cls(**cfg)


def save_original(model: OriginalLM, cfg: dict, path: Path, wrapping: str, prefix: str) -> Path:
    """wrapping: 'raw' (a bare state dict), 'dict' (train-script checkpoint, config as a dict),
    'dataclass' (config as a pickled dataclass of the original code's module)."""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    if wrapping == "raw":
        torch.save(state, path)
        return path
    module = None
    model_cfg = cfg
    if wrapping == "dataclass":
        module, model_cfg = pickled_dataclass_config(cfg)
        sys.modules[module.__name__] = module
    try:
        optimizer = torch.optim.AdamW(model.parameters()).state_dict()
        payload = {
            "model": state,
            "optimizer": optimizer,
            "config": {"model": model_cfg, "learning_rate": 3e-4},
            "step": 1234,
            "epoch": 0,
        }
        torch.save(payload, path)
    finally:
        if module is not None:
            del sys.modules[module.__name__]
    if module is not None:
        with pytest.raises(ModuleNotFoundError):  # a plain torch.load needs the original code
            torch.load(path, weights_only=False)
    return path


def write_yaml(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump({"model": cfg, "learning_rate": 3e-4, "max_steps": 10}))
    return path


# --------------------------------------------------------------------------------------------------
# Logits and generation

CASES = {  # name: (moc, gqa, wrapping, prefix)
    "moc-gqa-dataclass-compiled": (True, True, "dataclass", "_orig_mod."),
    "moc-mha-raw-ddp": (True, False, "raw", "module."),
    "dense-gqa-dict-ddp-compiled": (False, True, "dict", "module._orig_mod."),
    "dense-mha-raw-compiled": (False, False, "raw", "_orig_mod."),
}


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    moc, gqa, wrapping, prefix = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(7)
    cfg = original_config(moc, gqa)
    original = OriginalLM(cfg).eval()
    ckpt = save_original(original, cfg, tmp / "latest_checkpoint.pt", wrapping, prefix)
    args = [str(ckpt), "--out", str(tmp / "converted")]
    if wrapping == "raw":
        args += ["--config", str(write_yaml(cfg, tmp / "original.yaml"))]
    assert main(args) == 0
    return request.param, cfg, original, tmp / "converted"


def test_logits_match_the_original(converted):
    name, cfg, original, out = converted
    ckpt = load_checkpoint(latest_checkpoint(out))
    assert "optimizer" not in ckpt and ckpt["step"] == 0
    assert ckpt["extra"]["original_step"] == (None if CASES[name][2] == "raw" else 1234)
    config = ModelConfig.from_dict(ckpt["config"]["model_config"])
    assert (config.norm_eps, config.moc_attn_bias, config.ffn_hidden_rule) == (1e-5, True, "original")
    assert config.ffn_hidden == 56 != ModelConfig(**{**config.to_dict(), "ffn_hidden_rule": "design"}).ffn_hidden
    lm = LunarisLM(config).eval()
    lm.load_state_dict(ckpt["model"])
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ids = torch.randint(0, VOCAB, (3, cfg["max_seq_len"]))
    with torch.no_grad():
        expected = original(ids)
        ours = lm(ids).logits
        assert torch.equal(hf(ids).logits, ours)
    err = rel_err(ours, expected)
    print(f"{name}: logits, ||ours - original|| / ||original|| = {err:.2e}")
    assert err <= 1e-5, f"{name}: relative error {err:.3e}"


def test_greedy_generation_matches_the_original(converted):
    name, _, original, out = converted
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    prompt = torch.randint(0, VOCAB, (2, 5))
    generated = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generated, original_greedy(original, prompt, 12))


@pytest.mark.parametrize("converted", ["moc-gqa-dataclass-compiled"], indirect=True)  # every new key; one is enough
def test_converted_export_runs_with_trust_remote_code_alone(converted, tmp_path):
    """The export's own modeling code (biases, eps, the FFN rule) in a process without this project."""
    _, _, original, out = converted
    from test_model_hf import run_in_fresh_process

    ids = torch.randint(0, VOCAB, (2, 10))
    res = run_in_fresh_process(out / "hf", ids, tmp_path)
    with torch.no_grad():
        assert rel_err(res["logits"], original(ids)) <= 1e-5
    assert torch.equal(res["cached"], original_greedy(original, ids[:, :4], 6))


def test_config_yaml_and_hf_config_carry_the_new_keys(converted):
    _, cfg, _, out = converted
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["out_dir"] == str(out)
    assert ModelConfig.from_dict(written["model"]).ffn_hidden == 56
    hf_config = json.loads((out / "hf" / "config.json").read_text())
    assert hf_config["norm_eps"] == 1e-5 and hf_config["moc_attn_bias"] is True
    assert hf_config["ffn_hidden_rule"] == "original" and hf_config["n_kv_heads"] == cfg["n_kv_heads"]


# --------------------------------------------------------------------------------------------------
# Errors: one line naming the key or file, exit code 2


@pytest.fixture(scope="module")
def moc_original(tmp_path_factory) -> tuple[OriginalLM, dict, Path]:
    torch.manual_seed(3)
    cfg = original_config(moc=True, gqa=True)
    return OriginalLM(cfg), cfg, tmp_path_factory.mktemp("moc_original")


def run_main(capsys, args: list[str]) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ("drop", "'transformer.h.1.feed_forward.collab_cross_attn.in_proj_bias'"),
        ("drop_expert", "'transformer.h.0.feed_forward.experts.4.w2.weight'"),
        ("extra", "'transformer.h.0.feed_forward.mediator'"),
        ("extra_expert", "'transformer.h.1.feed_forward.experts.5.w1.weight'"),
        ("untied", "'lm_head.weight'"),
        ("shape", "'transformer.h.0.attention.k_proj.weight' [32, 32]"),
    ],
)
def test_missing_extra_or_misfit_key_is_named(capsys, moc_original, tmp_path, edit, needle):
    original, cfg, _ = moc_original
    state = {"_orig_mod." + k: v for k, v in original.state_dict().items()}
    key = needle.strip("'").split("'")[0]
    if edit.startswith("drop"):
        del state["_orig_mod." + key]
    elif edit == "untied":
        state["_orig_mod.lm_head.weight"] = state["_orig_mod.lm_head.weight"] + 1
    elif edit == "shape":
        state["_orig_mod." + key] = torch.randn(32, 32)
    else:
        state["_orig_mod." + key] = torch.randn(3)
    torch.save({"model": state, "config": {"model": cfg}}, tmp_path / "ckpt.pt")
    code, err = run_main(capsys, [tmp_path / "ckpt.pt", "--out", tmp_path / "out"])
    one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_inputs_are_one_line_errors(capsys, moc_original, tmp_path):
    original, cfg, _ = moc_original
    out = tmp_path / "out"
    one_line_error(*run_main(capsys, [tmp_path / "missing.pt", "--out", out]), "missing.pt", "not found")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    one_line_error(*run_main(capsys, [tmp_path / "text.pt", "--out", out]), "not a readable torch checkpoint")
    torch.save({"step": 3}, tmp_path / "no_model.pt")
    one_line_error(*run_main(capsys, [tmp_path / "no_model.pt", "--out", out]), "holds no model state dict")
    torch.save(original.state_dict(), tmp_path / "raw.pt")
    one_line_error(*run_main(capsys, [tmp_path / "raw.pt", "--out", out]), "holds no model config", "--config")
    other = write_yaml(cfg | {"n_layers": 3}, tmp_path / "other.yaml")
    torch.save({"model": original.state_dict(), "config": {"model": cfg}}, tmp_path / "ckpt.pt")
    code, err = run_main(capsys, [tmp_path / "ckpt.pt", "--out", out, "--config", other])
    one_line_error(code, err, "disagree on 'n_layers' (3 vs 2)")
    code, err = run_main(capsys, [tmp_path / "raw.pt", "--out", out, "--config", other])
    one_line_error(code, err, "'transformer.h.2.attention_norm.weight'")  # the config's layer 2 is not there
    unknown = write_yaml(cfg | {"moc_collab_steps": 2}, tmp_path / "unknown.yaml")
    one_line_error(*run_main(capsys, [tmp_path / "raw.pt", "--out", out, "--config", unknown]), "'moc_collab_steps'")
    assert main([str(tmp_path / "ckpt.pt"), "--out", str(out)]) == 0
    capsys.readouterr()
    code, err = run_main(capsys, [tmp_path / "ckpt.pt", "--out", out])
    one_line_error(code, err, "already holds checkpoints")


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "model.convert_original", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: checkpoint {str(tmp_path / 'nope.pt')!r} not found"]


# --------------------------------------------------------------------------------------------------
# Keep training: train_moe's --resume starts from a converted checkpoint


def _documents(n: int = 80) -> list[str]:
    import random

    rng = random.Random(1)
    words = ["expert", "router", "token", "layer", "loss", "gradient", "attention", "value", "the", "a"]
    return [" ".join(f"The {rng.choice(words)} sees a {rng.choice(words)}." for _ in range(6)) for _ in range(n)]


def test_resume_trains_on_from_a_converted_checkpoint(tmp_path, capsys):
    from model.data import TokenData, prepare
    from model.training import train

    data_dir = tmp_path / "data"
    prepare(_documents(), data_dir, vocab_size=300, val_fraction=0.2, progress=False)
    torch.manual_seed(11)
    cfg = dict(BASE, vocab_size=300, max_seq_len=16, n_layers=1, n_kv_heads=2, n_experts=4, top_k=2)
    original = OriginalLM(cfg).eval()
    adam = torch.optim.AdamW(original.parameters()).state_dict()
    payload = {"model": original.state_dict(), "optimizer": adam, "config": {"model": cfg}, "step": 500, "epoch": 1}
    torch.save(payload, tmp_path / "orig.pt")
    out = tmp_path / "run"
    assert main([str(tmp_path / "orig.pt"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "step 500 of the original run" in printed and "not converted: optimizer, epoch" in printed
    assert load_checkpoint(latest_checkpoint(out))["extra"]["original_step"] == 500

    raw = yaml.safe_load((out / "config.yaml").read_text())
    raw |= dict(data_dir=str(data_dir), max_steps=4, warmup_steps=2, batch_size=2, eval_interval=4, eval_batches=2)
    raw |= dict(log_interval=1, save_interval=2, keep_checkpoints=5, export_hf=False, wandb_project=None)
    raw |= dict(device="cpu", dtype="float32", learning_rate=1e-3)
    result = train(config_from_dict(raw), resume=True, progress=False)
    assert "starting at step 0 from the weights of" in capsys.readouterr().out

    # Step 0's validation loss is the original model's, computed with its own forward.
    data = TokenData(data_dir, 16, 300)
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in data.val_batches(2, 2):
            logits = original(inputs)
            total += F.cross_entropy(logits.view(-1, 300), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    assert result.val_loss_start == pytest.approx(total / count, rel=1e-5)
    assert result.steps == 4 and [r["step"] for r in result.history if "loss/main" in r] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(out)] == [f"step_{s:08d}.pt" for s in (0, 2, 4)]
    assert "optimizer" in load_checkpoint(latest_checkpoint(out))

    # From there on it is an ordinary run: a second --resume continues at step 4.
    resumed = train(config_from_dict(raw | {"max_steps": 6}), resume=True, progress=False)
    assert resumed.steps == 6 and min(r["step"] for r in resumed.history) == 5

    # The model keys must still match the converted checkpoint's (e.g. the original's norm eps).
    fresh = tmp_path / "again"
    assert main([str(tmp_path / "orig.pt"), "--out", str(fresh)]) == 0
    mismatched = dict(raw, out_dir=str(fresh), model={k: v for k, v in raw["model"].items() if k != "norm_eps"})
    with pytest.raises(ConfigError, match="model keys differ from the checkpoint's: norm_eps"):
        train(config_from_dict(mismatched), resume=True, progress=False)


def test_checkpoints_without_the_new_keys_still_resume(tmp_path):
    """A checkpoint written before norm_eps/moc_attn_bias/ffn_hidden_rule existed resumes with their defaults."""
    from model.data import prepare
    from model.training import train

    data_dir = tmp_path / "data"
    prepare(_documents(), data_dir, vocab_size=300, val_fraction=0.2, progress=False)
    model_keys = dict(d_model=16, n_layers=1, n_heads=2, vocab_size=300, multiple_of=8, max_seq_len=16, n_experts=2)
    raw = dict(model=model_keys, data_dir=str(data_dir), out_dir=str(tmp_path / "run"), max_steps=2, warmup_steps=1)
    raw |= dict(batch_size=2, eval_interval=2, eval_batches=1, save_interval=2, export_hf=False, wandb_project=None)
    raw |= dict(device="cpu", dtype="float32")
    train(config_from_dict(raw), progress=False)
    path = latest_checkpoint(tmp_path / "run")
    ckpt = load_checkpoint(path)
    for key in ("norm_eps", "moc_attn_bias", "ffn_hidden_rule"):
        del ckpt["config"]["model_config"][key]
    torch.save(ckpt, path)
    assert train(config_from_dict(raw | {"max_steps": 3}), resume=True, progress=False).steps == 3
    hf_style = LunarisForCausalLM.config_class(**{k: v for k, v in model_keys.items()})  # an old config.json
    assert hf_style.to_model_config().norm_eps == 1e-6 and hf_style.to_model_config().ffn_hidden_rule == "design"
