"""Optuna tuning with a tiny ResNet on the demo data: real SQLite Optuna storage (and a real PostgreSQL server for
the shared-study test), real MLflow SQLite store."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from urllib.parse import urlsplit

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from kfer import files, tracking
from kfer.config import load_params
from kfer.data.augment import OnTheFlyAugment
from kfer.data.pixels import PixelStoreError, decoded_images
from kfer.training.tune.apply import apply_best
from kfer.training.tune.data import trial_table
from kfer.training.tune.stage import run_tune
from kfer.training.tune.study import (
    BEST_RUN_TAG,
    RUN_ID_ATTR,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    WORKER_ATTR,
    TuneError,
    fingerprint,
    open_study,
    portable_url,
    redact,
    storage_url,
)
from kfer.training.tune.trials import nested_values, with_values
from kfer.training.tune.workers import gpu_assignment, parse_visible_devices, visible_gpu_ids
from kfer.config import deep_merge
from tests.helpers import REPO, TINY, prepare_demo, subprocess_env, write_params

SETTINGS = deep_merge(TINY, {
    "train": {"epochs": 3},
    "tune": {
        "n_trials": 3,
        "space": {"head_units": [0, 8], "learning_rate": [1.0e-3, 100.0]},
        "sampler": {"n_startup_trials": 2},
        "heartbeat_interval": 1,
        "grace_period": 2,
    },
})
# a trial at this learning rate diverges at once: its val macro-F1 stays at the one-class floor
GOOD = {"kernel_initializer": "he_normal", "head_units": 8, "strength": 0.5, "learning_rate": 1e-2}
BAD = {**GOOD, "learning_rate": 100.0}


@pytest.fixture(scope="module")
def base_project(tmp_path_factory):
    """Demo data → crop → split → augment at 32 px, once for the module."""
    root = tmp_path_factory.mktemp("tune-base")
    prepare_demo(write_params(root, SETTINGS))
    return root


@pytest.fixture
def project(base_project, tmp_path, monkeypatch):
    """A copy of the base project in tmp_path (own Optuna and MLflow stores); call it with param overrides."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "proj"
    shutil.copytree(base_project / "data", root / "data")

    def make(overrides: dict | None = None):
        return write_params(root, SETTINGS, overrides)

    return make


def _load(params):
    study = optuna.load_study(study_name=open_study(params).study_name, storage=storage_url(params))
    return study, study.get_trials(deepcopy=False)


def _runs(params):
    client = mlflow.MlflowClient(tracking.tracking_uri(params))
    exp = client.get_experiment_by_name(params.tune.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kfer.stage") == "tune"]
    children = [r for r in runs if r.data.tags.get("kfer.stage") == "tune-trial"]
    return client, parents, children


def test_storage_url_study_name_and_fingerprint(project):
    params = project()
    url = storage_url(params)
    assert url == "sqlite:///" + str((params.root / "optuna.db").resolve()) and url.startswith("sqlite:////")
    assert storage_url(params, "postgresql://u:secret@db/optuna") == "postgresql://u:secret@db/optuna"
    assert "secret" not in redact("postgresql://u:secret@db/optuna")
    # what tune/summary.json records: no absolute path of this machine
    assert portable_url(params, url) == "sqlite:///optuna.db"
    assert "secret" not in portable_url(params, "postgresql://u:secret@db/optuna")
    # short trials: tune.epochs (set) or train.epochs (null); the searched values and the objective as monitor
    trial = with_values(project({"tune": {"epochs": 2}}), GOOD)
    assert (trial.train.epochs, trial.train.monitor, trial.model.head_units) == (2, params.tune.metric, 8)
    assert with_values(project({"tune": {"epochs": None}}), GOOD).train.epochs == params.train.epochs
    assert fingerprint(project({"tune": {"epochs": 2}})) != fingerprint(project({"tune": {"epochs": 1}}))

    study = open_study(params)
    assert study.study_name == f"kfer-{fingerprint(params)}"
    assert open_study(params).study_name == study.study_name  # loaded again, not a new one
    # budget, workers and storage settings do not change the study; data or fixed params do
    assert fingerprint(project({"tune": {"n_trials": 50, "workers": 2, "timeout_s": 10}})) == fingerprint(params)
    assert fingerprint(project({"train": {"decode_workers": 1}, "crop": {"workers": 1}})) == \
        fingerprint(params)  # speed-only settings keep the study
    assert fingerprint(project({"train": {"batch_size": 8}})) != fingerprint(params)

    named = open_study(params, study_name="shared")
    named.enqueue_trial(GOOD)
    with pytest.raises(TuneError, match="other data or fixed params"):
        open_study(project({"train": {"batch_size": 8}}), study_name="shared")


def test_on_the_fly_augmentation_is_the_augment_stage(project):
    """Trials see exactly the images `kfer augment` writes for the same strength (same function, same draws)."""
    from kfer.training.inputs import make_dataset

    params = project()
    table = trial_table(params)
    splits = pd.read_csv(params.path(params.paths.splits), dtype=str, keep_default_na=False)
    assert set(table["path"]) == set(splits.loc[splits["split"] == "train", "path"])
    assert len(table) == (params.augment.copies + 1) * len(set(table["path"]))

    ds = make_dataset(params, table, training=False,
                      augment=OnTheFlyAugment(params, table, params.augment.strength))
    got = np.concatenate([x.numpy() for x, _ in ds]).astype(np.uint8)[..., 0]
    manifest = pd.read_csv(params.path(params.paths.augmented) / "manifest.csv", dtype=str, keep_default_na=False)
    stage = {(r.original, int(r.copy)): r.path for r in manifest.itertuples()}
    for i, row in enumerate(table.itertuples()):
        expected = files.read_image_gray(params.path(stage[(row.path, row.copy)]))
        np.testing.assert_array_equal(got[i], expected, err_msg=f"{row.path} copy {row.copy}")
    assert any(not np.array_equal(got[i], got[i - 1]) for i in range(1, len(got), 2))  # copies differ

    zero = OnTheFlyAugment(params, table, 0.0)
    img = files.read_image_gray(params.path(table["path"][1]))[..., None]
    np.testing.assert_array_equal(zero(img, np.int64(1)), img)

    # as a trial reads them (tune.pixel_cache): from the decoded store, the same batches as kfer train's files
    fn = OnTheFlyAugment(params, table, params.augment.strength)
    pixels = decoded_images(params, table)
    stage_table = pd.read_csv(params.path(params.paths.augmented) / "manifest.csv", dtype=str,
                              keep_default_na=False)
    n_batches = 0
    for (xa, ya), (xb, yb) in zip(make_dataset(params, table, training=True, augment=fn, pixels=pixels),
                                  make_dataset(params, stage_table, training=True), strict=True):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
        n_batches += 1
    assert n_batches == params.train.epochs * -(-len(table) // params.train.batch_size)


def test_fresh_augmentation_draws_new_copies_every_epoch(project):
    """train.fresh_augmentation: kfer train reads each manifest row's crop and augments it on the fly; epoch 1 is
    byte for byte the stage's files, later epochs new draws of the copies (the originals unchanged), a run resumed
    at epoch 2 sees the uninterrupted run's batches, and the option off trains on the files as they are."""
    import tensorflow as tf

    from kfer.training.inputs import (
        augmentation,
        decoded_pixels,
        make_dataset,
        train_table,
    )

    params = project({"train": {"fresh_augmentation": True, "epochs": 3}})
    manifest = train_table(params)
    rows, fn = augmentation(params, manifest)
    assert list(rows["path"]) == list(manifest["original"]) and list(rows["copy"]) == list(manifest["copy"])
    off_rows, off_fn = augmentation(project(), manifest)
    assert off_fn is None and off_rows is manifest  # off: the stage's files as they are

    def epochs(ds, n_epochs):
        per = -(-len(rows) // params.train.batch_size)
        xs = [x.numpy()[..., 0].astype(np.uint8) for x, _ in ds]
        assert len(xs) == n_epochs * per
        return [np.concatenate(xs[i * per:(i + 1) * per]) for i in range(n_epochs)]

    fresh = epochs(make_dataset(params, rows, training=True, augment=fn), 3)
    stage = epochs(make_dataset(params, manifest, training=True), 3)
    np.testing.assert_array_equal(fresh[0], stage[0])  # epoch 1: the augment stage's files
    copies = manifest["copy"].astype(int).to_numpy()
    changed = []
    for e in (1, 2):
        order = tf.random.experimental.stateless_shuffle(tf.range(len(rows), dtype=tf.int64),
                                                         seed=[params.seed, e]).numpy()
        for j, i in enumerate(order):
            if copies[i] == 0:  # the original crop, every epoch
                np.testing.assert_array_equal(fresh[e][j], stage[e][j])
            else:
                changed.append(not np.array_equal(fresh[e][j], stage[e][j]))
    assert len(changed) == 2 * int((copies > 0).sum()) and np.mean(changed) > 0.9
    assert not np.array_equal(fresh[1], fresh[2])  # epoch 3 draws again

    resumed = epochs(make_dataset(params, rows, training=True, augment=fn, first_epoch=1), 2)
    for a, b in zip(resumed, fresh[1:], strict=True):
        np.testing.assert_array_equal(a, b)

    # as kfer train reads them (train.pixel_cache): the crops decoded once, the same bytes every epoch
    pixels = decoded_pixels(params, rows)
    assert len(pixels[0]) == len(set(rows["path"])) < len(rows)
    for a, b in zip(epochs(make_dataset(params, rows, training=True, augment=fn, pixels=pixels), 3), fresh,
                    strict=True):
        np.testing.assert_array_equal(a, b)
    off = project({"train": {"epochs": 3}})  # fixed copies: the stage's files decoded once
    pixels = decoded_pixels(off, manifest)
    assert len(pixels[0]) == len(manifest)
    for a, b in zip(epochs(make_dataset(off, manifest, training=True, pixels=pixels), 3), stage, strict=True):
        np.testing.assert_array_equal(a, b)
    assert decoded_pixels(project({"train": {"pixel_cache": False}}), rows) is None


def test_decoded_store_is_built_once_per_data_and_rebuilt_when_an_image_changes(project):
    params = project()
    table = trial_table(params)
    folder = params.path(params.paths.pixel_store)
    old_umask = os.umask(0o027)
    try:
        store, which = decoded_images(params, table)
    finally:
        os.umask(old_umask)
    (first,) = folder.glob("*.npy")
    assert first.stat().st_mode & 0o777 == 0o640  # the umask, as every output
    unique = list(dict.fromkeys(table["path"]))
    assert store.shape == (len(unique), 32, 32, 1) and not store.flags.writeable
    for i in (0, 1, len(table) - 1):
        np.testing.assert_array_equal(store[which[i], :, :, 0], files.read_image_gray(params.path(table["path"][i])))
    mtime = first.stat().st_mtime_ns
    decoded_images(params, table)  # reused, not rebuilt
    assert first.stat().st_mtime_ns == mtime and list(folder.glob("*.npy")) == [first]

    victim = params.path(unique[3])
    img = files.read_image_gray(victim)
    files.write_png(victim, 255 - img)  # a new crop rewrote one image: a new store, the old one removed
    store, which = decoded_images(params, table)
    (second,) = folder.glob("*.npy")
    assert second != first
    np.testing.assert_array_equal(store[3, :, :, 0], 255 - img)

    victim.write_bytes(b"not a png")  # a broken image: one clear line, no store left behind
    with pytest.raises(PixelStoreError, match=re.escape(unique[3]) + ".*cannot decode"):
        decoded_images(params, table)
    assert not list(folder.glob("*.npy")) and not list(folder.glob(".*tmp*"))


@pytest.mark.training
def test_study_prunes_tracks_in_mlflow_and_writes_best(project):
    # objective val_loss: the diverging trial's loss (~1e11) is far above the others' (~2) from the first epoch,
    # whereas every trial's val macro-F1 sits near the one-class floor on this tiny set, so pruning on it would
    # hinge on chance
    params = project({"tune": {"metric": "val_loss", "pruner": {"n_startup_trials": 2, "n_warmup_steps": 0}}})
    splits = pd.read_csv(params.path(params.paths.splits), dtype=str, keep_default_na=False)
    for p in splits.loc[splits["split"] == "test", "path"]:
        params.path(p).write_bytes(b"not a png")  # the test split must never be read
    study = open_study(params)
    for values in (GOOD, {**GOOD, "kernel_initializer": "glorot_uniform"}, BAD):
        study.enqueue_trial(values)

    summary = run_tune(params)

    study, trials = _load(params)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert len(trials[2].intermediate_values) < params.train.epochs  # stopped early
    assert summary["n_complete"] == 2 and summary["n_pruned"] == 1 and summary["budget"] == 3
    best = study.best_trial
    assert summary["best_trial"] == best.number and summary["best_value"] == best.value
    assert yaml.safe_load(params.path(params.paths.tune_best).read_text()) == {
        "model": {"kernel_initializer": best.params["kernel_initializer"], "head_units": best.params["head_units"]},
        "augment": {"strength": best.params["strength"]},
        "train": {"learning_rate": best.params["learning_rate"]},
    }
    assert yaml.safe_load(params.path(params.paths.tune_summary).read_text()) == summary
    assert yaml.safe_load(params.path(params.paths.tune_headline).read_text()) == {"best": best.value, "trials": 2}

    client, parents, children = _runs(params)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags[STUDY_TAG] == study.study_name
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.value)
    assert parent.data.params["best.model.kernel_initializer"] == best.params["kernel_initializer"]
    assert parent.data.tags[BEST_RUN_TAG] == best.user_attrs[RUN_ID_ATTR] == summary["best_run_id"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    for plot in ("optimization_history", "param_importances", "parallel_coordinate", "slice"):
        assert f"optuna/{plot}.png" in artifacts, artifacts
    assert "optuna/trials.csv" in artifacts

    assert len(children) == 3
    by_number = {int(r.data.tags[TRIAL_TAG]): r for r in children}
    for t in trials:
        run = by_number[t.number]
        assert run.info.run_id == t.user_attrs[RUN_ID_ATTR]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags[STUDY_TAG] == study.study_name
        assert run.data.tags[STATE_TAG] == t.state.name
        assert run.data.params["model.kernel_initializer"] == t.params["kernel_initializer"]
        assert float(run.data.params["train.learning_rate"]) == t.params["learning_rate"]
        assert float(run.data.params["augment.strength"]) == t.params["strength"]
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == sorted(t.intermediate_values)  # one point per epoch, as reported
        assert [m.value for m in history] == pytest.approx([t.intermediate_values[k] for k in sorted(t.intermediate_values)])
    assert "pruned_epoch" in by_number[2].data.metrics and tracking.MODEL_URI_TAG not in by_number[2].data.tags

    # the best trial logged its model, so it can be registered
    from kfer.serving.registry import register

    mv = register(params, tuned=True)
    assert mv.run_id == summary["best_run_id"]
    assert mv.tags["kfer.selected_by"] == f"best trial {best.number} of Optuna study {study.study_name} by val_loss"

    # re-running a finished study adds nothing and writes the same best params
    again = run_tune(params)
    assert len(_load(params)[1]) == 3 and again["best_params"] == summary["best_params"]


def test_apply_best_keeps_comments(tmp_path):
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    params = load_params(tmp_path / "params.yaml")
    best = params.path(params.paths.tune_best)
    best.parent.mkdir(parents=True)
    best.write_text("# header\n" + yaml.safe_dump(nested_values(
        {"kernel_initializer": "glorot_uniform", "head_units": 256, "strength": 0.625,
         "learning_rate": 0.00123})), encoding="utf-8")

    changed = apply_best(params, tmp_path / "params.yaml")
    assert set(changed) == {"model.kernel_initializer", "model.head_units", "augment.strength",
                            "train.learning_rate"}
    new = (tmp_path / "params.yaml").read_text(encoding="utf-8")
    old_lines, new_lines = text.splitlines(), new.splitlines()
    assert len(old_lines) == len(new_lines)
    diff = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
    assert len(diff) == 4, diff
    assert all(a.split("#")[1:] == b.split("#")[1:] for a, b in diff)  # end-of-line comments kept
    p = load_params(tmp_path / "params.yaml")
    assert (p.model.kernel_initializer, p.model.head_units, p.augment.strength, p.train.learning_rate) == \
        ("glorot_uniform", 256, 0.625, 0.00123)
    assert apply_best(p, tmp_path / "params.yaml") == {}


@pytest.mark.slow
@pytest.mark.training
def test_killed_worker_trial_ends_fail_and_rerun_completes_budget(project):
    params = project({"tune": {"n_trials": 2, "retry_stale": 1}})
    name = open_study(params).study_name
    url = storage_url(params)
    proc = subprocess.Popen([sys.executable, "-m", "kfer.cli", "tune"], cwd=params.root, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and killed is None:
            running = optuna.load_study(study_name=name, storage=url).get_trials(states=(TrialState.RUNNING,))
            if running and RUN_ID_ATTR in running[0].user_attrs:  # mid-trial, its MLflow run started
                proc.send_signal(signal.SIGKILL)
                killed = running[0]
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert killed is not None, err.decode(errors="replace")[-3000:]
    assert optuna.load_study(study_name=name, storage=url).trials[killed.number].state == TrialState.RUNNING

    summary = run_tune(params)  # the same study: the stale trial ends FAIL and the budget is completed

    _, trials = _load(params)
    states = [t.state for t in trials]
    assert trials[killed.number].state == TrialState.FAIL and states.count(TrialState.FAIL) == 1
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 2 == summary["budget"]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params  # re-queued with the same params

    client, parents, children = _runs(params)
    dead = client.get_run(killed.user_attrs[RUN_ID_ATTR])
    assert dead.info.status == "FAILED" and dead.data.tags[STATE_TAG] == "FAIL"
    finished = [p for p in parents if p.info.status == "FINISHED"]
    killed_parents = [p for p in parents if p.info.status == "KILLED"]
    assert len(parents) == 2 and len(finished) == 1 and len(killed_parents) == 1  # none left RUNNING
    # the killed invocation's parent, left RUNNING by SIGKILL (no handler runs), was closed by the rerun
    assert killed_parents[0].data.tags["kfer.end_reason"].startswith("owner process ")
    assert killed_parents[0].data.tags[tracking.OWNER_TAG].split(":")[1] == str(proc.pid)
    again = client.get_run(retried[0].user_attrs[RUN_ID_ATTR])
    assert again.data.tags["optuna.retry_of"] == str(killed.number)
    assert again.data.tags["mlflow.parentRunId"] == finished[0].info.run_id


@pytest.mark.slow
@pytest.mark.training
@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
def test_two_worker_processes_share_one_study(project, storage, request):
    """`kfer tune --workers 2` on the default SQLite storage and on a real PostgreSQL server (postgres_url, started
    here): the two spawned workers share one study, keep the budget, draw distinct points and track every trial
    once under one parent run."""
    params = project()
    url = request.getfixturevalue("postgres_url") if storage == "postgresql" else None  # None: the default
    budget = 4
    proc = subprocess.Popen([sys.executable, "-m", "kfer.cli", "--set", "tune.epochs=1", "tune",
                             *(["--storage", url] if url else []), "--workers", "2", "--trials", str(budget)],
                            cwd=params.root, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-5000:]
    summary = json.loads(params.path(params.paths.tune_summary).read_text(encoding="utf-8"))
    if url:
        password = urlsplit(url).password
        assert summary["storage"].startswith("postgresql://") and password and password not in summary["storage"]
        assert not params.path(params.paths.optuna_db).exists()  # nothing went to the default SQLite storage
    else:
        assert summary["storage"] == "sqlite:///optuna.db" and params.path(params.paths.optuna_db).exists()

    used = url or storage_url(params)
    study = optuna.load_study(study_name=summary["study_name"], storage=used)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # distinct
    left = [(t.number, t.state.name) for t in trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert left == []  # none RUNNING (lost) or FAIL
    # the budget, or one more: two workers may both start the last trial in the same instant (see trials.work)
    assert budget <= len(trials) <= budget + 1, numbers
    assert summary["n_complete"] + summary["n_pruned"] == len(trials) and summary["n_running"] == 0
    workers = {t.user_attrs[WORKER_ATTR] for t in trials}
    assert len(workers) == 2 and str(proc.pid) not in {w.split(":")[1] for w in workers}  # the two spawned workers
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)  # no replayed random points
    assert all(len(t.intermediate_values) == 1 for t in trials)  # --set tune.epochs=1 reached the workers

    _, parents, children = _runs(params)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags[STUDY_TAG] == study.study_name
    assert parent.data.tags["optuna.storage"] == redact(used)  # no password
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in children) == sorted(numbers)
    assert {r.info.run_id for r in children} == {t.user_attrs[RUN_ID_ATTR] for t in trials}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in children)
    assert params.path(params.paths.tune_best).exists()


def test_trials_started_at_once_past_the_budget_give_way():
    """Two workers that count the study at the same moment both start a trial; the budget stays exact: the
    RUNNING trials with the lowest numbers keep the free places, a later one ends FAIL without training."""
    from kfer.training.tune.study import SURPLUS_ATTR, is_surplus
    from kfer.training.tune.trials import SurplusTrial, objective

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    done = study.ask()
    study.tell(done, 1.0)
    a, b, c = study.ask(), study.ask(), study.ask()  # three workers started at once; one place left of 2
    assert [is_surplus(study, t.number, 2) for t in (a, b, c)] == [False, True, True]
    assert [is_surplus(study, t.number, 3) for t in (a, b, c)] == [False, False, True]
    assert not any(is_surplus(study, t.number, 4) for t in (a, b, c))
    study.tell(a, 0.5)  # budget 2 reached: nobody else runs
    assert is_surplus(study, b.number, 2) and not is_surplus(study, b.number, 3)
    with pytest.raises(SurplusTrial, match="budget"):
        objective(c, None, budget=2)  # gives way before it trains (no context needed)
    assert c.user_attrs[SURPLUS_ATTR] is True


def test_gpu_assignment_round_robin_over_visible_gpus(monkeypatch):
    assert gpu_assignment(4, ["0", "1"]) == ["0", "1", "0", "1"]
    assert gpu_assignment(3, ["0"]) == ["0", "0", "0"]
    assert gpu_assignment(2, []) == [None, None]  # no GPU: the workers' environment is left untouched

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the user's choice: workers get those ids
    assert visible_gpu_ids() == ["3", "5"]
    assert gpu_assignment(4, visible_gpu_ids()) == ["3", "5", "3", "5"]
    for value, ids in (("", []), ("-1", []), (" 2 , 7 ", ["2", "7"]), ("0,-1,1", ["0"]),
                       ("GPU-1a2b,MIG-3c4d", ["GPU-1a2b", "MIG-3c4d"])):
        assert parse_visible_devices(value) == ids, value
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_assignment(2, visible_gpu_ids()) == [None, None]

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # unset: TensorFlow's physical GPUs (none on tensorflow-cpu)
    import tensorflow as tf

    assert visible_gpu_ids() == [str(i) for i in range(len(tf.config.list_physical_devices("GPU")))]


@pytest.mark.slow
def test_spawned_workers_get_their_gpu_before_tensorflow(project):
    """The real worker path (spawn_workers: spawned processes) with a budget of 0, from a fresh process as `kfer tune`
    is one (this test process may hold other code on sys.path, e.g. a loaded model's code_paths, which spawned
    children inherit): each child reports the CUDA_VISIBLE_DEVICES it runs with, and TensorFlow was not imported
    before it was set."""
    params = project()
    script = textwrap.dedent("""
        import logging, os, sys
        from kfer import tracking
        from kfer.config import load_params
        from kfer.training.tune.study import open_study, storage_url
        from kfer.training.tune.workers import spawn_workers
        logging.basicConfig(level=logging.INFO)
        params = load_params("params.yaml")
        study = open_study(params)
        tracking.setup(params, params.tune.experiment)  # the store exists before the workers, as under run_tune
        codes = spawn_workers(params, study, storage_url(params), "no-parent-run", workers=3, budget=0,
                              timeout=None)
        print("codes", codes, "parent", os.environ["CUDA_VISIBLE_DEVICES"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=params.root, capture_output=True, text=True,
                          env=subprocess_env(CUDA_VISIBLE_DEVICES="3,5"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "codes [0, 0, 0] parent 3,5" in proc.stdout, proc.stderr[-3000:]  # the parent's own env unchanged
    for worker, device in ((1, "3"), (2, "5"), (3, "3")):
        line = rf"tune: worker {worker} \(pid \d+\): CUDA_VISIBLE_DEVICES={device} \(assigned\);"
        assert re.search(line, proc.stderr), proc.stderr[-3000:]
    assert "TensorFlow was already imported" not in proc.stderr


def test_orphaned_runs_are_closed_only_when_their_owner_process_is_gone(make_params, monkeypatch):
    """tracking.close_orphaned_runs, which closes a killed `kfer tune`'s parent run: a RUNNING run owned by this
    process or by a live child stays open, one of a reused pid (same pid, another start time) ends KILLED, so does
    the child's once it has exited, and a run owned on another host is never judged from here."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = make_params()
    code = "import sys; from kfer import tracking; print(tracking.owner_tag(), flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=subprocess_env())
    child_tag = child.stdout.readline().strip()  # then it waits for its stdin to close
    try:
        me = tracking.owner_tag()
        host, pid, start = me.split(":")
        assert pid == str(os.getpid()) and start != "?" and child_tag.split(":")[:2] == [host, str(child.pid)]
        owners = {"me": me, "child": child_tag, "reused pid": f"{host}:{pid}:{int(start) + 1}",
                  "other host": f"another-{child_tag}"}
        exp_id = tracking.setup(params, "owners")
        client = mlflow.MlflowClient()
        runs = {name: client.create_run(exp_id, tags={"kfer.stage": "tune", tracking.OWNER_TAG: owner}).info.run_id
                for name, owner in owners.items()}
        assert tracking.close_orphaned_runs(params, "owners", "tune") == [runs["reused pid"]]
    finally:
        child.communicate("", timeout=60)  # the child exits
    assert tracking.close_orphaned_runs(params, "owners", "tune") == [runs["child"]]
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"me": "RUNNING", "child": "KILLED", "reused pid": "KILLED", "other host": "RUNNING"}
    assert client.get_run(runs["child"]).data.tags["kfer.end_reason"] == f"owner process {child_tag} gone (killed)"


@pytest.mark.training
def test_label_policy_and_min_agreement_are_search_dimensions(project):
    """tune.space.label_policy / min_agreement: each trial trains on its policy's labels less its low-agreement
    photos, every trial is scored on one val label (tune.validation_label), the summary says which, and --apply
    writes the best policy into data."""
    from kfer.training.tune.data import trial_rows

    space = {"label_policy": ["uploader", "soft"], "min_agreement": [2, 3]}
    params = project({"tune": {"n_trials": 2, "space": space, "validation_label": "uploader",
                               "sampler": {"n_startup_trials": 5}}})
    study = open_study(params)
    study.enqueue_trial({**GOOD, "label_policy": "uploader", "min_agreement": 3})
    study.enqueue_trial({**GOOD, "label_policy": "soft", "min_agreement": 2})
    summary = run_tune(params)

    _, trials = _load(params)
    assert [t.params["label_policy"] for t in trials] == ["uploader", "soft"]
    assert summary["validation_label"] == "uploader" and summary["n_complete"] == 2
    best = yaml.safe_load(params.path(params.paths.tune_best).read_text())
    assert best["data"] == {"label_policy": trials[summary["best_trial"]].params["label_policy"],
                            "min_agreement": trials[summary["best_trial"]].params["min_agreement"]}

    # what a trial trains on: its policy's labels, less its photos below min_agreement
    table = trial_table(params)
    p = with_values(params, {"label_policy": "uploader", "min_agreement": 3})
    rows, _ = trial_rows(p, table, None)
    assert (rows["label"] == rows["label_uploader"]).all() and (rows["agreement"] == "3").all()
    assert len(rows) < len(table)  # the demo's annotators disagree on some train photos
    # and what val is scored on: the uploader's label, whatever the policy of splits.csv
    from kfer.training.tune.data import validation_table

    val = validation_table(params)
    assert (val["label"] == val["label_uploader"]).all()

    # a searched range below data.min_agreement: those photos are not in splits.csv
    bad = project({"data": {"min_agreement": 3}, "tune": {"space": space}})
    with pytest.raises(TuneError, match="below data.min_agreement 3"):
        run_tune(bad)
