"""Kotara's generation on the architectures people bring (issue 31, item 3): A fused with A decodes
exactly what the model's own greedy ``generate`` decodes, prompt by prompt, with prompts of unequal
length in one batch (left padding), for attention models (Llama, GPT-2, a sliding-window Mistral, a
soft-capped Gemma2 with a sliding window), state-space models (Mamba, Mamba2, FalconMamba) and hybrids
(Jamba, RecurrentGemma, whose recurrent state lives in the module, not the cache).

Every model is a tiny random one built here (offline), its output layer re-drawn at a larger std so
greedy tokens are far from ties. Before the fix, Mamba got the full-length attention mask with one new
token per step and decoded the wrong tokens ([317, 635, 635, ...] against [317, 124, 425, ...] in the
issue); the padding probe said True for it, so nothing fell back.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from test_kotara_support import build_tokenizer, one_torch_thread, write_corpus  # noqa: F401

from kotara import generate, loading

PROMPTS = ["the model of the", "a", "token is not the a of to and window", "window stride"]
NEW_TOKENS = 6


def _config(kind: str, vocab: int, bos: int, eos: int):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=0, tie_word_embeddings=False)
    attention = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    if kind == "llama":
        return tf.LlamaConfig(**common, **attention)
    if kind == "mistral_sliding":
        return tf.MistralConfig(**common, **attention, sliding_window=4)
    if kind == "gemma2_softcap":
        return tf.Gemma2Config(**common, **attention, head_dim=8, sliding_window=4, final_logit_softcapping=3.0,
                               attn_logit_softcapping=5.0)  # fmt: skip
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=bos,
                             eos_token_id=eos, tie_word_embeddings=False)  # fmt: skip
    if kind == "mamba":
        return tf.MambaConfig(**common, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                              use_mambapy=False)  # fmt: skip
    if kind == "falcon_mamba":
        return tf.FalconMambaConfig(**common, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                    conv_kernel=4)  # fmt: skip
    if kind == "mamba2":
        return tf.Mamba2Config(**common, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
                               num_heads=8, head_dim=8, n_groups=1, chunk_size=8)  # fmt: skip
    if kind == "jamba":
        return tf.JambaConfig(**common, **attention, num_experts=2, num_experts_per_tok=1, expert_layer_period=2,
                              expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
                              mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False)  # fmt: skip
    if kind == "recurrent_gemma":
        return tf.RecurrentGemmaConfig(**common, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=1, lru_width=32,
                                       attention_window_size=6, conv1d_width=4, logits_soft_cap=30.0,
                                       block_types=["recurrent", "attention", "recurrent"])  # fmt: skip
    raise AssertionError(kind)


KINDS = ["llama", "gpt2", "mistral_sliding", "gemma2_softcap", "mamba", "mamba2", "falcon_mamba", "jamba",
         "recurrent_gemma"]  # fmt: skip


def _available(kind: str) -> bool:
    import transformers as tf

    names = {"falcon_mamba": "FalconMambaConfig", "mamba2": "Mamba2Config", "jamba": "JambaConfig",
             "recurrent_gemma": "RecurrentGemmaConfig"}  # fmt: skip
    return hasattr(tf, names.get(kind, "AutoConfig"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("kotara_arch")
    text = write_corpus(root / "text.txt", num_lines=10)
    return loading.load_tokenizer(str(build_tokenizer(root / "tok", text)))


def build(kind: str, tokenizer, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(kind, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    module = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        module.get_output_embeddings().weight.normal_(0.0, 1.0)  # peaked logits: greedy far from ties
    return module


def _own_greedy(module, tokenizer, prompt: str) -> list[int]:
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    out = module.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
    )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_fused_greedy_equals_the_models_own_generate(tokenizer, kind):
    """A + a copy of A (two modules, two caches or module states), one batch of prompts of 5, 1, 10 and
    2 tokens with its BOS: every row's tokens are those of the model's own greedy ``generate`` on that
    prompt alone."""
    if not _available(kind):
        pytest.skip(f"{kind} is not in this transformers")
    module = build(kind, tokenizer)
    twin = copy.deepcopy(module)
    out = generate([module, twin], tokenizer, PROMPTS, "average", max_new_tokens=NEW_TOKENS, batch_size=len(PROMPTS))
    for prompt, got in zip(PROMPTS, out):
        assert got.token_ids == _own_greedy(module, tokenizer, prompt), (kind, prompt)


def test_the_probe_catches_a_step_that_feeds_the_full_mask(tokenizer, monkeypatch):
    """The old stepping (the full-length mask with one new token, positions passed) decodes Mamba wrongly,
    and the probe sees it at the first step: such a model is not run padded."""
    runner_module = importlib.import_module("kotara.generate")
    module = build("mamba", tokenizer)
    model = runner_module.StepModel.wrap(module, 0)
    assert runner_module._probe(model).pads  # the model's own stepping handles left padding

    def old_forward(self, first):  # what Kotara did before: every kwarg passed as is, the mask included
        out = self.module(input_ids=self.ids if first else self.ids[:, -1:], **self.kwargs, return_dict=True)
        self.kwargs["attention_mask"] = torch.cat(
            [self.kwargs["attention_mask"], self.kwargs["attention_mask"].new_ones(self.ids.shape[0], 1)], 1
        )
        self.kwargs[self.model.cache_arg] = out.cache if hasattr(out, "cache") else out.cache_params
        return out.logits[:, -1]

    monkeypatch.setattr(runner_module.PaddedRunner, "_forward", old_forward)
    monkeypatch.setattr(runner_module, "_PROBES", type(runner_module._PROBES)())
    assert not runner_module._probe(model).pads


def test_a_module_given_twice_runs_once_and_rows_that_finish_are_carried_where_needed(tokenizer):
    """A+A with one module object: one forward per step (same tokens as two copies). RecurrentGemma keeps
    its recurrent state in the module: the probe finds that dropping a row is not exact, so finished rows
    are carried (and the result still equals each prompt alone)."""
    runner_module = importlib.import_module("kotara.generate")
    llama = build("llama", tokenizer)
    runner_module._probe(runner_module.StepModel.wrap(llama, 0))  # probed once, before counting
    calls = []
    hook = llama.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = generate([llama, llama], tokenizer, PROMPTS[:2], "average", max_new_tokens=3, batch_size=2)
    finally:
        hook.remove()
    assert len(calls) == 3  # the prefill and 2 steps, for both "models"
    assert [g.token_ids for g in out] == [_own_greedy(llama, tokenizer, p)[:3] for p in PROMPTS[:2]]
    recurrent = build("recurrent_gemma", tokenizer)
    assert not runner_module._probe(runner_module.StepModel.wrap(recurrent, 0)).compacts
    assert runner_module._probe(runner_module.StepModel.wrap(llama, 0)).compacts


@pytest.mark.parametrize("kind", ["mamba", "recurrent_gemma"])
def test_kotara_eval_generate_until_shares_the_stepping(tokenizer, kind):
    """``kotara eval``'s ``generate_until`` (the lm-eval LM) decodes with the same runner: A + a copy of A,
    one batch of contexts of unequal length, equals the model's own greedy ``generate`` on each context
    as the harness encodes it (no BOS here, so every context has 2+ tokens: RecurrentGemma's own forward
    takes a 1-token prefill for a decoding step on whatever state the module holds)."""
    pytest.importorskip("lm_eval")
    if not _available(kind):
        pytest.skip(f"{kind} is not in this transformers")
    from lm_eval.api.instance import Instance

    from kotara.harness import FusedLM

    module = build(kind, tokenizer)
    lm = FusedLM([module, copy.deepcopy(module)], tokenizer=tokenizer, strategy="average", batch_size=4, device="cpu")
    gen_kwargs = {"until": ["zzz"], "max_gen_toks": NEW_TOKENS, "do_sample": False}
    contexts = [p if len(p.split()) > 1 else f"{p} model" for p in PROMPTS]
    requests = [Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(contexts)]
    answers = lm.generate_until(requests, disable_tqdm=True)
    for prompt, answer in zip(contexts, answers):
        ids = torch.tensor([lm.tok_encode(prompt)])
        out = module.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )[0, ids.shape[1] :].tolist()  # fmt: skip
        expected = out[:-1] if out and out[-1] == tokenizer.eos_token_id else out
        assert answer == lm.tok_decode(expected), (kind, prompt)
