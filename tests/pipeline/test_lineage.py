"""Lineage tags tell the truth (issue 26): ``git.dirty`` says whether code, params or data differ from the commit,
not whether ``dvc repro`` is rewriting a stage's git-tracked outputs (it deletes them before it runs the stage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kfer.config import load_params
from kfer.tracking import lineage_tags
from tests.helpers import SMALL_PIPELINE, run_tool, set_param, train_runs, write_params

# git-tracked outputs of dvc.yaml's stages (their paths come from params.yaml's `paths` through ${paths.*})
TRACKED_OUTPUTS = ["reports/train.json", "metrics/train.json", "metrics/history.csv", "reports/crop.json",
                   "reports/eval/per_class.csv"]  # the last one lies inside an output folder (paths.eval_dir)


def _dirty(root: Path) -> str:
    return lineage_tags(load_params(root / "params.yaml"))["git.dirty"]


def _commit_all(repo: Path, message: str) -> None:
    run_tool(repo, "git", "add", "-A")
    run_tool(repo, "git", "commit", "-qm", message)


def test_dirty_ignores_stage_outputs_but_not_code_params_or_data(tmp_path, copy_repo_files):
    repo = tmp_path / "repo"
    write_params(repo)
    copy_repo_files(repo, ["dvc.yaml", "data.dvc"])
    for name in [*TRACKED_OUTPUTS, "reports/train.json.bak", "src/kfer/model.py"]:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("committed\n", encoding="utf-8")
    run_tool(repo, "git", "init", "-q")
    _commit_all(repo, "init")
    assert _dirty(repo) == "false"

    # what `dvc repro` does to a stage's outputs before and while it runs the stage
    for name in TRACKED_OUTPUTS[:-1]:
        (repo / name).unlink()
    (repo / TRACKED_OUTPUTS[-1]).write_text("rewritten\n", encoding="utf-8")
    assert _dirty(repo) == "false"
    run_tool(repo, "git", "rm", "-q", "--cached", "reports/crop.json")  # staged too
    assert _dirty(repo) == "false"
    (repo / "untracked.py").write_text("x = 1\n", encoding="utf-8")  # untracked files never count
    assert _dirty(repo) == "false"

    for name, edit in [("params.yaml", "# a comment\n"), ("data.dvc", "# another hash\n"),
                       ("src/kfer/model.py", "x = 2\n"), ("dvc.yaml", "\n"),
                       ("reports/train.json.bak", "not an output\n")]:  # a name that only starts like an output
        before = (repo / name).read_text(encoding="utf-8")
        (repo / name).write_text(before + edit, encoding="utf-8")
        assert _dirty(repo) == "true", name
        (repo / name).write_text(before, encoding="utf-8")
        assert _dirty(repo) == "false", name


def test_dirty_without_dvc_yaml_or_git(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    write_params(repo)
    (repo / "reports").mkdir()
    (repo / "reports" / "train.json").write_text("{}\n", encoding="utf-8")
    assert _dirty(repo) == "unknown"  # not a git repository
    run_tool(repo, "git", "init", "-q")
    _commit_all(repo, "init")
    assert _dirty(repo) == "false"
    (repo / "reports" / "train.json").unlink()
    assert _dirty(repo) == "true"  # no dvc.yaml: no stage outputs, every tracked file counts
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # git cannot be run
    tags = lineage_tags(load_params(repo / "params.yaml"))
    assert tags["git.dirty"] == "unknown" and tags["git.commit"] == "unknown"


@pytest.mark.slow
@pytest.mark.training
def test_dvc_repro_tags_the_train_run_clean(tmp_path, copy_repo_files):
    """In a clean committed repository, `dvc repro` of the train stage (whose git-tracked outputs DVC deletes first)
    tags the MLflow run git.dirty false; an edited params.yaml makes it true."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_repo_files(repo, ["params.yaml", "dvc.yaml", ".dvcignore", ".gitignore", "src", "models/init"])
    for key, value in {**SMALL_PIPELINE, "train.epochs": 1, "crop.box": "annotation"}.items():
        set_param(repo, key, value)
    run_tool(repo, "git", "init", "-q")
    run_tool(repo, "dvc", "init", "-q")
    _commit_all(repo, "init")
    run_tool(repo, "kfer", "demo-data", "--persons", "5", "--per-class", "2")  # data/raw (git-ignored)

    run_tool(repo, "dvc", "repro", "train")
    _commit_all(repo, "first run")  # dvc.lock and the git-tracked reports and metrics, as in the project
    assert (repo / "reports" / "train.json").exists() and (repo / "metrics" / "history.csv").exists()
    run_tool(repo, "dvc", "repro", "--force", "--single-item", "train")  # deletes them, then runs kfer train

    runs = sorted(train_runs(repo), key=lambda r: r.info.start_time)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert [r.data.tags["git.dirty"] for r in runs] == ["false", "false"]
    assert runs[1].info.run_id == json.loads((repo / "models" / "run.json").read_text())["run_id"]

    params = load_params(repo / "params.yaml")
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text(encoding="utf-8") + "# edited\n",
                                      encoding="utf-8")
    assert lineage_tags(params)["git.dirty"] == "true"
