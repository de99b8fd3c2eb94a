"""``train_moe.py``: a table of bad inputs and damaged run directories, each handled before any step runs.

Each row (``cli_error_table.Row``) builds its case in ``tmp_path``: ``data/`` (a copy of a prepared
directory), ``run/`` (a copy of a finished 2-step run: checkpoints of steps 1 and 2, metrics.jsonl)
and a config. User errors are one line with exit code 2 and leave the named files byte-for-byte as
they were; damaged checkpoints under ``--resume`` / ``--export-only`` fall back to the newest intact
one and say which was skipped and why (exit 0). ``model.cli.main`` runs in this process (fast); one
test runs the real ``python train_moe.py``.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from cli_error_table import Row, params, run_row, tree_hashes

from model.checkpoint import list_checkpoints
from model.cli import main
from model.data import prepare
from model.train_config import config_from_dict
from model.training import train

REPO = Path(__file__).resolve().parents[1]
WORDS = ["expert", "router", "token", "layer", "value", "list", "file", "string"]
VOCAB = 280


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_config(data_dir: Path, out_dir: Path) -> dict:
    return {
        "model": {
            "d_model": 16,
            "n_layers": 1,
            "n_heads": 2,
            "vocab_size": VOCAB,
            "multiple_of": 16,
            "ffn_hidden_multiplier": 2.0,
            "max_seq_len": 8,
            "n_experts": 2,
            "top_k": 1,
        },
        "data_dir": str(data_dir),
        "out_dir": str(out_dir),
        "learning_rate": 1e-3,
        "max_steps": 2,
        "warmup_steps": 1,
        "batch_size": 2,
        "eval_interval": 2,
        "eval_batches": 1,
        "log_interval": 1,
        "save_interval": 1,
        "keep_checkpoints": 3,
        "export_hf": False,
        "wandb_project": None,
        "device": "cpu",
        "dtype": "float32",
    }


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """``data/``: prepared; ``run/``: a finished run of 2 steps (checkpoints of steps 1 and 2)."""
    root = tmp_path_factory.mktemp("template")
    rng = random.Random(0)
    docs = [" ".join(f"The {rng.choice(WORDS)} takes a {rng.choice(WORDS)}." for _ in range(6)) for _ in range(60)]
    prepare(docs, root / "data", vocab_size=VOCAB, val_fraction=0.2, progress=False)
    train(config_from_dict(base_config(root / "data", root / "run")), progress=False)
    assert [p.name for p in list_checkpoints(root / "run")] == ["step_00000001.pt", "step_00000002.pt"]
    return root


@pytest.fixture
def ctx(template: Path, tmp_path: Path) -> SimpleNamespace:
    shutil.copytree(template / "data", tmp_path / "data")
    shutil.copytree(template / "run", tmp_path / "run")
    return SimpleNamespace(tmp=tmp_path)


def _write(ctx, name: str, data: bytes | str) -> Path:
    path = ctx.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _cfg(ctx, *flags: str, out: str = "out", **keys) -> list[str]:
    """argv: a config for ``data/`` and ``out`` (``run`` continues the finished run), then ``flags``."""
    raw = base_config(ctx.tmp / "data", ctx.tmp / out)
    for key, value in keys.items():
        raw[key] = value
    path = ctx.tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return [str(path), "--no-progress", *flags]


def _set(ctx, *assignments: str, out: str = "out", flags: tuple[str, ...] = ()) -> list[str]:
    return _cfg(ctx, *flags, *(a for s in assignments for a in ("--set", s)), out=out)


def _yaml_text(ctx, text: bytes) -> list[str]:
    return [str(_write(ctx, "cfg.yaml", text)), "--no-progress"]


def _base_yaml(ctx) -> str:
    return yaml.safe_dump(base_config(ctx.tmp / "data", ctx.tmp / "out"))


def _meta(ctx, **changes) -> list[str]:
    path = ctx.tmp / "data" / "meta.json"
    meta = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(meta))
    return _cfg(ctx)


def _damage(ctx, step: int, how: str) -> Path:
    path = ctx.tmp / "run" / "checkpoints" / f"step_{step:08d}.pt"
    data = path.read_bytes()
    damaged = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text": b"this is a note, not a checkpoint\n",
    }
    if how == "wrong-structure":
        torch.save({"step": "two", "model": {}}, path)
    elif how == "other-model":
        torch.save({"step": step, "model": {"w": torch.zeros(3)}, "config": {}}, path)
    else:
        path.write_bytes(damaged[how])
    return path


def _resume_after(ctx, step: int, how: str, *flags: str) -> list[str]:
    _damage(ctx, step, how)
    return _set(ctx, "max_steps=3", out="run", flags=("--resume", *flags))


def _resumed_from_step_1(ctx, out: str) -> None:
    assert "resumed from" in out and "step_00000001.pt at step 1" in out, out
    assert [p.name for p in list_checkpoints(ctx.tmp / "run")][-1] == "step_00000003.pt"


def _bad_metrics(ctx) -> list[str]:
    path = ctx.tmp / "run" / "metrics.jsonl"
    lines = path.read_bytes().splitlines()
    lines[1:1] = [b"not json", b"[1, 2]", b'{"step": "x"}', b"\xff\xfe{}"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return _set(ctx, "max_steps=3", out="run", flags=("--resume",))


def _metrics_kept(ctx, out: str) -> None:
    steps = [json.loads(line)["step"] for line in (ctx.tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    rejected = (ctx.tmp / "run" / "metrics.rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in rejected] == ["not json", "[1, 2]", '{"step": "x"}', "\\xff\\xfe{}"]


def _orphan_tmp(ctx) -> list[str]:
    _write(ctx, "run/checkpoints/.step_00000003.pt.k2j4.tmp", b"half a checkpoint")
    return _set(ctx, "max_steps=3", out="run", flags=("--resume",))


def _overwrite(ctx) -> list[str]:
    _write(ctx, "run/NOTES.md", "mine")
    return _set(ctx, "max_steps=1", out="run", flags=("--overwrite",))


def _overwritten(ctx, out: str) -> None:
    run = ctx.tmp / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001.pt"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (run / "NOTES.md").read_text() == "mine"


def _killed_before_first_save(ctx) -> list[str]:
    _write(ctx, "out/metrics.jsonl", '{"step": 0, "val/loss": 5.5}\n')
    return _set(ctx, "max_steps=1")


def _earlier_lines_kept(ctx, out: str) -> None:
    (aside,) = (ctx.tmp / "out").glob("metrics.*.earlier.jsonl")
    assert aside.read_text() == '{"step": 0, "val/loss": 5.5}\n'


def _shard_with_large_id(ctx) -> list[str]:
    shard = ctx.tmp / "data" / "train_00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[5] = 65000
    ids.tofile(shard)
    return _cfg(ctx)


UNCHANGED_RUN = ("run", "data")

ROWS = [
    # issue 30 §3: values that cannot be right
    Row(
        "weight-decay-nan", lambda c: _set(c, "weight_decay=.nan"), 2, r"weight_decay must be a finite number, got nan"
    ),
    Row("learning-rate-inf", lambda c: _set(c, "learning_rate=.inf"), 2, r"learning_rate must be a finite number"),
    Row("grad-clip-nan", lambda c: _set(c, "grad_clip=.nan"), 2, r"grad_clip must be a finite number, got nan"),
    Row("beta2-nan", lambda c: _set(c, "beta2=.nan"), 2, r"beta2 must be a finite number, got nan"),
    Row("min-lr-neg-inf", lambda c: _set(c, "min_lr=-.inf"), 2, r"min_lr must be a finite number, got -inf"),
    Row("seed-negative", lambda c: _set(c, "seed=-1"), 2, r"seed must be an integer in \[0, 2\*\*63\), got -1"),
    Row("seed-too-large", lambda c: _set(c, f"seed={2**64}"), 2, r"seed must be an integer in \[0, 2\*\*63\)"),
    # issue 30 §3-4: the config file itself
    Row(
        "yaml-duplicate-key",
        lambda c: _yaml_text(c, (_base_yaml(c) + "max_steps: 5\n").encode()),
        2,
        r"duplicate key 'max_steps' \(first at line \d+\)",
    ),
    Row(
        "yaml-duplicate-model-key",
        lambda c: _yaml_text(c, _base_yaml(c).replace("model:\n", "model:\n  d_model: 32\n").encode()),
        2,
        r"duplicate key 'd_model' \(first at line \d+\)",
    ),
    Row(
        "config-not-utf8",
        lambda c: _yaml_text(c, b"# caf\xe9\n" + _base_yaml(c).encode()),
        2,
        r"is not UTF-8 text \(byte 0xe9 at offset 5\)",
    ),
    Row("config-is-a-directory", lambda c: [str(c.tmp / "data"), "--no-progress"], 2, r"'.*data' is a directory"),
    # issue 30 §2, §4: paths of the wrong kind, found before any model is built
    Row(
        "data-dir-is-a-file",
        lambda c: _cfg(c, data_dir=str(_write(c, "d.bin", "x"))),
        2,
        r"data_dir '.*d\.bin' is a file",
    ),
    Row(
        "data-dir-not-prepared", lambda c: _cfg(c, data_dir=str(c.tmp / "run")), 2, r"is not prepared \(no meta\.json\)"
    ),
    Row("out-dir-is-a-file", lambda c: _set(c, out=_write(c, "o.txt", "x").name), 2, r"out_dir '.*o\.txt' is a file"),
    Row(
        "out-dir-below-a-file",
        lambda c: _set(c, out=f"{_write(c, 'p.txt', 'x').name}/sub"),
        2,
        r"out_dir '.*p\.txt/sub' cannot be created: a part of the path is a file",
        unchanged=("p.txt",),
    ),
    Row(
        "out-dir-not-creatable",
        lambda c: _set(c, out="/sys/lunaris_run"),
        2,
        r"out_dir '/sys/lunaris_run' cannot be created",
    ),
    Row(
        "out-dir-read-only",
        lambda c: (_write(c, "ro/keep.txt", "x").parent.chmod(0o500), _set(c, out="ro"))[1],
        2,
        r"out_dir '.*ro' is not writable",
        needs_non_root=True,
    ),
    Row(
        "checkpoints-is-a-file",
        lambda c: (_write(c, "out/checkpoints", "x"), _set(c))[1],
        2,
        r"out_dir/checkpoints '.*checkpoints' is a file",
        unchanged=("out",),
    ),
    Row(
        "metrics-is-a-directory",
        lambda c: ((c.tmp / "out" / "metrics.jsonl").mkdir(parents=True), _set(c))[1],
        2,
        r"metrics\.jsonl' is a directory",
    ),
    Row(
        "hf-is-a-file",
        lambda c: (_write(c, "out/hf", "x"), _set(c, "export_hf=true"))[1],
        2,
        r"out_dir/hf '.*hf' is a file",
        unchanged=("out",),
    ),
    # issue 30 §4: a prepared directory that is malformed
    Row(
        "meta-vocab-not-int",
        lambda c: _meta(c, vocab_size="abc"),
        2,
        r"'vocab_size' must be an integer >= 1, got 'abc'",
    ),
    Row(
        "meta-dtype-unknown",
        lambda c: _meta(c, dtype="float7"),
        2,
        r"'dtype' must be \"uint16\" or \"uint32\", got 'float7'",
    ),
    Row(
        "meta-shards-not-list",
        lambda c: _meta(c, val_shards="val_00000.bin"),
        2,
        r"'val_shards' must be a list of shards",
    ),
    Row("meta-shard-no-file", lambda c: _meta(c, train_shards=[{"name": "x"}]), 2, r"train_shards\[0\] must be"),
    Row("meta-shard-escapes", lambda c: _meta(c, train_shards=[{"file": "../x.bin"}]), 2, r"train_shards\[0\] must be"),
    Row(
        "meta-not-an-object",
        lambda c: (_write(c, "data/meta.json", "[1, 2]"), _cfg(c))[1],
        2,
        r"must hold a JSON object, got list",
    ),
    Row("meta-not-utf8", lambda c: (_write(c, "data/meta.json", b'{"a": "\xff"}'), _cfg(c))[1], 2, r"is not UTF-8"),
    Row("shard-token-id-beyond-vocab", _shard_with_large_id, 2, r"holds token id 65000 >= vocab_size 280"),
    # issue 30 §1: another run's out_dir is not overwritten, nor pruned, unless asked
    Row(
        "fresh-run-into-finished-run",
        lambda c: _set(c, out="run"),
        2,
        r"'.*run' holds another run's checkpoints \(up to step_00000002\.pt\): continue that run with --resume",
        unchanged=UNCHANGED_RUN,
    ),
    Row(
        "fresh-run-into-an-export",
        lambda c: (_write(c, "exp/hf/config.json", "{}"), _set(c, out="exp"))[1],
        2,
        r"holds another run's Hugging Face export \(hf/\)",
        unchanged=("exp",),
    ),
    Row("overwrite-clears-the-run", _overwrite, 0, r"--overwrite: deleted the earlier run", check=_overwritten),
    Row(
        "overwrite-with-resume",
        lambda c: _set(c, out="run", flags=("--overwrite", "--resume")),
        2,
        r"--overwrite starts a fresh run",
        unchanged=UNCHANGED_RUN,
    ),
    # issue 30 §3: a resume that is not the checkpointed run
    Row(
        "resume-max-steps-below-checkpoint",
        lambda c: _set(c, "max_steps=1", out="run", flags=("--resume",)),
        2,
        r"step_00000002\.pt: it is at step 2, beyond max_steps=1",
        unchanged=UNCHANGED_RUN,
    ),
    Row(
        "resume-seed-changed",
        lambda c: _set(c, "max_steps=3", "seed=7", out="run", flags=("--resume",)),
        2,
        r"this run changes seed 1337 -> 7; .* --allow-config-change",
        unchanged=UNCHANGED_RUN,
    ),
    Row(
        "resume-batch-size-changed",
        lambda c: _set(c, "max_steps=3", "batch_size=3", out="run", flags=("--resume",)),
        2,
        r"changes batch_size 2 -> 3",
        unchanged=UNCHANGED_RUN,
    ),
    Row(
        "resume-lr-and-decay-changed",
        lambda c: _set(c, "max_steps=3", "learning_rate=2e-3", "weight_decay=0", out="run", flags=("--resume",)),
        2,
        r"changes learning_rate 0\.001 -> 0\.002, weight_decay 0\.1 -> 0\.0",
        unchanged=UNCHANGED_RUN,
    ),
    Row(
        "resume-allow-config-change",
        lambda c: _set(c, "max_steps=3", "seed=7", out="run", flags=("--resume", "--allow-config-change")),
        0,
        r"WARNING: --allow-config-change: resuming .*step_00000002\.pt with seed 1337 -> 7",
    ),
    Row(
        "allow-config-change-without-resume",
        lambda c: _set(c, flags=("--allow-config-change",)),
        2,
        r"--allow-config-change only applies with --resume",
    ),
    # issue 30 §4: damaged checkpoints: the newest intact one is used, the skipped ones are named
    Row(
        "resume-newest-truncated",
        lambda c: _resume_after(c, 2, "truncated"),
        0,
        r"skipped a damaged checkpoint: checkpoint '.*step_00000002\.pt' cannot be loaded: the file is truncated",
        check=_resumed_from_step_1,
    ),
    Row(
        "resume-newest-empty",
        lambda c: _resume_after(c, 2, "empty"),
        0,
        r"step_00000002\.pt' cannot be loaded: the file is empty \(0 bytes\)",
        check=_resumed_from_step_1,
    ),
    Row(
        "resume-newest-random-bytes",
        lambda c: _resume_after(c, 2, "random"),
        0,
        r"step_00000002\.pt' cannot be loaded: it is not a torch checkpoint \(4096 bytes starting",
        check=_resumed_from_step_1,
    ),
    Row(
        "resume-newest-wrong-structure",
        lambda c: _resume_after(c, 2, "wrong-structure"),
        0,
        r"step_00000002\.pt' is not a checkpoint of this trainer: 'step' must be an integer >= 0, got 'two'",
        check=_resumed_from_step_1,
    ),
    Row(
        "resume-newest-other-weights",
        lambda c: _resume_after(c, 2, "other-model"),
        0,
        r"step_00000002\.pt' does not fit this run's model: \d+ key\(s\) missing \(first 'tok_embeddings\.weight'\); "
        r"1 unexpected key\(s\) \(first 'w'\)",
        check=_resumed_from_step_1,
    ),
    Row(
        "resume-all-damaged",
        lambda c: (_damage(c, 1, "text"), _resume_after(c, 2, "empty"))[1],
        2,
        r"no intact checkpoint in '.*checkpoints': .*the file is empty .*step_00000001\.pt' cannot be loaded: "
        r"it is a text file \(33 bytes, starts with 'this is a note, not a ch'\)",
    ),
    Row(
        "export-only-newest-damaged",
        lambda c: (_damage(c, 2, "text"), _set(c, out="run", flags=("--export-only",)))[1],
        0,
        r"exported .*step_00000001\.pt to",
    ),
    Row(
        "export-only-all-damaged",
        lambda c: (_damage(c, 1, "random"), _damage(c, 2, "empty"), _set(c, out="run", flags=("--export-only",)))[2],
        2,
        r"--export-only: no intact checkpoint: .*the file is empty",
        unchanged=UNCHANGED_RUN,
    ),
    # issue 30 §1, §4: metrics and temporaries of earlier segments
    Row(
        "resume-metrics-bad-lines",
        _bad_metrics,
        0,
        r"4 malformed line\(s\) \(line 2, 3, 4, 5\) set aside in .*metrics\.rejected\.jsonl",
        check=_metrics_kept,
    ),
    Row(
        "fresh-run-after-a-start-killed-before-its-first-save",
        _killed_before_first_save,
        0,
        r"metrics\.jsonl held lines of an earlier start; moved to .*metrics\.\d{8}-\d{6}\.earlier\.jsonl",
        check=_earlier_lines_kept,
    ),
    Row(
        "resume-removes-orphan-temporary",
        _orphan_tmp,
        0,
        r"removed 1 temporary file\(s\) of an interrupted checkpoint save: \.step_00000003\.pt\.k2j4\.tmp",
        check=lambda c, out: not list((c.tmp / "run" / "checkpoints").glob("*.tmp")) or pytest.fail("tmp left"),
    ),
]


@pytest.mark.parametrize("row", params(ROWS))
def test_train_bad_input(row: Row, ctx, capsys):
    try:
        run_row(row, ctx, main, capsys)
    finally:
        for path in (ctx.tmp / "ro", ctx.tmp / "out"):
            if path.exists():
                path.chmod(0o700)


@pytest.mark.slow  # a subprocess: the imports alone take ~8 s
def test_the_real_entry_point(template: Path, tmp_path: Path):
    """One row through ``python train_moe.py``: a NaN hyperparameter, exit 2, one line, nothing written."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(template / "data", tmp_path / "out")))
    before = tree_hashes(template / "run")
    result = subprocess.run(
        [sys.executable, "train_moe.py", str(cfg), "--set", "weight_decay=.nan"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: weight_decay must be a finite number, got nan"]
    assert not (tmp_path / "out").exists() and tree_hashes(template / "run") == before
