"""``results.json``, ``RESULTS.md`` and ``results.png`` from the numbers of one ``experiments.run``.

Every number and every verdict in RESULTS.md is computed here from ``results``; the commentary is a
template whose wording follows the numbers ("beat" / "did not beat"), so a re-run on another machine
or config rewrites it honestly.
"""

from __future__ import annotations

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


def _si(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}"
    return f"{x:.0f}"


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
    if v["primary_beats"]:
        head = (
            f"on the {label} text, fused `{primary}` beat the best single model, {who}: PPL {_fmt(fused_ppl)} vs "
            f"{_fmt(best_ppl)} ({_fmt(v['primary_gain'], 4)} nats/token)"
        )
    else:
        head = (
            f"on the {label} text, fused `{primary}` did not beat the best single model, {who}: PPL "
            f"{_fmt(fused_ppl)} vs {_fmt(best_ppl)} ({_fmt(v['primary_gain'], 4)} nats/token)"
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


# --------------------------------------------------------------------------------------------------
# Markdown


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
    env, cfg = results["environment"], results["config"]
    c1, c2 = results["claim1"], results["claim2"]
    arms = c1["arms"]
    wall = results["wall_s"]
    primary = c2["primary_strategy"]
    letters = c2["model_letters"]
    moc_name = next((n for n, a in arms.items() if a["is_moc"]), None)
    dense_names = [n for n, a in arms.items() if not a["is_moc"]]
    iso_names = [n for n in dense_names if arms[n]["matches_flops_of"]]
    same_tokens = [n for n in dense_names if not arms[n]["matches_flops_of"]]

    lines: list[str] = []
    add = lines.append
    add("# Results: MoC vs dense, and Kotara fusion vs its parts")
    add("")
    add(
        f"Written by `{results['command']}` (config `{results['config_path']}`), started {results['started_utc']}, "
        f"total wall time {wall['total'] / 60:.1f} min. Every number and verdict below is generated by "
        "`experiments/report.py` from `results.json`; nothing is edited by hand."
    )
    add("")

    # ---- summary
    summary = []
    if moc_name and same_tokens:
        cmp = compare_arms(arms, moc_name, same_tokens[0])
        summary.append(_claim1_sentence(moc_name, same_tokens[0], cmp, arms, "at the same tokens"))
    if moc_name and iso_names:
        cmp = compare_arms(arms, moc_name, iso_names[0])
        summary.append(_claim1_sentence(moc_name, iso_names[0], cmp, arms, "at about the same training FLOPs"))
    mixed = c2["evaluations"].get("mixed")
    if mixed:
        summary.append("Kotara: " + _fusion_sentence("mixed-domain", mixed, primary, letters))
    add("## Summary")
    add("")
    for s in summary:
        add(f"- {s}")
    add("")

    # ---- setup
    add("## Setup")
    add("")
    add(
        f"- Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, torch threads {env['torch_threads']}, "
        f"GPU: {env['gpu'] or 'none'} ({env['platform']})."
    )
    add("- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".")
    changes = {True: " (with uncommitted changes to tracked files)", False: "", None: ""}[env["git_tracked_changes"]]
    add(f"- Code: git commit `{env['git_commit']}`{changes}.")
    add(f"- Command: `{results['command']}`")
    add(
        f"- Wall time: {wall['total']:.0f} s total (corpus {wall['corpus']:.0f} s, claim 1 {wall['claim1']:.0f} s, "
        f"claim 2 {wall['claim2']:.0f} s)."
    )
    add("")

    # ---- claim 1
    data = c1["data"]
    any_arm = next(iter(arms.values()))
    tokens = any_arm["train_tokens"]
    add("## Claim 1: collaborating experts vs a dense FFN")
    add("")
    add(
        f"Corpus: docstrings of Python's standard library (`model.corpus`), {data['documents']} documents, byte-level "
        f"BPE vocabulary {data['vocab_size']}: {data['train_tokens']:,} training and {data['val_tokens']:,} validation "
        f"tokens (split by a hash of each document). Every run sees {tokens:,} training tokens "
        f"({tokens / data['train_tokens']:.2f} epochs). Validation PPL: the whole validation split in non-overlapping "
        f"windows of `max_seq_len` tokens ({data['val_tokens_scored']:,} tokens scored), at the end of training. "
        f"Unigram baseline (training token frequencies): PPL {_fmt(data['unigram_val_ppl'])}."
    )
    add("")
    add("| arm | FFN | params | fwd FLOPs/token | train FLOPs | val PPL per seed | mean ± std | min–max | wall s/run |")
    add("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for name, a in arms.items():
        m = a["model"]
        ffn = (
            f"MoC E={m.get('n_experts')}, k={m.get('top_k')}, F={a['ffn_hidden']}"
            if a["is_moc"]
            else f"dense F={a['ffn_hidden']}"
        )
        per_seed = ", ".join(f"{p:.2f} (s{s})" for p, s in zip(a["val_ppl"], a["seeds"]))
        std = f" ± {_fmt(a['val_ppl_std'])}" if a["val_ppl_std"] is not None else " (1 seed)"
        add(
            f"| `{name}` | {ffn} | {a['parameters']:,} | {_si(a['forward_flops_per_token'])} | "
            f"{_si(a['train_flops_total'])} | {per_seed} | {_fmt(a['val_ppl_mean'])}{std} | "
            f"{_fmt(a['val_ppl_min'])}–{_fmt(a['val_ppl_max'])} | {a['wall_s_mean']:.0f} |"
        )
    add("")
    add(
        "FLOPs: matrix products, 2 per multiply-add, training = 3 × forward (`model.info.flops_per_token`; the "
        "iso-FLOP width is solved in `experiments/flops.py`; the count is checked against "
        "`torch.utils.flop_counter` in `tests/test_experiments.py`)."
    )
    add("")
    if moc_name:
        moc = arms[moc_name]
        for iso in iso_names:
            a = arms[iso]
            ratio = a["forward_flops_per_token"] / moc["forward_flops_per_token"]
            base = arms[same_tokens[0]] if same_tokens else None
            epochs_needed = (
                tokens * moc["forward_flops_per_token"] / base["forward_flops_per_token"] / data["train_tokens"]
                if base
                else float("nan")
            )
            add(
                f"Iso-FLOP arm `{iso}`: the dense FFN is widened to F = {a['ffn_hidden']} (FLOPs/token {ratio:.3f} × "
                f"MoC's), with the same tokens, so its total training FLOPs match MoC's. Widening was chosen over "
                f"training the dense baseline on more tokens because the corpus is small: matching MoC's FLOPs with "
                f"tokens would take {epochs_needed:.1f} epochs of it, and the repetition would confound the "
                f"comparison. The price: `{iso}` has {a['parameters']:,} parameters, MoC {moc['parameters']:,}."
            )
            add("")
        add("Commentary:")
        add("")
        for other, how in [(n, "at the same tokens") for n in same_tokens] + [
            (n, "at about the same training FLOPs") for n in iso_names
        ]:
            add(f"- {_claim1_sentence(moc_name, other, compare_arms(arms, moc_name, other), arms, how)}")
        if same_tokens:
            base = arms[same_tokens[0]]
            add(
                f"- MoC costs {moc['forward_flops_per_token'] / base['forward_flops_per_token']:.2f}× the FLOPs "
                "per token "
                f"of `{same_tokens[0]}` (every expert runs on every token, plus two small attentions) and took "
                f"{moc['wall_s_mean'] / base['wall_s_mean']:.2f}× its wall time per run on this machine."
            )
        n_seeds = len(cfg["seeds"])
        add(
            f"- What would be needed to know more: {n_seeds} seed{'s' if n_seeds > 1 else ''} per arm only bound the "
            f"spread roughly (5+ would give a usable standard error); these models have ~{_si(moc['parameters'])} "
            f"parameters and see {_si(tokens)} tokens of a {_si(data['train_tokens'])}-token corpus, far from the "
            "regime where MoE-style layers are usually compared; a GPU run (below) with a larger model and corpus, "
            "and learning rates tuned per arm on the validation split, would test the claim at a meaningful scale."
        )
        add("")

    # ---- claim 2
    add("## Claim 2: Kotara fusion of two domain models vs each alone")
    add("")
    fusion_cfg = cfg["fusion"]
    add(
        f"Two `{fusion_cfg['arm']}` models (seed {fusion_cfg['seed']}) train on two groups of standard-library "
        "modules; "
        f"one byte-level BPE (vocabulary {cfg['vocab_size']}) is trained on both groups' training modules so the "
        f"vocabularies match. Held out per domain: the modules whose path hashes below {fusion_cfg['test_fraction']} "
        "(never seen by the tokenizer or the models). Kotara (`--strategy all`, temperatures 1, equal weights and "
        "PoE betas: its defaults, nothing tuned) scores the models alone and fused; the primary strategy, "
        f"`{primary}`, was fixed in the config before the run; the others are reported as exploratory."
    )
    add("")
    add("| model | domain | training modules | held-out modules | train tokens | steps × tokens | own val PPL |")
    add("|---|---|---:|---|---:|---:|---:|")
    for letter, name in letters.items():
        d, m = c2["domains"][name], c2["models"][name]
        held = ", ".join(f"`{p}`" for p in d["test_modules"])
        add(
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
    add("")
    add(
        "Domain module lists: "
        + "; ".join(f"**{n}**: {', '.join(d['modules'])}" for n, d in c2["domains"].items())
        + "."
    )
    add("")
    for label, ev in c2["evaluations"].items():
        add(f"### Held-out text: {label} ({ev['tokens']:,} tokens, {ev['bytes']:,} bytes)")
        add("")
        add("| | PPL | bits/byte | gain vs best single (nats/token) | mean weights a / b |")
        add("|---|---:|---:|---:|---:|")
        best = min(v["nll_per_token"] for v in ev["models"].values())
        for letter, v in ev["models"].items():
            add(
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
            add(
                _row(
                    f"{mark}fused {s}{mark}",
                    _fmt(v["ppl"]),
                    _fmt(v["bpb"], 4),
                    f"{v['gain_nats_per_token']:+.4f}",
                    weights,
                )
            )
        sim = ev["similarity"]
        add("")
        add(
            f"Similarity (Kotara): top-1 agreement {sim['top1_agreement']:.3f}, mean Jensen–Shannon divergence "
            f"{sim['mean_jsd_nats']:.4f} nats (max ln 2 = 0.693), per-token NLL correlation "
            f"{_fmt(sim['nll_pearson'], 3)}."
        )
        add("")
    if "own_tokenizers" in c2:  # python -m experiments.cross_tokenizer (or fusion.own_tokenizers: true)
        lines.extend(own_tokenizer_section(c2["own_tokenizers"]))
    add("Commentary:")
    add("")
    for label, ev in c2["evaluations"].items():
        add("- " + _capitalise(_fusion_sentence(label, ev, primary, letters)))
    add(
        "- Reading: the claim is that fusion helps when the models are similar but not identical. Here they share "
        "architecture, tokenizer and the docstring genre but not the modules; the single-domain texts show how much "
        "fusion costs (or gains) when one model is clearly the right one, the mixed text whether per-token weighting "
        "finds the right model for each part."
    )
    add(
        "- What would be needed to know more: more seeds per domain model (here one), larger models and "
        "held-out texts (the held-out sets are a handful of modules), and domains at graded distances to map "
        "gain against similarity."
    )
    add("")

    # ---- scaling and figure
    add("## Re-running at a larger scale")
    add("")
    add(
        "`python -m experiments.run --config experiments/configs/gpu.yaml` runs the same protocol on a GPU "
        "(`train.device: cuda`, `train.dtype: bfloat16`, Triton kernels through `model.kernels: auto`). The keys "
        "that set the scale: `train.model` (`d_model`, `n_layers`, `n_heads`, `max_seq_len`, `n_experts`, `top_k`), "
        "`train.max_steps` × `train.batch_size` (tokens), `seeds`, `vocab_size`, `data_dir` (a directory prepared "
        "with `python -m model.data prepare` for a corpus larger than the embedded one), `fusion.train` and "
        "`fusion.kotara` (`max_length`, `stride`, `batch_size`, `device`). Results go to `results_dir` "
        "(`experiments/gpu/` for that config), so the CPU results here are not overwritten."
    )
    if figure:
        add("")
        add("## Figure")
        add("")
        add(f"![validation curves, final PPL per arm and seed, Kotara gains]({RESULTS_PNG})")
        add("")
        add(
            "Left: validation loss during training (mean over seeds; thin lines: each seed). Middle: final validation "
            "PPL per arm, one dot per seed, bar = mean. Right: gain over the best single model on each held-out text "
            "(nats/token, above 0 = better than both models alone)."
        )
    add("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Figure


def render_png(results: dict[str, Any], path: Path) -> Path:
    """Three panels: validation curves, final PPL per arm and seed, Kotara gains per text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c1, c2 = results["claim1"], results["claim2"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    ax = axes[0]
    for i, name in enumerate(c1["arms"]):
        runs = [r for r in c1["runs"] if r["arm"] == name]
        for r in runs:
            steps, losses = zip(*r["val_curve"])
            ax.plot(steps, losses, color=colors[i % len(colors)], alpha=0.3, lw=0.8)
        curves = [dict(map(tuple, r["val_curve"])) for r in runs]
        common = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(
            common,
            [sum(c[s] for c in curves) / len(curves) for s in common],
            color=colors[i % len(colors)],
            label=name,
            lw=2,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("claim 1: validation loss")
    ax.legend()

    ax = axes[1]
    names = list(c1["arms"])
    for i, name in enumerate(names):
        a = c1["arms"][name]
        ax.bar(i, a["val_ppl_mean"], color=colors[i % len(colors)], alpha=0.4)
        ax.scatter([i] * len(a["val_ppl"]), a["val_ppl"], color=colors[i % len(colors)], zorder=3)
    ax.set_xticks(range(len(names)), names)
    lo = min(min(a["val_ppl"]) for a in c1["arms"].values())
    hi = max(max(a["val_ppl"]) for a in c1["arms"].values())
    ax.set_ylim(max(0.0, lo - 0.6 * (hi - lo + 1e-9) - 0.5), hi + 0.3 * (hi - lo + 1e-9) + 0.5)
    ax.set_ylabel("validation PPL (lower is better)")
    ax.set_title("claim 1: final validation PPL (dots: seeds)")

    ax = axes[2]
    labels = list(c2["evaluations"])
    first = c2["evaluations"][labels[0]]
    series = [f"model {m}" for m in first["models"]] + [f"fused {s}" for s in first["strategies"]]
    width = 0.8 / len(series)
    for j, label in enumerate(labels):
        ev = c2["evaluations"][label]
        best = min(v["nll_per_token"] for v in ev["models"].values())
        gains = [best - v["nll_per_token"] for v in ev["models"].values()]
        gains += [v["gain_nats_per_token"] for v in ev["strategies"].values()]
        for k, g in enumerate(gains):
            ax.bar(
                j + (k - len(series) / 2 + 0.5) * width,
                g,
                width,
                color=colors[k % len(colors)],
                label=series[k] if j == 0 else None,
            )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), [f"{lab} text" for lab in labels])
    ax.set_ylabel("gain vs best single model (nats/token)")
    ax.set_title(f"claim 2: Kotara on held-out text ({', '.join(f'{k}={v}' for k, v in c2['model_letters'].items())})")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], results_dir: str | Path) -> list[Path]:
    """Write results.json, RESULTS.md and results.png into ``results_dir``; returns their paths."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / RESULTS_JSON
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    try:
        png = render_png(results, out / RESULTS_PNG)
    except ImportError:  # matplotlib is optional: the tables say everything the figure shows
        png = None
        print("experiments: matplotlib is not installed: no results.png (RESULTS.md has the tables)", file=sys.stderr)
    md = out / RESULTS_MD
    md.write_text(render_markdown(results, figure=png is not None))
    return [md, json_path] + ([png] if png is not None else [])
