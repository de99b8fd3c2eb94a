"""``python -m model.data prepare``: a table of bad inputs, each a one-line error that leaves existing data as it was.

Each row (``cli_error_table.Row``) builds its bad input in ``tmp_path`` beside a copy of a prepared
data directory (``data/``) and says the exit code, the message's pattern and the files that must
not change. The rows of issue 30 §1 (a prepared directory deleted by an error found after the
deletion) are the first ones; the others are their siblings.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_error_table import Row, params, run_row

from model.data import main, prepare

REPO = Path(__file__).resolve().parents[1]
WORDS = ["expert", "router", "token", "layer", "value", "list", "file", "string", "model", "loss"]


def _documents(n: int = 40) -> list[str]:
    rng = random.Random(0)
    return [" ".join(f"The {rng.choice(WORDS)} takes a {rng.choice(WORDS)}." for _ in range(6)) for _ in range(n)]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A prepared data directory (copied into every row) and a folder of input documents beside it."""
    root = tmp_path_factory.mktemp("prepared")
    docs = root / "docs"
    docs.mkdir()
    for i, text in enumerate(_documents()):
        (docs / f"doc{i:02d}.txt").write_text(text)
    prepare(_documents(), root / "data", vocab_size=300, val_fraction=0.3, progress=False)
    return root


@pytest.fixture
def ctx(template: Path, tmp_path: Path) -> SimpleNamespace:
    shutil.copytree(template / "data", tmp_path / "data")
    shutil.copytree(template / "docs", tmp_path / "docs")
    return SimpleNamespace(tmp=tmp_path)


def _prep(ctx, *extra: str, inputs: tuple[str, ...] = ("docs",), out: str = "data") -> list[str]:
    return [
        "prepare",
        "--input",
        *(str(ctx.tmp / i) for i in inputs),
        "--out",
        str(ctx.tmp / out),
        "--no-progress",
        *extra,
    ]


def _write(ctx, name: str, data: bytes | str) -> Path:
    path = ctx.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _no_leftovers(ctx, out: str) -> None:
    """No temporary directory of the failed prepare stays beside the data directory."""
    assert not [p.name for p in ctx.tmp.iterdir() if p.name.startswith(".")], list(ctx.tmp.iterdir())


def _one_doc(ctx) -> list[str]:
    _write(ctx, "one/only.txt", "A single document cannot fill both the train and the val split.")
    return _prep(ctx, "--vocab-size", "300", inputs=("one",))


def _replaced_keeping_notes(ctx) -> list[str]:
    _write(ctx, "data/NOTES.md", "my notes about this data")
    return _prep(ctx, "--vocab-size", "280")


def _check_replaced(ctx, out: str) -> None:
    meta = json.loads((ctx.tmp / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 280  # the new preparation is in place
    assert (ctx.tmp / "data" / "NOTES.md").read_text() == "my notes about this data"  # a user's file stays
    _no_leftovers(ctx, out)


ROWS = [
    # issue 30 §1: the error came after the prepared directory was deleted
    Row(
        "vocab-too-small-into-prepared",
        lambda c: _prep(c, "--vocab-size", "100"),
        2,
        r"--vocab-size must be >= 257 .*, got 100$",
        unchanged=("data",),
    ),
    Row(
        "vocab-zero-into-prepared",
        lambda c: _prep(c, "--vocab-size", "0"),
        2,
        r"--vocab-size must be >= 257 .*, got 0$",
        unchanged=("data",),
    ),
    Row("one-document-val-split-empty", _one_doc, 2, r"split is empty", unchanged=("data",), check=_no_leftovers),
    Row(
        "tokenizer-is-a-file",
        lambda c: _prep(c, "--tokenizer", str(_write(c, "tok.json", "{}"))),
        2,
        r"--tokenizer '.*tok\.json' is not a directory",
        unchanged=("data",),
    ),
    Row(
        "tokenizer-dir-not-a-tokenizer",
        lambda c: _prep(c, "--tokenizer", str(c.tmp / "docs")),
        2,
        r"cannot load a tokenizer from '.*docs'",
        unchanged=("data", "docs"),
        check=_no_leftovers,
    ),
    # paths of the wrong kind
    Row(
        "out-is-a-file",
        lambda c: _prep(c, "--vocab-size", "300", out=_write(c, "f.txt", "x").name),
        2,
        r"--out '.*f\.txt' is a file",
        unchanged=("f.txt",),
    ),
    Row(
        "out-below-a-file",
        lambda c: _prep(c, "--vocab-size", "300", out=f"{_write(c, 'g.txt', 'x').name}/sub"),
        2,
        r"'.*g\.txt' is a file, not a directory",
        unchanged=("g.txt",),
    ),
    Row(
        "out-not-writable",
        lambda c: _prep(c, "--vocab-size", "300", out="/sys/lunaris_data"),
        2,
        r"cannot be created|not writable",
    ),
    Row(
        "out-read-only",
        lambda c: (_chmod(c.tmp / "data", 0o500), _prep(c, "--vocab-size", "300"))[1],
        2,
        r"data directory '.*data' is not writable",
        needs_non_root=True,
    ),
    # inputs that are not text
    Row(
        "input-not-utf8",
        lambda c: _prep(c, "--vocab-size", "300", inputs=(_write(c, "l1.txt", b"caf\xe9 " * 50).name,)),
        2,
        r"'.*l1\.txt' is not UTF-8 text \(byte 0xe9 at offset 3\)",
        unchanged=("data",),
    ),
    Row(
        "input-binary-nul",
        lambda c: _prep(c, "--vocab-size", "300", inputs=(_write(c, "b.txt", b"ab\x00cd" * 9).name,)),
        2,
        r"'.*b\.txt' holds NUL bytes",
        unchanged=("data",),
    ),
    Row(
        "input-empty-into-prepared",
        lambda c: _prep(c, "--vocab-size", "300", inputs=(_write(c, "e.txt", " \n").name,)),
        2,
        r"every input is empty",
        unchanged=("data",),
    ),
    Row(
        "input-missing",
        lambda c: _prep(c, "--vocab-size", "300", inputs=("nope.txt",)),
        2,
        r"input '.*nope\.txt' not found",
        unchanged=("data",),
    ),
    Row(
        "input-dir-without-text",
        lambda c: _prep(c, "--vocab-size", "300", inputs=(_write(c, "bin/x.bin", b"1").parent.name,)),
        2,
        r"no text files .* in directory '.*bin'",
        unchanged=("data",),
    ),
    # numbers that cannot be right
    Row(
        "val-fraction-nan",
        lambda c: _prep(c, "--vocab-size", "300", "--val-fraction", "nan"),
        2,
        r"--val-fraction must be in \(0, 1\), got nan",
        unchanged=("data",),
    ),
    Row(
        "val-fraction-one",
        lambda c: _prep(c, "--vocab-size", "300", "--val-fraction", "1"),
        2,
        r"--val-fraction must be in \(0, 1\), got 1",
        unchanged=("data",),
    ),
    Row(
        "shard-tokens-zero",
        lambda c: _prep(c, "--vocab-size", "300", "--shard-tokens", "0"),
        2,
        r"--shard-tokens must be > 0, got 0",
        unchanged=("data",),
    ),
    Row(
        "vocab-not-a-number",
        lambda c: _prep(c, "--vocab-size", "many"),
        2,
        r"invalid int value: 'many'",
        one_line=False,
        unchanged=("data",),
    ),
    # a good re-preparation replaces only the prepared files, after it is complete
    Row("re-prepare-keeps-user-files", _replaced_keeping_notes, 0, r"prepared .*: vocab 280", check=_check_replaced),
]


def _chmod(path: Path, mode: int) -> None:
    path.chmod(mode)


@pytest.mark.parametrize("row", params(ROWS))
def test_prepare_bad_input(row: Row, ctx, capsys):
    try:
        run_row(row, ctx, main, capsys)
    finally:
        (ctx.tmp / "data").chmod(0o700)


@pytest.mark.slow  # a subprocess: the imports alone take ~8 s
def test_the_real_entry_point(template: Path, tmp_path: Path):
    """One row through ``python -m model.data``: exit 2, one line, no traceback, the data unchanged."""
    from cli_error_table import tree_hashes

    shutil.copytree(template / "data", tmp_path / "data")
    before = tree_hashes(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "model.data", "prepare", "--input", str(template / "docs"), "--out",
         str(tmp_path / "data"), "--vocab-size", "100"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --vocab-size must be >= 257 (256 bytes + <|endoftext|>), got 100"
    ]
    assert tree_hashes(tmp_path / "data") == before
