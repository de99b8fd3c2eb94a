"""``python -m benchmarks.summary RESULTS.json``: the benchmark table, chart and GPU-readiness evidence.

    pytest benchmarks/ --benchmark-only --benchmark-json RESULTS.json
    python -m benchmarks.summary RESULTS.json [--out DIR] [--no-report] [--no-cost-model]
                                             [--activation-memory ACTIVATION.json]
                                             [--report-json REPORT.json] [--check]

Writes ``DIR/summary.md`` (default: next to RESULTS.json) and ``DIR/benchmarks.png`` (when matplotlib
is installed), and prints the markdown. Sections: timings (median per implementation, tokens/s, the
time ratios triton/reference, triton/compile and reference/loop: below 1 means the first is
faster), the speed bounds (``BOUNDS``), the compile report (``python -m moc_kernels.report --json``
in a subprocess), the cost model (labelled as a model), and the activation-memory result when given.
RESULTS may also be the JSON-lines file a run writes case by case with ``BENCH_STREAM=FILE``.

``--check`` exits 1 when a measured ratio misses its bound in ``BOUNDS``: speed bounds live here,
checked on a benchmark run, never asserted by CI's tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# "torch": plain PyTorch / transformers with no moc_kernels op (log_softmax, a model's own generate).
IMPL_ORDER = ("reference", "compile", "triton", "loop", "torch")
# Speed bounds, as ratios of medians: the fusion reference against log_softmax of both models' logits
# (benchmarks/test_bench_fusion_bounds.py), one strategy and all seven from one pass.
FUSION_OP, FUSION_BASELINE = "fusion_vs_log_softmax", "log_softmax"
BOUNDS = {"single strategy": 2.0, "all strategies": 3.0}


class SummaryError(ValueError):
    """A user error: bad path or a file that is not pytest-benchmark JSON."""


def load_results(path: str | Path) -> dict[str, Any]:
    """The pytest-benchmark JSON at ``path``, or the ``BENCH_STREAM`` JSON lines of a run in the same
    layout (raises SummaryError with a one-line reason)."""
    path = Path(path)
    if not path.is_file():
        raise SummaryError(f"results file not found: {str(path)!r} (write one with --benchmark-json)")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            return {"benchmarks": [r for r in records if "extra_info" in r and "stats" in r]}
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SummaryError(f"{str(path)!r} is not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise SummaryError(f"{str(path)!r} is not pytest-benchmark JSON (no 'benchmarks' list)")
    return data


def collect(data: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, machine): one row per (op, pass) with the median ms of each implementation."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    machine: dict[str, Any] = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "op" not in info or "impl" not in info:
            continue
        median_ms = info.get("median_ms", bench["stats"]["median"] * 1e3)
        key = (info["op"], info.get("pass_", ""))
        row = rows.setdefault(key, {"op": key[0], "pass": key[1], "shape": info.get("shape", ""), "medians": {}})
        row["medians"][info["impl"]] = median_ms
        row["tokens"] = info.get("tokens")
        if "work_flops" in info:  # a case that states its own useful work (no cost-model row)
            row["work"] = (info["work_flops"], info.get("work_bytes", 0.0))
        if info["impl"] == "triton" or "peak_memory_bytes" in info:
            row.setdefault("peak_memory_bytes", {})[info["impl"]] = info.get("peak_memory_bytes")
        for field in ("gpu", "cpu", "torch_threads", "torch", "timer"):
            if field in info:
                machine[field] = info[field]
    return list(rows.values()), machine


def _ratio(medians: dict[str, float], a: str, b: str) -> str:
    if a in medians and b in medians and medians[b] > 0:
        return f"{medians[a] / medians[b]:.2f}"
    return "-"


def _ceiling_fraction(row: dict[str, Any], median_ms: float, ceilings: dict[str, float]) -> str:
    """`` (41%)``: the row's useful work (cost model, or the case's own ``work_flops``/``work_bytes``) at
    ``median_ms`` as a fraction of the measured ceiling that bounds it (FLOPs or bytes, whichever
    takes longer at the ceilings); '' if unknown."""
    from benchmarks.cost_model import useful_work
    from benchmarks.shapes import BenchShape

    shape = BenchShape.parse(row.get("shape", ""))
    work = row.get("work") or (useful_work(row["op"], row["pass"], shape) if shape is not None else None)
    if work is None or median_ms <= 0:
        return ""
    flops, num_bytes = work
    compute_s, memory_s = flops / ceilings["flops_per_s"], num_bytes / ceilings["bytes_per_s"]
    return f" ({max(compute_s, memory_s) / (median_ms / 1e3):.0%})"


def timings_table(rows: list[dict[str, Any]], ceilings: dict[str, float] | None = None) -> str:
    """One row per (op, pass); with ``ceilings`` ({"flops_per_s", "bytes_per_s"}, measured) each time
    also shows the fraction of the roofline those ceilings allow for the op's useful work."""
    impls = [i for i in IMPL_ORDER if any(i in r["medians"] for r in rows)]
    head = ["op", "pass", *[f"{i} ms" for i in impls], "best tokens/s", "triton/reference", "triton/compile"]
    head.append("reference/loop")
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        med = r["medians"]
        cells = [r["op"], r["pass"]]
        for impl in impls:
            fraction = _ceiling_fraction(r, med[impl], ceilings) if ceilings and impl in med else ""
            cells.append(f"{med[impl]:.3f}{fraction}" if impl in med else "-")
        best = min(med.values())
        cells.append(f"{r['tokens'] / (best / 1e3):,.0f}" if r.get("tokens") else "-")
        cells += [
            _ratio(med, "triton", "reference"),
            _ratio(med, "triton", "compile"),
            _ratio(med, "reference", "loop"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_bounds(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(a line per bound checked, the lines of those missed): each fusion case's reference median over
    the log_softmax baseline's, against ``BOUNDS``. No fusion cases: nothing to check."""
    fusion = {r["pass"]: r["medians"] for r in rows if r["op"] == FUSION_OP}
    baseline = fusion.get(FUSION_BASELINE, {}).get("torch")
    lines, missed = [], []
    for case, medians in fusion.items():
        if case == FUSION_BASELINE or baseline is None or "reference" not in medians:
            continue
        kind = "all strategies" if case == "all" else "single strategy"
        ratio = medians["reference"] / baseline
        line = f"{FUSION_OP}[{case}] reference / log_softmax = {ratio:.2f}x (bound {BOUNDS[kind]:.1f}x, {kind})"
        lines.append(("ok     " if ratio <= BOUNDS[kind] else "MISSED ") + line)
        if ratio > BOUNDS[kind]:
            missed.append(line)
    return lines, missed


def chart(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """The medians as a PNG (``draw_timings``); None without matplotlib (optional: the table holds
    the same numbers)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    impls = [i for i in IMPL_ORDER if any(i in r["medians"] for r in rows)]
    fig = Figure(figsize=(9, 0.45 * len(rows) * max(len(impls), 1) / 2 + 1.5))
    draw_timings(fig.subplots(), rows, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def draw_timings(ax: Any, rows: list[dict[str, Any]], title: str) -> None:
    """Grouped horizontal bars of the medians (log scale) on ``ax``, one group per (op, pass)."""
    impls = [i for i in IMPL_ORDER if any(i in r["medians"] for r in rows)]
    height = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        ys = [i + j * height for i, r in enumerate(rows) if impl in r["medians"]]
        xs = [r["medians"][impl] for r in rows if impl in r["medians"]]
        ax.barh(ys, xs, height=height, label=impl)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))])
    ax.set_yticklabels([f"{r['op']} {r['pass']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time per call (ms, log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)


def compile_report_rows(report_json: str | Path | None = None) -> list[dict[str, Any]] | str:
    """Rows of ``python -m moc_kernels.report --json``: read from ``report_json``, or run in a subprocess
    with TRITON_INTERPRET=0 (the report compiles for real GPUs). A string says why there are none."""
    if report_json is not None:
        try:
            return json.loads(Path(report_json).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SummaryError(f"cannot read compile-report JSON {str(report_json)!r}: {err}") from None
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "moc_kernels.report", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"compile report failed (exit {proc.returncode}): {last}"
    return json.loads(proc.stdout)


def compile_report_table(report_json: str | Path | None = None) -> str:
    """The compile report as a markdown table, or why it is missing."""
    rows = compile_report_rows(report_json)
    if isinstance(rows, str):
        return rows
    if not rows:
        return "compile report: no kernel configurations found"
    columns = ("kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "tensor_cores")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def cost_model_table() -> str:
    from benchmarks import cost_model

    return cost_model.format_table(cost_model.all_rows())


def activation_table(path: str | Path) -> str:
    from benchmarks.activation_memory import format_report

    try:
        return format_report(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise SummaryError(f"cannot read activation-memory JSON {str(path)!r}: {err}") from None


def build(
    results: str | Path,
    out_dir: str | Path | None = None,
    report: bool = True,
    cost_model: bool = True,
    activation: str | Path | None = None,
    report_json: str | Path | None = None,
) -> str:
    """Write summary.md and benchmarks.png into ``out_dir``; return the markdown."""
    data = load_results(results)
    rows, machine = collect(data)
    if not rows:
        raise SummaryError(f"{str(results)!r} holds no cases of benchmarks/ (no extra_info op/impl)")
    out = Path(out_dir) if out_dir is not None else Path(results).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    where = machine.get("gpu") or f"CPU {machine.get('cpu', '?')} ({machine.get('torch_threads', '?')} torch threads)"
    title = f"benchmarks on {where}, torch {machine.get('torch', '?')}"
    png = chart(rows, out / "benchmarks.png", title)
    shapes = sorted({r["shape"] for r in rows if r["shape"]})
    parts = [
        f"## Timings ({where})",
        "",
        f"Measured by `pytest benchmarks/ --benchmark-only`; timer: {machine.get('timer', '?')}. "
        "Ratios are time ratios: below 1 means the first implementation is faster.",
        "Shapes: " + "; ".join(shapes),
        "",
        timings_table(rows),
        "",
        f"![benchmarks]({png.name})" if png else "(no chart: matplotlib is not installed)",
    ]
    bound_lines, _ = check_bounds(rows)
    if bound_lines:
        parts += ["", "## Speed bounds (`--check`)", "", "```", *bound_lines, "```"]
    if report:
        parts += ["", "## Compile report (sm_80 / sm_90, offline)", "", compile_report_table(report_json)]
    if cost_model:
        parts += ["", "## Cost model (a model, not a measurement)", "", cost_model_table()]
    if activation is not None:
        parts += ["", "## Activation memory", "", activation_table(activation)]
    markdown = "\n".join(parts) + "\n"
    (out / "summary.md").write_text(markdown)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="pytest-benchmark JSON written with --benchmark-json")
    parser.add_argument("--out", default=None, help="folder for summary.md and benchmarks.png (default: the JSON's)")
    parser.add_argument("--no-report", action="store_true", help="leave out the compile report")
    parser.add_argument("--no-cost-model", action="store_true", help="leave out the cost model table")
    parser.add_argument(
        "--activation-memory", default=None, help="JSON of `python -m benchmarks.activation_memory --json`"
    )
    parser.add_argument("--report-json", default=None, help="saved `python -m moc_kernels.report --json` output")
    parser.add_argument("--check", action="store_true", help="exit 1 when a speed bound (BOUNDS) is missed")
    args = parser.parse_args(argv)
    try:
        markdown = build(
            args.results, args.out, not args.no_report, not args.no_cost_model, args.activation_memory, args.report_json
        )
        print(markdown)
        if args.check:
            lines, missed = check_bounds(collect(load_results(args.results))[0])
            if not lines:
                raise SummaryError("--check: no fusion_vs_log_softmax cases with their log_softmax baseline")
            for line in missed:
                print(f"bound missed: {line}", file=sys.stderr)
            return 1 if missed else 0
    except SummaryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
