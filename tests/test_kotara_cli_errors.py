"""``kotara`` (``python kotara.py``) against wrong inputs, table-driven (issue 30).

Each row: the command line (built in a temporary workspace), the exit code, a pattern the one-line
message on stderr must match, and the stage the run must stop at: ``load`` (before any model is
loaded), ``run`` (models loaded, nothing scored or generated), ``interrupt`` (Ctrl-C while scoring).
Every row also asserts that no traceback escaped and that no file of the workspace changed, appeared
or vanished (every file is hashed before and after). Rows run in-process through
``kotara.cli.main`` (the shim and the console script call nothing else): an exception that escapes
it is what a user would see as a traceback, and is reported as one.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import traceback
from pathlib import Path

import pytest
from test_kotara_support import build_gpt2, build_tokenizer, one_torch_thread, write_corpus  # noqa: F401

from kotara import demo, evaluate, loading, word_generate, word_score
from kotara.cli import main


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Two word-level GPT-2s (64 positions) sharing a tokenizer, two with byte-level BPEs of their own, a text."""
    root = tmp_path_factory.mktemp("kotara_cli_errors")
    text = write_corpus(root / "text.txt", num_lines=12)  # ~120 tokens: windows past 64 positions by default
    tok = build_tokenizer(root / "tok", text)
    paths = {"root": root, "text": text, "a": build_gpt2(root / "a", tok, seed=1), "b": build_gpt2(root / "b", tok, 2)}
    for name, vocab in (("bpe_a", 300), ("bpe_b", 320)):
        bpe = demo.build_bpe_tokenizer(root / f"{name}_tok", text, vocab)
        paths[name] = demo.build_gpt2(root / name, bpe, seed=3)
    truncated = build_gpt2(root / "truncated", tok, seed=4)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    paths["truncated"] = truncated
    garbled = build_gpt2(root / "garbled_tokenizer", tok, seed=5)
    (garbled / "tokenizer.json").write_text('{"not": "a tokenizer"}', encoding="utf-8")
    paths["garbled"] = garbled
    (root / "no_tokenizer").mkdir()
    (root / "prompts.txt").write_text("the model\n", encoding="utf-8")
    (root / "out_dir").mkdir()
    return paths


def _score(w, *more):
    return ["--model", str(w["a"]), "--model", str(w["b"]), "--dataset_path", str(w["text"]), "--no_progress", *more]


def _word_score(w, *more):
    return ["--model", str(w["bpe_a"]), "--model", str(w["bpe_b"]), "--dataset_path", str(w["text"]),
            "--no_progress", *more]  # fmt: skip


def _generate(w, *more):
    return ["generate", "--model", str(w["a"]), "--model", str(w["b"]), "--prompt", "the model", "--no_progress",
            "--max_new_tokens", "2", *more]  # fmt: skip


def _word_generate(w, *more):
    return ["generate", "--model", str(w["bpe_a"]), "--model", str(w["bpe_b"]), "--prompt", "the", "--no_progress",
            "--max_new_tokens", "2", *more]  # fmt: skip


def _sys_out() -> str:  # a directory nobody may create files in, root included (sysfs)
    if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and _can_create("/sys"):
        pytest.skip("no read-only /sys on this machine")
    return "/sys/kotara_out.json"


def _can_create(directory: str) -> bool:
    try:
        Path(directory, ".kotara-test-probe").touch()
    except OSError:
        return False
    Path(directory, ".kotara-test-probe").unlink()
    return True


def _read_only_dir(w) -> str:
    directory = w["root"] / "read_only"
    directory.mkdir(exist_ok=True)
    directory.chmod(0o500)
    if _can_create(str(directory)):
        directory.chmod(0o700)
        pytest.skip("this user writes into read-only directories (root)")
    return str(directory / "out.json")


L64 = ("--max_length", "64", "--stride", "64")  # the tiny models' 64 positions
MAX_LENGTH = r"--max_length 1024: windows of \d+ tokens, but model a \('[^']+'\) has 64 positions; pass --max_length 64"

# name: (argv from the workspace, exit code, message pattern, stage)
ROWS = {
    # §2: every output location is checked before any model is loaded
    "save_metrics is a directory": (
        lambda w: _score(w, *L64, "--save_metrics", str(w["root"] / "out_dir")),
        2, r"--save_metrics '[^']*out_dir' is a directory; give a file name", "load"),
    "save_metrics in read-only sysfs": (lambda w: _score(w, *L64, "--save_metrics", _sys_out()),
                                        2, r"--save_metrics '/sys/kotara_out.json': cannot write into '/sys'", "load"),
    "save_metrics in a read-only dir": (lambda w: _score(w, *L64, "--save_metrics", _read_only_dir(w)),
                                        2, r"--save_metrics '[^']*': cannot write into '[^']*read_only'", "load"),
    "save_metrics under a file": (
        lambda w: _score(w, "--save_metrics", str(w["text"] / "out.json")),
        2, r"--save_metrics '[^']*out.json': '[^']*text.txt' is a file, not a directory", "load"),
    "per word: save_metrics is a directory": (
        lambda w: _word_score(w, *L64, "--save_metrics", str(w["root"] / "out_dir")),
        2, r"--save_metrics '[^']*out_dir' is a directory", "load"),
    "save_outputs is a directory": (lambda w: _generate(w, "--save_outputs", str(w["root"] / "out_dir")),
                                    2, r"--save_outputs '[^']*out_dir' is a directory; give a file name", "load"),
    "save_outputs in read-only sysfs": (lambda w: _generate(w, "--save_outputs", _sys_out()),
                                        2, r"--save_outputs '/sys/kotara_out.json': cannot write into '/sys'", "load"),
    "per word: save_outputs is a directory": (lambda w: _word_generate(w, "--save_outputs", str(w["root"] / "out_dir")),
                                              2, r"--save_outputs '[^']*out_dir' is a directory", "load"),
    "eval output_path in read-only sysfs": (
        lambda w: ["eval", "--model", str(w["a"]), "--model", str(w["b"]), "--tasks", "x", "--output_path", _sys_out()],
        2, r"--output_path '/sys/kotara_out.json': cannot write into '/sys'", "load"),
    # §3: a value that cannot be right is refused before it is used
    "switch_rate 2 per token": (lambda w: _score(w, *L64, "--strategy", "mixture_switch",
                                                 "--switch_rate", "2"),
                                2, r"--switch_rate must be in \[0, 1\], got 2\.0", "load"),
    "switch_rate nan per token, strategy all": (lambda w: _score(w, *L64, "--strategy", "all",
                                                                 "--switch_rate", "nan"),
                                                2, r"--switch_rate must be in \[0, 1\], got nan", "load"),
    "switch_rate -1 per word": (lambda w: _word_score(w, "--switch_rate", "-1"), 2, r"--switch_rate must be in",
                                "load"),
    "temperature nan": (lambda w: _score(w, "--temp", "nan"), 2, r"--temp values must be > 0, got nan", "load"),
    "poe betas all negative": (lambda w: _score(w, "--poe_beta", "-1"), 2, r"--poe_beta values must be finite", "load"),
    # §4: no traceback for what a user did
    "default max_length past 64 positions": (lambda w: _score(w), 2, MAX_LENGTH, "run"),
    "max_length past the positions, per word": (lambda w: _word_score(w, "--max_length", "100", "--stride", "50"),
                                                2, r"--max_length 100: windows of 100 tokens, but model a .* has 64 "
                                                r"positions; pass --max_length 64 or less", "run"),
    "truncated model.safetensors": (
        lambda w: ["--model", str(w["a"]), "--model", str(w["truncated"]), "--dataset_path", str(w["text"]),
                   *L64, "--no_progress"],
        2, r"cannot load model b from '[^']*truncated': .*(incomplete|deserializ|header)", "run"),
    "truncated model.safetensors, generate": (
        lambda w: ["generate", "--model", str(w["a"]), "--model", str(w["truncated"]), "--prompt", "the"],
        2, r"cannot load model b from '[^']*truncated'", "run"),
    "--tokenizer without tokenizer files: the whole message": (
        lambda w: _score(w, "--tokenizer", str(w["root"] / "no_tokenizer")),
        2, r"cannot load a tokenizer from '[^']*no_tokenizer': .*[^:\s]$", "load"),
    "a garbled tokenizer.json": (
        lambda w: ["--model", str(w["a"]), "--model", str(w["garbled"]), "--dataset_path", str(w["text"])],
        2, r"cannot load a tokenizer from '[^']*garbled_tokenizer': \S", "load"),
    "--tokenizer is a text file": (lambda w: _score(w, "--tokenizer", str(w["text"])),
                                   2, r"tokenizer directory not found: '[^']*text.txt'", "load"),
    "Ctrl-C while scoring": (lambda w: _score(w, *L64, "--save_metrics", str(w["root"] / "m.json")),
                             130, r"^kotara: interrupted \(results are written only when a run finishes\)$",
                             "interrupt"),
    "Ctrl-C while scoring per word": (
        lambda w: _word_score(w, *L64, "--save_metrics", str(w["root"] / "m.json")),
        130, r"^kotara: interrupted", "interrupt"),
    "unknown flag": (lambda w: _score(w, "--max_lenght", "64"), 2, r"unrecognized arguments: --max_lenght 64", "load"),
    "seed past 64 bits": (lambda w: _generate(w, "--do_sample", "--seed", str(2**64)), 2,
                          r"--seed must be in \[-2\*\*63, 2\*\*64\), got 18446744073709551616", "load"),
    "no prompt file": (lambda w: _generate(w, "--prompts_file", str(w["root"] / "nope.txt")),
                       2, r"prompts file not found: '[^']*nope.txt'", "load"),
}  # fmt: skip


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and os.access(p, os.R_OK)
    }


@pytest.fixture
def calls(monkeypatch):
    """Counts model loads and runs (scoring, generation); the interrupt rows' scoring raises KeyboardInterrupt."""
    seen = {"load": 0, "run": 0, "interrupt": False}

    def counting(module, name, kind):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen[kind] += 1
            if kind == "run" and seen["interrupt"]:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(loading, "load_model", "load")
    generate = importlib.import_module("kotara.generate")  # the package's ``generate`` is the function
    for module, name in ((evaluate, "evaluate"), (word_score, "score_words"), (generate, "generate"),
                         (word_generate, "generate_words")):  # fmt: skip
        counting(module, name, "run")
    return seen


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) as a user runs it: exit code, stdout, stderr (an escaped exception is a traceback)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:  # noqa: BLE001 - what the user would see
        captured = capsys.readouterr()
        return 1, captured.out, captured.err + traceback.format_exc()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("row", list(ROWS))
def test_wrong_input_one_line_exit_code_no_traceback_files_unchanged(ws, calls, capsys, row):
    make_argv, expected_code, pattern, stage = ROWS[row]
    argv = make_argv(ws)
    calls["interrupt"] = stage == "interrupt"
    before = _snapshot(ws["root"])
    code, out, err = _run(argv, capsys)
    assert "Traceback" not in err + out, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kotara: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert code == expected_code
    assert _snapshot(ws["root"]) == before
    if stage == "load":
        assert calls["load"] == 0 and calls["run"] == 0
    elif stage == "run":
        assert calls["run"] == 0
    else:
        assert calls["run"] == 1
