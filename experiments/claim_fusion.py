"""Claim 2: Kotara fusion of two domain models against each model alone.

Two dense models train on two related but different slices of the stdlib docstrings (groups of
top-level modules), with one tokenizer trained on both slices' training documents. Kotara
(``kotara.cli.main``, ``--strategy all``) scores each model alone and fused with every strategy on
held-out modules: a text mixing both domains and each domain alone, with its similarity report.
Nothing is tuned on the held-out text.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

from experiments.common import (
    documents_of,
    eval_batches_for,
    log,
    prepare_or_reuse,
    reusable_data,
    split_held_out,
    train_or_reuse,
)
from experiments.config import arm_model_keys, model_config, run_config


def claim_fusion(cfg: dict[str, Any], out: Path, modules: list, reuse: bool = False) -> dict[str, Any]:
    """Two domain models, one tokenizer, Kotara on held-out mixed and single-domain text."""
    fusion = cfg["fusion"]
    names = list(fusion["domains"])
    by_domain = {}
    for name in names:
        wanted = set(fusion["domains"][name])
        mods = [m for m in modules if m[1] in wanted]
        train_mods, test_mods = split_held_out(mods, fusion["test_fraction"])
        by_domain[name] = {"train": train_mods, "test": test_mods}
        log(f"claim 2: domain {name}: {len(train_mods)} training modules, {len(test_mods)} held out")
    models, data = _train_domain_models(cfg, out, names, by_domain, reuse)
    texts = _held_out_texts(fusion, names, by_domain)
    evaluations = {}
    for label, docs in texts.items():
        evaluations[label] = _kotara_on(out, label, docs, [models[n]["hf_dir"] for n in names], fusion, names)
        evaluations[label]["modules"] = [
            m[0] for n in names for m in by_domain[n]["test"] if label in ("mixed", f"{n} only")
        ]
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


def _train_domain_models(
    cfg: dict[str, Any], out: Path, names: list[str], by_domain: dict[str, Any], reuse: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(models, data): one tokenizer for both domains, then one exported model per domain."""
    from model.data import load_tokenizer, train_tokenizer

    fusion = cfg["fusion"]
    # One tokenizer for both models (Kotara needs one vocabulary), trained on training modules only.
    train_docs = {n: documents_of(by_domain[n]["train"], cfg["document_unit"]) for n in names}
    data_dirs = {n: out / "data" / f"domain_{n}" for n in names}
    reuse = reuse and all(reusable_data(data_dirs[n], train_docs[n]) for n in names)
    if reuse:
        tokenizer = load_tokenizer(data_dirs[names[0]] / "tokenizer")
        log("claim 2: --reuse: keeping the prepared domain data and its tokenizer")
    else:
        tokenizer = train_tokenizer(train_docs[names[0]] + train_docs[names[1]], cfg["vocab_size"])
    keys = arm_model_keys(cfg, len(tokenizer))[fusion["arm"]]
    seq = model_config(keys).max_seq_len
    batch = int((cfg["train"] | fusion["train"]).get("batch_size", 16))
    models, data, plans = {}, {}, []
    for name in names:
        meta, _ = prepare_or_reuse(
            reuse,
            train_docs[name],
            data_dirs[name],
            tokenizer=tokenizer,
            val_fraction=cfg["val_fraction"],
            progress=False,
        )
        eval_batches = eval_batches_for(meta, batch, seq, cfg["max_eval_batches"])
        run_out = out / "claim2" / f"model_{name}"
        plans.append(
            (name, run_config(cfg, keys, data_dirs[name], run_out, fusion["seed"], eval_batches, True, fusion["train"]))
        )
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
    return models, data


def _held_out_texts(fusion: dict[str, Any], names: list[str], by_domain: dict[str, Any]) -> dict[str, list[str]]:
    """The held-out texts by label: "mixed" alternates the domains' documents, "<name> only" is one domain's."""
    held = {n: _cap_chars(documents_of(by_domain[n]["test"], "module"), fusion["max_text_chars"]) for n in names}
    mixed = []
    for i in range(max(len(held[n]) for n in names)):
        mixed += [held[n][i] for n in names if i < len(held[n])]
    return {"mixed": mixed} | {f"{n} only": held[n] for n in names}


def _kotara_on(
    out: Path, label: str, docs: list[str], hf_dirs: list[str], fusion: dict[str, Any], names: list[str]
) -> dict[str, Any]:
    """Kotara ``--strategy all`` of the two models on one held-out text (documents separated by blank lines)."""
    from kotara.cli import main as kotara_main

    text_dir = out / "texts"
    text_dir.mkdir(parents=True, exist_ok=True)
    path = text_dir / f"{label.replace(' ', '_')}.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    metrics_path = out / "claim2" / f"kotara_{label.replace(' ', '_')}.json"
    argv = [arg for hf_dir in hf_dirs for arg in ("--model", hf_dir)]
    argv += ["--dataset_path", str(path), "--strategy", "all", "--save_metrics", str(metrics_path), "--no_progress"]
    kot = fusion["kotara"]
    for flag in ("max_length", "stride", "batch_size", "device", "dtype", "kernels"):
        if kot.get(flag) is not None:
            argv += [f"--{flag}", str(kot[flag])]
    log(f"claim 2: kotara on the {label} text ({len(docs)} modules): kotara {shlex.join(argv)}")
    rc = kotara_main(argv)
    if rc != 0:
        raise RuntimeError(f"kotara exited with code {rc} on {path}")
    evaluation = _summarise_kotara(json.loads(metrics_path.read_text()), names)
    evaluation["argv"] = argv
    return evaluation


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
