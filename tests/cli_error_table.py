"""The harness of the table-driven CLI error tests (``test_model_*_errors.py``), one row per bad input.

A row builds its bad input in a temporary directory, runs the CLI's ``main`` in this process (argparse's
``SystemExit`` caught), and checks: the exit code; that stderr's last line matches the row's pattern;
for a user error (exit 2) that stderr is that one line; that no output holds "Traceback"; and that the
files the row names are byte-for-byte what they were before (sha256 of every file under them).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


@dataclass
class Row:
    """One bad input. ``build(ctx)`` makes it under ``ctx.tmp`` and returns the CLI's argv.

    ``pattern``: a regex that stderr's last line must match (``re.search``); for exit code 0 it is
    searched in stdout + stderr instead. ``unchanged``: paths (relative to ``ctx.tmp``) whose files
    must not change. ``check(ctx, out)``: more assertions after the run.
    ``one_line=False``: argparse's own errors, which print the usage before their one ``error:`` line.
    """

    id: str
    build: Callable[[Any], list[str]]
    code: int
    pattern: str
    unchanged: tuple[str, ...] = ()
    check: Callable[[Any, str], None] | None = None
    needs_non_root: bool = False
    one_line: bool = True  # False for argparse's own errors (its usage, then one "error:" line)
    marks: tuple = field(default_factory=tuple)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself), keyed by relative path; {} when missing."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_row(row: Row, ctx: Any, main: Callable[[list[str]], int], capsys) -> str:
    """Run ``row`` against ``main``; returns stdout + stderr (for the row's own checks)."""
    if row.needs_non_root and hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root ignores file permissions: a read-only directory cannot be made here")
    argv = [str(a) for a in row.build(ctx)]
    before = {name: tree_hashes(ctx.tmp / name) for name in row.unchanged}
    for name, hashes in before.items():
        assert hashes, f"row {row.id}: {name} must exist before the run (nothing to compare)"
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    both = out + err
    assert "Traceback" not in both, both
    assert code == row.code, f"row {row.id}: exit code {code}, expected {row.code}\n{both}"
    if row.code == 0:
        assert re.search(row.pattern, both), f"row {row.id}: /{row.pattern}/ not in the output:\n{both}"
    else:
        lines = err.strip().splitlines()
        assert lines, f"row {row.id}: nothing on stderr"
        if row.code == 2 and row.one_line:
            assert len(lines) == 1 and lines[0].startswith("error: "), f"row {row.id}: not one line:\n{err}"
        assert re.search(row.pattern, lines[-1]), f"row {row.id}: /{row.pattern}/ does not match:\n{lines[-1]}"
    for name, hashes in before.items():
        assert tree_hashes(ctx.tmp / name) == hashes, f"row {row.id}: {name} changed"
    if row.check is not None:
        row.check(ctx, both)
    return both


def params(rows: list[Row]) -> list:
    """``pytest.param`` per row, with its id (for ``@pytest.mark.parametrize("row", params(ROWS))``)."""
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    return [pytest.param(r, id=r.id, marks=r.marks) for r in rows]
