"""Padded batches in the model and its Hugging Face export, as batching clients send them.

A left-padded batch of prompts of different lengths gives each prompt the logits (fp32, 1e-5) and
the greedy continuation it gets alone, with and without the KV cache, through ``import model`` and
through ``trust_remote_code`` in a process that never saw this project; a right-padded batch gives the
loss over its real tokens. Then the clients themselves: ``pipeline("text-generation")`` on a batch,
and lm-eval's ``hf`` model at batch sizes 1 and 8 on local tasks of its three request types.

Tiny MoC, MoE and dense models built from a ModelConfig, their weights drawn from N(0, 0.15): at the
default init (0.02) a random tiny model repeats one token, and a greedy test would show nothing.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from test_model_hf import make_tokenizer, run_script_in_fresh_process
from transformers import AutoTokenizer, DynamicCache
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from model import LunarisConfig, LunarisForCausalLM, LunarisLM, ModelConfig, export_hf
from model.hf import MODELING_FILE
from model.layers import KVCache

VOCAB = 97
VARIANTS = {
    "moc": dict(n_experts=6, top_k=3),
    "moe": dict(n_experts=6, top_k=2, ffn="moe"),
    "dense": dict(n_experts=0),
}
LENGTHS = (3, 8, 5)  # prompts of one batch
STEPS = 6  # generated tokens
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: a row computed in a batch against the same row alone


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: the CPU GEMMs of these tiny models run slower on more threads of a loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(variant: str) -> LunarisForCausalLM:
    config = ModelConfig.from_dict(
        dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16, max_seq_len=64)
        | dict(kernels="reference", **VARIANTS[variant])
    )
    torch.manual_seed(list(VARIANTS).index(variant))
    model = LunarisForCausalLM(LunarisConfig.from_model_config(config)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request) -> LunarisForCausalLM:
    return build(request.param)


def make_prompts(seed: int = 0, lengths=LENGTHS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator) for n in lengths]


def pad(prompts: list[torch.Tensor], side: str, pad_id: int = 0, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) [B, longest + extra], padded on ``side`` ("left", "right") with ``pad_id``."""
    width = max(len(p) for p in prompts) + extra
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        cols = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, cols], mask[row, cols] = prompt, 1
    return ids, mask


def greedy(lm: LunarisLM, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The slow way: the whole unpadded sequence through the model at every step, no cache."""
    seq = prompt[None]
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat([seq, lm(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0]


def test_left_padded_logits_equal_each_prompt_alone(model):
    prompts = make_prompts()
    ids, mask = pad(prompts, "left", extra=1)  # every row padded
    more = torch.randint(3, VOCAB, (len(prompts), 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        # the pad id never matters: another one gives the same real logits (bit for bit with MoC and
        # dense FFNs; the MoE's reference groups tokens by expert, so its GEMMs' shapes may change)
        other = model(ids.masked_fill(mask == 0, 77), attention_mask=mask).logits
        # cached: the padded prompts, then a 2-token chunk, then one token, each row's mask growing with it
        cache, steps = DynamicCache(config=model.config), []
        steps.append(model(ids, attention_mask=mask, past_key_values=cache).logits)
        mask = torch.cat([mask, torch.ones_like(more)], dim=1)
        steps.append(model(more[:, :2], attention_mask=mask[:, :-1], past_key_values=cache).logits)
        steps.append(model(more[:, 2:], attention_mask=mask, past_key_values=cache).logits)
        cached = torch.cat(steps, dim=1)
        # the model itself with its own KVCache
        lm, own_cache = model.model, KVCache()
        width = ids.shape[1]
        own = [lm(ids, kv_cache=own_cache, attention_mask=mask[:, :width]).logits]
        own.append(lm(more, kv_cache=own_cache, start_pos=width, attention_mask=mask).logits)
        own = torch.cat(own, dim=1)
        for row, prompt in enumerate(prompts):
            real = mask[row].bool()
            full = torch.cat([prompt, more[row]])
            alone = model(full[None]).logits[0]
            torch.testing.assert_close(batch[row, real[:width]], alone[: len(prompt)], **TOL)
            torch.testing.assert_close(other[row, real[:width]], batch[row, real[:width]], **TOL)
            if model.config.ffn != "moe":
                assert torch.equal(other[row, real[:width]], batch[row, real[:width]])
            torch.testing.assert_close(cached[row, real], alone, **TOL)
            torch.testing.assert_close(own[row, real], alone, **TOL)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_left_padded_greedy_generation_equals_each_prompt_alone(model, use_cache):
    prompts = make_prompts(seed=2)
    ids, mask = pad(prompts, "left")
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, eos_token_id=None, pad_token_id=0,
        use_cache=use_cache,
    )  # fmt: skip
    for row, prompt in enumerate(prompts):
        expected = greedy(model.model, prompt, STEPS)
        assert torch.equal(out[row, ids.shape[1] - len(prompt) :], expected), row
    assert len({tuple(x) for x in out[:, ids.shape[1] :].tolist()}) == len(prompts)  # they do differ


def test_right_padded_batch_gives_the_loss_over_real_tokens(model):
    prompts = make_prompts(seed=3, lengths=(9, 4, 6))
    ids, mask = pad(prompts, "right", pad_id=2)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        loss = model(ids, attention_mask=mask, labels=labels).loss
        total = sum(model(p[None], labels=p[None]).loss * (len(p) - 1) for p in prompts)
    torch.testing.assert_close(loss, total / sum(len(p) - 1 for p in prompts), rtol=1e-6, atol=0)


def test_position_ids_override_the_mask_positions():
    model = build("moc")
    prompts = make_prompts(seed=4)
    ids, mask = pad(prompts, "left")
    stride_two = (mask.cumsum(-1) - 1).clamp(min=0) * 2  # positions 0, 2, 4, ... of every row's tokens
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=stride_two).logits
        default = model(ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            real = mask[row].bool()
            alone = model(prompt[None], position_ids=torch.arange(len(prompt))[None] * 2).logits[0]
            torch.testing.assert_close(batch[row, real], alone, **TOL)
            assert (batch[row, real][1:] - default[row, real][1:]).abs().max() > 1e-3


def test_bad_masks_and_positions_are_one_line_errors():
    model = build("dense")
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, cached \+ T\] = \[2, 4\]"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="takes a 2D attention_mask"):
        model(ids, attention_mask=torch.ones(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids must be \[B, T\]"):
        model(ids, position_ids=torch.arange(3)[None])
    with pytest.raises(ValueError, match="positions 61..64 exceed max_seq_len=64"):
        model(ids, position_ids=torch.arange(61, 65)[None])


# ---------------------------------------------------------------------------------------------
# The clients: trust_remote_code in a fresh process, pipelines, lm-eval
# ---------------------------------------------------------------------------------------------

FRESH_SCRIPT = """
torch.set_num_threads(1)  # as this module's process: the unpadded logits must match bit for bit
for name, directory in inputs["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    kw = dict(max_new_tokens=inputs["steps"], do_sample=False, eos_token_id=None, pad_token_id=0)
    ids, mask, plain = inputs["ids"], inputs["mask"], inputs["plain"]
    with torch.no_grad():
        logits, plain_logits = model(ids, attention_mask=mask).logits, model(plain).logits
    results[name] = dict(
        module=type(model).__module__,
        logits=logits,
        cached=model.generate(ids, attention_mask=mask, use_cache=True, **kw),
        uncached=model.generate(ids, attention_mask=mask, use_cache=False, **kw),
        plain_logits=plain_logits,
        plain_cached=model.generate(plain[:, :4], use_cache=True, **kw),
        plain_uncached=model.generate(plain[:, :4], use_cache=False, **kw),
    )
"""


def test_trust_remote_code_in_a_fresh_process(tmp_path):
    """MoC, MoE and dense exports loaded with trust_remote_code where this project cannot be imported:
    unpadded, the logits and generations of the model itself exactly; left-padded, each prompt's own."""
    models = {variant: build(variant) for variant in VARIANTS}
    dirs = {variant: str(export_hf(m.model, tmp_path / variant)) for variant, m in models.items()}
    prompts = make_prompts(seed=5)
    ids, mask = pad(prompts, "left")
    plain = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    inputs = {"dirs": dirs, "ids": ids, "mask": mask, "plain": plain, "steps": STEPS}
    res = run_script_in_fresh_process(FRESH_SCRIPT, inputs, tmp_path)
    for variant, model in models.items():
        got, lm = res[variant], model.model
        assert "transformers_modules" in got["module"], variant  # the export's own code ran
        with torch.no_grad():
            assert torch.equal(got["plain_logits"], lm(plain).logits), variant
        for row in range(len(plain)):
            expected = greedy(lm, plain[row, :4], STEPS)
            assert torch.equal(got["plain_cached"][row], expected), (variant, row)
            assert torch.equal(got["plain_uncached"][row], expected), (variant, row)
        for row, prompt in enumerate(prompts):
            with torch.no_grad():
                alone = lm(prompt[None]).logits[0]
            torch.testing.assert_close(got["logits"][row, mask[row].bool()], alone, **TOL)
            expected = greedy(lm, prompt, STEPS)
            assert torch.equal(got["cached"][row, ids.shape[1] - len(prompt) :], expected), (variant, row)
            assert torch.equal(got["uncached"][row, ids.shape[1] - len(prompt) :], expected), (variant, row)


@pytest.fixture(scope="module")
def exported_moc(tmp_path_factory):
    """The MoC model exported with a tokenizer that has no pad token (as train_moe.py's BPE)."""
    model = build("moc")
    out = export_hf(model.model, tmp_path_factory.mktemp("padding") / "moc", tokenizer=make_tokenizer())
    return model, out


def test_export_tokenizer_pads_left_with_eos(exported_moc):
    _, out = exported_moc
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "</s>"
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 2


def test_text_generation_pipeline_on_a_batch(exported_moc):
    from transformers import pipeline

    model, out = exported_moc
    generator = pipeline("text-generation", model=str(out), device="cpu")
    texts = [" ".join(f"w{int(t) - 3}" for t in prompt) for prompt in make_prompts(seed=6)]
    kw = dict(max_new_tokens=STEPS, do_sample=False, return_full_text=False)
    batched = generator(texts, batch_size=len(texts), **kw)
    for text, result in zip(texts, batched, strict=True):
        ids = generator.tokenizer(text, return_tensors="pt")["input_ids"][0]
        expected = generator.tokenizer.decode(greedy(model.model, ids, STEPS)[len(ids) :])
        assert result[0]["generated_text"].strip() == expected.strip()


LM_EVAL_TASKS = {
    "pad_ll": "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
    "metric_list:\n  - metric: perplexity\n  - metric: acc\n",
    "pad_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
    "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    "pad_gen": "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
    "generation_kwargs:\n  until: ['w7']\n  max_gen_toks: 6\n  do_sample: false\n"
    "metric_list:\n  - metric: exact_match\n",
}


def write_lm_eval_tasks(root, num_docs: int = 10):
    """YAML + JSONL tasks of the three request types over the tokenizer's words (lengths vary per doc)."""
    rng = random.Random(0)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(k))

    docs = {
        "pad_ll": [{"context": words(rng.randint(2, 9)), "target": " " + words(rng.randint(1, 3))}
                   for _ in range(num_docs)],
        "pad_ppl": [{"text": words(rng.randint(5, 90))} for _ in range(num_docs)],
        "pad_gen": [{"context": words(rng.randint(2, 12)), "answer": words(1)} for _ in range(num_docs)],
    }  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    for name, body in LM_EVAL_TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs[name]), encoding="utf-8")
        header = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        )
        (root / f"{name}.yaml").write_text(header + "test_split: test\n" + body, encoding="utf-8")
    return root


def test_lm_eval_hf_model_same_numbers_at_batch_1_and_8(exported_moc, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, out = exported_moc
    remote_class = get_class_from_dynamic_module(f"{MODELING_FILE[:-3]}.LunarisForCausalLM", str(out))
    assert "transformers_modules" in remote_class.__module__
    tokenizer = AutoTokenizer.from_pretrained(out)
    manager = TaskManager(include_path=str(write_lm_eval_tasks(tmp_path / "tasks")), include_defaults=False)
    results = {}
    for batch_size in (1, 8):
        # `lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True` in a process that never
        # imported this project runs the export's own code: here too (`import model` would register ours)
        lm = HFLM(pretrained=remote_class.from_pretrained(out), tokenizer=tokenizer, batch_size=batch_size)
        results[batch_size] = lm_eval.simple_evaluate(
            model=lm, tasks=list(LM_EVAL_TASKS), task_manager=manager, bootstrap_iters=0, log_samples=True
        )
    one, eight = results[1], results[8]
    for task in LM_EVAL_TASKS:
        for key, value in one["results"][task].items():
            if isinstance(value, float) and math.isfinite(value):
                assert math.isclose(eight["results"][task][key], value, rel_tol=1e-5), (task, key)
        for a, b in zip(one["samples"][task], eight["samples"][task], strict=True):
            assert a["arguments"] == b["arguments"]
            if task == "pad_gen":
                assert a["resps"] == b["resps"], task  # the same generations
            else:
                for x, y in zip(a["resps"], b["resps"], strict=True):
                    got, want = (x[0][0], y[0][0]) if isinstance(x[0], (tuple, list)) else (x[0], y[0])
                    assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), (task, x, y)
    assert any(s["resps"][0][0].strip() for s in one["samples"]["pad_gen"])  # something was generated
