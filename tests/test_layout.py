"""The layout holds its import rule: one way only, no circles.

Layers, highest first: ``kfer.cli`` → ``kfer.demo`` → ``kfer.training`` → ``kfer.reporting`` → ``kfer.serving`` →
``kfer.data`` → the foundation modules at the top of the package (config, errors, catalog, files, tracking,
selection, plots, imports). A module imports only from its own package or from a lower layer; ``kfer.demo`` is imported
by ``kfer.cli`` alone. Imports inside functions count: a lazy import is still an edge of the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = ["foundation", "kfer.data", "kfer.serving", "kfer.reporting", "kfer.training", "kfer.demo", "kfer.cli"]
FOUNDATION = {"kfer", "kfer.config", "kfer.errors", "kfer.catalog", "kfer.files", "kfer.tracking", "kfer.selection",
              "kfer.plots", "kfer.imports"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """kfer module -> the kfer modules it imports: the import walk that also picks the served model's code and
    dvc.yaml's code deps (:func:`kfer.imports.module_imports`)."""
    from kfer.imports import module_imports

    files = {_module(p): p for p in (SRC / "kfer").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        source = path.read_text(encoding="utf-8")
        relative = [n.lineno for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom) and n.level]
        assert not relative, f"{name}: relative import at line(s) {relative} (kfer imports are absolute)"
        graph[name] = {m for m in module_imports(name, source) if m in files and m not in (name, "kfer")}
    return graph


def _layer(module: str) -> int:
    if module in FOUNDATION:
        return 0
    for i, prefix in enumerate(LAYERS[1:], start=1):
        if module == prefix or module.startswith(prefix + "."):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS or FOUNDATION in {__file__}")


def _package(module: str) -> str:
    return "foundation" if module in FOUNDATION else ".".join(module.split(".")[:2])


def test_every_import_runs_down_the_layers():
    wrong = []
    for module, deps in sorted(_graph().items()):
        for dep in sorted(deps):
            if _package(dep) == _package(module):
                continue
            if _layer(dep) >= _layer(module):
                wrong.append(f"{module} -> {dep}")
            elif _package(dep) == "kfer.demo" and module != "kfer.cli":
                wrong.append(f"{module} -> {dep} (demo is for the CLI and the tests only)")
    assert not wrong, "imports that run up or sideways:\n" + "\n".join(wrong)


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("rule", ["up", "circle"])
def test_the_checks_catch_a_bad_import(tmp_path, monkeypatch, rule):
    """The two checks above fail on a planted import that runs up the layers or closes a circle."""
    import shutil

    shutil.copytree(SRC / "kfer", tmp_path / "kfer")
    if rule == "up":
        bad = tmp_path / "kfer" / "data" / "split.py"
        bad.write_text(bad.read_text(encoding="utf-8") + "\nfrom kfer.training import model  # planted\n")
        check = test_every_import_runs_down_the_layers
    else:
        bad = tmp_path / "kfer" / "reporting" / "metrics.py"
        bad.write_text(bad.read_text(encoding="utf-8") + "\n\ndef _planted():\n    from kfer.reporting import "
                                                         "evaluate  # noqa: F401\n")
        check = test_no_import_circles
    monkeypatch.setattr(__import__(__name__, fromlist=["SRC"]), "SRC", tmp_path)
    with pytest.raises(AssertionError):
        check()
