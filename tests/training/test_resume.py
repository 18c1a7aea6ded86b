"""A `kfer train` killed with SIGKILL continues from its last finished epoch: real processes, real MLflow store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from kfer import tracking
from tests.helpers import TINY, prepare_demo, subprocess_env

# small batches: epochs long enough to be killed in; head dropout: its seed state must be restored too
FOUR_EPOCHS = {**TINY, "train": {**TINY["train"], "epochs": 4, "batch_size": 4},
               "model": {**TINY["model"], "head_dropout": 0.3}}


def _train(root: Path, kill_at: str | None = None) -> tuple[int, list[str]]:
    """Run `kfer train` in ``root``; with ``kill_at``, SIGKILL it as soon as that line is printed."""
    proc = subprocess.Popen([sys.executable, "-m", "kfer.cli", "train"], cwd=root,
                            env=subprocess_env(PYTHONUNBUFFERED="1"), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if kill_at is not None and line.startswith(kill_at):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    return proc.wait(timeout=300), lines


def _epoch_lines(lines):
    return [x for x in lines if x.startswith("Epoch ")]


@pytest.fixture
def two_projects(tmp_path, make_params, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return [prepare_demo(make_params(FOUR_EPOCHS, root=tmp_path / name)) for name in ("ref", "killed")]


@pytest.mark.training
def test_sigkill_after_epoch_2_resumes_at_epoch_3_with_the_uninterrupted_result(two_projects):
    ref, killed = two_projects
    code, out = _train(ref.root)
    assert code == 0, "\n".join(out[-30:])
    assert _epoch_lines(out)[0] == "Epoch 1/4"

    code, out = _train(killed.root, kill_at="Epoch 3/4")
    assert code == -signal.SIGKILL, "\n".join(out[-30:])
    backup = killed.path(killed.paths.train_backup)
    state = json.loads((backup / "state.json").read_text())
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert not killed.path(killed.paths.model).exists()  # no DVC output from the killed run

    code, out = _train(killed.root)
    assert code == 0, "\n".join(out[-30:])
    assert _epoch_lines(out)[0] == "Epoch 3/4"  # continues; epochs 1-2 are not trained again
    assert not backup.exists()  # cleaned when the run ended well

    hist_ref = pd.read_csv(ref.path(ref.paths.history))
    hist = pd.read_csv(killed.path(killed.paths.history))
    assert hist["epoch"].tolist() == [1, 2, 3, 4]  # one continuous history
    pd.testing.assert_frame_equal(hist, hist_ref, rtol=1e-5, atol=1e-6)
    m_ref = json.loads(ref.path(ref.paths.train_metrics).read_text())
    m = json.loads(killed.path(killed.paths.train_metrics).read_text())
    for key in ("best_val_loss", "best_val_accuracy", "best_val_macro_f1", "best_epoch", "epochs_run"):
        assert m[key] == pytest.approx(m_ref[key], rel=1e-5, abs=1e-6), key

    # one MLflow run, resumed: FINISHED, tagged, with every epoch's metrics once
    client = mlflow.MlflowClient(tracking.tracking_uri(killed))
    exp = client.get_experiment_by_name(killed.train.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["kfer.resumed_after_epoch"] == "2"
    assert json.loads(killed.path(killed.paths.train_run).read_text())["run_id"] == run.info.run_id
    assert [mm.step for mm in client.get_metric_history(run.info.run_id, "val_loss")] == [0, 1, 2, 3]


def test_backup_of_other_params_is_discarded(tmp_path, make_params, monkeypatch):
    from kfer.training.resume import TrainBackup

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = make_params(FOUR_EPOCHS)
    b = TrainBackup(params, "fp-a")
    b.begin("run-a")
    assert TrainBackup(params, "fp-a").run_id == "run-a"  # same fingerprint: resumed
    assert TrainBackup(params, "fp-b").run_id is None  # other params or data: starts over ...
    assert not b.dir.exists()  # ... and the stale backup is gone
    TrainBackup(params, "fp-a").begin("run-a")
    off = make_params({**FOUR_EPOCHS, "train": {**FOUR_EPOCHS["train"], "resume": False}}, root=tmp_path)
    assert TrainBackup(off, "fp-a").run_id is None  # train.resume: false
