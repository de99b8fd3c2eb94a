"""``kotara.harness.FusedLM`` against lm-eval's own ``hf`` model, offline (DESIGN §5b).

Tasks of every output type (multiple choice, loglikelihood, rolling perplexity, generation) are
YAML + JSONL written here with absolute ``data_files``; the models are tiny GPT-2s over a word-level
tokenizer built here. Shown: M copies of one model give ``hf``'s numbers metric for metric and
request for request (batch 1 and 3); two different models' fused log-likelihoods equal the reference
fusion computed independently over the same tokens (and the Triton kernels, under the interpreter,
agree); each model's row under ``all`` is that model alone in lm-eval; ``all`` runs as many forwards
as one strategy.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_kotara_support import WORDS, build_gpt2, build_tokenizer, one_torch_thread, write_corpus  # noqa: E402, F401

import moc_kernels  # noqa: E402

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from kotara.harness import FusedLM, evaluate_rows  # noqa: E402

TASKS = ["kt_mc", "kt_ll", "kt_ppl", "kt_gen"]
SCORED_TASKS = TASKS[:3]  # the loglikelihood ones: their rows all come from one set of forwards
BOOTSTRAP = 20  # few resamples: stderrs exist (seeded by lm-eval) but cost little
LOGPROB_ABS = 1e-6  # nats: fp32 rounding of a few log-probs near 0 (see _assert_same_samples)
EXACT_METRICS = ("acc", "acc_norm", "exact_match")  # counts: must be identical, not merely close
TASK_BODIES = {
    "kt_mc": "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
    "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "kt_ll": "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
    "metric_list:\n  - metric: perplexity\n  - metric: acc\n",
    "kt_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
    "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    "kt_gen": "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
    "generation_kwargs:\n  until: ['expert']\n  max_gen_toks: 5\n  do_sample: false\n"
    "metric_list:\n  - metric: exact_match\n",
}


def write_tasks(root: Path, num_docs: int = 6, seed: int = 0) -> Path:
    """The four tasks in ``root``; rolling texts run past the models' 64 positions (several windows)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    docs = {
        "kt_mc": [{"context": words(6), "choices": [words(2), words(3), words(1)], "label": rng.randrange(3)}
                  for _ in range(num_docs)],
        "kt_ll": [{"context": words(5), "target": " " + words(rng.randint(1, 3))} for _ in range(num_docs)],
        "kt_ppl": [{"text": words(rng.randint(20, 150))} for _ in range(num_docs)],
        "kt_gen": [{"context": words(5), "answer": words(1)} for _ in range(num_docs)],
    }  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    for name, body in TASK_BODIES.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs[name]), encoding="utf-8")
        files = f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        header = f"task: {name}\ndataset_path: json\n{files}"
        (root / f"{name}.yaml").write_text(header + "test_split: test\n" + body, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("kotara_harness")
    text = write_corpus(root / "text.txt", num_lines=30)
    tokenizer_dir = build_tokenizer(root / "tokenizer", text, extra_words=tuple(WORDS))
    tasks = write_tasks(root / "tasks")
    return {
        "root": root,
        "a": build_gpt2(root / "a", tokenizer_dir, seed=1),
        "b": build_gpt2(root / "b", tokenizer_dir, seed=2),
        "tasks": tasks,
        "manager": TaskManager(include_path=str(tasks), include_defaults=False),
        "hf": {},
    }


def _hf_results(workspace, name: str, batch_size: int, tasks=TASKS) -> dict:
    """lm-eval's ``hf`` model on one model, once per (model, batch size) for the module."""
    key = (name, batch_size, tuple(tasks))
    if key not in workspace["hf"]:
        module = AutoModelForCausalLM.from_pretrained(workspace[name]).eval()
        tokenizer = AutoTokenizer.from_pretrained(workspace[name])
        lm = HFLM(pretrained=module, tokenizer=tokenizer, batch_size=batch_size)
        workspace["hf"][key] = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=workspace["manager"], bootstrap_iters=BOOTSTRAP
        )
    return workspace["hf"][key]


def _assert_same_metrics(got: dict, want: dict, tasks, where: str) -> None:
    """Every metric (and stderr) of every task: counts identical, the rest within 1e-5 relative."""
    for task in tasks:
        for key, expected in want["results"][task].items():
            if key in ("alias", "name") or not isinstance(expected, (int, float)):
                continue
            value = got["results"][task][key]
            if key.split(",")[0] in EXACT_METRICS:
                assert value == expected, f"{where}: {task} {key} {value} != {expected}"
            else:
                assert math.isclose(value, expected, rel_tol=1e-5, abs_tol=1e-12), f"{where}: {task} {key}"


def _assert_same_samples(got: dict, want: dict, tasks, where: str) -> None:
    """Request for request: the same log-likelihoods, greedy flags and generations.

    A log-likelihood close to 0 (a near-certain token) carries fp32's absolute rounding of log-probs
    near log 1 (~1e-7 per token: the mixture's log-sum-exp and HF's log_softmax round differently
    there), so each is compared to 1e-5 relative *or* LOGPROB_ABS absolute.
    """
    for task in tasks:
        for mine, theirs in zip(got["samples"][task], want["samples"][task], strict=True):
            assert mine["arguments"] == theirs["arguments"], f"{where}: {task}: different requests"
            for r_mine, r_theirs in zip(mine["resps"], theirs["resps"], strict=True):
                for x, y in zip(r_mine, r_theirs, strict=True):
                    if isinstance(y, tuple | list):
                        close = math.isclose(x[0], y[0], rel_tol=1e-5, abs_tol=LOGPROB_ABS)
                        assert close, f"{where}: {task} {x} vs {y}"
                        assert x[1] == y[1], f"{where}: {task}: is_greedy {x} vs {y}"
                    elif isinstance(y, float):
                        assert math.isclose(x, y, rel_tol=1e-5, abs_tol=LOGPROB_ABS), f"{where}: {task} {x} vs {y}"
                    else:
                        assert x == y, f"{where}: {task}: generated {x!r} vs {y!r}"


@pytest.mark.parametrize("batch_size", [1, 3])
def test_copies_of_one_model_equal_hf_for_every_output_type(workspace, batch_size):
    want = _hf_results(workspace, "a", batch_size)
    lm = FusedLM([str(workspace["a"])] * 2, strategy="all", batch_size=batch_size, device="cpu")
    rows = ["average", "poe", "entropy", "mixture"] if batch_size == 1 else ["entropy"]
    got = evaluate_rows(lm, TASKS, rows=rows, task_manager=workspace["manager"], bootstrap_iters=BOOTSTRAP)
    for row in rows:
        _assert_same_metrics(got[row], want, TASKS, f"{row}, batch {batch_size}")
        _assert_same_samples(got[row], want, TASKS, f"{row}, batch {batch_size}")


def _reference_answer(lm: FusedLM, modules, context_ids, continuation_ids, strategy, weights):
    """(log q of the continuation, greedy) computed alone: each model's forward over this request's
    tokens only (HFLM's causal input), then the reference backend's fusion."""
    full = (context_ids + continuation_ids)[-(lm.max_length + 1) :]
    inputs = torch.tensor([full[:-1]])
    targets = torch.tensor(continuation_ids)
    with torch.no_grad():
        logits = [m(input_ids=inputs).logits[0, -len(continuation_ids) :, : len(lm.tokenizer)] for m in modules]
    with moc_kernels.use_backend("reference"):
        nll = moc_kernels.fused_logit_nll(logits, targets, strategy, lm.spec.temperatures, weights).nll
        log_q = moc_kernels.fused_log_probs(logits, strategy, lm.spec.temperatures, weights)
    return -float(nll.double().sum()), bool((log_q.argmax(-1) == targets).all())


def _requests(workspace):
    """Loglikelihood requests with an empty context, a trailing space, shared contexts (HFLM's
    one-token reuse), and one longer than max_length (left truncation)."""
    rng = random.Random(5)
    pairs = [("", "the model"), ("the fused ", "expert"), ("a of to", " and"), ("a of to", " in"), ("a of to", " is")]
    pairs += [(" ".join(rng.choice(WORDS) for _ in range(80)), " window stride")]
    pairs += [(" ".join(rng.choice(WORDS) for _ in range(k)), " " + rng.choice(WORDS)) for k in (3, 7, 12)]
    return [Instance("loglikelihood", {}, pair, idx) for idx, pair in enumerate(pairs)]


def test_two_models_fused_loglikelihood_equals_the_reference_fusion(workspace):
    paths = [str(workspace["a"]), str(workspace["b"])]
    modules = [AutoModelForCausalLM.from_pretrained(p).eval() for p in paths]
    requests = _requests(workspace)
    lm = FusedLM(paths, strategy="all", batch_size=4, device="cpu", temperatures=[0.8, 1.3], poe_betas=[1.5, -0.5])
    encoded = [lm._encode_pair(*r.args) if r.args[0] else ([lm.prefix_token_id], lm.tok_encode(r.args[1]))
               for r in requests]  # fmt: skip
    for strategy in moc_kernels.STRATEGIES:
        lm.select_row(strategy)
        answers = lm.loglikelihood(requests, disable_tqdm=True)
        weights = lm.spec.poe_betas if strategy == "poe" else lm.spec.weights
        for (ctx, cont), (value, greedy), request in zip(encoded, answers, requests):
            ref_value, ref_greedy = _reference_answer(lm, modules, ctx, cont, strategy, weights)
            assert math.isclose(value, ref_value, rel_tol=1e-5), f"{strategy} {request.args}: {value} vs {ref_value}"
            assert greedy == ref_greedy, f"{strategy} {request.args}"
    # 3 of the 9 requests share one input (HFLM's one-token reuse): 7 inputs, 2 batches of 4, per model.
    assert lm.forward_calls == 2 * math.ceil(7 / 4)


@pytest.mark.triton
def test_triton_fusion_gives_the_same_answers(workspace):
    paths = [str(workspace["a"]), str(workspace["b"])]
    requests = _requests(workspace)
    answers = {}
    for kernels in ("reference", "triton"):
        with moc_kernels.use_backend(kernels):
            lm = FusedLM(paths, strategy="all", batch_size=4, device="cpu")
            answers[kernels] = {}
            for strategy in moc_kernels.STRATEGIES:
                lm.select_row(strategy)
                answers[kernels][strategy] = lm.loglikelihood(requests, disable_tqdm=True)
    for strategy, want in answers["reference"].items():
        for (value, greedy), (ref_value, ref_greedy) in zip(answers["triton"][strategy], want):
            assert math.isclose(value, ref_value, rel_tol=1e-5), strategy
            assert greedy == ref_greedy, strategy  # the same is_greedy, so the same accuracies


def test_model_rows_are_each_model_alone_and_all_costs_one_strategys_forwards(workspace):
    paths = [str(workspace["a"]), str(workspace["b"])]
    kwargs = dict(task_manager=workspace["manager"], bootstrap_iters=BOOTSTRAP)
    one = FusedLM(paths, strategy="entropy", batch_size=3, device="cpu")
    single = evaluate_rows(one, SCORED_TASKS, **kwargs)["entropy"]
    every = FusedLM(paths, strategy="all", batch_size=3, device="cpu")
    rows = evaluate_rows(every, SCORED_TASKS, **kwargs)
    assert list(rows) == ["a", "b", *moc_kernels.STRATEGIES]
    assert one.forward_calls > 0 and every.forward_calls == one.forward_calls
    for name in ("a", "b"):
        want = _hf_results(workspace, name, 3, SCORED_TASKS)
        _assert_same_metrics(rows[name], want, SCORED_TASKS, f"row {name}")
        _assert_same_samples(rows[name], want, SCORED_TASKS, f"row {name}")
    _assert_same_metrics(rows["entropy"], single, SCORED_TASKS, "entropy under all")


def test_registered_as_kotara_and_built_from_an_arg_string(workspace):
    from lm_eval.api.registry import get_model

    assert get_model("kotara") is FusedLM
    args = f"models={workspace['a']}|{workspace['b']},strategy=poe,max_length=32"
    lm = FusedLM.create_from_arg_string(args, {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    assert lm.rows == ["poe"] and lm.batch_size == 2 and lm.max_length == 32
    assert lm.paths == [str(workspace["a"]), str(workspace["b"])]
    with pytest.raises(ValueError, match="unknown row"):
        lm.select_row("a")
