"""The embedded default corpus: docstrings of Python's standard library, extracted with ``ast``.

It exists on every machine that runs this project, with no download, so the CPU default
(``configs/tiny.yaml``) works offline. Files are visited in sorted order and the docstrings of each
module, class and function in source order, so the corpus is a deterministic function of the
Python installation (its hash is recorded in the prepared data's ``meta.json``). Tests, IDLE, the
bundled ``site-packages`` and a few generated or non-English modules are skipped.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

# Directories of the stdlib tree that are not the library itself (tests, vendored packages, tools)
# or whose docstrings are mostly noise for a small language model.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
_SKIP_FILES = {"this.py", "antigravity.py"}

DEFAULT_MAX_BYTES = 3_000_000  # "a few MB at most": enough for a tiny model to learn, fast to tokenize


def stdlib_dir() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library, minus tests and tools."""
    root = root or stdlib_dir()
    files = []
    for folder, dirs, names in os.walk(root):
        # Pruned, not walked and then filtered: the skipped trees (test/ above all) are most of the files.
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith("test")]
        files += [
            Path(folder, n) for n in names if n.endswith(".py") and n not in _SKIP_FILES and not n.startswith("test_")
        ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _definitions(tree: ast.Module) -> Iterator[ast.AST]:
    """Every class and function definition in ``tree``. Definitions are statements, and statements sit
    only in other statements' bodies (and in ``except`` handlers and ``match`` cases): the walk never
    enters an expression, most of a module's nodes (``ast.walk`` visited them all: 3x slower)."""
    blocks = (ast.stmt, ast.excepthandler, ast.match_case)
    stack: list[ast.AST] = [tree]
    while stack:
        for child in ast.iter_child_nodes(stack.pop()):
            if isinstance(child, blocks):
                stack.append(child)
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield child


def file_docstrings(path: Path) -> Iterator[str]:
    """Docstrings of a module and of every class/function in it, in source order (cleaned with inspect rules)."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old modules raise SyntaxWarning for invalid escapes
            tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    nodes = [tree, *_definitions(tree)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # the walk's order is not the source's: by line
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= 20:
            yield doc.strip()


def stdlib_documents(max_bytes: int = DEFAULT_MAX_BYTES, root: Path | None = None, progress: bool = False) -> list[str]:
    """The corpus: one document per module (its docstrings joined by blank lines), at most ``max_bytes``.

    ``progress`` shows a tqdm bar over the files (parsing the whole library takes a few seconds).

    Returns:
        list of str, deterministic for a given Python installation.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    documents: list[str] = []
    total = 0
    from tqdm.auto import tqdm

    for path in tqdm(stdlib_files(root), desc="extracting stdlib docstrings", unit="file", disable=not progress):
        text = "\n\n".join(file_docstrings(path))
        if not text:
            continue
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            continue  # skip a large module, later smaller ones may still fit
        documents.append(text)
        total += size
    if not documents:
        raise ValueError(f"no docstrings found under {str(root or stdlib_dir())!r}")
    return documents
