"""Claim 2 across tokenizers: two domain models, each with a BPE trained on its own domain only, fused per word.

    python -m experiments.cross_tokenizer                 # config experiments/configs/cpu.yaml
    python -m experiments.cross_tokenizer --smoke         # seconds: toy sizes (tests)

The same domains, held-out modules, model keys, training and Kotara settings as claim 2 of
``experiments.run`` (``claim_fusion``), except that each domain trains its own byte-level BPE on
its own training modules, so the two models share no vocabulary and only the closed-word mixture
of DESIGN §5c can fuse them (``kotara score`` picks that path because the tokenizers differ).
Writes ``RESULTS_cross_tokenizer.md`` and ``results_cross_tokenizer.json`` to the results
directory; models and token shards go under ``out_dir`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from experiments.claim_fusion import _cap_chars
from experiments.common import (
    DEFAULT_CONFIG,
    SMOKE_CONFIG,
    ExperimentError,
    documents_of,
    environment,
    eval_batches_for,
    log,
    prepare_or_reuse,
    split_held_out,
    stdlib_modules,
    train_or_reuse,
)
from experiments.config import arm_model_keys, load_experiment, model_config, run_config

STRATEGIES = ("mixture", "mixture_bayes", "mixture_switch")


def train_domain_models(cfg: dict[str, Any], out: Path, reuse: bool) -> tuple[dict, dict]:
    """Per domain: its own BPE and token shards, one model; returns (models, held-out modules by domain)."""
    fusion = cfg["fusion"]
    names = list(fusion["domains"])
    modules = stdlib_modules({m for mods in fusion["domains"].values() for m in mods})
    models, held = {}, {}
    for name in names:
        wanted = set(fusion["domains"][name])
        train_mods, test_mods = split_held_out([m for m in modules if m[1] in wanted], fusion["test_fraction"])
        held[name] = test_mods
        docs = documents_of(train_mods, cfg["document_unit"])
        data_dir = out / "data" / f"own_tokenizer_{name}"
        meta, _ = prepare_or_reuse(
            reuse, docs, data_dir, vocab_size=cfg["vocab_size"], val_fraction=cfg["val_fraction"], progress=False
        )
        keys = arm_model_keys(cfg, int(meta["vocab_size"]))[fusion["arm"]]
        seq = model_config(keys).max_seq_len
        batch = int((cfg["train"] | fusion["train"]).get("batch_size", 16))
        eval_batches = eval_batches_for(meta, batch, seq, cfg["max_eval_batches"])
        run_cfg = run_config(
            cfg, keys, data_dir, out / "claim2_own_tokenizers" / f"model_{name}", fusion["seed"], eval_batches, True,
            fusion["train"],
        )  # fmt: skip
        log(f"cross-tokenizer: training the {name} model on its own BPE ({run_cfg.max_steps} steps)")
        result = train_or_reuse(run_cfg, reuse)
        models[name] = {"hf_dir": result["hf_dir"], "vocab_size": int(meta["vocab_size"]), "wall_s": result["wall_s"]}
    return models, held


def mixed_text(cfg: dict[str, Any], held: dict, path: Path) -> Path:
    """The held-out modules of both domains alternated, as claim 2's mixed text."""
    names = list(held)
    limit = cfg["fusion"]["max_text_chars"]
    docs = {n: _cap_chars(documents_of(held[n], "module"), limit) for n in names}
    mixed = [docs[n][i] for i in range(max(len(d) for d in docs.values())) for n in names if i < len(docs[n])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(mixed) + "\n", encoding="utf-8")
    return path


def claim_own_tokenizers(cfg: dict[str, Any], out: Path, reuse: bool = False) -> dict[str, Any]:
    """Train (or reuse) the two own-tokenizer models, run Kotara per word on the mixed text; the summary."""
    from kotara.cli import main as kotara_main

    start = time.time()
    models, held = train_domain_models(cfg, out, reuse)
    text = mixed_text(cfg, held, out / "texts" / "mixed_own_tokenizers.txt")
    metrics_path = out / "claim2_own_tokenizers" / "kotara_mixed.json"
    names = list(models)
    kotara_argv = [arg for n in names for arg in ("--model", models[n]["hf_dir"])]
    kotara_argv += ["--dataset_path", str(text), "--strategy", "all", "--save_metrics", str(metrics_path)]
    kotara_argv += ["--no_progress"]
    for flag, value in cfg["fusion"]["kotara"].items():
        kotara_argv += [f"--{flag}", str(value)]
    log(f"cross-tokenizer: kotara {shlex.join(kotara_argv)}")
    if kotara_main(kotara_argv) != 0:
        raise RuntimeError("kotara failed on the mixed text")
    return {
        "domains": names,
        "models": models,
        "kotara_argv": kotara_argv,
        "kotara": json.loads(metrics_path.read_text()),
        "wall_s": time.time() - start,
    }


def format_report(summary: dict[str, Any], command: str, env: dict[str, Any]) -> str:
    """RESULTS_cross_tokenizer.md: the machine, then the section RESULTS.md's claim 2 shows."""
    from experiments.report import own_tokenizer_section

    machine = (
        f"Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs (shared with other jobs), torch threads "
        f"{env['torch_threads']}, GPU: {env['gpu'] or 'none'}; torch {env['versions']['torch']}, triton "
        f"{env['versions']['triton']}, transformers {env['versions']['transformers']}; code `{env['git_commit']}`."
    )
    lines = ["# Claim 2 across tokenizers", "", f"Written by `{command}`. {machine}", ""]
    lines += own_tokenizer_section(summary)
    lines += [f"Kotara command: `kotara {shlex.join(summary['kotara_argv'])}`", ""]
    return "\n".join(lines)


def fold_into_results(results_dir: Path, summary: dict[str, Any]) -> list[Path]:
    """Add the summary to the experiment's results.json (claim2.own_tokenizers) and re-render RESULTS.md
    from it (the figure is left as it is); nothing when results_dir holds no results.json."""
    from experiments.report import RESULTS_JSON, RESULTS_MD, RESULTS_PNG, render_markdown

    path = results_dir / RESULTS_JSON
    if not path.is_file():
        return []
    results = json.loads(path.read_text())
    results["claim2"]["own_tokenizers"] = summary
    path.write_text(json.dumps(results, indent=1) + "\n")
    (results_dir / RESULTS_MD).write_text(render_markdown(results, figure=(results_dir / RESULTS_PNG).is_file()))
    return [results_dir / RESULTS_MD, path]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m experiments.cross_tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="experiment YAML (default experiments/configs/cpu.yaml)")
    p.add_argument("--smoke", action="store_true", help="toy sizes (= --config experiments/configs/smoke.yaml)")
    p.add_argument("--out-dir", help="override out_dir")
    p.add_argument(
        "--results-dir",
        help="override results_dir: RESULTS_cross_tokenizer.md and its JSON go there, and the table is folded into "
        "the results.json and RESULTS.md found there",
    )
    p.add_argument("--reuse", action="store_true", help="keep finished runs and data in out_dir with the same config")
    args = p.parse_args(argv)
    config = Path(args.config) if args.config else (SMOKE_CONFIG if args.smoke else DEFAULT_CONFIG)
    try:
        cfg = load_experiment(config)
    except ExperimentError as e:
        print(f"experiments: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir or cfg["out_dir"])
    results_dir = Path(args.results_dir or cfg["results_dir"] or out)
    summary = claim_own_tokenizers(cfg, out, args.reuse)
    command = "python -m experiments.cross_tokenizer" + (" " + shlex.join(argv) if argv else "")
    env = environment()
    results_dir.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "environment": env, "config_path": str(config), **summary}
    (results_dir / "results_cross_tokenizer.json").write_text(json.dumps(record, indent=1) + "\n")
    (results_dir / "RESULTS_cross_tokenizer.md").write_text(format_report(summary, command, env))
    written = fold_into_results(results_dir, summary)
    log("done: " + ", ".join(str(p) for p in [results_dir / "RESULTS_cross_tokenizer.md", *written]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
