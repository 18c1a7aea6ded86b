"""The pretraining phase (``data.sources.<name>.split: pretrain`` + ``train.pretrain_epochs``): trained first, on
its own rows, logged, left out of tuning, and resumed by epoch after SIGKILL like the main phase. Real
processes, real MLflow store, real TensorFlow on a tiny model."""

from __future__ import annotations

import json
import signal

import mlflow
import pandas as pd
import pytest

from kfer import tracking
from kfer.config import load_params
from kfer.errors import UserError
from tests.training.test_resume import FOUR_EPOCHS, _epoch_lines, _train

PRETRAIN = {**FOUR_EPOCHS,
            "data": {"sources": {"main": {}, "extra": {"split": "pretrain"}}},
            "train": {**FOUR_EPOCHS["train"], "epochs": 3, "pretrain_epochs": 2}}


def _project(params):
    from kfer.data.augment import run_augment
    from kfer.data.crop import run_crop
    from kfer.data.split import run_split
    from kfer.demo.photos import generate_demo

    classes = [(c.name, c.ko) for c in params.classes]
    raw = params.path(params.paths.raw)
    generate_demo(raw / "main", classes, n_persons=5, per_class=2, seed=1)
    generate_demo(raw / "extra", classes, n_persons=2, per_class=2, seed=7)
    run_crop(params)
    run_split(params)
    run_augment(params)
    return params


@pytest.fixture
def two_projects(tmp_path, make_params, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return [_project(make_params(PRETRAIN, root=tmp_path / name)) for name in ("ref", "killed")]


def test_pretraining_runs_first_on_its_rows_and_resumes_after_sigkill_in_either_phase(two_projects):
    from kfer.training.inputs import manifest_datasets, phase_tables, train_table
    from kfer.training.tune.data import trial_table

    ref, killed = two_projects
    manifest = train_table(ref)
    datasets = manifest_datasets(ref, manifest)
    pre, main = phase_tables(ref, manifest, datasets)
    assert len(pre) == (datasets == "extra").sum() > 0 and len(main) == (datasets == "main").sum() > 0
    splits = pd.read_csv(ref.path(ref.paths.splits), keep_default_na=False)
    assert set(pre["source"]) == set(splits.loc[splits["source"] == "extra", "path"])
    assert set(splits.loc[splits["source"] == "extra", "split"]) == {"train"}  # never validated or tested on
    trials = trial_table(ref)  # tuning trains without the pretraining phase, on the other train rows
    assert set(trials["path"]) == set(splits.loc[(splits["split"] == "train") & (splits["source"] == "main"), "path"])

    code, out = _train(ref.root)
    assert code == 0, "\n".join(out[-30:])
    assert _epoch_lines(out) == ["Epoch 1/2", "Epoch 2/2", "Epoch 1/3", "Epoch 2/3", "Epoch 3/3"]
    report = json.loads(ref.path(ref.paths.train_metrics).read_text())
    assert report["pretrain_epochs"] == 2 and report["pretrain_images"] == len(pre)
    assert report["train_images"] == len(main) and report["epochs_run"] == 3
    assert pd.read_csv(ref.path(ref.paths.history))["epoch"].tolist() == [1, 2, 3]  # the main phase's
    client = mlflow.MlflowClient(tracking.tracking_uri(ref))
    run_id = json.loads(ref.path(ref.paths.train_run).read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "pretrain_loss")] == [0, 1]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0, 1, 2]

    # killed in the pretraining phase, at the start of the main phase (pretraining finished, no main epoch yet),
    # then later in the main phase: each attempt continues where the last one ended
    code, out = _train(killed.root, kill_at="Epoch 2/2")
    assert code == -signal.SIGKILL, "\n".join(out[-30:])
    backup = killed.path(killed.paths.train_backup)
    assert json.loads((backup / "pretrain" / "state.json").read_text())["epoch"] == 1
    code, out = _train(killed.root, kill_at="Epoch 1/3")
    assert code == -signal.SIGKILL, "\n".join(out[-30:])
    assert _epoch_lines(out) == ["Epoch 2/2", "Epoch 1/3"], "\n".join(out)  # pretraining epoch 1 not redone
    assert json.loads((backup / "pretrain" / "state.json").read_text())["epoch"] == 2
    code, out = _train(killed.root, kill_at="Epoch 3/3")
    assert code == -signal.SIGKILL, "\n".join(out[-30:])
    assert _epoch_lines(out) == ["Epoch 1/3", "Epoch 2/3", "Epoch 3/3"], "\n".join(out)  # restored, not refit
    assert any("pretraining finished in an earlier attempt" in line for line in out), "\n".join(out)
    code, out = _train(killed.root)
    assert code == 0, "\n".join(out[-30:])
    assert _epoch_lines(out) == ["Epoch 3/3"]  # a resumed main phase does not pretrain again either
    assert not backup.exists()
    killed_run = json.loads(killed.path(killed.paths.train_run).read_text())["run_id"]
    killed_client = mlflow.MlflowClient(tracking.tracking_uri(killed))  # one MLflow run over the four attempts
    assert killed_client.get_run(killed_run).data.tags["kfer.resumed_after_epoch"] == "2"
    assert [m.step for m in killed_client.get_metric_history(killed_run, "pretrain_loss")] == [0, 1]
    assert [m.step for m in killed_client.get_metric_history(killed_run, "val_loss")] == [0, 1, 2]

    pd.testing.assert_frame_equal(pd.read_csv(killed.path(killed.paths.history)),
                                  pd.read_csv(ref.path(ref.paths.history)), rtol=1e-5, atol=1e-6)
    m = json.loads(killed.path(killed.paths.train_metrics).read_text())
    for key in ("best_val_loss", "best_val_accuracy", "best_val_macro_f1", "best_epoch", "pretrain_loss",
                "pretrain_accuracy", "pretrain_epochs"):
        assert m[key] == pytest.approx(report[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("over, message", [
    ({"data": {"sources": {"a": {}, "b": {"split": "pretrain"}}}}, "train.pretrain_epochs is 0"),
    ({"data": {"sources": {"a": {}}}, "train": {"pretrain_epochs": 2}}, "no data.sources entry has split: pretrain"),
])
def test_pretraining_settings_that_do_not_fit_are_one_line_errors(tmp_path, over, message):
    from tests.conftest import REPO

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(UserError, match=message) as err:
        load_params(tmp_path / "params.yaml", over)
    assert "\n" not in str(err.value)
