"""End to end with real DVC in a temp git repo: `dvc pull` the shipped demo data, `dvc repro` every stage with a
small model variant, a second run does nothing, and a changed param reruns only the stages that depend on it."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from .conftest import REPO

pytestmark = pytest.mark.slow


SMALL = {  # a small variant so that the whole pipeline runs in about a minute on 2 cores
    "crop.image_size": 32,
    "augment.copies": 1,
    "model.blocks": [1, 1],
    "model.base_width": 4,
    "model.head_units": 8,
    "train.epochs": 2,
    "train.batch_size": 32,
    "tune.n_trials": 2,
}


def _env() -> dict:
    bindir = str(Path(sys.executable).parent)  # kfer and dvc of this environment, as after ./setup.sh
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the repo's own store
    return {**env, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t"}


def _run(cwd: Path, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out}"
    return out


def _ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", out))


def _set_param(repo: Path, dotted: str, value) -> None:
    p = repo / "params.yaml"
    data = yaml.safe_load(p.read_text(encoding="utf-8"))
    *parents, leaf = dotted.split(".")
    node = data
    for k in parents:
        node = node[k]
    node[leaf] = value
    p.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


def test_dvc_pull_and_repro_data_stages(tmp_path, copy_repo_files):
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(repo, "git", "init", "-q")
    copy_repo_files(repo, ["params.yaml", "dvc.yaml", "data.dvc", "dvc-storage", ".dvc/config", ".dvcignore",
                           ".gitignore", "src"])
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "init")

    _run(repo, "dvc", "pull", "-q", "data.dvc")  # offline, from the remote stored in the repository
    raw_files = [p for p in (repo / "data" / "raw").rglob("*") if p.is_file()]
    assert any(p.suffix == ".json" for p in raw_files) and len(raw_files) > 100

    for key, value in SMALL.items():
        _set_param(repo, key, value)
    out = _run(repo, "dvc", "repro")
    assert _ran(out) == {"crop", "split", "augment", "train", "evaluate", "tune"}, out
    crop = json.loads((repo / "metrics" / "crop.json").read_text())
    assert crop["ok"] > 0 and crop["box_source"] == {"matched": crop["ok"]}
    with open(repo / "data" / "splits.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    split_of_group: dict[str, set] = {}
    for r in rows:
        split_of_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of_group.values()), "a person is in two splits"
    aug = json.loads((repo / "metrics" / "augment.json").read_text())
    n_train = sum(r["split"] == "train" for r in rows)
    assert aug["originals"] == n_train and aug["augmented"] == n_train * SMALL["augment.copies"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"crop", "split", "augment", "train", "evaluate", "tune"}
    assert (repo / "tune" / "best_params.yaml").exists()

    # the training run is in the repo's MLflow store, tagged with the data versions of dvc.lock and data.dvc,
    # and evaluate logged the test metrics into the same run
    run_id = json.loads((repo / "models" / "run.json").read_text())["run_id"]
    run = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    cropped_md5 = next(o["md5"] for o in lock["stages"]["crop"]["outs"] if o["path"] == "data/cropped")
    assert run.data.tags["dvc.crop.data/cropped"] == cropped_md5
    assert run.data.tags["dvc.data.dvc"] == yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]
    assert {"best_val_macro_f1", "test_accuracy", "test_macro_f1"} <= set(run.data.metrics)
    assert json.loads((repo / "metrics" / "eval.json").read_text())["test_images"] > 0

    out = _run(repo, "dvc", "repro")
    assert _ran(out) == set(), f"second repro should do nothing:\n{out}"

    _set_param(repo, "crop.workers", 1)  # not a dependency: output is the same for any worker count
    assert _ran(_run(repo, "dvc", "repro")) == set()

    _set_param(repo, "train.registered_model", "another-name")  # not a training input
    assert _ran(_run(repo, "dvc", "repro")) == set()

    _set_param(repo, "augment.strength", 0.5)
    out = _run(repo, "dvc", "repro")
    assert _ran(out) == {"augment", "train", "evaluate"}, out
    assert json.loads((repo / "metrics" / "augment.json").read_text())["strength"] == 0.5

    _set_param(repo, "model.head_units", 4)
    out = _run(repo, "dvc", "repro")
    assert _ran(out) == {"train", "evaluate"}, out
    assert "up to date" in _run(repo, "dvc", "status").lower()
