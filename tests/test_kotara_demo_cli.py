"""``python -m kotara.demo`` against wrong inputs, table-driven (issue 30), and the command it prints.

Each row: the arguments (in a temporary directory), the exit code, a pattern the one-line message on
stderr must match; no traceback, nothing built, no file of the directory changed. Then the demo at a
tiny size and the ``kotara.py`` command it prints, run as printed (issue 30 §4: the printed
``--max_length`` used to be 1024 whatever ``--n_positions`` was).
"""

from __future__ import annotations

import hashlib
import re
import shlex
import traceback
from pathlib import Path

import pytest
from test_kotara_support import one_torch_thread  # noqa: F401

from kotara import demo
from kotara.cli import main as kotara_main

TINY = ["--vocab", "40", "--words", "120", "--n_layer", "1", "--n_embd", "8", "--n_head", "2", "--n_positions", "32"]

# name: (arguments after OUT_DIR, or the whole argv when a callable of the workspace; exit code, message pattern)
ROWS = {
    "heads do not split the width": (["--n_embd", "30", "--n_head", "4"], 2,
                                     r"--n_embd 30 must be a multiple of --n_head 4"),
    "no layers": (["--n_layer", "0"], 2, r"--n_layer must be >= 1, got 0"),
    "no heads": (["--n_head", "0"], 2, r"--n_head must be >= 1, got 0"),
    "no words": (["--words", "0"], 2, r"--words must be >= 1, got 0"),
    "negative positions": (["--n_positions", "-5"], 2, r"--n_positions must be >= 1, got -5"),
    "vocabulary of the special tokens only": (["--vocab", "4"], 2, r"--vocab must be > 4, got 4"),
    "not a number": (["--n_embd", "wide"], 2, r"argument --n_embd: invalid int value: 'wide'"),
    "unknown tokenizer kind": (["--tokenizer", "char"], 2, r"argument --tokenizer: invalid choice: 'char'"),
    "out_dir is a file": (lambda w: [str(w / "file.txt"), *TINY], 2, r"out_dir '[^']*file.txt' exists and is not a"),
    "out_dir under a file": (lambda w: [str(w / "file.txt" / "demo"), *TINY], 2, r"file.txt"),
}  # fmt: skip


def _snapshot(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _run(fn, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = fn(argv)
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:  # noqa: BLE001 - what the user would see
        captured = capsys.readouterr()
        return 1, captured.out, captured.err + traceback.format_exc()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("row", list(ROWS))
def test_demo_wrong_input_one_line_exit_2_nothing_built(tmp_path, capsys, row):
    (tmp_path / "file.txt").write_text("a file\n", encoding="utf-8")
    args, expected_code, pattern = ROWS[row]
    argv = args(tmp_path) if callable(args) else [str(tmp_path / "demo"), *TINY, *args]
    before = _snapshot(tmp_path)
    code, out, err = _run(demo.main, argv, capsys)
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("python -m kotara.demo: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert code == expected_code
    assert _snapshot(tmp_path) == before and not (tmp_path / "demo").exists()


@pytest.mark.slow  # builds two models and scores with --strategy all: 567 s on the VM at load 25, est. ~45 s idle
def test_the_command_the_demo_prints_runs(tmp_path, capsys):
    """The demo at 32 positions, then its printed ``python kotara.py ...`` command, exactly as printed."""
    code, out, err = _run(demo.main, [str(tmp_path / "demo"), *TINY], capsys)
    assert code == 0, err
    command = shlex.split(out.splitlines()[-1])
    assert command[:2] == ["python", "kotara.py"] and "--max_length" in command
    assert command[command.index("--max_length") + 1] == "32"
    code, out, err = _run(kotara_main, command[2:] + ["--no_progress"], capsys)
    assert "Traceback" not in err and code == 0, err
    assert "fused entropy" in out and "fused mixture_switch" in out
