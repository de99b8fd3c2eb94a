"""The GPU protocol's CPU dry run at its smallest size (so it cannot rot), its outputs and time limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks import protocol

ROOT = Path(__file__).resolve().parents[1]


def _run(outdir: Path, *args: str, allow_cpu: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_CPU"} | ({"ALLOW_CPU": "1"} if allow_cpu else {})
    cmd = ["bash", "benchmarks/run_gpu.sh", str(outdir)] if not args else [
        sys.executable, "-m", "benchmarks.protocol", str(outdir), *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env | {"PYTHON": sys.executable}, capture_output=True, text=True)


@pytest.mark.slow
def test_cpu_dry_run_leaves_exactly_the_five_files(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, "--size", "smoke")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(protocol.OUT_FILES)
    assert all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    results = json.loads((out / "results.json").read_text())
    status = {s["name"]: s["status"] for s in results["steps"]}
    assert status == {"machine": "ok", "correctness": "skipped", "training": "ok", "timings": "ok",
                      "timings_compile": "skipped"}  # fmt: skip
    assert results["machine"]["ceilings"]["bytes_per_s"] > 0 and results["machine"]["ceilings"]["flops_per_s"] > 0
    assert results["training"]["ok"] and results["training"]["checks"]["paths_agree"]
    timed = {(r["op"], r["pass"]) for r in results["timings"]["rows"]}
    assert timed == {("topk_gather", "fwd"), ("topk_gather", "fwd+bwd")}
    summary = (out / "summary.md").read_text()
    for section in ("## Ceilings (measured)", "## Training run", "## Timings (measured)", "| topk_gather | fwd |"):
        assert section in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/machine.log", "logs/training.log", "logs/timings.log", "logs/timings.jsonl"} <= names
    assert (out / "machine.txt").read_text().startswith("date_utc: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the protocol would start")
def test_bad_usage_exits_2_with_one_line(tmp_path):
    proc = _run(tmp_path / "out", allow_cpu=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA device") and proc.stderr.count("\n") == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    proc = _run(tmp_path / "busy", "--size", "smoke")
    assert proc.returncode == 2 and "notes.txt" in proc.stderr
    usage = subprocess.run(["bash", "benchmarks/run_gpu.sh"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: bash benchmarks/run_gpu.sh OUTDIR")


def test_a_step_past_its_limit_is_stopped_and_reported(tmp_path, monkeypatch):
    """The step's process (and its children: the whole group) is gone when run_step returns."""
    ctx = protocol.Context(size="smoke", work=tmp_path, out=tmp_path, cuda=False)
    step = protocol.Step("slow", "sleeps", {"smoke": protocol.MIN_STEP_S + 1})
    pids = tmp_path / "pids"
    code = (  # a parent and a child, both sleeping far past the limit
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(600)\n"
    )
    monkeypatch.setattr(protocol, "command", lambda s, c: [sys.executable, "-c", code])

    class StartedPopen(subprocess.Popen):
        """Starts the step's clock once both processes exist: on a loaded machine the parent could
        still be starting its child when a 6 s limit ran out, and the test then had no pids to check."""

        def wait(self, timeout=None):
            for _ in range(2400):  # at most 120 s for two Python processes to start
                if pids.exists() and len(pids.read_text().split()) == 2:
                    break
                time.sleep(0.05)
            return super().wait(timeout)

    monkeypatch.setattr(protocol.subprocess, "Popen", StartedPopen)
    record = protocol.run_step(step, ctx, deadline=time.monotonic() + 600)
    assert record["status"] == "timeout" and record["exit_code"] is None
    for pid in map(int, pids.read_text().split()):
        assert not _running(pid), f"process {pid} outlived its step"
    spent = protocol.run_step(step, ctx, deadline=time.monotonic() + 1)
    assert spent["status"] == "not run" and "budget" in spent["reason"]
    needs = protocol.run_step(protocol.Step("gpu", "x", {"smoke": 10}, needs_cuda=True), ctx, time.monotonic() + 600)
    assert needs["status"] == "skipped" and needs["reason"].startswith("needs CUDA")


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs: a killed process its new parent has not reaped yet (a zombie,
    state 'Z' in /proc) still answers kill(pid, 0) but runs no more."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"
