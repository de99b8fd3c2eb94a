"""``import model`` costs no transformers import, and still registers ``lunaris_moc`` with the Auto classes
before any of them can read a config, whichever is imported first (issue 32: the suite's speed)."""

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
