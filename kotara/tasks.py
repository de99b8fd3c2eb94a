"""Tasks for ``kotara eval``: resolving ``--tasks`` with clear errors, and the shipped docstring task.

``resolve_tasks`` turns ``--tasks`` (registered names, task YAML files, directories of them) and
``--include_path`` into what ``lm_eval.simple_evaluate`` takes plus its ``TaskManager``. lm-eval
itself skips a YAML file that does not parse without a word and reports an unknown name as "not
found"; here either is a ``ValueError`` naming the file and the parser's reason, or the name and
its close matches. lm-eval's own task index (~15,000 YAML files, ~13 s to scan) is only built
when a name is asked for; paths alone load in a fraction of a second.

``python -m kotara.tasks OUT_DIR [--files F1,F2,...]`` builds the shipped tasks, multiple choice
over the docstrings of the given files of this Python's standard library (every file by default):
``kotara_docstring_next_line``, "which line comes next in this docstring" (the wrong choices are
lines of other docstrings), and ``kotara_docstring_word_order``, the same question with the right
line's own words shuffled as the wrong choices (local well-formedness rather than the topical
coherence the first needs). Deterministic for a given Python installation (the file order is
sorted, the draws are seeded); the data is generated, never shipped, and its SHA-256 is printed and
put in the YAML. Each document's ``source`` names its file.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK_NAME = "kotara_docstring_next_line"  # wrong choices: lines of other docstrings
WORD_ORDER_TASK = "kotara_docstring_word_order"  # wrong choices: the right line's words shuffled
DISTRACTORS = {TASK_NAME: "other", WORD_ORDER_TASK: "shuffled"}
NUM_CHOICES = 4
MIN_LINES = 3  # a docstring needs >= 2 lines of context and one line to predict


# ------------------------------------------------------------------------------- --tasks


def check_yaml(path: Path) -> None:
    """Raise ValueError naming ``path`` and the reason when lm-eval could not read it as a task config."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        load_yaml(path, resolve_func=False, recursive=True)
    except Exception as err:  # noqa: BLE001 - yaml, include and type errors alike: lm-eval would skip the file
        reason = " ".join(str(err).split())
        raise ValueError(f"task file {str(path)!r} does not parse: {reason}") from None


def _yaml_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("**/*.yaml") if p.is_file())


def _known(manager: Any, name: str) -> bool:
    """A registered task, group or tag (``all_tasks`` holds all three), or a glob that matches some."""
    return name in manager.task_index or bool(manager.match_tasks([name]))


def resolve_tasks(tasks: str, include_path: Sequence[str] = ()) -> tuple[list[str], Any]:
    """``--tasks`` (comma-separated names, ``.yaml`` files, directories) -> (task specs, TaskManager).

    A directory stands for every task and group its YAML files define (and is searched like an
    ``--include_path``). Every YAML file given or found is checked to parse first.
    """
    from lm_eval.tasks import TaskManager

    specs = [t.strip() for t in tasks.split(",") if t.strip()]
    if not specs:
        raise ValueError("--tasks is empty: give task names, task YAML files or directories of them")
    include_dirs = []
    for entry in include_path:
        if not Path(entry).is_dir():
            raise ValueError(f"--include_path {entry!r} is not a directory")
        include_dirs.append(Path(entry).resolve())
    directories, files, names = [], [], []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            directories.append(path.resolve())
        elif spec.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise ValueError(f"task file not found: {spec!r}")
            files.append(path.resolve())
        else:
            names.append(spec)
    for directory in directories + include_dirs:
        for yaml_path in _yaml_files(directory):
            check_yaml(yaml_path)
    for yaml_path in files:
        check_yaml(yaml_path)
    roots = [str(d) for d in include_dirs + directories]
    manager = TaskManager(include_path=roots or None, include_defaults=False)
    if any(not _known(manager, name) for name in names):  # only then scan lm-eval's own tasks (slow)
        manager = TaskManager(include_path=roots or None, include_defaults=True)
    resolved: list[str] = [str(f) for f in files]
    for directory in directories:
        defined = [
            name
            for name, entry in manager.task_index.items()
            if entry.yaml_path is not None
            and Path(entry.yaml_path).resolve().is_relative_to(directory)
            and entry.kind.name in ("TASK", "PY_TASK", "GROUP")
        ]
        if not defined:
            raise ValueError(f"--tasks {str(directory)!r}: no task YAML in this directory")
        resolved += sorted(defined)
    for name in names:
        if not _known(manager, name):
            close = difflib.get_close_matches(name, sorted(manager.all_tasks), n=3, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else "; see `lm-eval ls tasks`"
            raise ValueError(f"unknown task {name!r}{hint}")
        resolved += manager.match_tasks([name]) or [name]
    return resolved, manager


# ------------------------------------------------------------------------ the shipped task


def docstring_lines(files: Sequence[str] | None = None) -> list[tuple[str, list[str]]]:
    """(relative path, non-empty lines) of every docstring of ``files`` (stdlib-relative; default all)."""
    from model.corpus import file_docstrings, stdlib_dir, stdlib_files

    root = stdlib_dir()
    paths = stdlib_files(root)
    if files:
        by_name = {p.relative_to(root).as_posix(): p for p in paths}
        missing = [f for f in files if f not in by_name]
        if missing:
            raise ValueError(f"not a standard-library file with docstrings: {', '.join(missing)}")
        paths = [by_name[f] for f in sorted(set(files))]
    out = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        for doc in file_docstrings(path):
            lines = [line.strip() for line in doc.splitlines() if line.strip()]
            if lines:
                out.append((rel, lines))
    return out


def _other_lines(rng: random.Random, pool: list[str], lines: list[str], answer: str) -> list[str]:
    """NUM_CHOICES - 1 lines of other docstrings, distinct from ``answer``, each other and ``lines``."""
    wrong: list[str] = []
    for _ in range(1000):  # bounded: a tiny pool cannot make this spin
        if len(wrong) == NUM_CHOICES - 1:
            return wrong
        candidate = pool[rng.randrange(len(pool))]
        if candidate != answer and candidate not in wrong and candidate not in lines:
            wrong.append(candidate)
    raise ValueError(f"too few distinct lines to draw {NUM_CHOICES - 1} wrong choices from")


def _shuffled_lines(rng: random.Random, answer: str) -> list[str]:
    """NUM_CHOICES - 1 distinct orders of ``answer``'s words, none the original (it has >= 4 words)."""
    words, wrong = answer.split(), []
    while len(wrong) < NUM_CHOICES - 1:  # >= 4 words: 23 other orders, so this ends
        order = words[:]
        rng.shuffle(order)
        candidate = " ".join(order)
        if candidate != " ".join(words) and candidate not in wrong:
            wrong.append(candidate)
    return wrong


def build_docs(
    docstrings: list[tuple[str, list[str]]], seed: int = 0, max_docs: int | None = None, distractors: str = "other"
) -> list[dict]:
    """One multiple-choice document per docstring of >= MIN_LINES lines.

    The line to predict is drawn among lines 3..n (so at least two lines of context). Its three
    wrong choices are, for ``distractors="other"``, lines of other docstrings (distinct from the
    right one and from each other: which line *comes next*); for ``"shuffled"``, the right line's
    own words in other orders (which line *is well formed*; only lines of >= 4 words are drawn).
    The choices are shuffled. Returns dicts ``{source, context, choices, label}``.
    """
    if distractors not in DISTRACTORS.values():
        expected = ", ".join(DISTRACTORS.values())
        raise ValueError(f"unknown distractors {distractors!r}; expected one of {expected}")
    rng = random.Random(seed)
    pool = sorted({line for _, lines in docstrings for line in lines})
    docs = []
    for source, lines in docstrings:
        candidates = [k for k in range(2, len(lines)) if distractors == "other" or len(lines[k].split()) >= 4]
        if len(lines) < MIN_LINES or not candidates:
            continue
        k = candidates[rng.randrange(len(candidates))]
        answer = lines[k]
        wrong = _other_lines(rng, pool, lines, answer) if distractors == "other" else _shuffled_lines(rng, answer)
        choices = [answer, *wrong]
        rng.shuffle(choices)
        docs.append({"source": source, "context": "\n".join(lines[:k]) + "\n", "choices": choices,
                     "label": choices.index(answer)})  # fmt: skip
        if max_docs is not None and len(docs) >= max_docs:
            break
    return docs


def write_task(out_dir: Path, name: str, docs: list[dict]) -> tuple[Path, str]:
    """The task ``name``'s JSONL data and YAML config in ``out_dir``; returns (yaml path, data sha256)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{name}.jsonl"
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    data.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    config = out_dir / f"{name}.yaml"
    config.write_text(
        f"# Built by `python -m kotara.tasks` (Python {sys.version.split()[0]}): {len(docs)} documents,\n"
        f"# data sha256 {digest}\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        "metadata:\n  version: 1.0\n",
        encoding="utf-8",
    )
    return config, digest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kotara.tasks", description="Build the docstring tasks.")
    p.add_argument("out_dir", type=Path, help="directory to write the task YAML and its JSONL data into")
    p.add_argument("--files", default="", help="comma-separated stdlib-relative files (default: every stdlib file)")
    p.add_argument("--seed", type=int, default=0, help="seed of the line and distractor draws (default 0)")
    p.add_argument("--max_docs", type=int, default=None, help="at most this many documents")
    args = p.parse_args(argv)
    files = [f.strip() for f in args.files.split(",") if f.strip()]
    try:
        docstrings = docstring_lines(files or None)
        built = {name: build_docs(docstrings, args.seed, args.max_docs, kind) for name, kind in DISTRACTORS.items()}
    except ValueError as err:
        print(f"python -m kotara.tasks: error: {err}", file=sys.stderr)
        return 2
    for name, docs in built.items():
        config, digest = write_task(args.out_dir, name, docs)
        print(f"{config}: {len(docs)} documents, data sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
