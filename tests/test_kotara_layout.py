"""The house of ``kotara/`` (issue 32), read from the source with ``ast``, nothing imported:

- no import circle between its modules (lazy imports inside functions count: a circle through
  them still ties the modules together);
- no module takes a ``_private`` name from another (``from m import _x``, or ``m._x`` on an
  imported kotara module);
- the command line is a layer: nothing outside ``kotara/cli/`` imports it, and ``kotara.py`` and
  the console script are one-line shims over ``kotara.cli.main``.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kotara"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return (ROOT / Path(*name.split(".")) / "__init__.py").is_file()


def _resolve(current: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current if _is_package(current) else current.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        base = base.rsplit(".", 1)[0]
    return f"{base}.{node.module}" if node.module else base


def _imports(name: str, tree: ast.Module, known: set[str]) -> list[tuple[str, str | None, int]]:
    """(imported kotara module, the name taken from it or None, line) for every import in the module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(name, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in known:  # ``from kotara import words``: the module itself
                    out.append((f"{source}.{alias.name}", None, node.lineno))
                elif source in known:
                    out.append((source, alias.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: {target for target, _, _ in _imports(name, tree, known) if target != name}
        for name, tree in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_circle_and_the_reader_sees_lazy_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("def f():\n    from kotara import cli\n    from kotara.evaluate import _sync\n")
    known = {"kotara", "kotara.cli", "kotara.evaluate"}
    assert _imports("kotara.word_score", tree, known) == [("kotara.cli", None, 2), ("kotara.evaluate", "_sync", 3)]


def test_kotara_has_no_import_circle():
    graph = _graph()
    assert "kotara.cli.score" in graph and "kotara.steps" in graph["kotara.evaluate"]
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_module_takes_a_private_name_from_another():
    modules = _modules()
    known = set(modules)
    found = []
    for name, tree in modules.items():
        aliases = {}  # local name -> kotara module, for ``module._name`` access
        for target, taken, line in _imports(name, tree, known):
            if target == name:
                continue
            if taken is not None and taken.startswith("_") and not taken.startswith("__"):
                found.append(f"{name}:{line} from {target} import {taken}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(name, node)
                aliases |= {
                    a.asname or a.name: f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in known
                }
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name: a.name for a in node.names if a.name in known}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and aliases.get(node.value.id, name) != name
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
    assert not found, "private names taken across modules: " + "; ".join(found)


def test_the_cli_is_a_layer_on_top():
    graph = _graph()
    below = {name: sorted(t for t in targets if t.startswith("kotara.cli")) for name, targets in graph.items()}
    assert not {n: t for n, t in below.items() if t and not n.startswith("kotara.cli")}, "the library imports the CLI"
    assert {"kotara.cli.score", "kotara.cli.generate", "kotara.cli.eval"} <= graph["kotara.cli"]
    for command in ("score", "generate", "eval"):
        assert "kotara.cli.options" in graph[f"kotara.cli.{command}"]
    shim = [line for line in (ROOT / "kotara.py").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert shim[1:] == ["from kotara.cli import main", "raise SystemExit(main())"]
    assert 'kotara = "kotara.cli:main"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8").splitlines()
