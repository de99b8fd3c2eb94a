"""Claim 1: collaborating experts against the baselines the claim needs (DESIGN §2b).

Every arm (dense, dense at MoC's FLOPs, top-k MoE at MoC's E/k/F, MoE at MoC's FLOPs, MoC, and
MoC without its router context or without its collaboration) trains on the same tokens once per
seed; validation PPL over the whole validation split (non-overlapping windows of ``max_seq_len``),
mean and spread over seeds.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

from experiments.common import (
    SUMMARY,
    ExperimentError,
    documents_of,
    eval_batches_for,
    log,
    mean_std,
    prepare_or_reuse,
    train_or_reuse,
)
from experiments.config import arm_model_keys, model_config, run_config


def claim_moc(
    cfg: dict[str, Any],
    out: Path,
    modules: list,
    reuse: bool = False,
    only: list[str] | None = None,
    previous: dict[str, Any] | None = None,
    finished_only: bool = False,
) -> dict[str, Any]:
    """Train every arm for every seed; validation PPL per run, mean and spread per arm.

    With ``only``, train just those arms and take every other arm's runs from ``previous`` (an earlier
    ``results["claim1"]``): a run is kept under the arm whose model keys equal the ones it was trained
    with, read with the meaning they had when it ran (``ModelConfig.saved_keys``: the first
    ``moc_no_collab`` is today's ``moc_no_collab_v1``). ExperimentError if an arm is left without runs
    or the data differ. With ``finished_only``, runs not finished in ``out`` are not trained but listed
    in ``missing_runs`` (a report of what has finished so far).
    """
    data_dir, meta, reuse = _claim1_data(cfg, out, modules, reuse)
    keys = arm_model_keys(cfg, int(meta["vocab_size"]))
    seq = model_config(next(iter(keys.values()))).max_seq_len
    batch = int(cfg["train"].get("batch_size", 16))
    eval_batches = eval_batches_for(meta, batch, seq, cfg["max_eval_batches"])
    train_keys = keys if only is None else {n: k for n, k in keys.items() if n in only}
    runs, unigram, missing_runs = _train_every_run(cfg, train_keys, data_dir, out, eval_batches, reuse, finished_only)
    reused: dict[str, str] = {}
    if only is not None:
        kept, reused, unigram_old = _previous_runs(previous or {}, keys, set(only), meta, eval_batches * batch * seq)
        runs = kept + runs
        unigram = unigram if unigram is not None else unigram_old
    missing = [n for n in keys if not any(r["arm"] == n for r in runs)]
    if missing and not finished_only:
        raise ExperimentError(f"claim 1: no runs for arm(s) {', '.join(missing)}: train them with --arms")
    arms = {
        name: _arm_summary(cfg, name, keys[name], [r for r in runs if r["arm"] == name])
        for name in keys
        if name not in missing
    }
    for name, old in reused.items():
        arms[name]["reused_from_arm"] = old
    extra = {"missing_runs": missing_runs} if finished_only else {}
    return extra | {
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


def _previous_runs(
    previous: dict[str, Any], keys: dict[str, dict[str, Any]], only: set[str], meta: dict[str, Any], scored: int
) -> tuple[list[dict[str, Any]], dict[str, str], float | None]:
    """The earlier runs of the arms not retrained, relabelled by their model keys; (runs, {arm: old arm}, unigram)."""
    from model.config import ModelConfig

    data = previous.get("data", {})
    same = {
        "train_tokens": int(meta["train_tokens"]),
        "val_tokens": int(meta["val_tokens"]),
        "val_tokens_scored": scored,
    }
    if any(data.get(k) != v for k, v in same.items()):
        raise ExperimentError(f"claim 1: the earlier results' data differ from this run's ({same}): run every arm")

    def meaning(model_keys: dict[str, Any]) -> dict[str, Any]:
        return ModelConfig.from_dict(ModelConfig.saved_keys(model_keys)).to_dict()

    wanted = {name: meaning(k) for name, k in keys.items() if name not in only}
    runs, relabel = [], {}
    for old_name, old_arm in previous.get("arms", {}).items():
        match = next((n for n, m in wanted.items() if m == meaning(old_arm["model"])), None)
        if match is not None:
            relabel[old_name] = match
    for run in previous.get("runs", []):
        if run["arm"] in relabel:
            runs.append(run | {"arm": relabel[run["arm"]]})
    unigram = data.get("unigram_val_ppl")
    return runs, {new: old for old, new in relabel.items()}, None if unigram is None else math.log(unigram)


def _claim1_data(cfg: dict[str, Any], out: Path, modules: list, reuse: bool) -> tuple[Path, dict[str, Any], bool]:
    """(data_dir, meta, reuse): the given ``data_dir``, or the stdlib docstrings prepared into out/data/all."""
    from model.data import read_meta

    if cfg["data_dir"]:
        data_dir = Path(cfg["data_dir"])
        log(f"claim 1: data {data_dir} (given)")
        return data_dir, read_meta(data_dir), reuse
    data_dir = out / "data" / "all"
    docs = documents_of(modules, cfg["document_unit"])
    log(f"claim 1: preparing {len(docs)} documents ({sum(len(d) for d in docs):,} chars) into {data_dir}")
    meta, reuse = prepare_or_reuse(
        reuse,
        docs,
        data_dir,
        vocab_size=cfg["vocab_size"],
        val_fraction=cfg["val_fraction"],
        sources=[{"corpus": "python-stdlib-docstrings", "modules": len(modules), "python": platform.python_version()}],
        progress=False,
    )
    return data_dir, meta, reuse


def _train_every_run(
    cfg: dict[str, Any],
    keys: dict[str, dict[str, Any]],
    data_dir: Path,
    out: Path,
    eval_batches: int,
    reuse: bool,
    finished_only: bool = False,
) -> tuple[list[dict[str, Any]], float | None, list[dict[str, Any]]]:
    """Train (or reuse) every (arm, seed); returns the runs' records, the unigram val loss and the runs
    skipped because they had not finished (``finished_only``: nothing is trained)."""
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
    runs, unigram, missing = [], None, []
    for name, seed, run_cfg in plans:
        if finished_only and not (Path(run_cfg.out_dir) / SUMMARY).is_file():
            log(f"claim 1: {name} seed {seed} has not finished: left out (--finished-only)")
            missing.append({"arm": name, "seed": seed})
            continue
        log(f"claim 1: training {name} seed {seed} ({run_cfg.max_steps} steps)")
        result = train_or_reuse(run_cfg, reuse)
        unigram = result["unigram_loss"] if result["unigram_loss"] is not None else unigram
        seq = model_config(run_cfg.model).max_seq_len
        runs.append(
            {
                "arm": name,
                "seed": seed,
                "val_loss": result["val_loss_end"],
                "val_ppl": math.exp(result["val_loss_end"]),
                "val_loss_start": result["val_loss_start"],
                "train_tokens": run_cfg.max_steps * run_cfg.batch_size * run_cfg.gradient_accumulation_steps * seq,
                "wall_s": result["wall_s"],
                "val_curve": result["val_curve"],
                "train_curve": result["train_curve"],
            }
        )
        log(f"claim 1: {name} seed {seed}: val loss {result['val_loss_end']:.4f} (ppl {runs[-1]['val_ppl']:.2f})")
    return runs, unigram, missing


def _arm_summary(cfg: dict[str, Any], name: str, keys: dict[str, Any], mine: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's model figures (parameters, FLOPs) and its runs' PPL statistics over seeds."""
    from experiments.flops import train_flops_per_token
    from model.info import active_parameters, count_parameters, flops_per_token

    mc = model_config(keys)
    seq = mc.max_seq_len
    ppls = [r["val_ppl"] for r in mine]
    mean, std = mean_std(ppls)
    loss_mean, loss_std = mean_std([r["val_loss"] for r in mine])
    return {
        "model": dict(keys),
        "is_moc": mc.is_moc,
        "ffn_kind": "moc" if mc.is_moc else "moe" if mc.is_moe else "moc_sparse" if mc.is_moc_sparse else "dense",
        "ffn_label": mc.ffn_label,
        "router_context": mc.router_context,
        "collaboration": mc.collaboration,
        "ablation_keeps_norm": mc.ablation_keeps_norm,
        "ffn_hidden": mc.ffn_hidden,
        "parameters": count_parameters(mc),
        "active_parameters": active_parameters(mc),
        "forward_flops_per_token": flops_per_token(mc, seq)["total"],
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
        "wall_s": [r["wall_s"] for r in mine],
        "wall_s_mean": sum(r["wall_s"] for r in mine) / len(mine),
        "matches_flops_of": cfg["arms"][name].get("match_flops_of"),
    }
