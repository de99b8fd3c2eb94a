"""``python -m model.convert_original``: a table of bad checkpoints, configs and ``--out`` paths, each a one-line error.

Each row (``cli_error_table.Row``) builds its case in ``tmp_path`` next to ``orig.pt``, a checkpoint
of the original code's layout (``test_model_convert_original.OriginalLM``, with its config). A bad
input is one line with exit code 2, found before anything is written, and names the file and what
it is; the files a row names stay byte-for-byte as they were.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from cli_error_table import Row, params, run_row
from test_model_convert_original import OriginalLM, original_config

from model.convert_original import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("original")
    torch.manual_seed(5)
    cfg = original_config(moc=True, gqa=True)
    model = OriginalLM(cfg)
    torch.save({"model": model.state_dict(), "config": {"model": cfg}, "step": 10}, root / "orig.pt")
    torch.save(model.state_dict(), root / "raw.pt")
    (root / "orig.yaml").write_text(yaml.safe_dump({"model": cfg}))
    return root


@pytest.fixture
def ctx(template: Path, tmp_path: Path) -> SimpleNamespace:
    for name in ("orig.pt", "raw.pt", "orig.yaml"):
        shutil.copy(template / name, tmp_path / name)
    return SimpleNamespace(tmp=tmp_path)


def _write(ctx, name: str, data: bytes | str) -> Path:
    path = ctx.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _conv(ctx, ckpt: str = "orig.pt", out: str = "out", *extra: str) -> list[str]:
    return [str(ctx.tmp / ckpt), "--out", str(ctx.tmp / out), *extra]


def _truncated(ctx) -> list[str]:
    data = (ctx.tmp / "orig.pt").read_bytes()
    _write(ctx, "cut.pt", data[: len(data) // 2])
    return _conv(ctx, "cut.pt")


def _poisoned(ctx, value: float) -> list[str]:
    ckpt = torch.load(ctx.tmp / "orig.pt", weights_only=False)
    key = "transformer.h.1.feed_forward.experts.2.w1.weight"
    ckpt["model"][key][3, 4] = value
    torch.save(ckpt, ctx.tmp / "bad.pt")
    return _conv(ctx, "bad.pt")


def _raw_with_config(ctx, text: bytes) -> list[str]:
    return _conv(ctx, "raw.pt", "out", "--config", str(_write(ctx, "c.yaml", text)))


def _dup_yaml(ctx) -> bytes:
    text = (ctx.tmp / "orig.yaml").read_text()
    return text.replace("model:\n", "model:\n  n_layers: 2\n").encode()  # same value twice: silently fine before


def _converted_once(ctx) -> list[str]:
    assert main(_conv(ctx)) == 0
    return _conv(ctx)


RANDOM = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()

ROWS = [
    # issue 30 §4: a file that is not a checkpoint says what it is, and is named
    Row(
        "ckpt-text-file",
        lambda c: _conv(c, _write(c, "note.pt", "hello, this is not a model\n").name),
        2,
        r"'.*note\.pt' is not a readable torch checkpoint: it is a text file \(27 bytes, starts with 'hello, this",
    ),
    Row(
        "ckpt-empty",
        lambda c: _conv(c, _write(c, "e.pt", b"").name),
        2,
        r"'.*e\.pt' is not a readable torch checkpoint: the file is empty \(0 bytes\)",
    ),
    Row(
        "ckpt-random-bytes",
        lambda c: _conv(c, _write(c, "r.pt", RANDOM).name),
        2,
        r"'.*r\.pt' is not a readable torch checkpoint: it is not a torch checkpoint \(4096 bytes starting [0-9a-f ]",
    ),
    Row("ckpt-truncated", _truncated, 2, r"'.*cut\.pt' is not a readable torch checkpoint: the file is truncated"),
    Row(
        "ckpt-is-a-directory",
        lambda c: (_write(c, "d.pt/x", "1"), _conv(c, "d.pt"))[1],
        2,
        r"checkpoint '.*d\.pt' is a directory",
    ),
    Row("ckpt-missing", lambda c: _conv(c, "nope.pt"), 2, r"checkpoint '.*nope\.pt' not found"),
    Row(
        "ckpt-a-list",
        lambda c: (torch.save([1, 2], c.tmp / "l.pt"), _conv(c, "l.pt"))[1],
        2,
        r"'.*l\.pt' holds a list, not a state dict",
    ),
    # issue 30 §3: never write a checkpoint or export whose weights are not all finite
    Row(
        "weights-nan",
        lambda c: _poisoned(c, float("nan")),
        2,
        r"'.*bad\.pt' holds NaN/inf weights \(in our 'layers\.1\.ffn\.w13'\): nothing was written",
    ),
    Row("weights-inf", lambda c: _poisoned(c, float("-inf")), 2, r"holds NaN/inf weights"),
    # issue 30 §2, §4: --out of the wrong kind, found before the checkpoint is read
    Row(
        "out-is-a-file",
        lambda c: _conv(c, "orig.pt", _write(c, "o.txt", "x").name),
        2,
        r"--out '.*o\.txt' is a file",
        unchanged=("o.txt",),
    ),
    Row(
        "out-below-a-file",
        lambda c: _conv(c, "orig.pt", f"{_write(c, 'p.txt', 'x').name}/sub"),
        2,
        r"--out '.*p\.txt/sub' cannot be created: '.*p\.txt' is a file",
        unchanged=("p.txt",),
    ),
    Row(
        "out-not-writable",
        lambda c: _conv(c, "orig.pt", "/sys/lunaris_conv"),
        2,
        r"--out '/sys/lunaris_conv'.* is not writable",
    ),
    Row(
        "out-read-only",
        lambda c: (_write(c, "ro/keep", "x").parent.chmod(0o500), _conv(c, "orig.pt", "ro"))[1],
        2,
        r"--out '.*ro' is not writable",
        needs_non_root=True,
    ),
    Row(
        "out-checkpoints-is-a-file",
        lambda c: (_write(c, "out/checkpoints", "x"), _conv(c))[1],
        2,
        r"'checkpoints' there is a file",
        unchanged=("out",),
    ),
    Row(
        "out-hf-is-a-file",
        lambda c: (_write(c, "out/hf", "x"), _conv(c))[1],
        2,
        r"'hf' there is a file",
        unchanged=("out",),
    ),
    Row("out-already-converted", _converted_once, 2, r"already holds checkpoints", unchanged=("out",)),
    # issue 30 §3-4: the --config file
    Row(
        "config-not-utf8",
        lambda c: _raw_with_config(c, b"# caf\xe9\n" + (c.tmp / "orig.yaml").read_bytes()),
        2,
        r"config file '.*c\.yaml' is not UTF-8 text \(byte 0xe9 at offset 5\)",
    ),
    Row(
        "config-duplicate-key",
        lambda c: _raw_with_config(c, _dup_yaml(c)),
        2,
        r"duplicate key 'n_layers' \(first at line 2\)",
    ),
    Row(
        "config-is-a-directory",
        lambda c: _conv(c, "raw.pt", "out", "--config", str(c.tmp)),
        2,
        r"config file '.*' is a directory",
    ),
]


@pytest.mark.parametrize("row", params(ROWS))
def test_convert_bad_input(row: Row, ctx, capsys):
    try:
        run_row(row, ctx, main, capsys)
    finally:
        if (ctx.tmp / "ro").exists():
            (ctx.tmp / "ro").chmod(0o700)


@pytest.mark.slow  # a subprocess: the imports alone take ~8 s
def test_the_real_entry_point(tmp_path: Path):
    """One row through ``python -m model.convert_original``: a text file, named and described, no traceback."""
    (tmp_path / "note.pt").write_text("hello, this is not a model\n")
    result = subprocess.run(
        [sys.executable, "-m", "model.convert_original", str(tmp_path / "note.pt"), "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {str(tmp_path / 'note.pt')!r} is not a readable torch checkpoint: it is a text file "
        "(27 bytes, starts with 'hello, this is not a mod'), not a torch checkpoint"
    ]
    assert not (tmp_path / "o").exists()
