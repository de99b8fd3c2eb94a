"""Evidence for the project's two claims, from one command (issue 8).

    python -m experiments.run                  # the CPU run behind experiments/RESULTS.md
    python -m experiments.run --smoke          # seconds: the same code path, toy sizes (tests)
    python -m experiments.run --config experiments/configs/gpu.yaml

1. **MoC vs dense.** The dense baseline and the MoC model train on the same tokens; a third arm is a
   dense model whose FFN is widened to about the same training FLOPs per token as MoC (same
   tokens, so same total FLOPs). Every arm runs once per seed; validation PPL over the whole
   validation split (non-overlapping windows of ``max_seq_len``), mean and spread over seeds.
2. **Kotara fusion vs its parts.** Two dense models train on two related but different slices of
   the stdlib docstrings (groups of top-level modules), with one tokenizer trained on both slices'
   training documents. Kotara (``kotara.cli.main``, ``--strategy all``) scores each model alone
   and fused with every strategy on held-out modules: a text mixing both domains and each domain
   alone, with its similarity report. Nothing is tuned on the held-out text.

Everything is written by this script: ``results.json``, ``RESULTS.md`` and ``results.png`` in
``results_dir``; token shards, checkpoints and exported models in ``out_dir`` (git-ignored).
User errors (bad config) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "cpu.yaml"
SMOKE_CONFIG = CONFIG_DIR / "smoke.yaml"

REQUIRED = object()  # marks a config key without a default

# Top-level keys of an experiment config and their defaults.
CONFIG_KEYS: dict[str, Any] = {
    "out_dir": REQUIRED,
    "results_dir": None,  # null: out_dir
    "seeds": REQUIRED,
    "vocab_size": REQUIRED,
    "val_fraction": 0.1,
    "full_corpus": True,
    "document_unit": "module",
    "max_eval_batches": None,
    "data_dir": None,
    "train": REQUIRED,
    "arms": REQUIRED,
    "fusion": REQUIRED,
}
FUSION_KEYS: dict[str, Any] = {
    "arm": "dense",
    "seed": 1,
    "test_fraction": 0.15,
    "primary_strategy": "entropy",
    "max_text_chars": None,
    "train": {},
    "domains": REQUIRED,
    "kotara": {},
    "own_tokenizers": False,  # also train each domain model on its own BPE and fuse them per word (DESIGN §5c)
}
KOTARA_KEYS = {"max_length", "stride", "batch_size", "device", "dtype", "kernels"}
DOCUMENT_UNITS = ("module", "docstring")


class ExperimentError(ValueError):
    """A user error in the experiment config or command line: one line, exit code 2."""


def log(message: str) -> None:
    print(f"[experiments {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# Config


def _check_keys(section: str, given: dict[str, Any], valid: dict[str, Any] | set[str]) -> None:
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; valid keys: {', '.join(sorted(valid))}"
            raise ExperimentError(f"unknown {section} key {key!r}{hint}")


def load_experiment(path: str | Path) -> dict[str, Any]:
    """Read and check an experiment config (see experiments/configs/cpu.yaml for every key).

    Model and training keys are checked by building every run's ``TrainConfig`` up front
    (:func:`plan_runs`), so a typo fails before the first minute of training, not after.
    """
    from model.train_config import ConfigError, load_yaml

    try:
        raw = load_yaml(path)
    except ConfigError as e:
        raise ExperimentError(str(e)) from e
    _check_keys("experiment", raw, CONFIG_KEYS)
    for key, default in CONFIG_KEYS.items():
        if default is REQUIRED and key not in raw:
            raise ExperimentError(f"experiment config {str(path)!r} lacks the required key {key!r}")
    cfg = {k: copy.deepcopy(raw.get(k, default)) for k, default in CONFIG_KEYS.items()}
    seeds = cfg["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ExperimentError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"seeds must be distinct, got {seeds!r}")
    if not isinstance(cfg["vocab_size"], int) or cfg["vocab_size"] < 257:
        raise ExperimentError(f"vocab_size must be an integer >= 257, got {cfg['vocab_size']!r}")
    if not isinstance(cfg["val_fraction"], (int, float)) or not 0 < cfg["val_fraction"] < 1:
        raise ExperimentError(f"val_fraction must be in (0, 1), got {cfg['val_fraction']!r}")
    if cfg["document_unit"] not in DOCUMENT_UNITS:
        raise ExperimentError(f"document_unit must be one of {', '.join(DOCUMENT_UNITS)}, got {cfg['document_unit']!r}")
    meb = cfg["max_eval_batches"]
    if meb is not None and (not isinstance(meb, int) or meb < 1):
        raise ExperimentError(f"max_eval_batches must be null or an integer >= 1, got {meb!r}")
    if not isinstance(cfg["train"], dict):
        raise ExperimentError(f"train must be a mapping of TrainConfig keys, got {cfg['train']!r}")
    for reserved in ("data_dir", "out_dir", "seed", "corpus"):
        if reserved in cfg["train"]:
            raise ExperimentError(f"train.{reserved} is set by the script per run; remove it from the config")

    arms = cfg["arms"]
    if not isinstance(arms, dict) or not arms:
        raise ExperimentError(f"arms must be a mapping of arm name -> model keys, got {arms!r}")
    for name, keys in arms.items():
        if not isinstance(keys, dict):
            raise ExperimentError(f"arm {name!r} must be a mapping of model keys, got {keys!r}")
        target = keys.get("match_flops_of")
        if target is not None:
            if target not in arms or target == name:
                raise ExperimentError(
                    f"arm {name!r}: match_flops_of must name another arm ({', '.join(arms)}), got {target!r}"
                )
            if arms[target].get("match_flops_of") is not None:
                raise ExperimentError(f"arm {name!r}: match_flops_of {target!r} must be an arm without match_flops_of")

    fusion = cfg["fusion"]
    if not isinstance(fusion, dict):
        raise ExperimentError(f"fusion must be a mapping, got {fusion!r}")
    _check_keys("fusion", fusion, FUSION_KEYS)
    if "domains" not in fusion:
        raise ExperimentError("fusion lacks the required key 'domains'")
    fusion = cfg["fusion"] = {k: copy.deepcopy(fusion.get(k, d)) for k, d in FUSION_KEYS.items()}
    if fusion["arm"] not in arms:
        raise ExperimentError(f"fusion.arm must be one of the arms ({', '.join(arms)}), got {fusion['arm']!r}")
    if arms[fusion["arm"]].get("match_flops_of") is not None:
        raise ExperimentError(f"fusion.arm {fusion['arm']!r} must be an arm without match_flops_of")
    mtc = fusion["max_text_chars"]
    if mtc is not None and (not isinstance(mtc, int) or mtc < 100):
        raise ExperimentError(f"fusion.max_text_chars must be null or an integer >= 100, got {mtc!r}")
    if not 0 < fusion["test_fraction"] < 1:
        raise ExperimentError(f"fusion.test_fraction must be in (0, 1), got {fusion['test_fraction']!r}")
    from moc_kernels import STRATEGIES

    if fusion["primary_strategy"] not in STRATEGIES:
        raise ExperimentError(
            f"fusion.primary_strategy must be one of {', '.join(STRATEGIES)}, got {fusion['primary_strategy']!r}"
        )
    domains = fusion["domains"]
    if not isinstance(domains, dict) or len(domains) != 2:
        raise ExperimentError(f"fusion.domains must map exactly 2 domain names to module lists, got {domains!r}")
    for name, modules in domains.items():
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
            raise ExperimentError(f"fusion.domains.{name} must be a non-empty list of module names, got {modules!r}")
    a, b = (set(m) for m in domains.values())
    if a & b:
        raise ExperimentError(f"fusion.domains overlap: {', '.join(sorted(a & b))} in both")
    if not isinstance(fusion["kotara"], dict):
        raise ExperimentError(f"fusion.kotara must be a mapping, got {fusion['kotara']!r}")
    _check_keys("fusion.kotara", fusion["kotara"], KOTARA_KEYS)
    return cfg


def _model_config(model_keys: dict[str, Any]):
    from model.train_config import ConfigError, build_model_config

    try:
        return build_model_config(model_keys)
    except ConfigError as e:
        raise ExperimentError(str(e)) from e


def arm_model_keys(cfg: dict[str, Any], vocab_size: int | None = None) -> dict[str, dict[str, Any]]:
    """Model keys of every arm (``train.model`` merged with the arm's), iso-FLOP widths solved.

    ``vocab_size``: the prepared tokenizer's size (a BPE trained on little text can stop short of
    the ``vocab_size`` asked for); default the config's.
    """
    from experiments.flops import iso_flop_dense

    base = dict(cfg["train"].get("model") or {}) | {"vocab_size": vocab_size or cfg["vocab_size"]}
    keys = {}
    for name, arm in cfg["arms"].items():
        keys[name] = base | {k: v for k, v in arm.items() if k != "match_flops_of"}
    for name, arm in cfg["arms"].items():
        target = arm.get("match_flops_of")
        if target is not None:
            wide = iso_flop_dense(_model_config(keys[target]), _model_config(keys[name]))
            keys[name]["ffn_hidden_multiplier"] = wide.ffn_hidden_multiplier
    return keys


def run_config(
    cfg: dict[str, Any],
    model_keys: dict[str, Any],
    data_dir: Path,
    out_dir: Path,
    seed: int,
    eval_batches: int,
    export: bool,
    overrides: dict[str, Any] | None = None,
):
    """The ``TrainConfig`` of one run; raises ExperimentError for a bad key or value."""
    from model.train_config import ConfigError, config_from_dict

    raw = {k: v for k, v in cfg["train"].items() if k != "model"} | (overrides or {})
    max_steps = raw.get("max_steps", 1000)
    raw |= {
        "model": model_keys,
        "data_dir": str(data_dir),
        "corpus": None,
        "out_dir": str(out_dir),
        "seed": seed,
        "eval_batches": eval_batches,
        "wandb_project": None,  # a results run must not depend on (or wait for) W&B
        "export_hf": export,
        "save_interval": max_steps,  # one checkpoint, at the end
        "keep_checkpoints": 1,
    }
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise ExperimentError(f"train: {e}") from e


def check_runs(cfg: dict[str, Any]) -> None:
    """Build every run's TrainConfig once with placeholder paths: a bad key fails before any training."""
    keys = arm_model_keys(cfg)
    for name in keys:
        run_config(cfg, keys[name], Path("."), Path("."), cfg["seeds"][0], 1, False)
    fusion = cfg["fusion"]
    run_config(cfg, keys[fusion["arm"]], Path("."), Path("."), fusion["seed"], 1, True, fusion["train"])


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


def _reusable_data(data_dir: Path, documents: list[str]) -> bool:
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

    if reuse and _reusable_data(data_dir, documents):
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
    result = train(run_cfg, progress=False)
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


# --------------------------------------------------------------------------------------------------
# Claim 1: MoC vs dense


def claim_moc(cfg: dict[str, Any], out: Path, modules: list, reuse: bool = False) -> dict[str, Any]:
    """Train every arm for every seed; validation PPL per run, mean and spread per arm."""
    from experiments.flops import train_flops_per_token
    from model.data import read_meta
    from model.info import flops_per_token
    from model.lm import LunarisLM

    train_keys = cfg["train"]
    seq = _model_config(arm_model_keys(cfg)[next(iter(cfg["arms"]))]).max_seq_len
    if cfg["data_dir"]:
        data_dir = Path(cfg["data_dir"])
        meta = read_meta(data_dir)
        log(f"claim 1: data {data_dir} (given)")
    else:
        data_dir = out / "data" / "all"
        docs = documents_of(modules, cfg["document_unit"])
        log(f"claim 1: preparing {len(docs)} documents ({sum(len(d) for d in docs):,} chars) into {data_dir}")
        meta, reuse = prepare_or_reuse(
            reuse,
            docs,
            data_dir,
            vocab_size=cfg["vocab_size"],
            val_fraction=cfg["val_fraction"],
            sources=[
                {"corpus": "python-stdlib-docstrings", "modules": len(modules), "python": platform.python_version()}
            ],
            progress=False,
        )
    keys = arm_model_keys(cfg, int(meta["vocab_size"]))
    model_cfgs = {name: _model_config(k) for name, k in keys.items()}
    batch = int(train_keys.get("batch_size", 16))
    eval_batches = eval_batches_for(meta, batch, seq, cfg["max_eval_batches"])
    # Build (and so validate) every run's config before training anything. A run interrupted late
    # can be finished with fewer seeds: --reuse keeps the runs already done.
    plans = [
        (
            name,
            seed,
            run_config(cfg, keys[name], data_dir, out / "claim1" / f"{name}_seed{seed}", seed, eval_batches, False),
        )
        for seed in cfg["seeds"]  # seed-major: an interrupted run has every arm for the first seeds
        for name in keys
    ]
    runs = []
    unigram = None
    for name, seed, run_cfg in plans:
        log(f"claim 1: training {name} seed {seed} ({run_cfg.max_steps} steps)")
        result = train_or_reuse(run_cfg, reuse)
        unigram = result["unigram_loss"] if result["unigram_loss"] is not None else unigram
        tokens = run_cfg.max_steps * run_cfg.batch_size * run_cfg.gradient_accumulation_steps * seq
        runs.append(
            {
                "arm": name,
                "seed": seed,
                "val_loss": result["val_loss_end"],
                "val_ppl": math.exp(result["val_loss_end"]),
                "val_loss_start": result["val_loss_start"],
                "train_tokens": tokens,
                "wall_s": result["wall_s"],
                "val_curve": result["val_curve"],
                "train_curve": result["train_curve"],
            }
        )
        log(f"claim 1: {name} seed {seed}: val loss {result['val_loss_end']:.4f} (ppl {runs[-1]['val_ppl']:.2f})")

    arms = {}
    for name, mc in model_cfgs.items():
        mine = [r for r in runs if r["arm"] == name]
        ppls = [r["val_ppl"] for r in mine]
        mean, std = mean_std(ppls)
        loss_mean, loss_std = mean_std([r["val_loss"] for r in mine])
        flops = flops_per_token(mc, seq)
        arms[name] = {
            "model": {k: v for k, v in keys[name].items()},
            "is_moc": mc.is_moc,
            "ffn_hidden": mc.ffn_hidden,
            "parameters": LunarisLM(mc).num_parameters(),
            "forward_flops_per_token": flops["total"],
            "train_flops_per_token": train_flops_per_token(mc, seq),
            "train_flops_total": train_flops_per_token(mc, seq) * mine[0]["train_tokens"],
            "train_tokens": mine[0]["train_tokens"],
            "seeds": [r["seed"] for r in mine],
            "val_ppl": ppls,
            "val_ppl_mean": mean,
            "val_ppl_std": std,
            "val_ppl_min": min(ppls),
            "val_ppl_max": max(ppls),
            "val_loss_mean": loss_mean,
            "val_loss_std": loss_std,
            "wall_s_mean": sum(r["wall_s"] for r in mine) / len(mine),
            "matches_flops_of": cfg["arms"][name].get("match_flops_of"),
        }
    return {
        "data": {
            "dir": str(data_dir),
            "train_tokens": int(meta["train_tokens"]),
            "val_tokens": int(meta["val_tokens"]),
            "documents": int(meta.get("documents", 0)),
            "vocab_size": int(meta["vocab_size"]),
            "val_tokens_scored": eval_batches * batch * seq,
            "unigram_val_ppl": None if unigram is None else math.exp(unigram),
        },
        "arms": arms,
        "runs": runs,
    }


# --------------------------------------------------------------------------------------------------
# Claim 2: Kotara fusion of two domain models


def claim_fusion(cfg: dict[str, Any], out: Path, modules: list, reuse: bool = False) -> dict[str, Any]:
    """Two domain models, one tokenizer, Kotara on held-out mixed and single-domain text."""
    from kotara.cli import main as kotara_main
    from model.data import load_tokenizer, train_tokenizer

    fusion = cfg["fusion"]
    names = list(fusion["domains"])
    by_domain = {}
    for name in names:
        wanted = set(fusion["domains"][name])
        mods = [m for m in modules if m[1] in wanted]
        train_mods, test_mods = split_held_out(mods, fusion["test_fraction"])
        by_domain[name] = {"train": train_mods, "test": test_mods}
        log(f"claim 2: domain {name}: {len(train_mods)} training modules, {len(test_mods)} held out")

    # One tokenizer for both models (Kotara needs one vocabulary), trained on training modules only.
    train_docs = {n: documents_of(by_domain[n]["train"], cfg["document_unit"]) for n in names}
    data_dirs = {n: out / "data" / f"domain_{n}" for n in names}
    reuse = reuse and all(_reusable_data(data_dirs[n], train_docs[n]) for n in names)
    if reuse:
        tokenizer = load_tokenizer(data_dirs[names[0]] / "tokenizer")
        log("claim 2: --reuse: keeping the prepared domain data and its tokenizer")
    else:
        tokenizer = train_tokenizer(train_docs[names[0]] + train_docs[names[1]], cfg["vocab_size"])
    keys = arm_model_keys(cfg, len(tokenizer))[fusion["arm"]]
    seq = _model_config(keys).max_seq_len
    batch = int((cfg["train"] | fusion["train"]).get("batch_size", 16))
    models, data = {}, {}
    plans = []
    for name in names:
        data_dir = data_dirs[name]
        meta, _ = prepare_or_reuse(
            reuse, train_docs[name], data_dir, tokenizer=tokenizer, val_fraction=cfg["val_fraction"], progress=False
        )
        eval_batches = eval_batches_for(meta, batch, seq, cfg["max_eval_batches"])
        run_cfg = run_config(
            cfg, keys, data_dir, out / "claim2" / f"model_{name}", fusion["seed"], eval_batches, True, fusion["train"]
        )
        plans.append((name, run_cfg))
        data[name] = {"train_tokens": int(meta["train_tokens"]), "val_tokens": int(meta["val_tokens"])}
    for name, run_cfg in plans:
        log(f"claim 2: training the {name} model ({run_cfg.max_steps} steps)")
        result = train_or_reuse(run_cfg, reuse)
        if result["hf_dir"] is None:
            raise RuntimeError(f"the trainer did not export a Hugging Face model for domain {name!r}")
        models[name] = {
            "hf_dir": result["hf_dir"],
            "val_ppl": math.exp(result["val_loss_end"]),
            "train_tokens": run_cfg.max_steps * run_cfg.batch_size * run_cfg.gradient_accumulation_steps * seq,
            "wall_s": result["wall_s"],
        }

    # Held-out texts: documents separated by blank lines; the mixed text alternates the domains.
    text_dir = out / "texts"
    text_dir.mkdir(parents=True, exist_ok=True)
    held = {n: _cap_chars(documents_of(by_domain[n]["test"], "module"), fusion["max_text_chars"]) for n in names}
    mixed = []
    for i in range(max(len(held[n]) for n in names)):
        mixed += [held[n][i] for n in names if i < len(held[n])]
    texts = {"mixed": mixed} | {f"{n} only": held[n] for n in names}
    kot = fusion["kotara"]
    evaluations = {}
    for label, docs in texts.items():
        path = text_dir / f"{label.replace(' ', '_')}.txt"
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        metrics_path = out / "claim2" / f"kotara_{label.replace(' ', '_')}.json"
        argv = ["--model", models[names[0]]["hf_dir"], "--model", models[names[1]]["hf_dir"]]
        argv += ["--dataset_path", str(path), "--strategy", "all", "--save_metrics", str(metrics_path), "--no_progress"]
        for flag in ("max_length", "stride", "batch_size", "device", "dtype", "kernels"):
            if kot.get(flag) is not None:
                argv += [f"--{flag}", str(kot[flag])]
        log(f"claim 2: kotara on the {label} text ({len(docs)} modules): kotara {shlex.join(argv)}")
        rc = kotara_main(argv)
        if rc != 0:
            raise RuntimeError(f"kotara exited with code {rc} on {path}")
        evaluations[label] = _summarise_kotara(json.loads(metrics_path.read_text()), names)
        evaluations[label]["modules"] = [
            m[0] for n in names for m in by_domain[n]["test"] if label in ("mixed", f"{n} only")
        ]
        evaluations[label]["argv"] = argv
    return {
        "domains": {
            n: {
                "modules": fusion["domains"][n],
                "train_modules": len(by_domain[n]["train"]),
                "test_modules": [m[0] for m in by_domain[n]["test"]],
                **data[n],
            }
            for n in names
        },
        "models": models,
        "model_letters": {chr(ord("a") + i): n for i, n in enumerate(names)},
        "evaluations": evaluations,
        "primary_strategy": fusion["primary_strategy"],
    }


def _cap_chars(documents: list[str], limit: int | None) -> list[str]:
    """The first documents up to ``limit`` characters in all, the last one cut at a line end (smoke runs)."""
    if limit is None:
        return documents
    out, used = [], 0
    for doc in documents:
        if used + len(doc) <= limit:
            out.append(doc)
            used += len(doc)
            continue
        cut = doc[: limit - used].rsplit("\n", 1)[0]
        if cut.strip():
            out.append(cut)
        break
    return out or [documents[0][:limit]]


def _summarise_kotara(metrics: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The numbers of a Kotara ``--save_metrics`` JSON that the report uses."""
    models = {
        m["name"]: {"ppl": m["ppl"], "nll_per_token": m["nll_per_token"], "bpb": m["bits_per_byte"]}
        for m in metrics["models"]
    }
    strategies = {
        s: {
            "ppl": v["ppl"],
            "nll_per_token": v["nll_per_token"],
            "bpb": v["bits_per_byte"],
            "gain_nats_per_token": v["gain_vs_best_model_nats_per_token"],
            "mean_weights": list(v["mean_weights"].values()),
        }
        for s, v in metrics["strategies"].items()
    }
    pair = metrics["similarity"]["pairs"][0]
    return {
        "tokens": metrics["tokens"],
        "bytes": metrics["bytes"],
        "models": models,
        "strategies": strategies,
        "similarity": {
            "top1_agreement": pair["top1_agreement"],
            "mean_jsd_nats": pair["mean_js_divergence_nats"],
            "nll_pearson": pair["nll_pearson"],
        },
    }


# --------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description="Train the MoC/dense arms and the two domain models, run Kotara, write RESULTS.md.",
    )
    p.add_argument("--config", help=f"experiment YAML (default {DEFAULT_CONFIG.relative_to(REPO)})")
    p.add_argument(
        "--smoke", action="store_true", help=f"toy sizes, seconds (= --config {SMOKE_CONFIG.relative_to(REPO)})"
    )
    p.add_argument("--out-dir", help="override out_dir (token shards, checkpoints, models)")
    p.add_argument("--results-dir", help="override results_dir (RESULTS.md, results.json, results.png)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep runs (and prepared data) already in out_dir whose config (and documents) are identical, "
        "instead of recomputing them: resumes an interrupted experiment",
    )
    p.add_argument("--debug", action="store_true", help="tracebacks for user errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run everything; returns the exit code (2 for a user error)."""
    from model.data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    t0 = time.time()
    started = datetime.now(timezone.utc)
    try:
        if args.smoke and args.config:
            raise ExperimentError("give --smoke or --config, not both")
        config_path = Path(args.config) if args.config else (SMOKE_CONFIG if args.smoke else DEFAULT_CONFIG)
        cfg = load_experiment(config_path)
        out = Path(args.out_dir or cfg["out_dir"])
        results_dir = Path(args.results_dir or cfg["results_dir"] or out)
        check_runs(cfg)  # every run's model and training keys, before any work
        log(f"config {config_path}; out_dir {out}; results_dir {results_dir}")
        env = environment()
        domain_names = {m for mods in cfg["fusion"]["domains"].values() for m in mods}
        log("reading the stdlib docstrings (model.corpus)")
        modules = stdlib_modules(None if cfg["full_corpus"] else domain_names)
        claim1_modules = modules
        fusion_modules = [m for m in modules if m[1] in domain_names]
        t1 = time.time()
        moc = claim_moc(cfg, out, claim1_modules, args.reuse)
        t2 = time.time()
        fusion = claim_fusion(cfg, out, fusion_modules, args.reuse)
        if cfg["fusion"]["own_tokenizers"]:
            from experiments.cross_tokenizer import claim_own_tokenizers

            fusion["own_tokenizers"] = claim_own_tokenizers(cfg, out, args.reuse)
        t3 = time.time()
    except (ExperimentError, DataError) as e:
        if args.debug:
            raise
        print(f"experiments: error: {e}", file=sys.stderr)
        return 2

    from experiments.report import write_report

    try:
        shown = config_path.resolve().relative_to(REPO)
    except ValueError:
        shown = config_path
    results = {
        "command": "python -m experiments.run" + (" " + shlex.join(argv) if argv else ""),
        "config_path": str(shown),
        "config": cfg,
        "environment": env,
        "started_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": {"corpus": t1 - t0, "claim1": t2 - t1, "claim2": t3 - t2, "total": time.time() - t0},
        "claim1": moc,
        "claim2": fusion,
    }
    paths = write_report(results, results_dir)
    log(f"done in {results['wall_s']['total']:.0f} s: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
