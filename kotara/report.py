"""The console table and the ``--save_metrics`` JSON of scoring, with the run's ``config`` that the
word path's JSON shares; the console lines and the ``--save_outputs`` JSONL of generation, per
token and per word.

The JSON keeps the original tool's keys (``baseline_ppl_a``, ``baseline_ppl_b``, ``fused_ppl``,
``strategy``, ``temps``, ``poe_betas``, ``weights``, ``config``) with their original shapes for a
single strategy, and adds ``tokens``, ``bytes``, ``bits_per_byte``, ``models``, ``strategies``,
``similarity``, ``throughput`` and ``prefix_token``. With ``--strategy all`` ``fused_ppl`` and
``weights`` map each strategy to its value.

"Alone" means temperature 1: ``baseline_ppl_*`` and ``models[i].ppl`` are each model's own
perplexity, as the original tool's baseline was. ``models[i].ppl_at_temperature`` is the model alone
at its fusion temperature (equal to ``ppl`` when that is 1), and the table shows it as one more row
where it differs, so that a fused gain which the temperature alone would give is visible.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

import moc_kernels
from kotara.evaluate import EvalResult
from kotara.generate import Generation
from kotara.loading import LoadedModel
from kotara.steps import BEATS_MARGIN_NATS_PER_TOKEN, FusionSpec
from kotara.word_score import WordInput, WordResult


def _finite(x: float) -> float | None:
    # JSON has no NaN/inf; null says "undefined" (e.g. correlation of a constant).
    return x if math.isfinite(x) else None


def build_metrics(
    result: EvalResult,
    spec: FusionSpec,
    strategy_arg: str,
    model_paths: list[str],
    config: dict[str, Any],
    prefix: str,
    prefix_id: int | None,
) -> dict[str, Any]:
    """The metrics dictionary written by ``--save_metrics`` (see the module docstring for its keys)."""
    names = result.model_names
    metrics: dict[str, Any] = {}
    for name, nll in zip(names, result.model_nll):
        metrics[f"baseline_ppl_{name}"] = result.ppl(nll)
    fused_ppl = {s: result.ppl(result.strategy_nll[s]) for s in result.strategies}
    mean_weights = {
        s: {f"w_{name}_mean": w for name, w in zip(names, result.strategy_mean_weights[s])} for s in result.strategies
    }
    single = strategy_arg != "all"
    metrics["fused_ppl"] = fused_ppl[strategy_arg] if single else fused_ppl
    metrics["strategy"] = strategy_arg
    metrics["temps"] = dict(zip(names, spec.temperatures))
    metrics["poe_betas"] = dict(zip(names, spec.poe_betas))
    metrics["weights"] = mean_weights[strategy_arg] if single else mean_weights
    metrics["config"] = config
    metrics["tokens"] = result.tokens
    metrics["bytes"] = result.num_bytes
    metrics["bits_per_byte"] = {name: result.bits_per_byte(nll) for name, nll in zip(names, result.model_nll)} | {
        s: result.bits_per_byte(result.strategy_nll[s]) for s in result.strategies
    }
    tempered_nll = result.model_nll_at_temperature or result.model_nll
    metrics["models"] = [
        {
            "name": name,
            "path": path,
            "tokens": result.tokens,
            "nll": nll,
            "nll_per_token": nll / result.tokens,
            "ppl": result.ppl(nll),  # at temperature 1, as baseline_ppl_*
            "bits_per_byte": result.bits_per_byte(nll),
            "ppl_at_temperature": result.ppl(tempered_nll[i]),  # alone at its fusion temperature
            "nll_at_temperature": tempered_nll[i],
            "temperature": spec.temperatures[i],
            "weight": spec.weights[i],
            "poe_beta": spec.poe_betas[i],
        }
        for i, (name, path, nll) in enumerate(zip(names, model_paths, result.model_nll))
    ]
    best_single = min(result.model_nll)
    metrics["strategies"] = {
        s: {
            "tokens": result.tokens,
            "nll": result.strategy_nll[s],
            "nll_per_token": result.strategy_nll[s] / result.tokens,
            "ppl": fused_ppl[s],
            "bits_per_byte": result.bits_per_byte(result.strategy_nll[s]),
            "gain_vs_best_model_nats_per_token": (best_single - result.strategy_nll[s]) / result.tokens,
            "mean_weights": mean_weights[s],
        }
        for s in result.strategies
    }
    metrics["similarity"] = {
        "pairs": [
            {
                "models": [names[i], names[j]],
                "top1_agreement": result.top1_agreement[k],
                "mean_js_divergence_nats": result.mean_jsd[k],
                "nll_pearson": _finite(result.nll_pearson[k]),
            }
            for k, (i, j) in enumerate(result.pairs)
        ],
        "mean_weights": mean_weights,
        "note": "model distributions at temperature 1; JS divergence in nats (max ln 2)",
    }
    metrics["throughput"] = {
        "tokens_per_s": result.tokens_per_s,
        "elapsed_s": result.elapsed_s,
        "forward_s": result.forward_s,
        "fusion_and_baselines_s": result.fusion_s,
        "world_size": result.world_size,
    }
    metrics["prefix_token"] = {"kind": prefix, "id": prefix_id, "scored": False}
    return metrics


def build_word_metrics(
    result: WordResult, args: Any, spec: FusionSpec, paths: Sequence[str], items: Sequence[WordInput], config: dict
) -> dict[str, Any]:
    """The ``--save_metrics`` JSON of the word path: the token path's shape where it applies
    (``bits_per_byte[label]``, ``bits_per_byte[strategy]``, ``models[i]`` with its own ``tokens``),
    plus ``fusion_unit: "word"`` and ``segments``; no fused perplexity (undefined across tokenizers)."""
    names = result.model_names
    single = args.strategy not in (None, "all")
    ln2 = math.log(2.0)
    mean_weights = {
        s: {f"w_{n}_mean": w for n, w in zip(names, result.strategy_mean_weights[s])} for s in result.strategies
    }
    models = []
    for i, (name, path, item) in enumerate(zip(names, paths, items)):
        tokens, log_prob = result.model_tokens[i], result.model_log_prob[i]
        models.append({
            "name": name, "path": path, "tokens": tokens, "nll": -log_prob, "nll_per_token": -log_prob / tokens,
            "ppl": math.exp(-log_prob / tokens), "bits_per_byte": result.bits_per_byte(log_prob),
            "nll_at_temperature": -result.model_log_prob_at_temperature[i],
            "bits_per_byte_at_temperature": result.bits_per_byte(result.model_log_prob_at_temperature[i]),
            "temperature": spec.temperatures[i], "weight": spec.weights[i], "vocab_size": item.vocab_size,
            "word_start_tokens": int(item.in_set.sum()), "prefix_token": {"kind": item.prefix, "id": item.prefix_id},
        })  # fmt: skip
    return {
        "fusion_unit": "word",
        "segments": result.segments,
        "strategy": args.strategy or "all",
        "temps": dict(zip(names, spec.temperatures)),
        "weights": mean_weights[args.strategy] if single else mean_weights,
        "switch_rate": args.switch_rate,
        "config": config,
        "bytes": result.num_bytes,
        "bits_per_byte": {n: result.bits_per_byte(lp) for n, lp in zip(names, result.model_log_prob)}
        | {s: result.bits_per_byte(result.strategy_log_prob[s]) for s in result.strategies},
        "models": models,
        "strategies": {
            s: {
                "neg_log2_prob": -result.strategy_log_prob[s] / ln2,
                "bits_per_byte": result.bits_per_byte(result.strategy_log_prob[s]),
                "gain_vs_best_model_bits_per_byte": min(result.bits_per_byte(lp) for lp in result.model_log_prob)
                - result.bits_per_byte(result.strategy_log_prob[s]),
                "mean_weights": mean_weights[s],
            }
            for s in result.strategies
        },
        "throughput": {
            "elapsed_s": result.elapsed_s,
            "forward_s": result.forward_s,
            "op_and_fusion_s": result.fusion_s,
            "world_size": result.world_size,
        },
    }


def run_config(
    args: argparse.Namespace,
    paths: Sequence[str],
    models: Sequence[LoadedModel],
    device_names: list[str],
    devices: list[torch.device],
    dtypes: list[torch.dtype],
    *,
    tokenizer: str | None,
    vocab_size: int | list[int],
    windows: int | None,
    world_size: int,
    protocol: str,
) -> dict[str, Any]:
    """The ``config`` of the ``--save_metrics`` JSON: the run's models, data, windows, dtypes, devices, kernels.

    The keyword arguments are where the two paths differ: the token path gives its shared
    ``tokenizer``'s path, one ``vocab_size`` and its count of ``windows``; the word path gives None,
    one vocabulary size per model and None (no ``windows`` key: each model has windows of its own).
    """
    config = {
        "models": list(paths),
        "model_a": paths[0],
        "model_b": paths[1] if len(paths) > 1 else None,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "logit_columns": [m.logit_columns for m in models],
        "dataset_path": args.dataset_path,
        "max_length": args.max_length,
        "stride": args.stride,
        "batch_size": args.batch_size,
        "chunk_bytes": args.chunk_bytes,
    }
    if windows is not None:
        config["windows"] = windows
    return config | {
        "dtype": args.dtype,
        "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
        "device": device_names[0],
        "devices": [str(d) for d in devices],
        "kernels": moc_kernels.get_backend(),
        "kernels_ran": moc_kernels.backend.resolve(devices[0]),
        "trust_remote_code": args.trust_remote_code,
        "world_size": world_size,
        "protocol": protocol,
    }


def _write_atomic(path: str, text: str, suffix: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".kotara-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` (atomically)."""
    _write_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n", ".json")


def write_jsonl_atomic(path: str, records: list[dict[str, Any]]) -> None:
    """Write one JSON object per line to ``path`` (atomically)."""
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), ".jsonl")


def format_generation(generation: Generation, index: int, total: int, model_names: list[str]) -> str:
    """One generated completion for the console: a header line, the prompt and the completion."""
    steps = len(generation.token_ids)
    mean = [sum(w[i] for w in generation.weights) / max(steps, 1) for i in range(len(model_names))]
    weights = " ".join(f"{name} {w:.3f}" for name, w in zip(model_names, mean))
    return (
        f"[{index + 1}/{total}] {generation.strategy} · {generation.finish_reason} after {steps} tokens · "
        f"mean weights {weights}\n"
        f"prompt:     {generation.prompt}\n"
        f"completion: {generation.completion}\n"
    )


def show_generations(
    generations: Sequence[Any], format_one: Callable[..., str], names: list[str], save_outputs: str | None
) -> None:
    """Print every completion (``format_one(generation, index, total, names)``) and, with
    ``save_outputs``, write each one's ``to_json()`` as a line of that JSONL file (atomically)."""
    for index, generation in enumerate(generations):
        print(format_one(generation, index, len(generations), names))
    if save_outputs:
        write_jsonl_atomic(save_outputs, [g.to_json() for g in generations])
        print(f"outputs saved to {save_outputs}")


def _ppl(x: float) -> str:
    return f"{x:.4f}" if x < 1e6 else f"{x:.4e}"


def format_table(result: EvalResult, spec: FusionSpec, model_paths: list[str]) -> str:
    """The console report: one row per model and per strategy, then similarity and throughput."""
    names = result.model_names
    weight_cols = [f"w_{n}" for n in names]
    header = f"{'':<24}{'PPL':>14}{'NLL/token':>12}{'bits/byte':>11}  " + "".join(f"{c:>8}" for c in weight_cols)
    rule = "=" * len(header)
    lines = [
        rule,
        f"Kotara  ·  {result.tokens} tokens scored, {result.num_bytes} bytes",
        rule,
        header,
        "-" * len(header),
    ]
    # Each model alone at T = 1 (the baseline); where its fusion temperature is not 1, also alone at
    # that temperature, so a fused gain that the temperature alone gives is visible.
    tempered_nll = result.model_nll_at_temperature or result.model_nll
    rows = [(f"model {name} (T=1)", nll) for name, nll in zip(names, result.model_nll)]
    rows += [
        (f"model {name} (T={spec.temperatures[i]:g})", tempered_nll[i])
        for i, name in enumerate(names)
        if spec.temperatures[i] != 1.0
    ]
    for label, nll in rows:
        lines.append(
            f"{label:<24}{_ppl(result.ppl(nll)):>14}{nll / result.tokens:>12.4f}{result.bits_per_byte(nll):>11.4f}"
        )
    best = min(nll for _, nll in rows) - BEATS_MARGIN_NATS_PER_TOKEN * result.tokens
    for s in result.strategies:
        nll = result.strategy_nll[s]
        mark = " *" if nll < best else ""
        weights = "".join(f"{w:>8.3f}" for w in result.strategy_mean_weights[s])
        lines.append(
            f"{'fused ' + s:<24}{_ppl(result.ppl(nll)):>14}{nll / result.tokens:>12.4f}"
            f"{result.bits_per_byte(nll):>11.4f}  {weights}{mark}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"* fused beats every single-model row above by more than {BEATS_MARGIN_NATS_PER_TOKEN:g} nats/token "
        "(the rounding of the sums).  w_x: mean weight model x received."
    )
    for k, (i, j) in enumerate(result.pairs):
        corr = result.nll_pearson[k]
        lines.append(
            f"similarity {names[i]}~{names[j]}: top-1 agreement {result.top1_agreement[k]:.3f} · "
            f"mean JS divergence {result.mean_jsd[k]:.4f} nats · NLL correlation "
            + (f"{corr:.3f}" if math.isfinite(corr) else "n/a")
        )
    for name, path in zip(names, model_paths):
        lines.append(f"model {name}: {path}")
    lines.append(
        f"throughput: {result.tokens_per_s:,.1f} tokens/s ({result.elapsed_s:.2f} s; "
        f"forwards {result.forward_s:.2f} s, fusion + baselines {result.fusion_s:.2f} s; "
        f"{result.world_size} process(es))"
    )
    lines.append(rule)
    return "\n".join(lines)
