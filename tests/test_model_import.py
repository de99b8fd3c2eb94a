"""``import model`` costs no transformers import, and still registers ``lunaris_moc`` with the Auto classes
before any of them can read a config, whichever is imported first; ``import kotara`` and its command line
cost none either (issue 32: the suite's speed, and every ``kotara`` command's start)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK_REGISTERED = """
from transformers import AutoConfig, AutoModelForCausalLM
from model import LunarisConfig, LunarisForCausalLM
assert type(AutoConfig.for_model("lunaris_moc")) is LunarisConfig
assert AutoModelForCausalLM._model_mapping[LunarisConfig] is LunarisForCausalLM
print("registered")
"""
FIRST = {
    # What training, model.info and the benchmarks import: no transformers until the Auto classes come.
    "model": "import model, model.info, model.cli\n"
    "assert 'transformers' not in sys.modules, sorted(m for m in sys.modules if m.startswith('transformers'))\n",
    # model.hf imports transformers, which loads the auto classes while model.hf is half done.
    "model.hf": "from model import export_hf\n",
}


@pytest.mark.parametrize("first", list(FIRST))
def test_import_model_is_lazy_and_registers(first):
    code = "import sys\n" + FIRST[first] + textwrap.dedent(CHECK_REGISTERED)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "registered", proc.stderr[-3000:]


def test_import_kotara_and_its_cli_is_lazy():
    """transformers (~5 s here) comes with the first model a command loads, not with ``import kotara``:
    a usage error, ``--help`` and the per-word path's own code start without it."""
    code = (
        "import sys\nimport kotara, kotara.cli, kotara.word_generate, kotara.word_score\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'lm_eval')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout[-2000:] + proc.stderr[-3000:]
