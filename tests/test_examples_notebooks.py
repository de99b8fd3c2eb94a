"""The example notebooks (examples/*.ipynb): committed with their outputs, and executed top to bottom.

The fast test reads the committed files: small enough, every code cell executed in one run without an
error, the figures and the notebook's own checks present. The slow tests execute each notebook again with
nbclient in a kernel of this interpreter (``examples/execute.py``, which the committed outputs came from;
all the notebooks at once, each in its own kernel process) and fail on any cell error (each notebook
``assert``s its own checks: Kotara's per-token NLLs recomputed from the fusion op, the Triton kernels
against the references, the Hugging Face round trip).
"""

from __future__ import annotations

import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MAX_BYTES = 1_000_000  # committed with their images; GitHub renders them on the repository page
MAX_SECONDS = 120  # per notebook on CI's 2 cores; reported, not asserted (shared machines are noisy)

# notebook -> (figures it draws, lines its checks print only when they pass)
EXPECTED = {
    "kotara_quickstart.ipynb": (
        2,
        [
            "per-token NLLs of all 7 strategies equal Kotara's",
            "fused mixture_entropy",  # a row of Kotara's table: every strategy was scored
            "top-1 agreement",  # the similarity report
            "fused mixture_entropy      mean weight of a",  # a fused generation through kotara.generate
        ],
    ),
    "moc_quickstart.ipynb": (
        2,
        [
            "kernels match the reference",
            "the loaded model's logits equal the exported model's",
            "greedy (with and without cache):",
        ],
    ),
}


def _code_cells(nb: dict) -> list[dict]:
    return [cell for cell in nb["cells"] if cell["cell_type"] == "code"]


def _outputs(nb: dict) -> list[dict]:
    return [output for cell in _code_cells(nb) for output in cell.get("outputs", [])]


def _images(nb: dict) -> int:
    return sum("image/png" in output.get("data", {}) for output in _outputs(nb))


def _text(nb: dict) -> str:
    parts = []
    for output in _outputs(nb):
        text = output.get("text", output.get("data", {}).get("text/plain", ""))
        parts.append("".join(text) if isinstance(text, list) else text)
    return "\n".join(parts)


def _check_outputs(name: str, nb: dict) -> None:
    figures, markers = EXPECTED[name]
    errors = [o for o in _outputs(nb) if o["output_type"] == "error"]
    assert not errors, f"{name}: error outputs: {[e.get('ename') for e in errors]}"
    assert _images(nb) == figures, f"{name}: {_images(nb)} figures, expected {figures}"
    text = _text(nb)
    for marker in markers:
        assert marker in text, f"{name}: the output lacks {marker!r}"


def test_every_notebook_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_notebook_has_its_outputs(name):
    path = EXAMPLES / name
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size:,} bytes"
    nb = json.loads(path.read_text(encoding="utf-8"))
    counts = [cell.get("execution_count") for cell in _code_cells(nb)]
    assert counts == list(range(1, len(counts) + 1)), f"{name}: not executed top to bottom in one run: {counts}"
    _check_outputs(name, nb)


def _execute_module():
    spec = importlib.util.spec_from_file_location("examples_execute", EXAMPLES / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed_execute(name: str, cwd: Path):
    start = time.perf_counter()
    nb = _execute_module().execute(EXAMPLES / name, cwd=cwd)  # raises CellExecutionError on the first failing cell
    return nb, time.perf_counter() - start


@pytest.fixture(scope="module")
def executions(request, tmp_path_factory):
    """Every notebook this session executes, started at once: each runs in its own kernel (a process,
    one torch thread), so on CI's 2 cores they run side by side, in the longest one's time instead of
    the sum. Yields (examples/ before any started, {name: (future (notebook, seconds), its cwd)})."""
    names = [item.callspec.params["name"] for item in request.session.items if item.originalname == EXECUTES]
    before = sorted(p.name for p in EXAMPLES.iterdir())
    with ThreadPoolExecutor(max(len(names), 1)) as pool:
        runs = {}
        for name in names:
            cwd = tmp_path_factory.mktemp(name.removesuffix(".ipynb"))
            runs[name] = (pool.submit(_timed_execute, name, cwd), cwd)
        yield before, runs


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes(name, executions):
    before, runs = executions
    future, cwd = runs[name]
    nb, seconds = future.result()
    print(f"{name}: executed in {seconds:.1f} s (target: {MAX_SECONDS} s on CI's 2 cores, beside the others)")
    _check_outputs(name, nb)
    assert not any(cwd.iterdir()), "the notebook wrote into its working directory"
    for other, _ in runs.values():  # any of them may write into examples/ while they run: wait for all
        other.exception()
    assert sorted(p.name for p in EXAMPLES.iterdir()) == before, "a notebook wrote into examples/"


EXECUTES = test_notebook_executes.__name__
