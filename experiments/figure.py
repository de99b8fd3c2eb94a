"""``results.png``: validation curves and final PPL of the claim-1 arms, and Kotara's gains (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render_png(results: dict[str, Any], path: Path) -> Path:
    """Three panels: validation curves, final PPL per arm and seed, Kotara gains per text.

    Raises ImportError when matplotlib is not installed (the caller writes the tables only).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    _panel_curves(axes[0], results["claim1"], colors)
    _panel_final_ppl(axes[1], results["claim1"], colors)
    _panel_fusion(axes[2], results["claim2"], colors)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panel_curves(ax, c1: dict[str, Any], colors: list[str]) -> None:
    for i, name in enumerate(c1["arms"]):
        runs = [r for r in c1["runs"] if r["arm"] == name]
        for r in runs:
            steps, losses = zip(*r["val_curve"])
            ax.plot(steps, losses, color=colors[i % len(colors)], alpha=0.3, lw=0.8)
        curves = [dict(map(tuple, r["val_curve"])) for r in runs]
        common = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [sum(c[s] for c in curves) / len(curves) for s in common]
        ax.plot(common, mean, color=colors[i % len(colors)], label=name, lw=2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("claim 1: validation loss")
    ax.legend(fontsize=8)


def _panel_final_ppl(ax, c1: dict[str, Any], colors: list[str]) -> None:
    names = list(c1["arms"])
    for i, name in enumerate(names):
        a = c1["arms"][name]
        ax.bar(i, a["val_ppl_mean"], color=colors[i % len(colors)], alpha=0.4)
        ax.scatter([i] * len(a["val_ppl"]), a["val_ppl"], color=colors[i % len(colors)], zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    lo = min(min(a["val_ppl"]) for a in c1["arms"].values())
    hi = max(max(a["val_ppl"]) for a in c1["arms"].values())
    ax.set_ylim(max(0.0, lo - 0.6 * (hi - lo + 1e-9) - 0.5), hi + 0.3 * (hi - lo + 1e-9) + 0.5)
    ax.set_ylabel("validation PPL (lower is better)")
    ax.set_title("claim 1: final validation PPL (dots: seeds)")


def _panel_fusion(ax, c2: dict[str, Any], colors: list[str]) -> None:
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
            offset = (k - len(series) / 2 + 0.5) * width
            ax.bar(j + offset, g, width, color=colors[k % len(colors)], label=series[k] if j == 0 else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), [f"{lab} text" for lab in labels])
    ax.set_ylabel("gain vs best single model (nats/token)")
    ax.set_title(f"claim 2: Kotara on held-out text ({', '.join(f'{k}={v}' for k, v in c2['model_letters'].items())})")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
