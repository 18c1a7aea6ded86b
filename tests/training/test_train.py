"""Training with a tiny ResNet variant on the demo data, tracked in a real MLflow SQLite store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import keras
import mlflow
import numpy as np
import pytest

from kfer import tracking
from kfer.serving.calibration import apply_temperature
from kfer.training.inputs import class_weights, train_table
from kfer.training.model import build_resnet
from kfer.training.train import run_train
from tests.helpers import TINY, prepare_demo, subprocess_env


@pytest.fixture
def tiny_project(tmp_path, make_params, monkeypatch):
    """Demo data → crop → split → augment at 32 px in tmp_path; MLflow store under tmp_path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return prepare_demo(make_params(TINY))


def _trainable(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def test_resnet50_matches_keras_applications_parameter_count():
    ours = build_resnet(64, 7, head_units=0)
    ref = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 1), classes=7)
    assert ours.count_params() == ref.count_params() == 23_595_783
    assert _trainable(ours) == _trainable(ref)
    with_head = build_resnet(64, 7, head_units=512)
    assert with_head.count_params() - ours.count_params() == 2048 * 512 + 512 + (512 - 2048) * 7
    assert ours.get_layer("conv1_conv").kernel_initializer.__class__.__name__ == "HeNormal"
    glorot = build_resnet(32, 7, kernel_initializer="glorot_uniform", blocks=(1,), base_width=4)
    assert glorot.get_layer("conv1_conv").kernel_initializer.__class__.__name__ == "GlorotUniform"


def test_class_weights_are_inverse_frequencies_over_the_classes_present(make_params):
    import pandas as pd

    params = make_params()
    names = params.class_names
    table = pd.DataFrame({"label": [names[2]] * 6 + [names[0]] * 3 + [names[5]]})  # 10 rows of 3 classes
    expected = {i: 1.0 for i in range(len(names))}  # a class without rows: 1
    expected.update({2: 10 / (3 * 6), 0: 10 / (3 * 3), 5: 10 / (3 * 1)})  # n / (k · count)
    assert class_weights(params, table) == pytest.approx(expected)


@pytest.mark.training
def test_two_epoch_run_is_fully_tracked(tiny_project):
    params = tiny_project
    result = run_train(params)

    for key in ("model", "onnx_model", "train_run", "train_metrics", "history"):
        assert params.path(getattr(params.paths, key)).exists(), key
    full = json.loads(params.path(params.paths.train_metrics).read_text())
    assert json.loads(params.path(params.paths.train_headline).read_text()) == {  # the DVC metrics
        "val_accuracy": full["best_val_accuracy"], "val_macro_f1": full["best_val_macro_f1"]}
    run_info = json.loads(params.path(params.paths.train_run).read_text())
    assert run_info["run_id"] == result["run_id"]
    assert tracking.tracking_uri(params).endswith(str(params.root / "mlflow.db"))

    client = mlflow.MlflowClient(tracking.tracking_uri(params))
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.kernel_initializer"] == "he_normal" and p["model.head_units"] == "8"
    assert p["train.epochs"] == "2" and p["crop.image_size"] == "32" and p["seed"] == "42"
    for m in ("best_val_macro_f1", "best_val_accuracy", "best_val_loss", "epochs_run", "train_images_per_s"):
        assert m in run.data.metrics, m
    for m in ("loss", "val_loss", "accuracy", "val_macro_f1", "learning_rate"):
        assert len(client.get_metric_history(run.info.run_id, m)) == 2, m  # per epoch
    tags = run.data.tags
    assert {"git.commit", "git.dirty", tracking.MODEL_URI_TAG, tracking.KERAS_URI_TAG} <= set(tags)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_curves.png", "labels.json", "model_card.md"} <= artifacts
    card = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model_card.md")
    assert f"| val (model selection) | {full['val_images']} | {full['best_val_accuracy']:.3f} |" in card
    assert "Not evaluated on the test split yet" in card  # train's card: no test numbers, none of an older model

    # calibration: the temperature fitted on val is in the report, the run and the served model's config
    cal = full["calibration"]
    assert 0.05 <= cal["temperature"] <= 20 and cal["val"]["n"] == full["val_images"]
    assert cal["val"]["nll_after"] <= cal["val"]["nll_before"] + 1e-9  # the fit never makes val worse
    assert run.data.metrics["temperature"] == pytest.approx(cal["temperature"])
    assert run.data.metrics["val_ece_calibrated"] == pytest.approx(cal["val"]["ece_after"])
    inputs = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert inputs == {"train", "val"}

    # the Keras-format model and the photo pyfunc are both loadable; the photo model's probabilities are the
    # Keras model's scaled by the temperature (same argmax)
    km = mlflow.keras.load_model(tags[tracking.KERAS_URI_TAG])
    photo = mlflow.pyfunc.load_model(tags[tracking.MODEL_URI_TAG]).unwrap_python_model()
    assert photo.temperature == pytest.approx(cal["temperature"])
    faces = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    raw = km.predict_on_batch(faces[..., None].astype(np.float32))
    served = photo.classify_faces(faces)  # on ONNX Runtime: equal to the Keras model's within the export tolerance
    np.testing.assert_allclose(served, apply_temperature(raw, cal["temperature"]), atol=1e-4)
    assert km.output_shape == (None, 7)
    saved = keras.models.load_model(params.path(params.paths.model))
    assert saved.count_params() == km.count_params()
    assert getattr(saved, "optimizer", None) is None  # weights only: no optimizer state (3x the size) in the served model
    # the ONNX export (what the photo model runs) was checked on validation faces and predicts what models/ holds
    assert run.data.metrics["onnx_argmax_agreement"] == 1.0
    assert 1 < run.data.metrics["onnx_check_faces"] <= params.train.onnx_check_faces + 1
    assert run.data.metrics["onnx_max_prob_diff"] <= params.train.onnx_tolerance
    from kfer.serving.export import compare
    from kfer.serving.runtime import OnnxClassifier

    faces = np.random.default_rng(3).integers(0, 256, (6, 32, 32, 1)).astype(np.float32)
    agreement = compare(saved, OnnxClassifier(params.path(params.paths.onnx_model)), faces)
    assert agreement.all_agree and agreement.max_prob_diff <= params.train.onnx_tolerance
    history = params.path(params.paths.history).read_text().splitlines()
    assert history[0].startswith("epoch,") and len(history) == 3
    # train.pixel_cache (the default): the train images were read from the store decoded once, not from PNGs
    (store,) = params.path(params.paths.pixel_store).glob("*.npy")
    assert np.load(store, mmap_mode="r").shape[0] == full["train_images"]


@pytest.mark.training
def test_crashing_run_ends_failed(tiny_project):
    params = tiny_project
    bad = params.path(train_table(params)["path"].iloc[0])
    bad.write_bytes(b"not a png")  # decoding fails inside fit
    with pytest.raises(Exception):  # noqa: B017 - TensorFlow raises its own error types
        run_train(params, run_name="crash")
    client = mlflow.MlflowClient(tracking.tracking_uri(params))
    runs = client.search_runs([tracking.setup(params)], "attributes.run_name = 'crash'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not params.path(params.paths.train_run).exists()


@pytest.mark.slow
@pytest.mark.training
def test_sigterm_ends_run_killed(tiny_project):
    params = tiny_project
    (params.root / "params.yaml").write_text(
        (params.root / "params.yaml").read_text().replace("epochs: 2", "epochs: 200"), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "kfer.cli", "train", "--run-name", "long"], cwd=params.root,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = mlflow.MlflowClient(tracking.tracking_uri(params))
    deadline, run = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        with_runs = (params.root / "mlflow.db").exists() and client.search_experiments()
        if with_runs:
            runs = client.search_runs([e.experiment_id for e in with_runs], "attributes.run_name = 'long'")
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                run = runs[0]
                break
        time.sleep(0.5)
    assert run is not None, proc.stderr.read() if proc.poll() is not None else "no epoch logged in time"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def _class_sorted_table(tmp_path, params, rows_per_class: int):
    """A class-sorted train table (as the stages write it): ``rows_per_class`` rows per class, all rows of a
    class pointing at one tiny PNG."""
    import cv2
    import pandas as pd

    paths, labels = [], []
    for k, name in enumerate(params.class_names):
        p = tmp_path / f"{name}.png"
        cv2.imwrite(str(p), np.full((params.crop.image_size,) * 2, k, np.uint8))
        paths += [str(p)] * rows_per_class
        labels += [name] * rows_per_class
    return pd.DataFrame({"path": paths, "label": labels})


def test_every_batch_mixes_classes_on_a_large_class_sorted_table(tmp_path, make_params):
    from kfer.training.inputs import make_dataset

    params = make_params({"crop": {"image_size": 8}, "train": {"batch_size": 32}})
    table = _class_sorted_table(tmp_path, params, 3000)  # 21,000 rows, 3,000 of each class in a row
    ds = make_dataset(params, table, training=True)
    first = [np.unique(np.argmax(y, 1)).size for _, y in ds.take(20)]
    assert min(first) >= 5, first  # a 4,096-row window would give batches of 1-2 classes here


def test_each_epoch_is_a_fresh_seeded_permutation_of_the_whole_table(tmp_path, make_params):
    import cv2
    import pandas as pd

    from kfer.training.inputs import make_dataset

    params = make_params({"crop": {"image_size": 8}, "train": {"batch_size": 50, "epochs": 3}})
    rows = []
    for i in range(300):  # each row its own image: pixel (0, 0) = i // 256, (0, 1) = i % 256
        img = np.zeros((8, 8), np.uint8)
        img[0, 0], img[0, 1] = divmod(i, 256)
        p = tmp_path / f"{i:03d}.png"
        cv2.imwrite(str(p), img)
        rows.append({"path": str(p), "label": params.class_names[i * 7 // 300]})
    table = pd.DataFrame(rows)

    def epochs(seed, first=0):
        ds = make_dataset(params, table, training=True, seed=seed, first_epoch=first)
        ids = np.concatenate([(x[:, 0, 0, 0] * 256 + x[:, 0, 1, 0]).numpy() for x, _ in ds]).astype(int)
        return [ids[i:i + 300].tolist() for i in range(0, len(ids), 300)]  # 6 batches of 50 per epoch

    a = epochs(1)
    assert len(a) == 3 and all(sorted(e) == list(range(300)) for e in a)  # the whole table, each row once
    assert a[0] != a[1] != a[2] and a[0] != sorted(a[0])  # a fresh order every epoch
    assert epochs(1) == a and epochs(2) != a  # a function of the seed
    assert epochs(1, first=1) == a[1:]  # and of the epoch alone: a run resumed at epoch 2 sees epoch 2's order


def test_decode_workers_change_speed_only(tmp_path, make_params):
    """train.decode_workers (parallel read + decode calls) gives the same batches, epoch by epoch, for any value."""
    import cv2
    import pandas as pd

    from kfer.errors import UserError
    from kfer.training.inputs import decode_workers, make_dataset

    def project(workers):
        return make_params({"crop": {"image_size": 8},
                            "train": {"batch_size": 6, "epochs": 2, "decode_workers": workers}},
                           root=tmp_path / f"w{workers}")

    names = project(1).class_names
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):  # distinct tiny PNGs, so that any reordering would show
        p = tmp_path / f"{i:02d}.png"
        cv2.imwrite(str(p), rng.integers(0, 256, (8, 8), dtype=np.uint8))
        rows.append({"path": str(p), "label": names[i % len(names)]})
    table = pd.DataFrame(rows)

    def batches(workers, training):
        params = project(workers)
        assert decode_workers(params) == (len(os.sched_getaffinity(0)) if workers == "auto" else workers)
        flip = (lambda img, key, epoch: img[:, ::-1].copy()) if training else None  # through the augment map too
        ds = make_dataset(params, table, training=training, augment=flip)
        # training: one dataset holds both epochs (each in its own order); val: one pass, read twice
        return [[(x.numpy(), y.numpy()) for x, y in ds] for _ in range(1 if training else 2)]

    for training in (True, False):
        ref = batches(1, training)
        for workers in (2, "auto"):
            got = batches(workers, training)
            assert [len(e) for e in got] == [len(e) for e in ref] == ([14] if training else [7, 7])
            for e_got, e_ref in zip(got, ref, strict=True):
                for (x, y), (x0, y0) in zip(e_got, e_ref, strict=True):
                    np.testing.assert_array_equal(x, x0)
                    np.testing.assert_array_equal(y, y0)
    for k, bad in enumerate((0, -1, "all", True, 1.5)):
        with pytest.raises(UserError, match="decode_workers"):
            make_params({"train": {"decode_workers": bad}}, root=tmp_path / f"bad{k}")


@pytest.mark.training
def test_soft_policy_trains_on_the_vote_distributions(tmp_path, make_params, monkeypatch):
    """data.label_policy soft: the train batches carry each photo's vote distribution (the uploader as
    data.soft_uploader_weight more votes), the val batches the hard label; a run with mixup and class weights
    trains and logs the policy."""
    from kfer.data.policy import targets
    from kfer.data.split import run_split
    from kfer.training.inputs import make_dataset, split_table

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = prepare_demo(make_params({**TINY, "data": {"label_policy": "soft", "soft_uploader_weight": 1.0},
                                       "train": {**TINY["train"], "mixup_alpha": 0.2}}))
    table = train_table(params)
    disputed = table["votes"].str.contains(" ")  # the demo's annotators disagree on about one photo in ten
    assert disputed.any() and (table["label_uploader"] != "").all()
    expected = targets(table, "soft", params.class_names, 1.0)
    no_mix = params.updated({"train": {"mixup_alpha": 0.0}})
    got = np.concatenate([y for _, y in make_dataset(no_mix, table, training=False)])
    np.testing.assert_array_equal(got, np.eye(7, dtype=np.float32)[[params.class_names.index(c)
                                                                     for c in table["label"]]])
    # training=False is how val and test are read: one-hot; the training stream is the soft targets, reordered
    ds = make_dataset(no_mix, table, training=True)
    seen = np.concatenate([y for _, y in ds.take(-(-len(table) // params.train.batch_size))])
    assert sorted(map(tuple, np.round(seen, 6))) == sorted(map(tuple, np.round(expected, 6)))
    assert (np.abs(expected[disputed.to_numpy()].max(axis=1) - 1) > 1e-6).all()  # not one-hot where they disagree

    result = run_train(params)
    run = mlflow.MlflowClient(tracking.tracking_uri(params)).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["data.label_policy"] == "soft"
    assert np.isfinite(run.data.metrics["best_val_loss"])
    # the val table is scored on the hard label (the majority's under soft)
    val = split_table(params, "val")
    assert (val["label"] == val["label_majority"].where(val["label_majority"] != "", val["label_uploader"])).all()
    # the policy switched back to majority: a split gives the same labels (soft's hard label is the majority's)
    before = split_table(params, "train")["label"].tolist()
    run_split(params.updated({"data": {"label_policy": "majority"}}))
    assert split_table(params, "train")["label"].tolist() == before
