"""The import graph of kfer's own sources, read from the files (never by importing them): which ``kfer`` modules a
module imports, at module level or inside functions, and the closure of a module over those imports. The one
import walk of kfer: the served model's ``code_paths`` (:func:`kfer.serving.publish.serving_modules`), the source
deps of each stage in dvc.yaml (tests/pipeline/test_dvc_deps.py) and the layer rule (tests/test_layout.py) come
from it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "kfer"


def module_file(name: str) -> Path | None:
    """The source file of the ``kfer`` module ``name`` (a package's ``__init__.py``), or None."""
    base = Path(__file__).resolve().parent.joinpath(*name.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_imports(module: str, source: str) -> set[str]:
    """The ``kfer`` modules that a module's source imports, at module level or inside functions (``from a.b
    import c`` counts ``a.b.c`` when that is a module, else ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if module_file(f"{target}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
    return found


def module_closure(root: str) -> list[str]:
    """``root`` and every ``kfer`` module it imports, transitively, with the packages that hold them (read from
    their sources, imports inside functions included, so a new import is followed without a list to keep).
    Names that are not modules (attributes of a package) are skipped."""
    todo, seen = [root], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name)
        if path is None:
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo.extend([*parents, *(module_imports(name, path.read_text(encoding="utf-8")) - seen)])
    return sorted(seen)
