"""Generation from the fused model (DESIGN §5a): self-fusion equals the model's own greedy decoding,
the KV caches equal recomputing the prefix, a batch equals each prompt alone, finished rows leave the
batch, sampling is seeded and draws from the fused q (a stated statistical bound), top-k / top-p,
stop strings and EOS, and ``kotara generate`` end to end with its user errors.

Tiny models are built here, offline: GPT-2 and Llama with untied, re-drawn output layers (so that
their next tokens depend on the context rather than repeat the last one) and our own exported
LunarisForCausalLM (which takes left-padded batches, as the HF models do).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_rel_close
from test_kotara_support import build_tokenizer, one_torch_thread, write_corpus  # noqa: F401

import moc_kernels as mk
from kotara import generate, loading
from kotara.cli import main
from kotara.generate import FINISH_REASONS, StepModel, handles_left_padding, restrict_support

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["the model of", "a", "token is not the a of to and", "window stride entropy"]
EPS = 1e-6  # DESIGN §5's epsilon of the entropy weights


def _save(module, directory: Path, tokenizer) -> Path:
    module.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def build_gpt2(directory: Path, tokenizer, seed: int, columns: int | None = None, save_tokenizer=True) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=columns or len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    module = GPT2LMHeadModel(config)
    with torch.no_grad():
        module.lm_head.weight.normal_(0.0, 0.3)  # logits of std ~2: peaked, not one-hot
    return _save(module, directory, tokenizer if save_tokenizer else None)


def build_llama(directory: Path, tokenizer, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    module = LlamaForCausalLM(config)
    with torch.no_grad():
        module.lm_head.weight.normal_(0.0, 0.3)
    return _save(module, directory, tokenizer)


def build_lunaris(directory: Path, tokenizer, seed: int) -> Path:
    """Our own model, exported as train_moe.py does, its vocabulary padded by 3 columns; weights
    re-drawn at std 0.3 (the default init's near-uniform logits would make argmax a coin toss)."""
    hf = pytest.importorskip("model.hf", reason="the project's model package is not available")
    from model.config import ModelConfig
    from model.lm import LunarisLM

    torch.manual_seed(seed)
    config = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=len(tokenizer) + 3, multiple_of=16)
    config.update(max_seq_len=64, n_experts=4, top_k=2, kernels="reference")
    lm = LunarisLM(ModelConfig.from_dict(config)).eval()
    with torch.no_grad():
        for param in lm.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    return Path(hf.export_hf(lm, directory, tokenizer=tokenizer))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("kotara_generate")
    text = write_corpus(root / "text.txt", num_lines=10)
    tokenizer = loading.load_tokenizer(str(build_tokenizer(root / "tok", text)))
    foreign = loading.load_tokenizer(str(build_tokenizer(root / "other_tok", text, extra_words=("zebra",))))
    return {
        "root": root,
        "tokenizer": tokenizer,
        "a": build_gpt2(root / "a", tokenizer, seed=1),
        "b": build_gpt2(root / "b", tokenizer, seed=2),
        "llama": build_llama(root / "llama", tokenizer, seed=3),
        "lunaris": build_lunaris(root / "lunaris", tokenizer, seed=4),
        "foreign": build_gpt2(root / "foreign", foreign, seed=5),
        "narrow": build_gpt2(root / "narrow", tokenizer, seed=6, columns=len(tokenizer) - 2, save_tokenizer=False),
    }


def _load(workspace, *names, device=None):
    device = device or torch.device("cpu")
    return [
        loading.load_model(str(workspace[n]), loading.model_label(i), device, torch.float32)
        for i, n in enumerate(names)
    ]


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def test_padding_check_passes_our_model_and_the_hf_ones(workspace):
    gpt2, llama, lunaris = _load(workspace, "a", "llama", "lunaris")
    assert handles_left_padding(StepModel.wrap(gpt2, 0)) and handles_left_padding(StepModel.wrap(llama, 1))
    assert handles_left_padding(StepModel.wrap(lunaris, 2))  # it takes padded batches (mask and positions)


def test_padding_check_tells_models_that_honour_the_mask_from_those_that_do_not(workspace):
    """GPT-2 and Llama honour left padding; a model that ignores the mask (here a GPT-2 that drops it, as
    our own model refused padded batches before issue 31) fails the probe and is run grouped by length."""
    from transformers import GPT2LMHeadModel

    class MaskIgnoring(GPT2LMHeadModel):
        def forward(self, *args, attention_mask=None, position_ids=None, **kwargs):
            return super().forward(*args, **kwargs)

    gpt2, llama = _load(workspace, "a", "llama")
    assert handles_left_padding(StepModel.wrap(gpt2, 0)) and handles_left_padding(StepModel.wrap(llama, 1))
    ignoring = MaskIgnoring.from_pretrained(workspace["a"]).eval()
    assert not handles_left_padding(StepModel.wrap(ignoring, 2))
    out = generate([ignoring, gpt2.module], workspace["tokenizer"], PROMPTS, "average", 5, batch_size=4)
    for prompt, got in zip(PROMPTS, out):  # grouped by length: each row as if alone
        (alone,) = generate([ignoring, gpt2.module], workspace["tokenizer"], [prompt], "average", 5)
        assert got.token_ids == alone.token_ids, prompt


@pytest.mark.parametrize("kind", ["a", "llama", "lunaris"])
@pytest.mark.parametrize("strategy", mk.STRATEGIES)
def test_self_fusion_greedy_equals_the_models_own_generate(workspace, kind, strategy):
    """A fused with A is A (every strategy gives q = p_A at T = 1): its greedy tokens are those of
    transformers' own ``generate(do_sample=False)``, prompt by prompt, EOS included. (Our model's 3
    padding columns are no tokens: transformers is told to suppress them, as Kotara drops them.)"""
    tokenizer = workspace["tokenizer"]
    (model,) = _load(workspace, kind)
    out = generate([model, model], tokenizer, PROMPTS, strategy, max_new_tokens=10, batch_size=len(PROMPTS))
    padding_columns = list(range(len(tokenizer), model.logit_columns)) or None
    for prompt, got in zip(PROMPTS, out):
        ids = torch.tensor([_prompt_ids(tokenizer, prompt)])
        expected = model.module.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
            suppress_tokens=padding_columns,
        )[0, ids.shape[1]:].tolist()  # fmt: skip
        assert got.token_ids == expected, prompt
        assert got.finish_reason == ("eos" if expected[-1] == tokenizer.eos_token_id else "length")
        assert got.weights == [pytest.approx([0.5, 0.5])] * len(expected) or strategy == "poe"


def _recomputed_greedy(modules, tokenizer, prompt, strategy, temperatures, weights, steps):
    """Greedy decoding without any cache: every step, each model's full forward over the whole prefix."""
    ids = _prompt_ids(tokenizer, prompt)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            outputs = [m(input_ids=torch.tensor([ids]), use_cache=False) for m in modules]
        logits = [o.logits[:, -1, : len(tokenizer)] for o in outputs]
        token = int(mk.fused_log_probs(logits, strategy, temperatures, weights).argmax())
        out.append(token)
        ids.append(token)
        if token == tokenizer.eos_token_id:
            break
    return out


@pytest.mark.parametrize(
    "strategy,weights", [("entropy", None), ("mixture_gap", None), ("poe", [1.5, -0.5, 0.25]), ("mixture", [1, 2, 1])]
)
def test_cached_decoding_equals_recomputing_the_prefix(workspace, strategy, weights):
    tokenizer = workspace["tokenizer"]
    models = _load(workspace, "a", "llama", "lunaris")
    temperatures = [0.9, 1.1, 1.0]
    out = generate(models, tokenizer, PROMPTS, strategy, 8, temperatures=temperatures, weights=weights, batch_size=4)
    for prompt, got in zip(PROMPTS, out):
        expected = _recomputed_greedy(
            [m.module for m in models], tokenizer, prompt, strategy, temperatures, weights, steps=8
        )
        assert got.token_ids == expected, prompt


@pytest.mark.parametrize("batch_size", [2, 5])
def test_a_batch_of_different_lengths_equals_each_prompt_alone(workspace, batch_size):
    """Left padding, masks and position ids (GPT-2, Llama) and the grouped path (ours), M = 3."""
    tokenizer = workspace["tokenizer"]
    models = _load(workspace, "a", "llama", "lunaris")
    prompts = [*PROMPTS, "expert window"]  # 3, 1, 8, 3 and 2 tokens
    together = generate(models, tokenizer, prompts, "gap", max_new_tokens=9, batch_size=batch_size)
    for prompt, got in zip(prompts, together):
        (alone,) = generate(models, tokenizer, [prompt], "gap", max_new_tokens=9)
        assert got.token_ids == alone.token_ids, prompt
        assert got.finish_reason == alone.finish_reason
        assert_rel_close(torch.tensor(got.weights), torch.tensor(alone.weights), torch.float32, f"weights {prompt}")
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) >= 4  # the lengths really differ


def test_finished_rows_leave_the_batch(workspace):
    """After a row ends (here at an EOS chosen from its own greedy output) the models run on fewer rows."""
    tokenizer = workspace["tokenizer"]
    models = _load(workspace, "a", "b")
    free = generate(models, tokenizer, PROMPTS[:3], "average", max_new_tokens=8)
    eos = free[1].token_ids[2]  # row 1 ends after 3 tokens (or earlier, if it made this token before)
    rows_seen = []
    hook = models[0].module.register_forward_pre_hook(
        lambda module, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        out = generate(models, tokenizer, PROMPTS[:3], "average", max_new_tokens=8, eos_token_id=eos)
    finally:
        hook.remove()
    rows_seen = rows_seen[-(1 + max(len(g.token_ids) for g in out) - 1) :]  # this run's prefill and steps
    expected = [3] + [sum(len(g.token_ids) > step for g in out) for step in range(1, len(rows_seen))]
    assert rows_seen == expected
    assert min(rows_seen) < 3 and out[1].finish_reason == "eos"


@pytest.mark.triton
def test_the_triton_fusion_decodes_what_the_reference_does(workspace):
    """``--kernels triton`` (the interpreter here, CUDA on a GPU): same tokens, same weights."""
    tokenizer = workspace["tokenizer"]
    models = _load(workspace, "a", "llama", device=torch.get_default_device())
    for strategy in ("entropy", "mixture_gap"):
        with mk.use_backend("reference"):
            expected = generate(models, tokenizer, PROMPTS[:2], strategy, max_new_tokens=4)
        with mk.use_backend("triton"):
            got = generate(models, tokenizer, PROMPTS[:2], strategy, max_new_tokens=4)
        for g, e in zip(got, expected):
            assert g.token_ids == e.token_ids, strategy
            assert_rel_close(torch.tensor(g.weights), torch.tensor(e.weights), torch.float32, strategy)


def test_sampling_is_reproducible_with_a_seed(workspace):
    tokenizer = workspace["tokenizer"]
    models = _load(workspace, "a", "b")
    kwargs = dict(max_new_tokens=12, do_sample=True, sampling_temperature=1.3, top_k=20, top_p=0.95)
    first = generate(models, tokenizer, PROMPTS, "entropy", seed=7, **kwargs)
    again = generate(models, tokenizer, PROMPTS, "entropy", seed=7, **kwargs)
    other = generate(models, tokenizer, PROMPTS, "entropy", seed=8, **kwargs)
    greedy = generate(models, tokenizer, PROMPTS, "entropy", max_new_tokens=12)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]
    assert [g.token_ids for g in first] != [g.token_ids for g in greedy]


def _fused_entropy_q(modules, ids, temperature):
    """The next-token distribution written out from DESIGN §5 / §5a in fp64: entropy weights, the
    log-linear pool, then the decoding temperature."""
    with torch.no_grad():
        z = torch.stack([m(input_ids=torch.tensor([ids])).logits[0, -1].double() for m in modules])
    log_p = torch.log_softmax(z, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    alpha = (1 / (entropy + EPS)) / (1 / (entropy + EPS)).sum()
    log_q = torch.log_softmax((alpha[:, None] * z).sum(0), -1)
    return torch.softmax(log_q / temperature, -1), torch.softmax(log_q, -1), log_p.exp()


def test_sampled_frequencies_match_the_fused_distribution(workspace):
    """n draws of the first token (one prompt repeated n times in one batch, seed fixed, so the test is
    deterministic). Bound: Hoeffding per token and a union bound over the V tokens,
    P(any |freq_v - q_v| >= t) <= 2 V exp(-2 n t^2), set to 1e-6: a correct sampler fails with
    probability < 1e-6 over seeds. The alternatives a wrong sampler would draw from (q at decoding
    temperature 1, either model alone) are checked to be farther than 2t from q, so the test has power."""
    tokenizer = workspace["tokenizer"]
    models = _load(workspace, "a", "b")
    n, temperature, prompt = 20000, 0.6, "the model of"
    out = generate(
        models, tokenizer, [prompt] * n, "entropy", max_new_tokens=1, do_sample=True,
        sampling_temperature=temperature, seed=1234, batch_size=n,
    )  # fmt: skip
    q, q_untempered, alone = _fused_entropy_q([m.module for m in models], _prompt_ids(tokenizer, prompt), temperature)
    vocab = q.numel()
    freq = torch.bincount(torch.tensor([g.token_ids[0] for g in out]), minlength=vocab).double() / n
    bound = math.sqrt(math.log(2 * vocab / 1e-6) / (2 * n))
    for alternative in (q_untempered, alone[0], alone[1]):
        assert (alternative - q).abs().max() > 2 * bound  # a sampler drawing from it would fail
    assert (freq - q).abs().max() < bound, f"max deviation {(freq - q).abs().max():.4f} >= {bound:.4f}"


def test_top_k_and_top_p_restrict_the_support_as_documented():
    """q = (0.5, 0.3, 0.15, 0.05) and a tie; the sets follow from the definitions by hand."""
    log_q = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()

    def support(**kwargs):
        return set(torch.nonzero(restrict_support(log_q, **kwargs)[0] > float("-inf")).flatten().tolist())

    assert support(top_k=2) == {0, 1}
    assert support(top_k=4) == support(top_p=1.0) == {0, 1, 2, 3}
    assert support(top_p=0.5) == {0}  # token 0 alone reaches 0.5
    assert support(top_p=0.8) == {0, 1}
    assert support(top_p=0.81) == {0, 1, 2}
    assert support(top_p=0.01) == {0}  # never empty
    assert support(top_k=3, top_p=0.84) == {0, 1}  # top-p over the renormalised top 3: 0.526, 0.842
    assert support(top_k=3, top_p=0.85) == {0, 1, 2}
    tie = torch.tensor([[0.4, 0.2, 0.2, 0.2]]).log()
    assert (restrict_support(tie, top_k=2)[0] > float("-inf")).all()  # ties at the k-th value are kept


@pytest.mark.parametrize("kwargs", [dict(top_k=3), dict(top_p=0.6)])
def test_sampling_never_leaves_the_restricted_support(workspace, kwargs):
    tokenizer = workspace["tokenizer"]
    models = _load(workspace, "a", "b")
    prompt, n = "token is not", 2000
    out = generate(
        models, tokenizer, [prompt] * n, "entropy", 1, do_sample=True, seed=5, batch_size=n, **kwargs
    )  # fmt: skip
    q, _, _ = _fused_entropy_q([m.module for m in models], _prompt_ids(tokenizer, prompt), 1.0)
    order = q.argsort(descending=True)
    if "top_k" in kwargs:
        allowed = set(order[: kwargs["top_k"]].tolist())
    else:  # the fewest most probable tokens whose mass reaches top_p
        allowed = set(order[: int((q[order].cumsum(0) < kwargs["top_p"]).sum()) + 1].tolist())
    drawn = {g.token_ids[0] for g in out}
    assert drawn <= allowed and len(drawn) > 1


def test_stop_strings_and_eos_end_a_row(workspace):
    tokenizer = workspace["tokenizer"]
    models = _load(workspace, "a", "b")
    (free,) = generate(models, tokenizer, [PROMPTS[2]], "entropy", max_new_tokens=10)
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    words = free.completion.split()
    k = next(i for i in range(2, 10) if words[i] not in words[:i])  # a word first made at step k
    (stopped,) = generate(models, tokenizer, [PROMPTS[2]], "entropy", max_new_tokens=10, stop=[words[k]])
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: k + 1]  # the token that completed the stop string is kept
    assert stopped.completion == " " + " ".join(words[:k]) + " "  # the text is cut before the stop string
    (ended,) = generate(models, tokenizer, [PROMPTS[2]], "entropy", max_new_tokens=10, eos_token_id=free.token_ids[k])
    assert ended.finish_reason == "eos" and ended.token_ids == free.token_ids[: k + 1]
    assert ended.completion == " " + " ".join(words[:k])  # without the EOS token
    assert len(ended.weights) == k + 1 and all(sum(w) == pytest.approx(1.0) for w in ended.weights)


def test_modules_and_a_contrastive_poe_through_the_python_api(workspace):
    """Plain transformers modules work as well as Kotara's LoadedModel; PoE with a negative beta
    decodes from log_softmax(1.5 z_a - 0.5 z_b), and reports the betas as weights."""
    tokenizer = workspace["tokenizer"]
    modules = [m.module for m in _load(workspace, "a", "b")]
    (got,) = generate(modules, tokenizer, [PROMPTS[0]], "poe", 6, weights=[1.5, -0.5])
    ids = _prompt_ids(tokenizer, PROMPTS[0])
    for token in got.token_ids:
        with torch.no_grad():
            z = [m(input_ids=torch.tensor([ids])).logits[0, -1].double() for m in modules]
        assert token == int((1.5 * z[0] - 0.5 * z[1]).argmax())
        ids.append(token)
    assert got.weights == [[1.5, -0.5]] * 6 and got.strategy == "poe"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prompts=[]), "no prompt"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_k=0), "top_k must be >= 1"),
        (dict(strategy="vote"), "unknown strategy 'vote'"),
        (dict(strategy="mixture", weights=[1.0, -1.0]), "mixture weights are probabilities"),
        (dict(max_new_tokens=63), "has 2 tokens: with max_new_tokens 63 it needs 65 positions, model a has 64"),
        (dict(names=("a", "narrow")), "vocab mismatch: model b has"),
        (dict(names=("a",)), "at least 2 models"),
    ],
)
def test_bad_arguments_are_clear_errors(workspace, kwargs, message):
    names = kwargs.pop("names", ("a", "b"))
    call = dict(prompts=["a"], strategy="average", max_new_tokens=5) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(_load(workspace, *names), workspace["tokenizer"], **call)


# ------------------------------------------------------------------------------------------ the CLI


def _run_main(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse errors leave through SystemExit
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_generate_writes_the_completions_and_the_jsonl(workspace, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "the a\nof"}) + "\n\n" + json.dumps("model") + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(workspace["a"]), "--model", str(workspace["b"]), "--prompt", PROMPTS[0]]
    argv += ["--prompts_file", str(prompts_file), "--strategy", "poe", "--poe_beta", "1.5", "--poe_beta", "-0.5"]
    argv += ["--max_new_tokens", "6", "--batch_size", "2", "--device", "cpu", "--no_progress"]
    argv += ["--save_outputs", str(out)]
    code, stdout, stderr = _run_main(argv, capsys)
    assert code == 0, stderr
    prompts = [PROMPTS[0], "the a\nof", "model"]
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == prompts
    expected = generate(_load(workspace, "a", "b"), workspace["tokenizer"], prompts, "poe", 6, weights=[1.5, -0.5])
    for record, generation in zip(records, expected):
        assert set(record) == {"prompt", "completion", "token_ids", "weights", "strategy", "finish_reason"}
        assert record == generation.to_json()
        assert record["finish_reason"] in FINISH_REASONS and record["strategy"] == "poe"
        assert len(record["weights"]) == len(record["token_ids"]) and record["weights"][0] == [1.5, -0.5]
        assert f"completion: {record['completion']}\n" in stdout
    assert stdout.count("prompt:") == 3 and "[3/3] poe" in stdout


def test_cli_generate_through_the_console_script_and_the_shim(workspace):
    argv = ["generate", "--model", str(workspace["a"]), "--model", str(workspace["lunaris"]), "--prompt", "the model"]
    argv += ["--strategy", "mixture_entropy", "--max_new_tokens", "5", "--device", "cpu", "--no_progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    script = shutil.which("kotara", path=str(Path(sys.executable).parent))
    commands = [[sys.executable, "kotara.py", *argv]] + ([[script, *argv]] if script else [])
    outputs = []
    for cmd in commands:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(proc.stdout)
    assert "[1/1] mixture_entropy" in outputs[0] and "prompt:     the model" in outputs[0]
    assert len(set(outputs)) == 1  # the console script runs the same code
    if script is None:
        pytest.skip("no `kotara` console script next to this Python (project not installed)")


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_prompt", "no prompt: give --prompt"),
        ("empty_prompts_file", "has no prompts"),
        ("missing_prompts_file", "prompts file not found"),
        ("zero_new_tokens", "--max_new_tokens must be >= 1"),
        ("unknown_strategy", "unknown strategy 'vote'"),
        ("all_strategies", "unknown strategy 'all'"),
        # Tokenizers that differ generate per word, which these whitespace word-level ones cannot (no
        # token starts at a space): tests/test_kotara_word_generate.py has the working case.
        ("different_vocabularies", "no token starts at the word boundary"),
        ("narrower_model", "vocab mismatch"),
        ("top_p_zero", "--top_p must be in (0, 1]"),
        ("top_p_above_one", "--top_p must be in (0, 1]"),
        ("top_k_zero", "--top_k must be >= 1"),
        ("negative_mixture_weight", "--weight values must be > 0"),
        ("all_betas_negative", "--poe_beta values must be finite with at least one > 0"),
        ("shaping_without_sampling", "add --do_sample"),
        ("prompt_too_long", "positions, model a has 64"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2_and_write_nothing(workspace, tmp_path, capsys, case, message):
    model_b = {"different_vocabularies": workspace["foreign"], "narrower_model": workspace["narrow"]}.get(
        case, workspace["b"]
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    extra = {
        "empty_prompts_file": ["--prompts_file", str(empty)],
        "missing_prompts_file": ["--prompts_file", str(tmp_path / "nope.txt")],
        "zero_new_tokens": ["--max_new_tokens", "0"],
        "unknown_strategy": ["--strategy", "vote"],
        "all_strategies": ["--strategy", "all"],
        "top_p_zero": ["--do_sample", "--top_p", "0"],
        "top_p_above_one": ["--do_sample", "--top_p", "1.5"],
        "top_k_zero": ["--do_sample", "--top_k", "0"],
        "negative_mixture_weight": ["--strategy", "mixture", "--weight", "1", "--weight", "-1"],
        "all_betas_negative": ["--strategy", "poe", "--poe_beta", "-1"],
        "shaping_without_sampling": ["--top_k", "5"],
        "prompt_too_long": ["--max_new_tokens", "64"],
    }.get(case, [])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(workspace["a"]), "--model", str(model_b), "--device", "cpu", "--no_progress"]
    argv += ["--save_outputs", str(out), *extra]
    if case not in ("no_prompt", "empty_prompts_file", "missing_prompts_file"):
        argv += ["--prompt", "the model"]
    code, _, stderr = _run_main(argv, capsys)
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert not out.exists() and list(tmp_path.glob(".kotara-*")) == []
