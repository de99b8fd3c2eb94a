"""``kotara.harness_words.WordFusedLM``: models whose tokenizers differ as one lm-eval model (DESIGN §5b, §5c).

Offline: tiny GPT-2s over a byte-level BPE (model a, c) and a Metaspace (SentencePiece-like) BPE
(model b), built here, on local tasks of every output type (``test_kotara_harness.write_tasks``' kind).
Shown: each model alone through the word path is lm-eval's ``hf`` model on it, output for output; two
copies of one model fused per word are that model; a two-model mixture's log-likelihood is the formula
of DESIGN §5b computed here independently in float64; every strategy is a sub-probability over the
continuations of each length on a toy alphabet; bad inputs are one line and exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_kotara_support import WORDS, build_gpt2, one_torch_thread, write_corpus  # noqa: E402, F401

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from kotara.harness import evaluate_rows  # noqa: E402
from kotara.harness_words import WordFusedLM, read, split_request  # noqa: E402

STRATEGIES = ("mixture", "mixture_bayes", "mixture_switch")
TASKS = ["kw_mc", "kw_ll", "kw_ppl", "kw_gen"]
BOOTSTRAP = 20
LOGPROB_ABS = 1e-6  # nats
EXACT_METRICS = ("acc", "acc_norm", "exact_match")
TASK_BODIES = {
    "kw_mc": "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
    "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "kw_ll": "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
    "metric_list:\n  - metric: perplexity\n  - metric: acc\n",
    "kw_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
    "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    "kw_gen": "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
    "generation_kwargs:\n  until: ['expert']\n  max_gen_toks: 5\n  do_sample: false\n"
    "metric_list:\n  - metric: exact_match\n",
}


def write_tasks(root: Path, num_docs: int = 5, seed: int = 0, bodies=None) -> Path:
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    docs = {
        "kw_mc": [{"context": words(6), "choices": [words(2), words(3), words(1)], "label": rng.randrange(3)}
                  for _ in range(num_docs)],
        "kw_ll": [{"context": words(5), "target": words(rng.randint(1, 3))} for _ in range(num_docs)],
        "kw_ppl": [{"text": words(rng.randint(20, 60))} for _ in range(num_docs)],
        "kw_gen": [{"context": words(5), "answer": words(1)} for _ in range(num_docs)],
    }  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    for name, body in (bodies or TASK_BODIES).items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs.get(name, docs["kw_ll"])), encoding="utf-8")
        files = f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\n{files}test_split: test\n" + body)
    return root


def metaspace_tokenizer(directory: Path, text: str, vocab_size: int) -> Path:
    """A SentencePiece-like BPE: Metaspace pre-tokenizer and decoder, <s> / </s> / <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    scheme = dict(replacement="▁", prepend_scheme="first")
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(**scheme), decoders.Metaspace(**scheme)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    backend.train_from_iterator([text], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    return directory


def byte_bpe(directory: Path, text: str, vocab_size: int) -> Path:
    from model.data import train_tokenizer

    train_tokenizer([text], vocab_size=vocab_size).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("kotara_harness_words")
    text = write_corpus(root / "text.txt", num_lines=30).read_text(encoding="utf-8") + " " + " ".join(WORDS)
    byte_dir, meta_dir = byte_bpe(root / "bpe", text, 300), metaspace_tokenizer(root / "meta", text, 120)
    tasks = write_tasks(root / "tasks")
    return {
        "root": root,
        "a": build_gpt2(root / "a", byte_dir, seed=1),
        "b": build_gpt2(root / "b", meta_dir, seed=2),
        "tasks": tasks,
        "manager": TaskManager(include_path=str(tasks), include_defaults=False),
        "hf": {},
    }


def hf_results(workspace, name: str, tasks=TASKS) -> dict:
    """lm-eval's own ``hf`` model on one model (once per module)."""
    key = (name, tuple(tasks))
    if key not in workspace["hf"]:
        module = AutoModelForCausalLM.from_pretrained(workspace[name]).eval()
        lm = HFLM(pretrained=module, tokenizer=AutoTokenizer.from_pretrained(workspace[name]), batch_size=2)
        workspace["hf"][key] = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=workspace["manager"], bootstrap_iters=BOOTSTRAP, log_samples=True
        )
    return workspace["hf"][key]


def assert_same(got: dict, want: dict, tasks, where: str) -> None:
    """Every metric (counts identical, the rest 1e-5 relative) and every request's answer."""
    for task in tasks:
        for key, expected in want["results"][task].items():
            if key in ("alias", "name") or not isinstance(expected, (int, float)):
                continue
            value = got["results"][task][key]
            if key.split(",")[0] in EXACT_METRICS:
                assert value == expected, f"{where}: {task} {key} {value} != {expected}"
            else:
                assert math.isclose(value, expected, rel_tol=1e-5, abs_tol=1e-12), f"{where}: {task} {key}"
        for mine, theirs in zip(got["samples"][task], want["samples"][task], strict=True):
            assert mine["arguments"] == theirs["arguments"], f"{where}: {task}: different requests"
            for x, y in zip(mine["resps"], theirs["resps"], strict=True):
                x, y = x[0], y[0]
                if isinstance(y, tuple | list):
                    assert math.isclose(x[0], y[0], rel_tol=1e-5, abs_tol=LOGPROB_ABS), f"{where}: {task} {x} vs {y}"
                    assert x[1] == y[1], f"{where}: {task}: is_greedy {x} vs {y}"
                elif isinstance(y, float):
                    assert math.isclose(x, y, rel_tol=1e-5, abs_tol=LOGPROB_ABS), f"{where}: {task} {x} vs {y}"
                else:
                    assert x == y, f"{where}: {task}: generated {x!r} vs {y!r}"


# Measured with the whole module at load average 25-30 on the shared 2-core VM: 190 s (with the fixture's 115 s).
@pytest.mark.slow
def test_each_model_alone_equals_hf_for_every_output_type(workspace):
    lm = WordFusedLM([str(workspace["a"]), str(workspace["b"])], strategy="all", batch_size=2, device="cpu")
    assert lm.rows == ["a", "b", *STRATEGIES]
    rows = evaluate_rows(lm, TASKS, rows=["a", "b"], task_manager=workspace["manager"], bootstrap_iters=BOOTSTRAP,
                         log_samples=True)  # fmt: skip
    for name in ("a", "b"):
        assert_same(rows[name], hf_results(workspace, name), TASKS, f"model {name} alone")


@pytest.mark.slow  # 155 s at load average 25-30 on the shared 2-core VM (three rows x four tasks)
def test_two_copies_of_one_model_fused_per_word_equal_hf(workspace):
    lm = WordFusedLM([str(workspace["a"])] * 2, strategy="all", weights=[0.3, 0.7], batch_size=3, device="cpu")
    rows = evaluate_rows(lm, TASKS, rows=list(STRATEGIES), task_manager=workspace["manager"],
                         bootstrap_iters=BOOTSTRAP, log_samples=True)  # fmt: skip
    for strategy in STRATEGIES:
        assert_same(rows[strategy], hf_results(workspace, "a"), TASKS, f"{strategy} of two copies of a")


# ------------------------------------------------------------- the formula, computed here in float64

BOUNDARY = re.compile(r"(?<=\S) ")  # DESIGN §5c: a space after a non-whitespace character


def _reference_segments(path: Path, text: str, has_context: bool) -> list[float]:
    """log q_m(s_j) of ``text`` for one model, last segment open, from a float64 forward over hf's tokens:
    the tokenizer's own reading (no prefix) when there is a context, the prefix token before it otherwise."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).double().eval()
    encoding = tokenizer(text, add_special_tokens=has_context, return_offsets_mapping=True)
    ids, starts = encoding["input_ids"], [s for s, _ in encoding["offset_mapping"]]
    prefix = [] if has_context else [tokenizer.bos_token_id]
    inputs = torch.tensor([prefix + ids])
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=inputs).logits[0, :, : len(tokenizer)].double(), -1)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    word_start = torch.tensor([p.startswith(("Ġ", "▁")) for p in pieces])
    log_s = log_p.masked_fill(~word_start, float("-inf")).logsumexp(-1)
    cuts = [0] + [m.start() for m in BOUNDARY.finditer(text)] + [len(text)]
    factors = []
    for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        factor = 0.0
        for k, start in enumerate(starts):  # token k is predicted by row k + len(prefix) - 1 (none: unscored)
            row = k + len(prefix) - 1
            if a <= start < b and row >= 0:
                factor += float(log_p[row, ids[k]])
                if start == a and j > 0:
                    factor -= float(log_s[row])  # S(before s_j)
            if start == b and j < len(cuts) - 2 and row >= 0:
                factor += float(log_s[row])  # S(after s_j): the row that predicts s_{j+1}'s first token
        factors.append(factor)
    return factors


def _reference_log_q(tables: list[list[float]], strategy: str, weights: list[float], switch_rate: float) -> float:
    prior = [w / sum(weights) for w in weights]
    current, total = list(prior), 0.0
    for j in range(len(tables[0])):
        joint = [current[m] * math.exp(tables[m][j]) for m in range(len(tables))]
        total += math.log(sum(joint))
        if strategy == "mixture_bayes":
            current = [x / sum(joint) for x in joint]
        elif strategy == "mixture_switch":
            current = [(1 - switch_rate) * x / sum(joint) + switch_rate / len(tables) for x in joint]
    return total


REQUESTS = [
    ("the fused expert window ", "stride of the model"),
    ("", "the token is fused with entropy"),
    ("a of to and", " in is it that"),
    ("entropy gap average mixture product length loss value", " of the model"),
]


def test_two_models_loglikelihood_is_the_open_last_segment_formula_in_float64(workspace):
    paths = [workspace["a"], workspace["b"]]
    weights, switch_rate = [0.3, 0.7], 0.2
    lm = WordFusedLM([str(p) for p in paths], weights=weights, switch_rate=switch_rate, batch_size=2, device="cpu")
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(REQUESTS)]
    for strategy in STRATEGIES:
        lm.select_row(strategy)
        answers = lm.loglikelihood(requests, disable_tqdm=True)
        for (context, continuation), (value, _) in zip(REQUESTS, answers):
            c = context.rstrip()
            full = [_reference_segments(p, c + context[len(c) :] + continuation, bool(c)) for p in paths]
            want = _reference_log_q(full, strategy, weights, switch_rate)
            if c:
                context_tables = [_reference_segments(p, c, True) for p in paths]
                want -= _reference_log_q(context_tables, strategy, weights, switch_rate)
            assert len(full[0]) >= 3  # the request crosses several segments
            assert math.isclose(value, want, rel_tol=1e-5, abs_tol=1e-6), f"{strategy} {context!r}: {value} vs {want}"


# ------------------------------------------------------------------------- a sub-probability

TOY_TEXT = "ab ba aab b a bb ab a ba abab b aa " * 3
TOY_CONTEXTS = ("ab", "b a ")


def test_every_row_is_a_sub_probability_over_the_continuations_of_each_length(tmp_path):
    """Σ over every continuation x of k characters (alphabet a, b, space) of exp(loglikelihood(c, x)) <= 1,
    for each model alone and each strategy: the events "the text goes on with x" are disjoint for one k.
    Continuations that some model cannot start a token at are errors, so not counted (a smaller sum)."""
    import itertools

    paths = [
        build_gpt2(tmp_path / f"m{size}", metaspace_tokenizer(tmp_path / f"t{size}", TOY_TEXT, size), seed=size)
        for size in (9, 14)
    ]
    lm = WordFusedLM([str(p) for p in paths], weights=[0.4, 0.6], switch_rate=0.3, batch_size=32, device="cpu")
    assert len(lm.readers[0].tokenizer) != len(lm.readers[1].tokenizer)
    for context in TOY_CONTEXTS:
        for k in (1, 3):
            requests = []
            for chars in itertools.product("ab ", repeat=k):
                try:
                    [read(r, *split_request(context, "".join(chars))) for r in lm.readers]
                except ValueError:
                    continue
                requests.append(Instance("loglikelihood", {}, (context, "".join(chars)), 0))
            assert len(requests) >= 3**k // 2, (context, k, len(requests))
            for row in lm.rows:
                lm.select_row(row)
                total = sum(math.exp(value) for value, _ in lm.loglikelihood(requests, disable_tqdm=True))
                assert 0.0 < total <= 1.0 + 1e-9, (context, k, row, total)


# ------------------------------------------------------------------------------------ the CLI

BAD_TASK = (
    "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: ''\ntarget_delimiter: ''\n"
    "metric_list:\n  - metric: acc\n"
)


def run_eval(workspace, models, extra, capsys):
    from kotara.cli import main

    argv = ["eval", *(a for m in models for a in ("--model", str(workspace.get(m, m))))]
    argv += ["--include_path", str(workspace["tasks"]), "--device", "cpu", "--no_progress"]
    argv += ["--bootstrap_iters", str(BOOTSTRAP), *extra]
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_cli_fuses_models_whose_tokenizers_differ_per_word(workspace, tmp_path, capsys):
    out = tmp_path / "rows.json"
    code, stdout, err = run_eval(
        workspace, ("a", "b"), ["--tasks", "kw_ppl", "--limit", "2", "--output_path", str(out)], capsys
    )
    assert code == 0, err
    for label in (f"model a ({workspace['a']})", f"model b ({workspace['b']})", *STRATEGIES):
        assert label in stdout
    data = json.loads(out.read_text())
    assert list(data["rows"]) == ["a", "b", *STRATEGIES] and data["config"]["fusion_unit"] == "word"
    assert data["rows"]["mixture"]["results"]["kw_ppl"]["bits_per_byte,none"] > 0


@pytest.mark.parametrize(
    "models, extra, message",
    [
        (("a", "b"), ["--tasks", "kw_mc", "--strategy", "entropy"], "strategy entropy combines the models' logits"),
        (("a", "b"), ["--tasks", "kw_mc", "--strategy", "gap"], "needs one shared vocabulary"),
        (("a", "words"), ["--tasks", "kw_mc"], "model b: no token starts at the word boundary at character"),
        (("a", "b"), ["--tasks", "kw_empty"], "empty continuation after context"),
    ],
)
def test_bad_inputs_are_one_line_exit_2(workspace, tmp_path, capsys, models, extra, message):
    from kotara import demo

    if "words" in models and "words" not in workspace:
        tokenizer = demo.build_tokenizer(tmp_path / "wtok", sorted(set(WORDS)))
        workspace["words"] = build_gpt2(tmp_path / "w", tokenizer, seed=4)
    if not (workspace["tasks"] / "kw_empty.yaml").exists():
        write_tasks(workspace["tasks"], bodies={"kw_empty": BAD_TASK}, num_docs=2)
    code, _, err = run_eval(workspace, models, [*extra, "--limit", "2"], capsys)
    assert code == 2
    # lm-eval's own progress bar over the documents may come first (it ignores --no_progress once tqdm is imported)
    errors = [line for line in re.split(r"[\r\n]", err) if "kotara: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("kotara: error: ") and message in errors[0], err
    assert "Traceback" not in err
