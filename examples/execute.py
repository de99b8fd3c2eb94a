"""Execute the example notebooks top to bottom, as the tests do; ``--write`` stores the outputs in place.

    python examples/execute.py --write                 # re-run every notebook here and commit the outputs
    python examples/execute.py kotara_quickstart.ipynb # run one, keep the file as it is (a cell error exits 1)

The kernel is this interpreter (a kernel spec written to a temporary directory points at
``sys.executable``), so a notebook sees exactly the packages of the environment that runs this
script or the tests, whatever Jupyter kernels the machine has. Notebooks run in a temporary working
directory and write their artefacts (token shards, checkpoints, exported models) under the kernel's
temporary directory (``TMPDIR``), which is deleted afterwards: nothing lands in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
NOTEBOOKS = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))
KERNEL_NAME = "lunaris-examples"
TIMEOUT_S = 600  # per cell; the notebooks are meant to finish in well under 2 minutes in all


def execute(path: str | Path, cwd: str | Path | None = None, timeout: int = TIMEOUT_S):
    """Run every cell of the notebook at ``path`` in a fresh kernel of this interpreter.

    Returns the executed ``nbformat.NotebookNode`` (outputs filled in, file untouched). Raises
    ``nbclient.exceptions.CellExecutionError`` at the first cell that raises.
    """
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    with tempfile.TemporaryDirectory(prefix="lunaris-notebook-") as scratch:
        spec_dir = Path(scratch) / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])
        workdir, tmpdir = Path(scratch) / "cwd", Path(scratch) / "tmp"
        workdir.mkdir()
        tmpdir.mkdir()
        client = NotebookClient(
            nb,
            km=KernelManager(
                kernel_name=KERNEL_NAME, kernel_spec_manager=specs, connection_file=str(Path(scratch) / "kernel.json")
            ),
            timeout=timeout,
            resources={"metadata": {"path": str(cwd or workdir)}},
        )
        # The kernel's temporary directory (where the notebooks put their artefacts) goes with `scratch`.
        client.execute(env=dict(os.environ, TMPDIR=str(tmpdir)))
    # The committed notebooks name the standard kernel, not the temporary one.
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    return nb


def main(argv: list[str] | None = None) -> int:
    import nbformat
    from nbclient.exceptions import CellExecutionError

    parser = argparse.ArgumentParser(prog="python examples/execute.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help=f"notebooks in examples/ (default: all: {', '.join(NOTEBOOKS)})")
    parser.add_argument("--write", action="store_true", help="write the executed notebooks back, outputs included")
    args = parser.parse_args(argv)
    for name in args.notebooks or NOTEBOOKS:
        path = EXAMPLES / Path(name).name
        start = time.perf_counter()
        try:
            nb = execute(path)
        except CellExecutionError as err:
            print(f"{path.name}: a cell failed:\n{err}", file=sys.stderr)
            return 1
        seconds = time.perf_counter() - start
        if args.write:
            for cell in nb.cells:
                cell.metadata.pop("execution", None)  # timestamps: noise in the committed file
            nbformat.write(nb, str(path))
        size = path.stat().st_size
        written = f", written ({size / 1024:.0f} KiB)" if args.write else ""
        print(f"{path.name}: executed in {seconds:.1f} s{written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
