"""Shared fixtures (the helpers that tests import are in tests/helpers.py). Real-image tests use ../shared/data
(read-only) and skip when it is absent."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, write_params

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(autouse=True)
def _restore_sys_path():
    """``mlflow.pyfunc.load_model`` prepends the model's code folder (a partial copy of kfer) to sys.path for
    good; a later test's spawned workers would import that copy. Each test starts from the same sys.path."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


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
