"""The GPU protocol: one prepared, time-boxed run that proves and times the kernels (docs/GPU.md).

    bash benchmarks/run_gpu.sh OUTDIR            (= python3 -m benchmarks.protocol OUTDIR)
    ALLOW_CPU=1 bash benchmarks/run_gpu.sh OUTDIR   the dry run on a machine without CUDA
    python -m benchmarks.protocol OUTDIR [--size gpu|cpu|smoke] [--budget-s SECONDS]

GPU time comes in short windows, so the steps run in order of value, each as a subprocess with its
own time limit (a step past it is stopped and reported; later steps still run), all within one
budget (``BUDGET_S``: 8 minutes on a GPU, cold Triton cache included):

1. ``machine``: GPU, driver, versions; memory and compute ceilings measured on the spot.
2. ``correctness`` (CUDA): the ``triton``-marked tests on CUDA tensors, compiled: every kernel
   forward and backward against its reference (fp32, bf16, fp16, ragged shapes, NaN-poisoned
   outputs) and the model's kernel path against its reference path (fp32, bf16 autocast).
3. ``training``: a short training run on the kernels, checked against the reference path.
4. ``timings``: ``pytest benchmarks/`` (kernel vs reference) at the GPT-2-small MoC shape, each case
   streamed as it ends; ``timings_compile``: the ``torch.compile(reference)`` cases after them.
5. the summary, rewritten after every step, so a run cut short still returns what it did.

OUTDIR ends up holding exactly ``OUT_FILES``: summary.md, results.json, machine.txt, protocol.png
and logs.tar.gz (every step's log and raw output). It runs on the GPU image's own packages, from the
repository root, with nothing installed (no wandb, no network). Without CUDA it refuses (exit 2)
unless ``ALLOW_CPU=1``: then the compiled steps are skipped and the rest runs at a small size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_FILES = ("summary.md", "results.json", "machine.txt", "protocol.png", "logs.tar.gz")
BUDGET_S = {"gpu": 480, "cpu": 180, "smoke": 120}
SUMMARY_RESERVE_S = 10  # kept free at the end of the budget for the last summary
MIN_STEP_S = 5  # a step is not started with less time than this left
BENCH_FILES = (  # in order of value: ops, the layer and a training step, Kotara
    "benchmarks/test_bench_ops.py",
    "benchmarks/test_bench_model.py",
    "benchmarks/test_bench_fusion_bounds.py",
    "benchmarks/test_bench_kotara_generate.py",
)


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    limit_s: dict[str, int]  # per size; a size missing here does not run the step
    needs_cuda: bool = False


STEPS = (
    Step("machine", "machine and measured ceilings", {"gpu": 40, "cpu": 30, "smoke": 20}),
    Step("correctness", "kernels vs references, compiled (pytest -m triton)", {"gpu": 150}, needs_cuda=True),
    Step("training", "short training run, kernels vs reference", {"gpu": 90, "cpu": 75, "smoke": 60}),
    # cpu: its benchmarks take ~50 s of the 2-core VM; 60 s timed out whenever another job shared it.
    Step("timings", "benchmarks: kernels and references", {"gpu": 150, "cpu": 80, "smoke": 30}),
    Step("timings_compile", "benchmarks: torch.compile(reference)", {"gpu": 50, "cpu": 60}),
)


@dataclass(frozen=True)
class Context:
    size: str
    work: Path  # logs and raw outputs (packed into logs.tar.gz)
    out: Path
    cuda: bool


def _pytest_options(module: str, options: list[str]) -> list[str]:
    return options if importlib.util.find_spec(module) is not None else []


def command(step: Step, ctx: Context) -> list[str]:
    """The subprocess of ``step``: everything runs as ``python -m`` from the repository root."""
    py, w = sys.executable, ctx.work
    if step.name == "machine":
        return [py, "-m", "benchmarks.machine", "--json", str(w / "machine.json"), "--text", str(w / "machine.txt"),
                "--size", ctx.size]  # fmt: skip
    if step.name == "correctness":
        options = _pytest_options("xdist", ["-n", str(min(8, os.cpu_count() or 1))])
        options += _pytest_options("pytest_timeout", ["--timeout=300"])
        return [py, "-m", "pytest", "-q", "-m", "triton", "tests", "-p", "no:cacheprovider",
                f"--junitxml={w / 'correctness.xml'}", *options]  # fmt: skip
    if step.name == "training":
        return [py, "-m", "benchmarks.training_check", "--out", str(w / "training.json"), "--size", ctx.size]
    files, select = {
        ("timings", "gpu"): (BENCH_FILES, "not compile"),
        ("timings", "cpu"): (BENCH_FILES[:1] + BENCH_FILES[2:3], "not compile"),
        ("timings", "smoke"): (BENCH_FILES[:1], "reference and topk_gather"),
        ("timings_compile", "gpu"): (BENCH_FILES[:2], "compile"),
        ("timings_compile", "cpu"): (BENCH_FILES[:1], "compile and topk_gather and not bwd"),
    }[step.name, ctx.size]
    return [py, "-m", "pytest", *files, "--benchmark-only", "-q", "-p", "no:cacheprovider", "-k", select]


def run_step(step: Step, ctx: Context, deadline: float) -> dict[str, Any]:
    """Run one step under its limit (and the budget's); its log goes to work/<name>.log."""
    record: dict[str, Any] = {"name": step.name, "title": step.title, "status": "skipped", "seconds": 0.0}
    if step.needs_cuda and not ctx.cuda:
        return record | {"reason": "needs CUDA (the CPU suite runs these tests under Triton's interpreter)"}
    if ctx.size not in step.limit_s:
        return record | {"reason": f"not run at size {ctx.size}"}
    limit = min(step.limit_s[ctx.size], deadline - time.monotonic())
    if limit < MIN_STEP_S:
        return record | {"status": "not run", "reason": "the protocol's time budget was spent"}
    env = os.environ | {"BENCH_STREAM": str(ctx.work / "timings.jsonl"), "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(ctx.work / f"{step.name}.log", "w") as log:
        log.write(f"$ {' '.join(command(step, ctx))}\n")
        log.flush()
        proc = subprocess.Popen(
            command(step, ctx), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            _stop(proc)
            code, status = None, "timeout"
    return record | {"status": status, "exit_code": code, "seconds": round(time.monotonic() - start, 1),
                     "limit_s": round(limit), "log": f"logs/{step.name}.log"}  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the step's whole process group (pytest workers included), SIGKILL what is left; return
    once no process of the group runs. A signal is delivered asynchronously: the group's leader can be
    reaped while a child is still on its way out, so the whole group is waited for, not only the leader."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_runs(proc.pid):
                return
            time.sleep(0.05)


def _group_runs(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (Linux /proc; a zombie runs no more)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(") ", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if int(group) == pgid and state != "Z":
            return True
    return False


# --------------------------------------------------------------------------------------------------
# Results: read the steps' raw outputs back


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def correctness_results(path: Path) -> dict[str, Any] | None:
    """Counts and failures from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").splitlines()[0][:200] if problem.get("message") else ""
            failed.append(f"{case.get('classname')}::{case.get('name')}: {message}")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return counts | {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                     "failed_tests": failed}  # fmt: skip


def timing_results(path: Path) -> dict[str, Any]:
    from benchmarks import summary

    if not path.is_file():
        return {"rows": [], "skipped": [], "failed": [], "machine": {}}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows, machine = summary.collect({"benchmarks": [r for r in lines if "extra_info" in r and "stats" in r]})
    return {
        "rows": rows,
        "skipped": [f"{r['name']}: {r['skipped']}" for r in lines if "skipped" in r],
        "failed": [f"{r['name']} ({r['failed']}): {r['error']}" for r in lines if "failed" in r],
        "machine": machine,
    }


def collect_results(ctx: Context, steps: list[dict[str, Any]], started: str, budget: float) -> dict[str, Any]:
    from benchmarks import summary

    machine = _read_json(ctx.work / "machine.json") or {}
    timings = timing_results(ctx.work / "timings.jsonl")
    bound_lines, missed = summary.check_bounds(timings["rows"])
    return {
        "protocol": "benchmarks/protocol.py (docs/GPU.md)",
        "size": ctx.size,
        "started_utc": started,
        "budget_s": budget,
        "steps": steps,
        "machine": machine,
        "correctness": correctness_results(ctx.work / "correctness.xml"),
        "training": _read_json(ctx.work / "training.json"),
        "timings": timings,
        "bounds": {"lines": bound_lines, "missed": missed},
    }


# --------------------------------------------------------------------------------------------------
# The outputs


def render_summary(results: dict[str, Any]) -> str:
    from benchmarks import summary

    facts, ceilings = results["machine"].get("facts", {}), results["machine"].get("ceilings")
    where = facts.get("gpu") or f"CPU {facts.get('cpu', '?')} (no GPU)"
    packages = facts.get("packages", {})
    out = [
        f"# GPU protocol: {where}",
        "",
        f"Started {results['started_utc']}; commit {facts.get('git_commit', '?')} "
        f"({facts.get('git_changed_files', '?')} changed files); size `{results['size']}`, budget "
        f"{results['budget_s']:.0f} s. torch {packages.get('torch')}, triton {packages.get('triton')}, "
        f"transformers {packages.get('transformers')}, CUDA {facts.get('cuda_runtime')}, driver "
        f"{facts.get('driver', '-')}.",
        "",
        "| step | status | seconds | limit s | note |",
        "|---|---|---:|---:|---|",
    ]
    for s in results["steps"]:
        note = s.get("reason", "")
        out.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('limit_s', '-')} | {note} |")
    if ceilings:
        out += ["", "## Ceilings (measured)", "",
                f"- memory: {ceilings['bytes_per_s'] / 1e9:,.1f} GB/s ({ceilings['copy']})",
                f"- compute: {ceilings['flops_per_s'] / 1e12:,.2f} TFLOP/s ({ceilings['matmul']})"]  # fmt: skip
    out += ["", "## Correctness (compiled kernels vs references)", ""]
    correctness = results["correctness"]
    if correctness is None:
        out.append("not run (see the steps table)")
    else:
        out.append(
            f"{correctness['passed']} passed, {correctness['failures']} failed, {correctness['errors']} errors, "
            f"{correctness['skipped']} skipped of {correctness['tests']}."
        )
        out += [f"- FAILED {name}" for name in correctness["failed_tests"]]
    out += ["", "## Training run", "", _training_text(results["training"])]
    timings = results["timings"]
    out += ["", "## Timings (measured)", ""]
    if timings["rows"]:
        shapes = sorted({r["shape"] for r in timings["rows"] if r["shape"]})
        out += [
            f"Timer: {timings['machine'].get('timer', '?')}. Each time is followed by the fraction of the "
            "roofline the measured ceilings allow for the op's useful work (cost model: its FLOPs or fewest "
            "HBM bytes, whichever bounds it); ratios are time ratios (below 1: the first is faster).",
            "Shapes: " + "; ".join(shapes),
            "",
            summary.timings_table(timings["rows"], ceilings),
        ]
        out += _memory_lines(timings["rows"])
    else:
        out.append("no timing finished (see the steps table)")
    if results["bounds"]["lines"]:
        out += ["", "## Speed bounds", "", "```", *results["bounds"]["lines"], "```"]
    if timings["failed"]:
        out += ["", f"Failed cases: {len(timings['failed'])}", "", *[f"- {line}" for line in timings["failed"]]]
    if timings["skipped"]:
        reasons = Counter(line.split(": ", 1)[-1] for line in timings["skipped"])
        out += ["", f"Skipped cases: {len(timings['skipped'])}", ""]
        out += [f"- {count} x {reason}" for reason, count in reasons.most_common()]
    out += ["", "![protocol](protocol.png)", ""]
    return "\n".join(out)


def _training_text(training: dict[str, Any] | None) -> str:
    if not training:
        return "not run (see the steps table)"
    losses = training["losses"]
    peak = training.get("peak_memory_bytes")
    return (
        f"{training['steps']} steps on {training['device']} ({training['dtype']}, kernels {training['kernels']}"
        + (f": {training['kernels_note']}" if training.get("kernels_note") else "")
        + f"), model {training['model']}: train loss {losses[0]:.4f} -> {losses[-1]:.4f}, validation "
        f"{training['val_loss_start']:.4f} -> {training['val_loss_end']:.4f}; the first "
        f"{len(training['reference_losses'])} steps' losses within {training['max_relative_difference']:.2e} "
        f"(relative) of the reference path's (tolerance {training['tolerance']:.0e}); "
        f"{training['tokens_per_s'] or 0:,.0f} tokens/s"
        + (f", peak memory {peak / 2**30:.2f} GiB" if peak else "")
        + f". Checks: {training['checks']}."
    )


def _memory_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        peaks = {impl: b for impl, b in (r.get("peak_memory_bytes") or {}).items() if b}
        if r["op"] == "training_step" and peaks:
            lines.append(
                "Training step peak memory (`torch.cuda.max_memory_allocated`): "
                + ", ".join(f"{impl} {b / 2**30:.2f} GiB" for impl, b in sorted(peaks.items()))
            )
    return ["", *lines] if lines else []


def render_png(results: dict[str, Any], path: Path) -> bool:
    """Training losses (kernels, reference) and the timings; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from benchmarks import summary

    rows = results["timings"]["rows"]
    fig = Figure(figsize=(13, max(4.0, 0.22 * len(rows) * 3 + 1.5)))
    ax_loss, ax_time = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    training = results["training"]
    if training:
        losses = training["losses"]
        ax_loss.plot(range(1, len(losses) + 1), losses, label=f"kernels ({training['kernels']})")
        ref = training["reference_losses"]
        ax_loss.plot(range(1, len(ref) + 1), ref, "o", label="reference path")
        ax_loss.legend(fontsize=8)
    ax_loss.set(xlabel="step", ylabel="training loss (nats/token)", title="training run")
    if rows:
        summary.draw_timings(ax_time, rows, "median time per call")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    return True


def finalize(ctx: Context, results: dict[str, Any]) -> None:
    """Rewrite every file of OUTDIR from what the steps have left so far (each by a rename)."""

    def write(name: str, fill) -> None:
        tmp = ctx.out / f".{name}.tmp"
        if fill(tmp) is not False:
            os.replace(tmp, ctx.out / name)

    write("results.json", lambda p: p.write_text(json.dumps(results, indent=1, default=str) + "\n"))
    write("summary.md", lambda p: p.write_text(render_summary(results)))
    machine = ctx.work / "machine.txt"
    write("machine.txt", lambda p: p.write_text(machine.read_text() if machine.is_file() else "machine step not run\n"))
    write("protocol.png", lambda p: render_png(results, p))

    def pack(p: Path) -> None:
        with tarfile.open(p, "w:gz") as tar:
            for item in sorted(ctx.work.iterdir()):
                tar.add(item, arcname=f"logs/{item.name}")

    write("logs.tar.gz", pack)


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m benchmarks.protocol", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="where the five result files go (created; must hold nothing else)")
    parser.add_argument("--size", choices=sorted(BUDGET_S), help="default: gpu on CUDA, else cpu")
    parser.add_argument("--budget-s", type=float, help="wall-time budget of all steps (default: BUDGET_S[size])")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("ALLOW_CPU") != "1":
        print("error: no CUDA device visible to torch; set ALLOW_CPU=1 for the CPU dry run", file=sys.stderr)
        return 2
    out = Path(args.outdir)
    extra = sorted(p.name for p in out.iterdir() if p.name not in OUT_FILES) if out.is_dir() else []
    if extra:
        print(f"error: {out} holds files the protocol did not write ({', '.join(extra[:3])}); use an empty folder",
              file=sys.stderr)  # fmt: skip
        return 2
    out.mkdir(parents=True, exist_ok=True)
    size = args.size or ("gpu" if cuda else "cpu")
    budget = args.budget_s if args.budget_s is not None else float(os.environ.get("PROTOCOL_BUDGET_S", BUDGET_S[size]))
    deadline = time.monotonic() + budget - SUMMARY_RESERVE_S
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="protocol-") as tmp:
        ctx = Context(size=size, work=Path(tmp), out=out, cuda=cuda)
        steps: list[dict[str, Any]] = []
        for step in STEPS:
            print(f"== {step.name}: {step.title}", flush=True)
            steps.append(run_step(step, ctx, deadline))
            record = steps[-1]
            note = f" - {record['reason']}" if "reason" in record else ""
            print(f"   {record['status']} ({record['seconds']} s){note}", flush=True)
            finalize(ctx, collect_results(ctx, steps, started, budget))
    failed = [s["name"] for s in steps if s["status"] in ("failed", "timeout")]
    print(f"results in {out}: {', '.join(OUT_FILES)}" + (f"; failed steps: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
