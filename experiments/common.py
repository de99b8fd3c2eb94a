"""What both claims share: paths, the user-error type, the stdlib corpus, statistics, and training runs
that an interrupted experiment can reuse (``--reuse``)."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "cpu.yaml"
SMOKE_CONFIG = CONFIG_DIR / "smoke.yaml"


class ExperimentError(ValueError):
    """A user error in the experiment config or command line: one line, exit code 2."""


def log(message: str) -> None:
    print(f"[experiments {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# Corpus: the embedded stdlib docstrings, grouped by top-level module


def stdlib_modules(names: set[str] | None = None) -> list[tuple[str, str, list[str]]]:
    """``(relative path, top-level module, docstrings)`` of every stdlib file (or those under ``names``).

    Uses ``model.corpus``'s file list and docstring extraction, so one document per module joined by
    blank lines is exactly a document of ``model.corpus.stdlib_documents`` (without its size cap).
    """
    from model.corpus import file_docstrings, stdlib_dir, stdlib_files

    root = stdlib_dir()
    out = []
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        top = rel.split("/")[0].removesuffix(".py")
        if names is not None and top not in names:
            continue
        docs = list(file_docstrings(path))
        if docs:
            out.append((rel, top, docs))
    return out


def documents_of(modules: list[tuple[str, str, list[str]]], unit: str) -> list[str]:
    """One document per module (docstrings joined by blank lines) or one per docstring."""
    if unit == "module":
        return ["\n\n".join(docs) for _, _, docs in modules]
    return [doc for _, _, docs in modules for doc in docs]


def _hash_fraction(text: str) -> float:
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64


def split_held_out(modules: list, fraction: float) -> tuple[list, list]:
    """(train, test) modules; a module is held out when a hash of its path is below ``fraction``.

    Deterministic and independent of file order; at least one module on each side.
    """
    if len(modules) < 2:
        raise ExperimentError(f"a domain needs at least 2 modules with docstrings to hold one out, got {len(modules)}")
    test = [m for m in modules if _hash_fraction(m[0]) < fraction]
    if not test:  # the lowest hash goes to test
        test = [min(modules, key=lambda m: _hash_fraction(m[0]))]
    if len(test) == len(modules):
        test = test[:-1]
    train = [m for m in modules if m not in test]
    return train, test


# --------------------------------------------------------------------------------------------------
# Statistics and helpers


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def eval_batches_for(meta: dict[str, Any], batch_size: int, seq_len: int, cap: int | None) -> int:
    """Validation batches that cover the val split once with non-overlapping windows (at least 1)."""
    n = max(1, int(meta["val_tokens"]) // (batch_size * seq_len))
    return min(n, cap) if cap else n


def environment() -> dict[str, Any]:
    """Machine and versions, for the report."""
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "tokenizers", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    commit, dirty = "unknown", None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": commit,
        "git_tracked_changes": dirty,
    }


def _documents_sha256(documents: list[str]) -> str:
    """The ``corpus_sha256`` that ``model.data.prepare`` records for these documents."""
    h = hashlib.sha256()
    for doc in documents:
        h.update(doc.encode("utf-8"))
    return h.hexdigest()


def reusable_data(data_dir: Path, documents: list[str]) -> bool:
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return meta.get("corpus_sha256") == _documents_sha256(documents) and (data_dir / "tokenizer").is_dir()


def prepare_or_reuse(reuse: bool, documents: list[str], data_dir: Path, **kwargs) -> tuple[dict[str, Any], bool]:
    """``model.data.prepare``, or (``reuse``) the existing directory if it holds exactly these documents.

    Returns (meta, reused). Runs trained on re-prepared data are never reused.
    """
    from model.data import prepare

    if reuse and reusable_data(data_dir, documents):
        meta = json.loads((data_dir / "meta.json").read_text())
        wanted = kwargs.get("vocab_size")
        if wanted is None or meta.get("tokenizer_source") == f"trained byte-level BPE (vocab {wanted})":
            log(f"--reuse: keeping the prepared data in {data_dir}")
            return meta, True
    return prepare(documents, data_dir, **kwargs), False


SUMMARY = "experiment_run.json"


def train_or_reuse(run_cfg, reuse: bool) -> dict[str, Any]:
    """Train one run (``model.training.train``) and summarise it in ``out_dir/experiment_run.json``.

    With ``reuse``, a finished run whose saved config equals ``run_cfg`` is read back instead.
    """
    from model.training import train

    path = Path(run_cfg.out_dir) / SUMMARY
    if reuse and path.is_file():
        saved = json.loads(path.read_text())
        hf_ok = saved["hf_dir"] is None or Path(saved["hf_dir"]).is_dir()
        if saved.get("config") == json.loads(json.dumps(run_cfg.to_dict())) and hf_ok:
            log(f"--reuse: keeping the finished run in {run_cfg.out_dir}")
            return saved
    # A run recomputed here replaces whatever an earlier experiment left in its out_dir (train refuses that
    # without overwrite, so that a user's run is never overwritten by mistake).
    result = train(run_cfg, progress=False, overwrite=True)
    summary = {
        "config": run_cfg.to_dict(),
        "val_loss_end": result.val_loss_end,
        "val_loss_start": result.val_loss_start,
        "unigram_loss": result.unigram_loss,
        "wall_s": result.wall_seconds,
        "hf_dir": None if result.hf_dir is None else str(result.hf_dir),
        "val_curve": [[r["step"], r["val/loss"]] for r in result.history if "val/loss" in r],
        "train_curve": [[r["step"], r["loss/main"]] for r in result.history if "loss/main" in r],
    }
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary
