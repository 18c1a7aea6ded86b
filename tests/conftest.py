"""Shared fixtures. Real-image tests use ../shared/data (read-only) and skip when it is absent."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KFER_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def shared_dir(name: str) -> Path:
    """A folder of the real shared data, or skip the test with a clear message."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real-image data not available: {path} is absent (set KFER_SHARED_DATA to its folder)")
    return path


@pytest.fixture(autouse=True)
def _restore_sys_path():
    """``mlflow.pyfunc.load_model`` prepends the model's code folder (a partial copy of kfer) to sys.path for
    good; a later test's spawned workers would import that copy. Each test starts from the same sys.path."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


def write_params(root: Path, *overrides: dict | None):
    """Write ``root/params.yaml`` (the repository's, with each override merged in turn) and load it.

    Every path in it resolves under ``root``.
    """
    from kfer.config import deep_merge, load_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for over in overrides:
        raw = deep_merge(raw, over or {})
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return load_params(root / "params.yaml")


def prepare_demo(params, n_persons: int = 5, per_class: int = 2, seed: int = 1):
    """Synthetic demo photos → crop → split → augment, into the folders ``params`` names; returns ``params``."""
    from kfer.data.augment import run_augment
    from kfer.data.crop import run_crop
    from kfer.data.split import run_split
    from kfer.demo.photos import generate_demo

    generate_demo(params.path(params.paths.raw), [(c.name, c.ko) for c in params.classes],
                  n_persons=n_persons, per_class=per_class, seed=seed)
    run_crop(params)
    run_split(params)
    run_augment(params)
    return params


@pytest.fixture
def make_params(tmp_path):
    """Write a params.yaml into tmp_path (repo defaults + overrides) and load it; paths resolve under tmp_path."""

    def _make(overrides: dict | None = None, root: Path | None = None):
        return write_params(root or tmp_path, overrides)

    return _make


@pytest.fixture
def copy_repo_files():
    """Copy the named repository files/folders into a destination folder (for DVC end-to-end tests)."""

    def _copy(dest: Path, names: list[str]) -> None:
        for name in names:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)

    return _copy


def face_cropper(**settings):
    """A :class:`kfer.data.faces.FaceCropper` of the repository's params.yaml ``crop`` settings, with ``settings``
    (FaceCropper's field names) changed: the library has no defaults of its own."""
    import dataclasses

    from kfer.config import load_params
    from kfer.data.faces import FaceCropper

    return dataclasses.replace(FaceCropper.from_params(load_params(REPO / "params.yaml").crop), **settings)


def augment_cfg(**settings):
    """The repository's params.yaml ``augment`` section as an ``AugmentCfg``, with ``settings`` changed (validated)."""
    from kfer.config import AugmentCfg, load_params

    return AugmentCfg.model_validate({**load_params(REPO / "params.yaml").augment.model_dump(), **settings})
