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
            "COLUMNS": "400",  # DVC's tables at their full width, not cut to a terminal's
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t"}


def _run(cwd: Path, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out}"
    return out


MAX_WIDTH = 160  # the widest `dvc metrics show` / `dvc exp show --only-changed` table (issue 12)


def _width(table: str) -> int:
    return max(len(line.rstrip()) for line in table.splitlines())


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
                           ".gitignore", "src", "models/init"])
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "init")

    _run(repo, "dvc", "pull", "-q", "data.dvc")  # offline, from the remote stored in the repository
    raw_files = [p for p in (repo / "data" / "raw").rglob("*") if p.is_file()]
    assert any(p.suffix == ".json" for p in raw_files) and len(raw_files) > 100

    for key, value in SMALL.items():
        _set_param(repo, key, value)
    out = _run(repo, "dvc", "repro")
    assert _ran(out) == {"crop", "split", "augment", "train", "evaluate", "tune"}, out
    crop = json.loads((repo / "reports" / "crop.json").read_text())
    assert crop["ok"] > 0 and crop["box_source"] == {"matched": crop["ok"]}
    with open(repo / "data" / "splits.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    split_of_group: dict[str, set] = {}
    for r in rows:
        split_of_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of_group.values()), "a person is in two splits"
    aug = json.loads((repo / "reports" / "augment.json").read_text())
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
    assert json.loads((repo / "reports" / "eval.json").read_text())["test_images"] > 0

    # DVC metrics are the stages' headline numbers: one narrow table, per-class tables only in the reports
    table = _run(repo, "dvc", "metrics", "show")
    assert _width(table) <= MAX_WIDTH, table
    assert "per_class" not in table and "photo_accuracy" in table and "val_macro_f1" in table, table
    for name in ("crop", "split", "augment", "train", "eval", "tune"):
        head = json.loads((repo / "metrics" / f"{name}.json").read_text())
        assert 0 < len(head) <= 3 and all(isinstance(v, (int, float)) for v in head.values()), (name, head)

    out = _run(repo, "dvc", "repro")
    assert _ran(out) == set(), f"second repro should do nothing:\n{out}"

    _set_param(repo, "crop.workers", 1)  # not a dependency: output is the same for any worker count
    assert _ran(_run(repo, "dvc", "repro")) == set()

    _set_param(repo, "train.registered_model", "another-name")  # not a training input
    assert _ran(_run(repo, "dvc", "repro")) == set()

    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "first run")  # the baseline of `dvc exp show` below
    _set_param(repo, "augment.strength", 0.5)
    out = _run(repo, "dvc", "repro")
    assert _ran(out) == {"augment", "train", "evaluate"}, out
    assert json.loads((repo / "reports" / "augment.json").read_text())["strength"] == 0.5
    # comparing with the committed run: the changed param and metrics fit the width (README's command)
    table = _run(repo, "dvc", "exp", "show", "--only-changed", "--drop", "^(data|models|src)/", "--no-pager")
    assert _width(table) <= MAX_WIDTH and "augment.strength" in table, table

    _set_param(repo, "model.head_units", 4)
    out = _run(repo, "dvc", "repro")
    assert _ran(out) == {"train", "evaluate"}, out
    assert "up to date" in _run(repo, "dvc", "status").lower()


def _train_runs(repo: Path) -> list:
    db = repo / "mlflow.db"
    if not db.exists():
        return []
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("kfer")
    return [] if exp is None else [r for r in client.search_runs([exp.experiment_id])
                                   if r.data.tags.get("kfer.stage") == "train"]


def test_dvc_exp_temp_queue_and_mlflow_run_log_into_the_main_stores(tmp_path, copy_repo_files):
    """`dvc exp run --temp` and a queued experiment run in copies under .dvc/tmp/exps that DVC deletes: their
    MLflow runs must land in the main repository's store (DVC_ROOT), not in the copy."""
    import time

    repo = tmp_path / "repo"
    repo.mkdir()
    _run(repo, "git", "init", "-q")
    copy_repo_files(repo, ["params.yaml", "dvc.yaml", "data.dvc", "dvc-storage", ".dvc/config", ".dvcignore",
                           ".gitignore", "src", "MLproject", "models/init"])
    for key, value in SMALL.items():
        _set_param(repo, key, value)
    _set_param(repo, "train.epochs", 1)
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-qm", "init")
    _run(repo, "dvc", "pull", "-q", "data.dvc")
    _run(repo, "dvc", "repro", "augment")  # the data stages once, in the workspace (the experiments reuse them)
    assert _train_runs(repo) == []

    _run(repo, "dvc", "exp", "run", "--temp", "train", "-S", "model.head_units=4")
    runs = _train_runs(repo)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params["model.head_units"] == "4"

    _run(repo, "dvc", "exp", "run", "--queue", "train", "-S", "model.head_units=2")
    _run(repo, "dvc", "queue", "start", "-j", "1")
    deadline = time.time() + 420
    while time.time() < deadline:
        status = _run(repo, "dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Success" in status and "Failed" not in status, status
    _run(repo, "dvc", "queue", "stop", "--kill")
    runs = _train_runs(repo)
    assert sorted(r.data.params["model.head_units"] for r in runs) == ["2", "4"], [r.data.params for r in runs]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))  # nothing left (or lost) in DVC's copies

    # `mlflow run`, as the README shows it: the train entry point goes through `dvc exp run`, and kfer logs into
    # the run MLflow opened (in kfer's experiment), so dvc.lock matches the workspace afterwards
    tiny = ["-P", "epochs=1", "-P", "head_units=3", "-P", "batch_size=32", "-P", "learning_rate=0.001",
            "-P", "kernel_initializer=he_normal"]
    proc = subprocess.run(["mlflow", "run", ".", "-e", "train", "--env-manager", "local", *tiny], cwd=repo,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "add --experiment-name kfer to the mlflow run command" in proc.stderr, \
        proc.stderr[-3000:]
    out = _run(repo, "mlflow", "run", ".", "-e", "train", "--env-manager", "local", "--experiment-name", "kfer",
               *tiny)
    mlflow_run_id = re.findall(r"=== Run \(ID '(\w+)'\) succeeded ===", out)
    runs = {r.data.params["model.head_units"]: r for r in _train_runs(repo)}
    assert sorted(runs) == ["2", "3", "4"] and mlflow_run_id == [runs["3"].info.run_id], out[-3000:]
    assert runs["3"].info.status == "FINISHED" and runs["3"].data.params["epochs"] == "1"  # MLflow's -P, same run
    assert "train" not in _run(repo, "dvc", "status", "train")  # dvc.lock is the run's
