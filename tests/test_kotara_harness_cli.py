"""``kotara eval`` end to end (the table, the JSON of every row) and its user errors, offline; the
shipped ``kotara_docstring_next_line`` task's builder.

Each user error is one line ``kotara: error: ...`` on stderr and exit code 2, before any model runs.
"""

from __future__ import annotations

import json
import sys

import pytest
from test_kotara_harness import BOOTSTRAP, WORDS, write_tasks
from test_kotara_support import build_gpt2, build_tokenizer, one_torch_thread, write_corpus  # noqa: F401

import moc_kernels
from kotara import tasks as kotara_tasks
from kotara.cli import main

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("kotara_eval_cli")
    text = write_corpus(root / "text.txt", num_lines=30)
    tokenizer_dir = build_tokenizer(root / "tokenizer", text, extra_words=tuple(WORDS))
    other_tokenizer = build_tokenizer(root / "other_tokenizer", text, extra_words=("zebra",) + tuple(WORDS))
    return {
        "a": str(build_gpt2(root / "a", tokenizer_dir, seed=1)),
        "b": str(build_gpt2(root / "b", tokenizer_dir, seed=2)),
        "other": str(build_gpt2(root / "other", other_tokenizer, seed=3)),
        "tasks": write_tasks(root / "tasks"),
        "root": root,
    }


def test_eval_all_prints_a_table_and_writes_every_rows_lm_eval_results(workspace, capsys):
    out = workspace["root"] / "eval.json"
    argv = ["eval", "--model", workspace["a"], "--model", workspace["b"], "--strategy", "all", "--tasks",
            str(workspace["tasks"] / "kt_mc.yaml"), "--limit", "4", "--batch_size", "2", "--output_path", str(out),
            "--bootstrap_iters", str(BOOTSTRAP), "--no_progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    rows = ["a", "b", *moc_kernels.STRATEGIES]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert list(data["rows"]) == rows
    for row in rows:
        results = data["rows"][row]["results"]["kt_mc"]
        assert 0 <= results["acc,none"] <= 1 and results["acc_stderr,none"] >= 0
        assert data["rows"][row]["n-samples"]["kt_mc"]["effective"] == 4
        assert any(line.startswith(row if row not in ("a", "b") else f"model {row} ") for line in table.splitlines())
    assert data["models"] == {"a": workspace["a"], "b": workspace["b"]}
    assert data["row_kinds"]["a"] == "model" and data["row_kinds"]["entropy"] == "strategy"
    assert data["config"]["strategy"] == "all" and data["config"]["limit"] == 4
    assert set(data["versions"]) >= {"lm_eval", "torch", "transformers"}
    assert data["timings"]["forward_calls"] == 2 * 6  # 4 docs x 3 choices = 12 requests, batches of 2
    assert "kt_mc (4 documents, 0-shot)" in table and "*" in table


def _bad_yaml_dir(workspace):
    directory = workspace["root"] / "bad_tasks"
    directory.mkdir(exist_ok=True)
    (directory / "broken.yaml").write_text("task: broken\nmetric_list: [acc\n", encoding="utf-8")
    return str(directory)


USER_ERRORS = {
    "missing task file": (lambda w: ["--tasks", str(w["root"] / "nope.yaml")], "task file not found"),
    "unparsable yaml": (lambda w: ["--tasks", _bad_yaml_dir(w)], "broken.yaml' does not parse"),
    "negative fewshot": (lambda w: ["--tasks", str(w["tasks"]), "--num_fewshot", "-1"], "--num_fewshot must be >= 0"),
    "zero limit": (lambda w: ["--tasks", str(w["tasks"]), "--limit", "0"], "--limit must be > 0"),
    "output in a missing dir": (
        lambda w: ["--tasks", str(w["tasks"]), "--output_path", str(w["root"] / "no" / "out.json")],
        "does not exist",
    ),
    "output is a dir": (lambda w: ["--tasks", str(w["tasks"]), "--output_path", str(w["root"])], "is a directory"),
    "unknown strategy": (lambda w: ["--tasks", str(w["tasks"]), "--strategy", "median"], "unknown strategy 'median'"),
    "tokenizers differ, per token": (
        lambda w: ["--tasks", str(w["tasks"]), "--model", w["other"], "--fusion_unit", "token"],
        "tokenizer mismatch",
    ),
    # per word (the default when tokenizers differ): this word-level tokenizer drops the spaces
    "tokenizers differ, per word": (
        lambda w: ["--tasks", str(w["tasks"]), "--model", w["other"], "--strategy", "poe"],
        "strategy poe combines the models' logits token by token",
    ),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_eval_user_errors_are_one_line_and_exit_2(workspace, capsys, case):
    extra, message = USER_ERRORS[case]
    argv = ["eval", "--model", workspace["a"], "--model", workspace["b"], "--no_progress", *extra(workspace)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kotara: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err, err


def test_eval_without_lm_eval_names_the_extra(workspace, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    argv = ["eval", "--model", workspace["a"], "--model", workspace["b"], "--tasks", str(workspace["tasks"])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[eval]'" in err


@pytest.mark.slow
def test_unknown_task_names_lm_evals_close_matches(workspace, capsys):
    # A name is looked up in lm-eval's own registry (it scans ~15,000 task files: the slow part).
    argv = ["eval", "--model", workspace["a"], "--model", workspace["b"], "--tasks", "hellaswg"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kotara: error: unknown task 'hellaswg'; close matches: hellaswag"), err
    assert err.count("\n") == 1


def test_docstring_tasks_are_deterministic_and_load_in_lm_eval(tmp_path):
    files = ["json/decoder.py", "timeit.py", "warnings.py"]
    lines = kotara_tasks.docstring_lines(files)
    for name, kind in kotara_tasks.DISTRACTORS.items():
        docs = kotara_tasks.build_docs(lines, distractors=kind)
        assert docs == kotara_tasks.build_docs(kotara_tasks.docstring_lines(files[::-1]), distractors=kind)
        assert len(docs) >= 10, name
        for doc in docs:
            answer = doc["choices"][doc["label"]]
            assert len(doc["choices"]) == kotara_tasks.NUM_CHOICES == len(set(doc["choices"]))
            assert doc["context"].endswith("\n") and doc["context"].count("\n") >= 2
            assert doc["source"] in files
            if kind == "shuffled":  # every wrong choice is the right line's words in another order
                assert all(sorted(c.split()) == sorted(answer.split()) for c in doc["choices"])
            else:
                assert all(sorted(c.split()) != sorted(answer.split()) for c in doc["choices"] if c != answer)
    assert kotara_tasks.main([str(tmp_path), "--files", ",".join(files)]) == 0
    resolved, manager = kotara_tasks.resolve_tasks(str(tmp_path))
    assert resolved == sorted(kotara_tasks.DISTRACTORS)
    loaded = manager.load(resolved)["tasks"]
    assert len(list(loaded[kotara_tasks.TASK_NAME].test_docs())) == len(kotara_tasks.build_docs(lines))
    with pytest.raises(ValueError, match="not a standard-library file"):
        kotara_tasks.docstring_lines(["no_such_module.py"])
