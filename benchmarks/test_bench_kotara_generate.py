"""Speed of generating from the fused model (``kotara.generate``) against the models' own generation.

- ``test_kotara_generate_fused``: ``kotara.generate`` of two random GPT-2 models, greedy, ``entropy``
  (the default strategy: adaptive weights, so the whole fusion runs every step), the fusion on the
  ``reference`` backend or the Triton kernels (CUDA).
- ``test_kotara_generate_separate``: the same two models' own cached ``generate(do_sample=False)``,
  one after the other, on the same prompts and as many new tokens: the work of stepping both.
- ``test_kotara_generate_fusion_step``: one step's fusion alone (``fused_log_probs`` and the argmax
  over [B, V] for two models): its share of a fused step is this median over the fused median / N.

Every case decodes ``NEW_TOKENS`` tokens for each of ``BATCH`` prompts (no early EOS: the fused run
has none, the separate run sets ``min_new_tokens``), so tokens/s compare the same work. CPU: GPT-2
d=64, 2 layers, with GPT-2's V = 50257 so that the fusion's share is that of a real vocabulary; CUDA:
GPT-2 small (d=768, 12 layers) in bf16.
"""

from __future__ import annotations

import pytest
import torch

import moc_kernels
from benchmarks.impls import require_triton
from benchmarks.timing import measure

VOCAB = 50257


def _sizes(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return dict(width=768, layers=12, heads=12, batch=8, prompt=64, new_tokens=64)
    return dict(width=64, layers=2, heads=2, batch=4, prompt=16, new_tokens=32)


def _describe(device: torch.device) -> str:
    s = _sizes(device)
    return (
        f"2 x GPT-2 d={s['width']} L={s['layers']} V={VOCAB}, {s['batch']} prompts x {s['prompt']} tokens, "
        f"{s['new_tokens']} new tokens each"
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory, device):
    """A word-level tokenizer of V = 50257 tokens, two random GPT-2 models and the prompts."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from kotara import demo

    sizes = _sizes(device)
    words = [f"w{i}" for i in range(VOCAB - len(demo.SPECIAL_TOKENS))]
    tokenizer = AutoTokenizer.from_pretrained(demo.build_tokenizer(tmp_path_factory.mktemp("tok"), words))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=VOCAB, n_positions=sizes["prompt"] + sizes["new_tokens"], n_embd=sizes["width"],
            n_layer=sizes["layers"], n_head=sizes["heads"],
        )  # fmt: skip
        models.append(GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval())
    generator = torch.Generator().manual_seed(0)
    prompts = [
        " ".join(words[i] for i in torch.randint(0, len(words), (sizes["prompt"] - 1,), generator=generator).tolist())
        for _ in range(sizes["batch"])
    ]  # with the BOS Kotara puts first: sizes["prompt"] tokens each
    return tokenizer, models, prompts, sizes


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_kotara_generate_fused(benchmark, device, setup, impl):
    """Greedy fused generation, two models, ``entropy``; tokens/s of the whole loop."""
    from kotara import generate

    if impl == "triton":
        require_triton(device)
    tokenizer, models, prompts, sizes = setup

    def run():
        with moc_kernels.use_backend(impl):
            return generate(
                models, tokenizer, prompts, "entropy", sizes["new_tokens"], eos_token_id=[],
                batch_size=len(prompts),
            )  # fmt: skip

    tokens = sizes["batch"] * sizes["new_tokens"]
    with torch.no_grad():
        measure(
            benchmark, run, [()], device, tokens, op="kotara_generate_fused", impl=impl, pass_="decode",
            shape=_describe(device),
        )  # fmt: skip
    assert all(len(g.token_ids) == sizes["new_tokens"] for g in run())
    benchmark.group = "kotara_generate"


def test_kotara_generate_separate(benchmark, device, setup):
    """Each model's own cached greedy ``generate``, one after the other: what fusion is compared with."""
    tokenizer, models, prompts, sizes = setup
    encoded = [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    input_ids = torch.tensor(encoded, device=device)  # equal lengths: no padding
    kwargs = dict(
        attention_mask=torch.ones_like(input_ids), max_new_tokens=sizes["new_tokens"],
        min_new_tokens=sizes["new_tokens"], do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip

    def run():
        return [model.generate(input_ids=input_ids, **kwargs) for model in models]

    tokens = sizes["batch"] * sizes["new_tokens"]
    with torch.no_grad():
        measure(
            benchmark, run, [()], device, tokens, op="kotara_generate_separate", impl="torch", pass_="decode",
            shape=_describe(device),
        )  # fmt: skip
    assert all(out.shape[1] == input_ids.shape[1] + sizes["new_tokens"] for out in run())
    benchmark.group = "kotara_generate"


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_kotara_generate_fusion_step(benchmark, device, setup, impl):
    """One step's fusion: both models' logits [B, V] -> log q (``entropy``) -> the greedy token."""
    from kotara.generate import Sampling, next_tokens

    if impl == "triton":
        require_triton(device)
    _, models, _, sizes = setup
    dtype = next(models[0].parameters()).dtype

    def step(logits):
        with moc_kernels.use_backend(impl):
            log_q = moc_kernels.fused_log_probs(logits, "entropy", return_weights=True)[0]
            return next_tokens(log_q, Sampling())

    sets = [([torch.randn(sizes["batch"], VOCAB, device=device, dtype=dtype) * 3 for _ in models],) for _ in range(2)]
    with torch.no_grad():
        measure(
            benchmark, step, sets, device, sizes["batch"], op="kotara_generate_fusion_step", impl=impl, pass_="step",
            shape=f"2 models x [{sizes['batch']}, {VOCAB}], entropy + argmax",
        )  # fmt: skip
    benchmark.group = "kotara_generate"
