"""Hugging Face integration: export, both loading routes, generate with/without the KV cache."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from model import LunarisConfig, LunarisForCausalLM, LunarisLM, ModelConfig, export_hf
from model.hf import MODELING_FILE

VOCAB = 97


def tiny(**overrides) -> ModelConfig:
    base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16, max_seq_len=64)
    base.update(n_experts=6, top_k=3, kernels="reference")
    base.update(overrides)
    return ModelConfig.from_dict(base)


def make_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[LunarisLM, Path]:
    torch.manual_seed(0)
    lm = LunarisLM(tiny()).eval()
    out = export_hf(lm, tmp_path_factory.mktemp("export") / "lunaris", tokenizer=make_tokenizer())
    return lm, out


def test_export_directory_layout(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", MODELING_FILE, "tokenizer.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lunaris_moc" and config["kernels"] == "auto"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lunaris_moc.LunarisForCausalLM"
    assert config["num_experts_per_tok"] == 3 and config["bos_token_id"] == 1
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.tok_embeddings.weight" in keys and "model.lm_head.weight" not in keys  # tied: stored once
    source = (out / MODELING_FILE).read_text()
    tree = ast.parse(source)  # imports of this project outside try/except would break fresh processes
    imported = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("model", "moc_kernels")}, imported
    assert "def export_hf" not in source


def test_auto_classes_roundtrip_identical_logits(exported):
    lm, out = exported
    assert isinstance(AutoConfig.from_pretrained(out), LunarisConfig)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf) is LunarisForCausalLM
    assert hf.model.config == ModelConfig(**{**lm.config.to_dict(), "kernels": "auto"})
    assert hf.model.lm_head.weight.data_ptr() == hf.model.tok_embeddings.weight.data_ptr()
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, lm(ids).logits)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w0 w5 w9")["input_ids"] == [3, 8, 12]


def test_labels_loss_is_the_shifted_main_loss(exported):
    lm, out = exported
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    labels = ids.clone()
    labels[1, :3] = -100
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, labels=labels).loss, lm(ids, targets).loss)


def greedy(lm: LunarisLM, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding the slow way: the whole sequence through the model at every step, no cache."""
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, lm(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_generate_with_and_without_cache_agree(exported):
    lm, out = exported
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.randint(0, VOCAB, (2, 5))
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    cached = hf.generate(prompt, use_cache=True, **kwargs)
    uncached = hf.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, greedy(lm, prompt, 8))
    assert torch.equal(uncached, cached)
    torch.manual_seed(3)
    sampled = hf.generate(prompt, do_sample=True, top_p=0.9, temperature=0.8, max_new_tokens=6, eos_token_id=None)
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :5], prompt)


def test_tokenizer_from_a_file_and_bad_path(tmp_path):
    lm = LunarisLM(tiny(n_experts=0))
    make_tokenizer().save_pretrained(tmp_path / "tok")
    out = export_hf(lm, tmp_path / "dense", tokenizer=tmp_path / "tok" / "tokenizer.json")
    assert AutoTokenizer.from_pretrained(out)("w1")["input_ids"] == [4]
    out = export_hf(lm, tmp_path / "from_dir", tokenizer=tmp_path / "tok")  # a save_pretrained directory
    assert AutoTokenizer.from_pretrained(out)("w2")["input_ids"] == [5]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    with pytest.raises(ValueError, match="neither a tokenizer object"):
        export_hf(lm, tmp_path / "bad", tokenizer=tmp_path / "missing.json")


# Run in a fresh interpreter that can import neither this project nor moc_kernels: the exported
# directory must carry everything (modeling code with the reference math inlined). The test that does
# it, on MoC, MoE and dense exports with and without padding, is in test_model_padding.py (one
# process for all: starting one costs seconds).
FRESH_PREAMBLE = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("model", "moc_kernels", "kotara"):
                raise ImportError(f"{name} must not be imported here")

    sys.meta_path.insert(0, Blocked())
    import torch
    from transformers import AutoModelForCausalLM

    inputs = torch.load(sys.argv[1])
    results = {}
    """
)
FRESH_EPILOGUE = textwrap.dedent(
    """
    results["leaked"] = [m for m in sys.modules if m.split(".")[0] in ("model", "moc_kernels")]
    torch.save(results, sys.argv[2])
    """
)


FRESH_SCRIPT = textwrap.dedent(
    """
    for name, (directory, ids) in inputs.items():
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(ids).logits
        kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        cached = model.generate(ids[:, :4], use_cache=True, **kw)
        uncached = model.generate(ids[:, :4], use_cache=False, **kw)
        results[name] = dict(logits=logits, cached=cached, uncached=uncached, module=type(model).__module__)
    """
)


def run_script_in_fresh_process(script: str, inputs: dict, tmp_path) -> dict:
    """``script`` (which reads the dict ``inputs`` and fills the dict ``results``) in a process that
    cannot import this project; its results, after checking that nothing of ours leaked in."""
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "fresh.py").write_text(FRESH_PREAMBLE + script + FRESH_EPILOGUE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "fresh.py"), str(tmp_path / "inputs.pt"), str(tmp_path / "res.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    res = torch.load(tmp_path / "res.pt")
    assert res["leaked"] == []
    return res


def run_in_fresh_process(hf_dir, ids: torch.Tensor, tmp_path) -> dict:
    """FRESH_SCRIPT on ``hf_dir`` and ``ids`` in a fresh process: the logits of ``ids`` and 6 greedy tokens
    after ``ids[:, :4]`` with and without the cache, checked to come from the export's own code."""
    return run_many_in_fresh_process({"model": (hf_dir, ids)}, tmp_path)["model"]


def run_many_in_fresh_process(cases: dict[str, tuple], tmp_path) -> dict[str, dict]:
    """:func:`run_in_fresh_process` for several exports (name -> (hf_dir, ids); each directory's name
    distinct, as it names the export's code module) in one process start."""
    res = run_script_in_fresh_process(FRESH_SCRIPT, {k: (str(d), ids) for k, (d, ids) in cases.items()}, tmp_path)
    for name in cases:
        assert "transformers_modules" in res[name]["module"], name
    return {name: res[name] for name in cases}
