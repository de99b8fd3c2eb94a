"""``kotara eval``'s output: the console table of every row and the ``--output_path`` JSON.

Rows are lm-eval results dicts (one ``simple_evaluate`` per row, from ``kotara.harness.evaluate_rows``).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from kotara.harness import FusedLM


def _metric_columns(results: dict[str, Any], task: str) -> list[str]:
    """The task's metrics, ``name,filter`` keys without their stderr twins, in lm-eval's order."""
    return [k for k in results[task] if "," in k and "_stderr," not in k]


def _number(value: Any) -> str:
    """4 decimals for rates and small values, 5 significant digits for large ones (perplexities)."""
    if not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.5g}"


def _row_label(row: str, labels: dict[str, str]) -> str:
    return f"model {row} ({labels[row]})" if row in labels else row


def format_rows(rows: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """One table per task: a line per row, a column per metric (value ± stderr), ``*`` at each best value.

    rows: {row: lm-eval results}; labels: {model label: path} (the rows that are one model alone).
    """
    first = next(iter(rows.values()))
    lines = []
    for task in first["results"]:
        columns = _metric_columns(first["results"], task)
        higher = first.get("higher_is_better", {}).get(task, {})
        n = first.get("n-samples", {}).get(task, {}).get("effective")
        shots = first.get("n-shot", {}).get(task)
        lines.append(f"{task}" + (f" ({n} documents, {shots}-shot)" if n is not None else ""))
        width = max(len(_row_label(r, labels)) for r in rows)
        lines.append(" " * width + "".join(f"  {c.split(',')[0]:>22}" for c in columns))
        best = {}
        for column in columns:
            values = {r: res["results"][task][column] for r, res in rows.items()}
            numeric = {r: v for r, v in values.items() if isinstance(v, (int, float))}
            if numeric:
                pick = max if higher.get(column.split(",")[0], True) else min
                best[column] = pick(numeric.values())
        for row, res in rows.items():
            cells = []
            for column in columns:
                value = res["results"][task][column]
                stderr = res["results"][task].get(column.replace(",", "_stderr,", 1))
                text = _number(value)
                if isinstance(stderr, (int, float)):
                    text += f" ± {_number(stderr)}"
                mark = "*" if best.get(column) == value else " "
                cells.append(f"  {text:>21}{mark}")
            lines.append(f"{_row_label(row, labels):<{width}}" + "".join(cells))
        lines.append("")
    lines.append("* best row of each column (by the metric's direction)")
    return "\n".join(lines)


def rows_json(
    rows: dict[str, dict[str, Any]], lm: FusedLM, labels: dict[str, str], config: dict[str, Any], samples: bool
) -> dict[str, Any]:
    """``--output_path``'s JSON: per row lm-eval's own ``results`` (and more), the config, models, versions, timings."""
    import platform

    import transformers
    from lm_eval.utils import handle_non_serializable

    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
    out_rows = {}
    for row, res in rows.items():
        entry = {k: res[k] for k in keep if k in res}
        entry["time_s"] = res["time_s"]
        if samples and "samples" in res:
            entry["samples"] = res["samples"]
        out_rows[row] = entry
    data = {
        "rows": out_rows,
        "row_kinds": {row: ("model" if row in labels else "strategy") for row in rows},
        "models": labels,
        "config": config,
        "versions": {
            "lunaris_moc": _package_version("lunaris-moc"),
            "lm_eval": _package_version("lm_eval"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "timings": {
            "total_s": sum(res["time_s"] for res in rows.values()),
            "rows_s": {row: res["time_s"] for row, res in rows.items()},
            "forward_s": lm.forward_s,
            "fusion_s": lm.fusion_s,
            "forward_calls": lm.forward_calls,
        },
    }
    return json.loads(json.dumps(data, default=handle_non_serializable))


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
