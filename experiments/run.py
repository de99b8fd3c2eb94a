"""Evidence for the project's two claims, from one command (issues 8 and 20).

    python -m experiments.run                  # the CPU run behind experiments/RESULTS.md
    python -m experiments.run --smoke          # seconds: the same code path, toy sizes (tests)
    python -m experiments.run --config experiments/configs/gpu.yaml
    python -m experiments.run --arms moc_sparse,moc_preview   # train only these claim-1 arms; the
        # others' runs (and claim 2) come from results_dir/results.json, then the report is rewritten

1. **MoC vs the baselines it claims to beat** (``experiments.claim_moc``): dense, dense at MoC's
   FLOPs, top-k MoE at MoC's E/k/F and at MoC's FLOPs, MoC, and MoC without its router context or
   its collaboration, every arm on the same tokens, once per seed.
2. **Kotara fusion vs its parts** (``experiments.claim_fusion``): two domain models, one tokenizer,
   Kotara on held-out mixed and single-domain text.

Everything is written by this script: ``results.json``, ``RESULTS.md`` and ``results.png`` in
``results_dir`` (``experiments.report``); token shards, checkpoints and exported models in
``out_dir`` (git-ignored). User errors (bad config) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from experiments.claim_fusion import claim_fusion
from experiments.claim_moc import claim_moc
from experiments.common import DEFAULT_CONFIG, REPO, SMOKE_CONFIG, ExperimentError, environment, log, stdlib_modules
from experiments.config import check_runs, load_experiment


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description="Train the claim-1 arms (dense, MoE, MoC and its ablations) and the two domain models, "
        "run Kotara, write RESULTS.md.",
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
    p.add_argument(
        "--arms",
        help="comma-separated claim-1 arms to train; every other arm's runs and claim 2 are taken from the "
        "results.json already in results_dir (a run is kept under the arm whose model keys it was trained "
        "with), then the report is rewritten",
    )
    p.add_argument(
        "--finished-only",
        action="store_true",
        help="with --arms: train nothing; report the runs of those arms that have finished in out_dir and "
        "name the missing ones (a report of an experiment still running)",
    )
    p.add_argument("--debug", action="store_true", help="tracebacks for user errors")
    return p


def _selected_arms(arms: str | None, cfg: dict, results_dir: Path) -> tuple[list[str] | None, dict | None]:
    """(arm names, the earlier results) for ``--arms``; (None, None) without it. ExperimentError if unusable."""
    import json

    if arms is None:
        return None, None
    names = [a.strip() for a in arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in cfg["arms"]]
    if not names or unknown:
        raise ExperimentError(
            f"--arms: unknown arm(s) {', '.join(unknown) or repr(arms)}; arms: {', '.join(cfg['arms'])}"
        )
    path = results_dir / "results.json"
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExperimentError(f"--arms needs the earlier results in {path}: {e}") from None
    for key in ("train", "seeds", "vocab_size", "val_fraction", "full_corpus"):
        if previous["config"].get(key) != cfg.get(key):
            raise ExperimentError(f"--arms: {key!r} differs from the earlier results' ({path}); run every arm")
    return names, previous


def main(argv: list[str] | None = None) -> int:
    """Run everything; returns the exit code (2 for a user error)."""
    from model.data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    t0, cpu0 = time.time(), _cpu_seconds()
    started = datetime.now(timezone.utc)
    try:
        if args.smoke and args.config:
            raise ExperimentError("give --smoke or --config, not both")
        config_path = Path(args.config) if args.config else (SMOKE_CONFIG if args.smoke else DEFAULT_CONFIG)
        cfg = load_experiment(config_path)
        out = Path(args.out_dir or cfg["out_dir"])
        results_dir = Path(args.results_dir or cfg["results_dir"] or out)
        check_runs(cfg)  # every run's model and training keys, before any work
        only, previous = _selected_arms(args.arms, cfg, results_dir)
        if args.finished_only and only is None:
            raise ExperimentError("--finished-only needs --arms (the arms whose finished runs to report)")
        log(f"config {config_path}; out_dir {out}; results_dir {results_dir}")
        env = environment()
        domain_names = {m for mods in cfg["fusion"]["domains"].values() for m in mods}
        log("reading the stdlib docstrings (model.corpus)")
        modules = stdlib_modules(None if cfg["full_corpus"] else domain_names)
        claim1_modules = modules
        fusion_modules = [m for m in modules if m[1] in domain_names]
        t1 = time.time()
        moc = claim_moc(
            cfg,
            out,
            claim1_modules,
            args.reuse,
            only,
            None if previous is None else previous["claim1"],
            args.finished_only,
        )
        t2 = time.time()
        if previous is not None:
            fusion = previous["claim2"]
            log(f"claim 2: kept from {results_dir / 'results.json'} (--arms)")
        else:
            fusion = claim_fusion(cfg, out, fusion_modules, args.reuse)
        if cfg["fusion"]["own_tokenizers"] and previous is None:
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
        # user + system CPU seconds of this process and its threads (on a shared machine, wall time
        # also counts the other processes' share of the cores; CPU time does not)
        "cpu_s": _cpu_seconds() - cpu0,
        "claim1": moc,
        "claim2": fusion,
    }
    if previous is not None:  # the runs kept from the earlier results: where they came from
        results["reused"] = {
            "arms_trained": only,
            "from_command": previous["command"],
            "from_commit": previous["environment"].get("git_commit"),
            "from_started_utc": previous.get("started_utc"),
            "from_wall_s": previous["wall_s"],
        }
    paths = write_report(results, results_dir)
    log(f"done in {results['wall_s']['total']:.0f} s: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
