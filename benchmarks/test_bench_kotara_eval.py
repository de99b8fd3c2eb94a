"""Speed of ``kotara eval``'s scoring (``FusedLM.loglikelihood``) against lm-eval's ``hf`` model.

- ``test_kotara_eval_hf_separate``: lm-eval's ``HFLM.loglikelihood`` of each of the two models, one
  after the other (what evaluating each model alone costs).
- ``test_kotara_eval_fused[entropy]``: ``FusedLM`` of the two models, one strategy.
- ``test_kotara_eval_fused[all]``: ``FusedLM(strategy="all")`` answering every row (each model alone
  and the seven strategies): the forwards once, every row derived from them.

The requests are those of a multiple-choice task (``CONTEXTS`` contexts of ``CONTEXT_WORDS`` words,
``CHOICES`` one-to-three-word continuations each), scored from scratch every round (the kept scores
are cleared), so the three cases do the same work on the same tokens. lm-eval's task loading and
metric aggregation, the same for every model, are not timed. CPU: two random GPT-2 d=128, 2 layers,
with GPT-2's V = 50257 (so the fusion over the vocabulary weighs what it would with a real
tokenizer); the fusion on the ``reference`` backend (CPU). CUDA: GPT-2 small in bf16, Triton fusion.
"""

from __future__ import annotations

import random

import pytest
import torch

import moc_kernels
from benchmarks.timing import measure

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

VOCAB = 50257
CONTEXTS, CONTEXT_WORDS, CHOICES, BATCH = 16, 48, 4, 8


def _sizes(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return dict(width=768, layers=12, heads=12)
    return dict(width=128, layers=2, heads=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, device):
    """Two random GPT-2 models (saved with a V = 50257 word-level tokenizer) and the requests."""
    from lm_eval.api.instance import Instance
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
            vocab_size=VOCAB, n_positions=128, n_embd=sizes["width"], n_layer=sizes["layers"], n_head=sizes["heads"],
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        models.append(GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval())
    rng = random.Random(0)
    requests = []
    for _ in range(CONTEXTS):
        context = " ".join(rng.choice(words) for _ in range(CONTEXT_WORDS))
        for _ in range(CHOICES):
            continuation = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
            requests.append(Instance("loglikelihood", {}, (context, continuation), len(requests)))
    return tokenizer, models, requests


def _tokens(lm, requests) -> int:
    return sum(len(lm._encode_pair(*r.args)[1]) for r in requests)


def test_kotara_eval_hf_separate(benchmark, device, setup):
    """lm-eval's hf model on each model, one after the other."""
    from lm_eval.models.huggingface import HFLM

    tokenizer, models, requests = setup
    lms = [HFLM(pretrained=m, tokenizer=tokenizer, batch_size=BATCH) for m in models]

    def run():
        return [lm.loglikelihood(requests, disable_tqdm=True) for lm in lms]

    with torch.no_grad():
        measure(
            benchmark, run, [()], device, _tokens(lms[0], requests), op="kotara_eval_hf_separate", impl="lm-eval hf",
            pass_="loglikelihood", shape=f"2 models, {len(requests)} requests, batch {BATCH}, V={VOCAB}",
        )  # fmt: skip
    benchmark.group = "kotara_eval"


@pytest.mark.parametrize("strategy", ["entropy", "all"])
def test_kotara_eval_fused(benchmark, device, setup, strategy):
    """FusedLM of the two models: one strategy, or every row (all) from the same forwards."""
    from kotara.harness import FusedLM

    tokenizer, models, requests = setup
    impl = "triton" if device.type == "cuda" else "reference"
    lm = FusedLM(models, strategy=strategy, tokenizer=tokenizer, batch_size=BATCH)

    def run():
        lm._scores.clear()  # score from scratch each round: the forwards are what is timed
        with moc_kernels.use_backend(impl):
            return [(lm.select_row(row), lm.loglikelihood(requests, disable_tqdm=True)) for row in lm.rows]

    with torch.no_grad():
        measure(
            benchmark, run, [()], device, _tokens(lm, requests), op=f"kotara_eval_fused_{strategy}", impl=impl,
            pass_="loglikelihood", shape=f"2 models, {len(requests)} requests, batch {BATCH}, V={VOCAB}",
        )  # fmt: skip
    assert len(run()) == len(lm.rows)
    benchmark.group = "kotara_eval"
