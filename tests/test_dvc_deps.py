"""dvc.yaml lists, for every stage, each module of ``src/kfer`` that the stage's code imports (transitively,
function-level imports included): otherwise editing that module would not rerun the stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

#: the module each `kfer <stage>` of dvc.yaml runs
ENTRY = {"crop": "kfer.crop", "split": "kfer.split", "augment": "kfer.augment", "train": "kfer.train",
         "evaluate": "kfer.evaluate", "tune": "kfer.tune"}


def _file(module: str) -> Path | None:
    p = SRC.joinpath(*module.split("."))
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def _imports(file: Path, module: str) -> set[str]:
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kfer":
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if _file(f"{target}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kfer")
    return found


def closure(module: str) -> set[str]:
    """Files (relative to the repository) of ``module`` and of every kfer module it imports, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        f = _file(m)
        assert f is not None, f"{module}: import of {m}, which is not a module of src/kfer"
        seen.add(m)
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # a submodule imports its packages
        todo.extend(_imports(f, m))
    return {_file(m).relative_to(REPO).as_posix() for m in seen}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_closure_follows_function_level_and_package_imports():
    tune = closure("kfer.tune")
    assert "src/kfer/augment.py" in tune  # tune.data imports OnTheFlyAugment from it
    assert "src/kfer/augment.py" in closure("kfer.train")  # imported only inside train.data.augmentation
    assert "src/kfer/tune/workers.py" in tune and "src/kfer/serving.py" in tune


def test_every_stage_has_an_entry_module():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert set(stages) == set(ENTRY)


@pytest.mark.parametrize("stage", sorted(ENTRY))
def test_stage_deps_cover_its_imports(stage):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert stages[stage]["cmd"].split()[:2] == ["kfer", stage]
    deps = [d for d in stages[stage]["deps"] if isinstance(d, str) and d.startswith("src/")]
    needed = closure(ENTRY[stage]) - {"src/kfer/__init__.py"}  # the package docstring and version only
    missing = sorted(p for p in needed if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} does not list {missing} among its deps"
    for d in deps:
        assert (REPO / d).exists(), f"dvc.yaml stage {stage} lists {d}, which does not exist"
