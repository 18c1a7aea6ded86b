"""dvc.yaml lists, for every stage, each module of ``src/kfer`` that the stage's code imports (transitively,
function-level imports included): otherwise editing that module would not rerun the stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"

#: the module each `kfer <stage>` of dvc.yaml runs
ENTRY = {"crop": "kfer.data.crop", "split": "kfer.data.split", "augment": "kfer.data.augment",
         "train": "kfer.training.train", "evaluate": "kfer.reporting.evaluate", "tune": "kfer.training.tune.stage"}


def closure(module: str) -> set[str]:
    """Files (relative to the repository) of ``module`` and of every kfer module it imports, transitively: the
    walk that gives the served model its code (:func:`kfer.imports.module_closure`)."""
    from kfer.imports import module_closure, module_file

    return {module_file(m).relative_to(REPO).as_posix() for m in module_closure(module)}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_closure_follows_function_level_and_package_imports():
    tune = closure("kfer.training.tune.stage")
    assert "src/kfer/data/augment.py" in tune  # tune.data imports OnTheFlyAugment from it
    assert "src/kfer/data/augment.py" in closure("kfer.training.train")  # imported only inside inputs.augmentation
    assert "src/kfer/training/tune/workers.py" in tune and "src/kfer/serving/publish.py" in tune
    assert "src/kfer/data/__init__.py" in closure("kfer.data.split")  # a module's package comes with it


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
