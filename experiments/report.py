"""``results.json``, ``RESULTS.md`` and ``results.png`` from the numbers of one ``experiments.run``.

Every number and every verdict in RESULTS.md is computed here from ``results``; the commentary is a
template whose wording follows the numbers ("beat" / "did not beat", "every seed agrees"), so a
re-run on another machine or config rewrites it honestly. One function per section of RESULTS.md.

    python -m experiments.report experiments/results.json   # rewrite RESULTS.md and results.png from it
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

RESULTS_MD = "RESULTS.md"
RESULTS_JSON = "results.json"
RESULTS_PNG = "results.png"


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _secs(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _si(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}"
    return f"{x:.0f}"


# --------------------------------------------------------------------------------------------------
# Which arm plays which part


def ffn_kind(arm: dict[str, Any]) -> str:
    """ "dense", "moe" or "moc" (results written before ``ffn_kind`` existed had MoC or dense only)."""
    return arm.get("ffn_kind", "moc" if arm["is_moc"] else "dense")


def _is_ablation(arm: dict[str, Any]) -> bool:
    return ffn_kind(arm) == "moc" and not (arm.get("router_context", True) and arm.get("collaboration", True))


def arm_roles(arms: dict[str, Any]) -> dict[str, Any]:
    """The arms by role: ``moc`` (full MoC, or None), its baselines at the same tokens and at its FLOPs, ablations.

    ``same_tokens`` and ``iso_flops`` are lists of (arm name, how the comparison is phrased).
    """
    full_moc = [n for n, a in arms.items() if ffn_kind(a) == "moc" and not _is_ablation(a)]
    moc = next((n for n in full_moc if not arms[n]["matches_flops_of"]), None)
    how = {
        "dense": "at the same tokens",
        "moe": "at the same experts (E, k, F) and tokens",
    }
    same_tokens, iso_flops = [], []
    for kind in ("dense", "moe"):
        for name, a in arms.items():
            if ffn_kind(a) != kind:
                continue
            if a["matches_flops_of"]:
                iso_flops.append((name, "at about the same training FLOPs"))
            else:
                same_tokens.append((name, how[kind]))
    ablations = [n for n, a in arms.items() if _is_ablation(a)]
    sparse = [n for n, a in arms.items() if ffn_kind(a) == "moc_sparse"]
    return {"moc": moc, "same_tokens": same_tokens, "iso_flops": iso_flops, "ablations": ablations, "sparse": sparse}


# --------------------------------------------------------------------------------------------------
# Verdicts


def compare_arms(arms: dict[str, Any], better: str, other: str) -> dict[str, Any]:
    """How arm ``better`` compares with ``other`` on validation PPL (lower is better).

    ``verdict``: "beat" when every seed of ``better`` is below every seed of ``other`` (the seed
    ranges do not overlap), "lower mean" when only the mean is lower, else "did not beat".
    """
    a, b = arms[better], arms[other]
    diff = b["val_ppl_mean"] - a["val_ppl_mean"]
    if a["val_ppl_max"] < b["val_ppl_min"]:
        verdict = "beat"
    elif diff > 0:
        verdict = "lower mean"
    else:
        verdict = "did not beat"
    return {"diff": diff, "rel": diff / b["val_ppl_mean"], "verdict": verdict}


def paired_difference(arms: dict[str, Any], arm: str, reference: str) -> dict[str, Any]:
    """Val PPL of ``arm`` minus ``reference``'s, seed by seed (both trained on the same seeds' batches).

    Returns the per-seed differences (dict seed -> PPL, positive = ``arm`` worse), the difference
    of means, the sample std of the per-seed differences (None for one seed), and ``agree``: "worse"
    or "better" when every seed's difference has that sign, else "mixed".
    """
    a, r = arms[arm], arms[reference]
    ref_by_seed = dict(zip(r["seeds"], r["val_ppl"]))
    diffs = {s: p - ref_by_seed[s] for s, p in zip(a["seeds"], a["val_ppl"]) if s in ref_by_seed}
    values = list(diffs.values())
    std = None
    if len(values) > 1:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    agree = "mixed"
    if values and all(v > 0 for v in values):
        agree = "worse"
    elif values and all(v < 0 for v in values):
        agree = "better"
    return {
        "per_seed": diffs,
        "mean_diff": a["val_ppl_mean"] - r["val_ppl_mean"],
        "std_diff": std,
        "agree": agree,
    }


def _claim1_sentence(name: str, other: str, cmp: dict[str, Any], arms: dict[str, Any], how: str) -> str:
    a, b = arms[name], arms[other]
    n = len(a["val_ppl"])
    nums = f"val PPL {_fmt(a['val_ppl_mean'])} vs {_fmt(b['val_ppl_mean'])} (mean of {n} seed{'s' if n > 1 else ''})"
    if cmp["verdict"] == "beat":
        where = "(every MoC seed below every one of its seeds)" if n > 1 else "(a single seed: no spread measured)"
        return f"MoC beat `{other}` {how} {where}: {nums}, {_fmt(cmp['diff'])} PPL ({cmp['rel']:.1%}) lower."
    if cmp["verdict"] == "lower mean":
        return (
            f"MoC's mean was {_fmt(cmp['diff'])} PPL lower than `{other}` {how}, but the seed ranges overlap, so "
            f"it did not clearly beat it: {nums}."
        )
    return f"MoC did not beat `{other}` {how}: {nums}, {_fmt(-cmp['diff'])} PPL higher."


ABLATION_WHAT = {"router_context": "its router context", "collaboration": "collaboration"}


def _ablation_sentence(name: str, moc: str, arms: dict[str, Any]) -> str:
    """What switching one of MoC's ideas off cost or gained, against full MoC, seed by seed."""
    a = arms[name]
    what = " and ".join(ABLATION_WHAT[k] for k in ABLATION_WHAT if not a.get(k, True))
    if a.get("ablation_keeps_norm") is False:
        what += " and the RMSNorm before `Wo` (the ablation as first run, before issue 28)"
    d = paired_difference(arms, name, moc)
    spread = f" ± {_fmt(d['std_diff'])} (std of the per-seed differences)" if d["std_diff"] is not None else ""
    per_seed = ", ".join(f"{v:+.2f} (s{s})" for s, v in d["per_seed"].items())
    effect = "higher (worse)" if d["mean_diff"] > 0 else "lower (better)"
    if d["agree"] == "mixed":
        agreement = "the seeds disagree on the sign, so this spread does not resolve the effect"
    else:
        agreement = f"every seed agrees ({d['agree']} without it)"
    return (
        f"Without {what} (`{name}`), MoC's val PPL was {_fmt(abs(d['mean_diff']))} {effect}: "
        f"{_fmt(a['val_ppl_mean'])} vs full MoC's {_fmt(arms[moc]['val_ppl_mean'])} (difference of means "
        f"{d['mean_diff']:+.2f}{spread}; per seed {per_seed}); {agreement}."
    )


def _fusion_verdict(ev: dict[str, Any], primary: str) -> dict[str, Any]:
    best_model = min(ev["models"], key=lambda m: ev["models"][m]["nll_per_token"])
    winners = [s for s, v in ev["strategies"].items() if v["gain_nats_per_token"] > 0]
    best_strategy = max(ev["strategies"], key=lambda s: ev["strategies"][s]["gain_nats_per_token"])
    return {
        "best_model": best_model,
        "primary_gain": ev["strategies"][primary]["gain_nats_per_token"],
        "primary_beats": ev["strategies"][primary]["gain_nats_per_token"] > 0,
        "winners": winners,
        "best_strategy": best_strategy,
    }


def _fusion_sentence(label: str, ev: dict[str, Any], primary: str, letters: dict[str, str]) -> str:
    v = _fusion_verdict(ev, primary)
    best = v["best_model"]
    best_ppl = ev["models"][best]["ppl"]
    fused_ppl = ev["strategies"][primary]["ppl"]
    who = f"model {best} ({letters.get(best, best)})"
    beat = "beat" if v["primary_beats"] else "did not beat"
    head = (
        f"on the {label} text, fused `{primary}` {beat} the best single model, {who}: PPL {_fmt(fused_ppl)} vs "
        f"{_fmt(best_ppl)} ({_fmt(v['primary_gain'], 4)} nats/token)"
    )
    others = [s for s in v["winners"] if s != primary]
    tail = (
        f"; {len(v['winners'])}/{len(ev['strategies'])} strategies beat it ({', '.join(v['winners'])})"
        if v["winners"]
        else "; no strategy beat it"
    )
    if not others and v["primary_beats"]:
        tail = f"; only `{primary}` beat it"
    return head + tail + "."


def _moc_comparisons(arms: dict[str, Any]) -> list[str]:
    """MoC against every baseline (same tokens first, then same FLOPs), one sentence each."""
    roles = arm_roles(arms)
    moc = roles["moc"]
    if moc is None:
        return []
    return [
        _claim1_sentence(moc, other, compare_arms(arms, moc, other), arms, how)
        for other, how in roles["same_tokens"] + roles["iso_flops"]
    ]


# --------------------------------------------------------------------------------------------------
# Markdown: one function per section


def own_tokenizer_section(summary: dict[str, Any]) -> list[str]:
    """Claim 2's extra table: each domain model with its own BPE, fused per word (``experiments.cross_tokenizer``)."""
    metrics, names = summary["kotara"], summary["domains"]
    bits = metrics["bits_per_byte"]
    best = min(bits[m["name"]] for m in metrics["models"])
    lines = [
        f"### Extra: each model with its own tokenizer, fused per word (mixed text, {metrics['bytes']:,} bytes, "
        f"{metrics['segments']:,} segments)",
        "",
        "The same domains, held-out modules, model keys and training, but each domain trains its own byte-level BPE "
        "on its own training modules only ("
        + ", ".join(f"{n}: {summary['models'][n]['vocab_size']} tokens" for n in names)
        + "), so the models share no vocabulary and Kotara fuses them per closed word (DESIGN §5c; `--strategy all`, "
        f"equal weights, `--switch_rate {metrics['switch_rate']}`). Token perplexity is not defined across "
        f"tokenizers: bits/byte only. Written by `python -m experiments.cross_tokenizer` ({summary['wall_s']:.0f} s; "
        "training " + ", ".join(f"{n} {summary['models'][n]['wall_s']:.0f} s" for n in names) + ").",
        "",
        "| | own tokens | bits/byte | gain vs best single (bits/byte) | mean weights a / b |",
        "|---|---:|---:|---:|---:|",
    ]
    for model, name in zip(metrics["models"], names):
        lines.append(_row(f"model {model['name']} ({name}) alone", f"{model['tokens']:,}", _fmt(bits[model["name"]], 4),
                          f"{best - bits[model['name']]:+.4f}", ""))  # fmt: skip
    for s, v in metrics["strategies"].items():
        weights = " / ".join(f"{w:.3f}" for w in v["mean_weights"].values())
        lines.append(_row(f"fused {s}", "", _fmt(bits[s], 4), f"{best - bits[s]:+.4f}", weights))
    return lines + [""]


def render_markdown(results: dict[str, Any], figure: bool = True) -> str:
    """RESULTS.md from ``results`` (the dictionary written to results.json)."""
    sections = [
        _section_title(results),
        _section_summary(results),
        _section_setup(results),
        _section_claim1(results),
        _section_claim2(results),
        _section_scaling(),
    ]
    if figure:
        sections.append(_section_figure())
    return "\n\n".join(sections) + "\n"


def _section_title(results: dict[str, Any]) -> str:
    wall = results["wall_s"]
    return (
        "# Results: MoC vs dense and MoE baselines, its two ablations, and Kotara fusion vs its parts\n\n"
        f"Written by `{results['command']}` (config `{results['config_path']}`), started {results['started_utc']}, "
        f"total wall time {wall['total'] / 60:.1f} min. Every number and verdict below is generated by "
        "`experiments/report.py` from `results.json`; nothing is edited by hand."
    )


def _section_summary(results: dict[str, Any]) -> str:
    arms, c2 = results["claim1"]["arms"], results["claim2"]
    roles = arm_roles(arms)
    summary = _moc_comparisons(arms)
    summary += [_ablation_sentence(n, roles["moc"], arms) for n in roles["ablations"] if roles["moc"]]
    summary += _sparse_sentences(arms)
    mixed = c2["evaluations"].get("mixed")
    if mixed:
        summary.append(
            "Kotara: " + _fusion_sentence("mixed-domain", mixed, c2["primary_strategy"], c2["model_letters"])
        )
    return "## Summary\n\n" + "\n".join(f"- {s}" for s in summary)


def _section_setup(results: dict[str, Any]) -> str:
    env, wall = results["environment"], results["wall_s"]
    run_threads = results["config"]["train"].get("cpu_threads")
    threads = f" at start (training runs: `train.cpu_threads` {run_threads})" if run_threads else ""
    changes = {True: " (with uncommitted changes to tracked files)", False: "", None: ""}[env["git_tracked_changes"]]
    cpu = results.get("cpu_s")
    cpu_text = f"; CPU time {cpu:.0f} s (user + system, this process)" if cpu is not None else ""
    lines = [
        "## Setup",
        "",
        f"- Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, torch threads {env['torch_threads']}{threads}, "
        f"GPU: {env['gpu'] or 'none'} ({env['platform']}).",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
        f"- Code: git commit `{env['git_commit']}`{changes}.",
        f"- Command: `{results['command']}`",
        f"- Wall time: {wall['total']:.0f} s total (corpus {wall['corpus']:.0f} s, claim 1 {wall['claim1']:.0f} s, "
        f"claim 2 {wall['claim2']:.0f} s){cpu_text}.",
    ]
    return "\n".join(lines)


def _ffn_cell(arm: dict[str, Any]) -> str:
    m, kind = arm["model"], ffn_kind(arm)
    if kind == "dense":
        return f"dense F={arm['ffn_hidden']}"
    label = arm.get("ffn_label", "MoC")
    return f"{label} E={m.get('n_experts')}, k={m.get('top_k')}, F={arm['ffn_hidden']}"


def _claim1_table(arms: dict[str, Any]) -> list[str]:
    lines = [
        "| arm | FFN | params | active params | fwd FLOPs/token | train FLOPs | val PPL per seed | mean ± std | "
        "min–max | wall s/run |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, a in arms.items():
        per_seed = ", ".join(f"{p:.2f} (s{s})" for p, s in zip(a["val_ppl"], a["seeds"]))
        std = f" ± {_fmt(a['val_ppl_std'])}" if a["val_ppl_std"] is not None else " (1 seed)"
        active = a.get("active_parameters", a["parameters"])
        lines.append(
            f"| `{name}` | {_ffn_cell(a)} | {a['parameters']:,} | {active:,} | {_si(a['forward_flops_per_token'])} | "
            f"{_si(a['train_flops_total'])} | {per_seed} | {_fmt(a['val_ppl_mean'])}{std} | "
            f"{_fmt(a['val_ppl_min'])}–{_fmt(a['val_ppl_max'])} | {_secs(a['wall_s_mean'])} |"
        )
    return lines


def _iso_flop_notes(arms: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """One paragraph per iso-FLOP arm: how it was widened, and why widening rather than more tokens."""
    moc = arm_roles(arms)["moc"]
    notes = []
    for name, a in arms.items():
        target = a["matches_flops_of"]
        if not target or target not in arms:
            continue
        t = arms[target]
        ratio = a["forward_flops_per_token"] / t["forward_flops_per_token"]
        base = next(
            (
                b
                for b in arms.values()
                if ffn_kind(b) == ffn_kind(a)
                and b.get("router_context") == a.get("router_context")
                and not b["matches_flops_of"]
            ),
            None,
        )
        epochs = (
            a["train_tokens"] * t["forward_flops_per_token"] / base["forward_flops_per_token"] / data["train_tokens"]
            if base
            else float("nan")
        )
        what = {
            "dense": "the dense FFN is",
            "moe": "every expert of the MoE (k of them run per token) is",
            "moc_sparse": "every routed expert of the sparse MoC (k of them run per token) is",
        }[ffn_kind(a)]
        notes.append(
            f"Iso-FLOP arm `{name}`: {what} widened to F = {a['ffn_hidden']} (FLOPs/token {ratio:.3f} × "
            f"`{target}`'s), with the same tokens, so its total training FLOPs match `{target}`'s. Widening was "
            f"chosen over training on more tokens because the corpus is small: matching the FLOPs with tokens would "
            f"take {epochs:.1f} epochs of it, and the repetition would confound the comparison. The price: "
            f"`{name}` has {a['parameters']:,} parameters, `{target}` {t['parameters']:,}."
        )
    if moc is not None and any(ffn_kind(a) == "moe" for a in arms.values()):
        notes.append(
            "The MoE arms route on the token's own hidden state and run only the k chosen experts (sparse "
            "compute, `moc_kernels.routed_swiglu`); they share MoC's expert weights' names, shapes and "
            "initialisation, and have no router attention, collaboration or output projection. The ablations "
            "are MoC with one idea removed (DESIGN §2b): `router_context: false` routes on `s = x`, "
            "`collaboration: false` combines the normalised expert outputs, `(Σ_j w_j RMSNorm(S)_j) Wo`, "
            "removing the collaboration only (issue 28); `ablation_keeps_norm: false` is the ablation as first run, "
            "`(Σ_j w_j S_j) Wo`, which also removed the RMSNorm that step 5 puts between the experts and `Wo` (the "
            "README's model section measures what that does to the layer's output at initialisation)."
        )
    return notes


SPARSE_IDEA = {
    False: "collaboration over the k routed experts, token router",
    "preview": "collaboration over the k routed experts, preview router",
}


def sparse_comparisons(arms: dict[str, Any]) -> list[dict[str, Any]]:
    """Each sparse-MoC arm (DESIGN §2c) against the dense and MoE baselines, at equal tokens and at MoC's FLOPs.

    One row per (arm, baseline): the verdict of :func:`compare_arms`, the per-seed differences of
    :func:`paired_difference` and the ratio of training FLOPs. A preview arm is also paired with the
    token-router arm of the same width (what the preview adds).
    """
    roles = arm_roles(arms)
    rows = []
    for name in roles["sparse"]:
        a = arms[name]
        others = [n for n, _ in roles["same_tokens"] + roles["iso_flops"]]
        if a.get("router_context") == "preview":
            others += [
                n
                for n in roles["sparse"]
                if arms[n].get("router_context") is False
                and bool(arms[n]["matches_flops_of"]) == bool(a["matches_flops_of"])
                and arms[n].get("collaboration", True) == a.get("collaboration", True)
            ]
        for other in others:
            b = arms[other]
            rows.append(
                {
                    "arm": name,
                    "other": other,
                    "flops_ratio": a["train_flops_total"] / b["train_flops_total"],
                    "compare": compare_arms(arms, name, other),
                    "paired": paired_difference(arms, name, other),
                }
            )
    return rows


def _sparse_table(arms: dict[str, Any]) -> list[str]:
    lines = [
        "| arm | against | train FLOPs ratio | val PPL (mean) | against's | per-seed difference (arm − against) | "
        "verdict |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in sparse_comparisons(arms):
        a, b = arms[row["arm"]], arms[row["other"]]
        per_seed = ", ".join(f"{v:+.2f} (s{s})" for s, v in row["paired"]["per_seed"].items())
        verdict = {"beat": "beat", "lower mean": "lower mean, seeds overlap", "did not beat": "did not beat"}
        lines.append(
            f"| `{row['arm']}` | `{row['other']}` | {row['flops_ratio']:.2f}× | {_fmt(a['val_ppl_mean'])} | "
            f"{_fmt(b['val_ppl_mean'])} | {per_seed} | {verdict[row['compare']['verdict']]} |"
        )
    return lines


def _sparse_sentences(arms: dict[str, Any]) -> list[str]:
    """Per idea, the verdict at equal tokens (same E/k/F) and at MoC's training FLOPs, in words."""
    rows = sparse_comparisons(arms)
    moc = arm_roles(arms)["moc"]
    out = []
    for name in arm_roles(arms)["sparse"]:
        a = arms[name]
        mine = [r for r in rows if r["arm"] == name]
        if not mine:
            continue
        idea = SPARSE_IDEA.get(a.get("router_context"), "sparse MoC")
        where = "at MoC's training FLOPs" if a["matches_flops_of"] else "at MoC's E, k, F and the same tokens"
        cost = f"{a['forward_flops_per_token'] / arms[moc]['forward_flops_per_token']:.2f}× MoC's" if moc else ""
        parts = []
        for r in mine:
            d = r["paired"]
            agree = {"better": "every seed lower", "worse": "every seed higher", "mixed": "seeds disagree"}[d["agree"]]
            verb = {"beat": "beat", "lower mean": "had a lower mean than", "did not beat": "did not beat"}
            parts.append(
                f"{verb[r['compare']['verdict']]} `{r['other']}` ({d['mean_diff']:+.2f} PPL, {agree}; "
                f"{r['flops_ratio']:.2f}× its training FLOPs)"
            )
        out.append(
            f"Sparse MoC, {idea} (`{name}`, {where}; forward FLOPs/token {cost}): val PPL "
            f"{_fmt(a['val_ppl_mean'])}; it " + "; ".join(parts) + "."
        )
    return out


def _claim1_commentary(results: dict[str, Any]) -> list[str]:
    c1, cfg = results["claim1"], results["config"]
    arms, data = c1["arms"], c1["data"]
    roles = arm_roles(arms)
    moc_name = roles["moc"]
    moc = arms[moc_name]
    bullets = _moc_comparisons(arms) + [_ablation_sentence(n, moc_name, arms) for n in roles["ablations"]]
    dense = next((n for n, _ in roles["same_tokens"] if ffn_kind(arms[n]) == "dense"), None)
    if dense:
        base = arms[dense]
        bullets.append(
            f"MoC costs {moc['forward_flops_per_token'] / base['forward_flops_per_token']:.2f}× the FLOPs per token "
            f"of `{dense}` (every expert runs on every token, plus two small attentions) and took "
            f"{moc['wall_s_mean'] / base['wall_s_mean']:.2f}× its wall time per run on this machine."
        )
    walls = ", ".join(f"`{n}` {_secs(a['wall_s_mean'])} s" for n, a in arms.items())
    bullets.append(f"Wall time per run (mean over seeds, this machine): {walls}.")
    n_seeds = len(cfg["seeds"])
    tokens = moc["train_tokens"]
    bullets.append(
        f"What would be needed to know more: {n_seeds} seed{'s' if n_seeds > 1 else ''} per arm only bound the "
        f"spread roughly (5+ would give a usable standard error); these models have ~{_si(moc['parameters'])} "
        f"parameters and see {_si(tokens)} tokens of a {_si(data['train_tokens'])}-token corpus, far from the "
        "regime where MoE-style layers are usually compared; a GPU run (below) with a larger model and corpus, "
        "and learning rates tuned per arm on the validation split, would test the claim at a meaningful scale."
    )
    return ["Commentary:", ""] + [f"- {b}" for b in bullets]


def _section_claim1(results: dict[str, Any]) -> str:
    c1 = results["claim1"]
    arms, data = c1["arms"], c1["data"]
    tokens = next(iter(arms.values()))["train_tokens"]
    lines = [
        "## Claim 1: collaborating experts vs a dense FFN and a standard top-k MoE",
        "",
        f"Corpus: docstrings of Python's standard library (`model.corpus`), {data['documents']} documents, byte-level "
        f"BPE vocabulary {data['vocab_size']}: {data['train_tokens']:,} training and {data['val_tokens']:,} validation "
        f"tokens (split by a hash of each document). Every run sees {tokens:,} training tokens "
        f"({tokens / data['train_tokens']:.2f} epochs). Validation PPL: the whole validation split in non-overlapping "
        f"windows of `max_seq_len` tokens ({data['val_tokens_scored']:,} tokens scored), at the end of training. "
        f"Unigram baseline (training token frequencies): PPL {_fmt(data['unigram_val_ppl'])}.",
        "",
        *_claim1_table(arms),
        "",
        "FLOPs: matrix products, 2 per multiply-add, training = 3 × forward (`model.info.flops_per_token`; the "
        "iso-FLOP widths are solved in `experiments/flops.py`; the count is checked against "
        "`torch.utils.flop_counter` in `tests/test_experiments.py`). Active params: the parameters one token's "
        "forward uses (an MoE token skips E − k experts).",
        "",
    ]
    for note in _iso_flop_notes(arms, data):
        lines += [note, ""]
    if arm_roles(arms)["moc"] is not None:
        lines += _claim1_commentary(results)
    if arm_roles(arms)["sparse"]:
        lines += ["", *_section_sparse(results)]
    return "\n".join(lines).rstrip()


def _section_sparse(results: dict[str, Any]) -> list[str]:
    arms = results["claim1"]["arms"]
    lines = [
        "### MoC's ideas at a top-k MoE's cost (DESIGN §2c, issue 28)",
        "",
        "Sparse MoC runs only each token's k routed experts (`routed_swiglu`, as the MoE) and keeps the "
        "collaboration among them (attention, RMSNorm, refinement FFN, `Wo`); its router reads the token "
        "(`router_context: false`) or a preview of every expert (`router_context: preview`: each expert's first "
        "r hidden units, an attention over the E previews in width p). Each arm against the dense and MoE "
        "baselines at equal tokens and at MoC's training FLOPs (`*_iso_flops`), seed by seed (same seeds' "
        'initialisation and batches); verdicts as above ("beat": every seed of the arm below every seed of the '
        "other).",
        "",
        *_sparse_table(arms),
        "",
        *[f"- {s}" for s in _sparse_sentences(arms)],
    ]
    reused = results.get("reused")
    if reused:
        kept = [n for n in arms if n not in reused["arms_trained"]]
        relabelled = [f"`{a['reused_from_arm']}` as `{n}`" for n, a in arms.items() if a.get("reused_from_arm", n) != n]
        lines += [
            "",
            f"Arms trained for this report (`--arms`): {', '.join(f'`{n}`' for n in reused['arms_trained'])}. "
            f"The other arms' runs ({', '.join(f'`{n}`' for n in kept)}) are those of `{reused['from_command']}` "
            f"at commit `{reused['from_commit']}` (started {reused['from_started_utc']}), kept because their model and "
            "training keys are unchanged and their forward and backward are bit-identical at this commit"
            + (f"; relabelled: {', '.join(relabelled)}" if relabelled else "")
            + ". Claim 2 below is that run's too.",
        ]
    missing = results["claim1"].get("missing_runs")
    if missing:
        names = sorted({m["arm"] for m in missing}, key=list(results["config"]["arms"]).index)
        lines += [
            "",
            "**Not finished when this report was written** (left out above; the arms and verdicts use the seeds "
            "that finished): " + ", ".join(f"`{m['arm']}` seed {m['seed']}" for m in missing) + ". Finish them "
            f"and rewrite this report with `python -m experiments.run --reuse --arms {','.join(names)}` "
            "(keeps the finished runs in `out_dir`, trains the rest).",
        ]
    return lines


def _fusion_table(c2: dict[str, Any]) -> list[str]:
    lines = [
        "| model | domain | training modules | held-out modules | train tokens | steps × tokens | own val PPL |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for letter, name in c2["model_letters"].items():
        d, m = c2["domains"][name], c2["models"][name]
        held = ", ".join(f"`{p}`" for p in d["test_modules"])
        lines.append(
            _row(
                letter,
                name,
                d["train_modules"],
                held,
                f"{d['train_tokens']:,}",
                f"{m['train_tokens']:,}",
                _fmt(m["val_ppl"]),
            )
        )
    return lines


def _held_out_text_table(label: str, ev: dict[str, Any], primary: str, letters: dict[str, str]) -> list[str]:
    lines = [
        f"### Held-out text: {label} ({ev['tokens']:,} tokens, {ev['bytes']:,} bytes)",
        "",
        "| | PPL | bits/byte | gain vs best single (nats/token) | mean weights a / b |",
        "|---|---:|---:|---:|---:|",
    ]
    best = min(v["nll_per_token"] for v in ev["models"].values())
    for letter, v in ev["models"].items():
        lines.append(
            _row(
                f"model {letter} ({letters.get(letter, letter)}) alone",
                _fmt(v["ppl"]),
                _fmt(v["bpb"], 4),
                f"{best - v['nll_per_token']:+.4f}",
                "",
            )
        )
    for s, v in ev["strategies"].items():
        mark = "**" if s == primary else ""
        weights = " / ".join(f"{w:.3f}" for w in v["mean_weights"])
        lines.append(
            _row(
                f"{mark}fused {s}{mark}", _fmt(v["ppl"]), _fmt(v["bpb"], 4), f"{v['gain_nats_per_token']:+.4f}", weights
            )
        )
    sim = ev["similarity"]
    lines += [
        "",
        f"Similarity (Kotara): top-1 agreement {sim['top1_agreement']:.3f}, mean Jensen–Shannon divergence "
        f"{sim['mean_jsd_nats']:.4f} nats (max ln 2 = 0.693), per-token NLL correlation "
        f"{_fmt(sim['nll_pearson'], 3)}.",
        "",
    ]
    return lines


def _section_claim2(results: dict[str, Any]) -> str:
    cfg, c2 = results["config"], results["claim2"]
    primary, letters = c2["primary_strategy"], c2["model_letters"]
    fusion_cfg = cfg["fusion"]
    lines = [
        "## Claim 2: Kotara fusion of two domain models vs each alone",
        "",
        f"Two `{fusion_cfg['arm']}` models (seed {fusion_cfg['seed']}) train on two groups of standard-library "
        f"modules; one byte-level BPE (vocabulary {cfg['vocab_size']}) is trained on both groups' training modules so "
        f"the vocabularies match. Held out per domain: the modules whose path hashes below "
        f"{fusion_cfg['test_fraction']} (never seen by the tokenizer or the models). Kotara (`--strategy all`, "
        "temperatures 1, equal weights and PoE betas: its defaults, nothing tuned) scores the models alone and "
        f"fused; the primary strategy, `{primary}`, was fixed in the config before the run; the others are reported "
        "as exploratory.",
        "",
        *_fusion_table(c2),
        "",
        "Domain module lists: "
        + "; ".join(f"**{n}**: {', '.join(d['modules'])}" for n, d in c2["domains"].items())
        + ".",
        "",
    ]
    for label, ev in c2["evaluations"].items():
        lines += _held_out_text_table(label, ev, primary, letters)
    if "own_tokenizers" in c2:  # python -m experiments.cross_tokenizer (or fusion.own_tokenizers: true)
        lines += own_tokenizer_section(c2["own_tokenizers"])
    lines += ["Commentary:", ""]
    lines += [
        "- " + _capitalise(_fusion_sentence(label, ev, primary, letters)) for label, ev in c2["evaluations"].items()
    ]
    lines += [
        "- Reading: the claim is that fusion helps when the models are similar but not identical. Here they share "
        "architecture, tokenizer and the docstring genre but not the modules; the single-domain texts show how much "
        "fusion costs (or gains) when one model is clearly the right one, the mixed text whether per-token weighting "
        "finds the right model for each part.",
        "- What would be needed to know more: more seeds per domain model (here one), larger models and "
        "held-out texts (the held-out sets are a handful of modules), and domains at graded distances to map "
        "gain against similarity.",
    ]
    return "\n".join(lines)


def _section_scaling() -> str:
    return (
        "## Re-running at a larger scale\n\n"
        "`python -m experiments.run --config experiments/configs/gpu.yaml` runs the same protocol on a GPU "
        "(`train.device: cuda`, `train.dtype: bfloat16`, Triton kernels through `model.kernels: auto`). The keys "
        "that set the scale: `train.model` (`d_model`, `n_layers`, `n_heads`, `max_seq_len`, `n_experts`, `top_k`), "
        "`train.max_steps` × `train.batch_size` (tokens), `seeds`, `vocab_size`, `data_dir` (a directory prepared "
        "with `python -m model.data prepare` for a corpus larger than the embedded one), `fusion.train` and "
        "`fusion.kotara` (`max_length`, `stride`, `batch_size`, `device`). Results go to `results_dir` "
        "(`experiments/gpu/` for that config), so the CPU results here are not overwritten."
    )


def _section_figure() -> str:
    return (
        "## Figure\n\n"
        f"![validation curves, final PPL per arm and seed, Kotara gains]({RESULTS_PNG})\n\n"
        "Left: validation loss during training (mean over seeds; thin lines: each seed). Middle: final validation "
        "PPL per arm, one dot per seed, bar = mean. Right: gain over the best single model on each held-out text "
        "(nats/token, above 0 = better than both models alone)."
    )


# --------------------------------------------------------------------------------------------------
# Files


def write_report(results: dict[str, Any], results_dir: str | Path, write_json: bool = True) -> list[Path]:
    """Write results.json, RESULTS.md and results.png into ``results_dir``; returns their paths."""
    from experiments.figure import render_png

    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / RESULTS_JSON
    if write_json:
        json_path.write_text(json.dumps(results, indent=1) + "\n")
    try:
        png = render_png(results, out / RESULTS_PNG)
    except ImportError:  # matplotlib is optional: the tables say everything the figure shows
        png = None
        print("experiments: matplotlib is not installed: no results.png (RESULTS.md has the tables)", file=sys.stderr)
    md = out / RESULTS_MD
    md.write_text(render_markdown(results, figure=png is not None))
    return [md] + ([json_path] if write_json else []) + ([png] if png is not None else [])


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.report RESULTS_JSON``: rewrite RESULTS.md and results.png next to it."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description="Rewrite RESULTS.md and results.png from a results.json written by python -m experiments.run.",
    )
    parser.add_argument("results_json", help="path of a results.json")
    args = parser.parse_args(argv)
    path = Path(args.results_json)
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"experiments.report: error: cannot read {str(path)!r}: {e}", file=sys.stderr)
        return 2
    for written in write_report(results, path.parent, write_json=False):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
