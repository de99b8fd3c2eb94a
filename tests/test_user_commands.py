"""The README's commands that run on a CPU in seconds, typed as a user types them, at a small size (issue 33).

Each runs in a fresh process from the repository root, with the environment a user's shell has (not this
process's Triton interpreter switch), and fails when it exits non-zero, with the command's stderr.
``pytest benchmarks/ --benchmark-only`` itself runs in ``.ci/run`` (``BENCH_SMOKE=1``: each case once).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_command(command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``command`` as typed in a shell at the repository root, ``python`` being this interpreter."""
    argv = shlex.split(command)
    assert argv[0] == "python", command
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # set by this process, not the user
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def test_cost_model_command():
    out = run_command("python -m benchmarks.cost_model").stdout
    assert "| moc_layer | fwd+bwd |" in out and "| expert_swiglu | fwd |" in out, out[-2000:]


@pytest.mark.parametrize("config", ["configs/tiny.yaml", "config_moc.yaml"])
def test_model_info_command(config):
    out = run_command(f"python -m model.info {config}").stdout
    assert "FLOPs/token" in out, out[-2000:]


@pytest.mark.slow
def test_compile_report_summary_command():
    """The compile report (real Triton compiler, sm_80 and sm_90) at one small op."""
    out = run_command("python -m moc_kernels.report --summary --ops target_and_set_log_probs").stdout
    rows = [line for line in out.splitlines() if line.startswith("| _")]
    assert {row.split("|")[2].strip() for row in rows} == {"sm_80", "sm_90"}, out


def test_kotara_demo_then_the_command_it_prints(tmp_path):
    """``python -m kotara.demo DIR`` (small models), then the ``kotara.py`` command it prints, as printed.

    At 64 positions the printed ``--max_length 1024`` exceeded the models' positions (IndexError in GPT-2's
    position embedding): the demo must print a command its own models can run.
    """
    demo = tmp_path / "demo"
    out = run_command(
        f"python -m kotara.demo {demo} --vocab 64 --words 300 --n_layer 1 --n_embd 16 --n_head 2 --n_positions 64"
    ).stdout
    printed = [line.strip() for line in out.splitlines() if line.strip().startswith("python kotara.py")]
    assert len(printed) == 1, out
    score = run_command(printed[0]).stdout
    assert "ppl" in score.lower(), score[-2000:]
