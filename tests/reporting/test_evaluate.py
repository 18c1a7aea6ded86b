"""The evaluate stage and the report figures: metrics against hand-computed values and scikit-learn, test split
only, outputs, MLflow resume, clear errors, and Hangul rendering without missing glyphs."""

from __future__ import annotations

import json
import logging
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from kfer.files import write_png
from tests.helpers import CENTERS, INTENSITY_CLASSES, INTENSITY_SIZE, save_intensity_model, value_of

# Keras' own model.save under numpy 2 (not kfer code)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

S, C = INTENSITY_SIZE, INTENSITY_CLASSES  # image side and classes (params.yaml's) for every test here

EVAL_FILES = ("behaviour.csv", "behaviour.png", "confusion_matrix.png", "gradcam.png", "misclassified.png",
              "per_class.csv", "predictions.csv")


@pytest.fixture
def params(make_params, monkeypatch):
    # the default store (SQLite under tmp_path) must be used, never a server from the environment
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_params({"crop": {"image_size": S}, "train": {"batch_size": 4, "experiment": "kfer-test"}})


def write_splits(params, rows: list[tuple[str, str, int | None]], sources: list[str] | None = None) -> pd.DataFrame:
    """rows: (label, split, pixel value or None). None writes no image: a path evaluate must never open.

    Without ``sources`` the file has no source column (as before data.sources); with them, row i's source is
    ``sources[i]`` and its person ``<source>/p<i % 3>``.
    """
    out = []
    for i, (label, split, value) in enumerate(rows):
        rel = f"data/cropped/{label}/{split}_{i:03d}.png"
        if value is not None:
            (params.root / rel).parent.mkdir(parents=True, exist_ok=True)
            write_png(params.root / rel, np.full((S, S), value, dtype=np.uint8))
        row = {"path": rel, "label": label, "group": f"p{i % 3}", "split": split}
        if sources is not None:
            row.update(group=f"{sources[i]}/p{i % 3}", source=sources[i])
        out.append(row)
    columns = ["path", "label", "group", "split"] if sources is None else ["path", "label", "group", "source", "split"]
    df = pd.DataFrame(out, columns=columns)
    target = params.path(params.paths.splits)
    target.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(target, index=False)
    return df


def save_tiny_resnet(params):
    from kfer.training.model import build_resnet

    model = build_resnet(S, C, blocks=(1, 1), base_width=4, head_units=0, seed=0)
    path = params.path(params.paths.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return model


# y_true / y_pred designed by hand (class 6 has no test image):
Y_TRUE = [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5]
Y_PRED = [0, 0, 1, 2, 2, 2, 4, 4, 4, 5, 5]
# per class (precision, recall, f1, support), zero_division = 0
EXPECTED = {
    0: (1.0, 1.0, 1.0, 2),
    1: (1.0, 0.5, 2 / 3, 2),
    2: (2 / 3, 1.0, 0.8, 2),
    3: (0.0, 0.0, 0.0, 2),
    4: (1 / 3, 1.0, 0.5, 1),
    5: (1.0, 1.0, 1.0, 2),
    6: (0.0, 0.0, 0.0, 0),
}
EXPECTED_ACCURACY = 8 / 11
EXPECTED_MACRO_F1 = (1 + 2 / 3 + 0.8 + 0 + 0.5 + 1) / 6  # over the 6 classes with test images, as train's


def known_rows(names):
    rows = [(names[t], "test", value_of(p)) for t, p in zip(Y_TRUE, Y_PRED, strict=True)]
    # train/val rows have no image file: reading any of them would fail the stage
    rows += [(names[k % C], "train", None) for k in range(10)] + [(names[k % C], "val", None) for k in range(5)]
    return rows


def test_known_predictions_metrics_files_and_mlflow_resume(params, caplog):
    import mlflow

    from kfer import tracking
    from kfer.reporting.evaluate import run_evaluate

    names = params.class_names
    write_splits(params, known_rows(names))
    save_intensity_model(params)

    # a finished training run, as the train stage leaves it; in another experiment than train.experiment
    # (e.g. a tuning trial): evaluate must resume it where it is
    with tracking.tracked_run(params, "train", log_params=False, experiment="kfer-other") as run:
        mlflow.log_metric("val_accuracy", 0.5)
    run_id = run.info.run_id
    params.path(params.paths.train_run).parent.mkdir(parents=True, exist_ok=True)
    params.path(params.paths.train_run).write_text(
        json.dumps({"run_id": run_id, "experiment_id": run.info.experiment_id}), encoding="utf-8")

    # the train stage's report with the temperature it fitted on val (as kfer train writes it)
    from kfer.serving import calibration

    val_probs = np.array([[0.7, 0.3], [0.8, 0.2], [0.4, 0.6]])
    val = calibration.report(val_probs, np.array([0, 1, 1]), 2.0)
    params.path(params.paths.train_metrics).parent.mkdir(parents=True, exist_ok=True)
    params.path(params.paths.train_metrics).write_text(
        json.dumps({"best_val_accuracy": 0.5, "best_val_macro_f1": 0.4, "best_val_loss": 1.0, "best_epoch": 1,
                    "epochs_run": 2, "train_seconds": 3.0, "train_images_per_s": 10.0, "train_images": 10,
                    "val_images": 3, "calibration": {"temperature": 2.0, "val": val}}), encoding="utf-8")

    with caplog.at_level(logging.INFO, logger="kfer.reporting.evaluate"):
        result = run_evaluate(params)

    # --- metrics JSON: hand-computed values
    written = json.loads(params.path(params.paths.eval_metrics).read_text(encoding="utf-8"))
    assert written == result
    assert set(written) == {"test_accuracy", "test_macro_f1", "test_images", "per_class", "behaviour", "calibration"}
    # calibration: val as the train stage measured it, test scaled by its temperature (the argmax kept)
    cal = written["calibration"]
    assert cal["temperature"] == 2.0 and cal["splits"]["val"] == val
    test_probs = save_intensity_model(params).predict_on_batch(
        np.stack([np.full((S, S, 1), value_of(p), np.float32) for p in Y_PRED]))
    expected = calibration.report(np.asarray(test_probs, np.float64), np.array(Y_TRUE), 2.0)
    assert cal["splits"]["test"]["ece_before"] == pytest.approx(expected["ece_before"], abs=1e-6)
    assert cal["splits"]["test"]["ece_after"] == pytest.approx(expected["ece_after"], abs=1e-6)
    assert cal["splits"]["test"]["ece_after"] != pytest.approx(cal["splits"]["test"]["ece_before"])
    # behaviour: the flat faces keep their mean under a mirror, contrast, rotation, blur (and JPEG, to a grey
    # level), so the intensity model keeps its answer; x1.2 / x0.8 moves the mean to another class's centre
    beh = written["behaviour"]
    assert beh["n"] == len(Y_TRUE) and beh["accuracy"] == pytest.approx(EXPECTED_ACCURACY)
    for name in ("mirror", "contrast_up", "contrast_down", "rotate_left", "rotate_right", "blur", "jpeg30"):
        assert beh["checks"][name] == {"same_prediction": 1.0, "accuracy": pytest.approx(EXPECTED_ACCURACY),
                                       "accuracy_change": pytest.approx(0.0)}, name
    for name, factor in (("brighter", 1.2), ("darker", 0.8)):
        moved = [int(np.argmin(np.abs(min(255, round(value_of(p) * factor)) / 255 - CENTERS))) for p in Y_PRED]
        assert beh["checks"][name]["same_prediction"] == pytest.approx(np.mean(np.equal(moved, Y_PRED))), name
        assert beh["checks"][name]["accuracy"] == pytest.approx(np.mean(np.equal(moved, Y_TRUE))), name
    assert beh["checks"]["brighter"]["same_prediction"] < 1.0  # the check can tell a change
    assert json.loads(params.path(params.paths.eval_headline).read_text(encoding="utf-8")) == {  # DVC metrics
        "test_accuracy": written["test_accuracy"], "test_macro_f1": written["test_macro_f1"]}
    assert written["test_images"] == len(Y_TRUE)
    assert written["test_accuracy"] == pytest.approx(EXPECTED_ACCURACY)
    assert written["test_macro_f1"] == pytest.approx(EXPECTED_MACRO_F1)
    assert list(written["per_class"]) == names
    for k, (p, r, f, n) in EXPECTED.items():
        got = written["per_class"][names[k]]
        assert got == {"precision": pytest.approx(p), "recall": pytest.approx(r), "f1": pytest.approx(f),
                       "support": n}, names[k]
    assert "classes without test images" in caplog.text and names[6] in caplog.text
    assert "evaluate: 11 test images" in caplog.text

    # --- eval folder: the files, test rows only, in split-file order
    eval_dir = params.path(params.paths.eval_dir)
    assert sorted(p.name for p in eval_dir.iterdir()) == sorted([*EVAL_FILES, "reliability.png"])
    pred = pd.read_csv(eval_dir / "predictions.csv")
    assert list(pred.columns) == ["path", "actual", "predicted", "confidence", "photo_predicted"]
    assert (pred["photo_predicted"].isna()).all()  # no photo model in this run: no photo path
    assert list(pred["path"]) == [f"data/cropped/{names[t]}/test_{i:03d}.png" for i, t in enumerate(Y_TRUE)]
    assert list(pred["actual"]) == [names[t] for t in Y_TRUE]
    assert list(pred["predicted"]) == [names[p] for p in Y_PRED]
    assert pred["confidence"].between(1 / C, 1).all()
    per_class = pd.read_csv(eval_dir / "per_class.csv", keep_default_na=False)
    assert list(per_class.columns) == ["class", "ko", "precision", "recall", "f1", "support"]
    assert list(per_class["class"]) == names and per_class["ko"].iloc[0] == params.classes[0].ko
    assert per_class["f1"].to_numpy() == pytest.approx([EXPECTED[k][2] for k in range(C)], abs=1e-6)
    for name in ("confusion_matrix.png", "misclassified.png"):
        assert (eval_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --- MLflow: the training run got the metrics and artifacts, and is FINISHED again
    client = mlflow.MlflowClient(tracking.tracking_uri(params))
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    m = got.data.metrics
    assert m["val_accuracy"] == 0.5  # the training metrics are untouched
    assert m["test_accuracy"] == pytest.approx(EXPECTED_ACCURACY)
    assert m["test_macro_f1"] == pytest.approx(EXPECTED_MACRO_F1)
    assert m["test_images"] == len(Y_TRUE)
    assert m[f"test_f1_{names[1]}"] == pytest.approx(2 / 3)
    assert m[f"test_recall_{names[1]}"] == pytest.approx(0.5)
    assert m[f"test_precision_{names[4]}"] == pytest.approx(1 / 3)
    assert m["behaviour_brighter_same"] == pytest.approx(beh["checks"]["brighter"]["same_prediction"])
    assert m["behaviour_mirror_accuracy"] == pytest.approx(EXPECTED_ACCURACY)
    assert m["behaviour_min_same"] == min(c["same_prediction"] for c in beh["checks"].values())
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert artifacts == {f"eval/{f}" for f in (*EVAL_FILES, "reliability.png", "eval.json")}
    assert m["test_ece_calibrated"] == pytest.approx(cal["splits"]["test"]["ece_after"])
    assert len(client.search_runs([got.info.experiment_id])) == 1  # resumed, not a new run
    # the model card: written beside the reports and logged into the run, from this evaluation's numbers
    text = params.path(params.paths.model_card).read_text(encoding="utf-8")
    assert text == mlflow.artifacts.load_text(f"runs:/{run_id}/model_card.md")
    assert f"(MLflow run {run_id})" in text and f"| test (crop path) | {len(Y_TRUE)} | 0.727 | " in text
    assert "| brighter |" in text and "Temperature 2.000, fitted on val" in text


def test_per_source_metrics_files_and_mlflow(params, caplog):
    """Test rows from two datasets: metrics per source (same definitions as overall) in the JSON, per_source.csv
    and MLflow; a source column of "" only gives today's output."""
    import mlflow

    from kfer import tracking
    from kfer.reporting.evaluate import run_evaluate

    names = params.class_names
    rows = known_rows(names)
    # the 11 test rows: 6 from "aihub" (classes 0-2), 5 from "fer+2013" (classes 3-5); train/val rows alike
    sources = ["aihub"] * 6 + ["fer+2013"] * 5 + ["aihub", "fer+2013"] * ((len(rows) - 11) // 2) + ["aihub"]
    write_splits(params, rows, sources[: len(rows)])
    save_intensity_model(params)
    with tracking.tracked_run(params, "train", log_params=False) as run:
        pass
    params.path(params.paths.train_run).parent.mkdir(parents=True, exist_ok=True)
    params.path(params.paths.train_run).write_text(json.dumps({"run_id": run.info.run_id}), encoding="utf-8")

    with caplog.at_level(logging.INFO, logger="kfer.reporting.evaluate"):
        result = run_evaluate(params)

    # overall metrics unchanged by the sources
    assert result["test_accuracy"] == pytest.approx(EXPECTED_ACCURACY)
    assert result["test_macro_f1"] == pytest.approx(EXPECTED_MACRO_F1)
    # aihub: true 0 0 1 1 2 2, pred 0 0 1 2 2 2; fer+2013: true 3 3 4 5 5, pred 4 4 4 5 5
    expected = {
        "aihub": {"accuracy": pytest.approx(5 / 6), "macro_f1": pytest.approx((1 + 2 / 3 + 0.8) / 3), "n": 6,
                  "persons": 3},
        "fer+2013": {"accuracy": pytest.approx(3 / 5), "macro_f1": pytest.approx((0 + 0.5 + 1) / 3), "n": 5,
                     "persons": 3},
    }
    assert result["per_source"] == expected
    written = json.loads(params.path(params.paths.eval_metrics).read_text(encoding="utf-8"))
    assert written == result and list(written["per_source"]) == ["aihub", "fer+2013"]
    assert "source fer+2013: 5 images, 3 persons" in caplog.text

    eval_dir = params.path(params.paths.eval_dir)
    # the source is a group field too: accuracy by group (tests/reporting/test_groups.py)
    assert sorted(p.name for p in eval_dir.iterdir()) == sorted([*EVAL_FILES, "per_source.csv", "per_group.csv",
                                                                 "groups.png"])
    assert list(result["groups"]["fields"]) == ["source"]
    assert {v: m["n"] for v, m in result["groups"]["fields"]["source"]["values"].items()} == {"aihub": 6,
                                                                                              "fer+2013": 5}
    table = pd.read_csv(eval_dir / "per_source.csv", keep_default_na=False)
    assert list(table.columns) == ["source", "n", "persons", "accuracy", "macro_f1"]
    assert table["source"].tolist() == ["aihub", "fer+2013"] and table["n"].tolist() == [6, 5]
    assert table["accuracy"].to_numpy() == pytest.approx([5 / 6, 3 / 5], abs=1e-6)

    m = mlflow.MlflowClient(tracking.tracking_uri(params)).get_run(run.info.run_id).data.metrics
    assert m["test_accuracy_aihub"] == pytest.approx(5 / 6)
    assert m["test_macro_f1_fer_2013"] == pytest.approx(0.5)  # "+" is not allowed in MLflow names
    assert m["test_accuracy_fer_2013"] == pytest.approx(3 / 5)
    assert m["test_accuracy"] == pytest.approx(EXPECTED_ACCURACY)

    # a source column without names (data.sources not configured): the output of before
    write_splits(params, rows, [""] * len(rows))
    params.path(params.paths.train_run).unlink()
    result = run_evaluate(params)
    assert "per_source" not in result
    assert sorted(p.name for p in eval_dir.iterdir()) == sorted(EVAL_FILES)


def test_source_metric_keys_stay_distinct():
    from kfer.reporting.metrics import flat_metrics

    metrics = {"test_accuracy": 0.5, "test_macro_f1": 0.4, "test_images": 10, "per_class": {},
               "per_source": {"한국": {"accuracy": 0.1, "macro_f1": 0.2, "n": 4, "persons": 1},
                              "일본": {"accuracy": 0.3, "macro_f1": 0.4, "n": 6, "persons": 2},
                              "AI Hub": {"accuracy": 0.6, "macro_f1": 0.7, "n": 6, "persons": 2}}}
    flat = flat_metrics(metrics)
    assert flat["test_accuracy_AI Hub"] == 0.6 and flat["test_macro_f1_AI Hub"] == 0.7
    hangul = sorted(k for k in flat if k.startswith("test_accuracy___"))
    assert len(hangul) == 2 and {flat[k] for k in hangul} == {0.1, 0.3}  # "__" + a hash of each name
    assert len(flat) == 3 + 2 * 3


def test_matches_sklearn_on_tiny_resnet_without_run_file(params, caplog):
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        precision_recall_fscore_support,
    )

    from kfer.files import read_image_gray
    from kfer.reporting.evaluate import run_evaluate

    names = params.class_names
    rng = np.random.default_rng(0)
    rows = [(names[k % C], "test", int(rng.integers(0, 256))) for k in range(13)]  # 13: a partial last batch
    rows += [(names[0], "train", None), (names[1], "val", None)]
    df = write_splits(params, rows)
    model = save_tiny_resnet(params)

    with caplog.at_level(logging.WARNING):
        result = run_evaluate(params)
    assert "NOT logged to MLflow" in caplog.text
    assert not params.path(params.paths.mlflow_db).exists()

    test = df[df["split"] == "test"]
    x = np.stack([read_image_gray(params.path(p)) for p in test["path"]]).astype("float32")[..., None]
    probs = model.predict(x, verbose=0)
    y_true = test["label"].map(names.index).to_numpy()
    y_pred = probs.argmax(1)
    labels = list(range(C))
    assert result["test_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    present = sorted(set(y_true))  # every class has test images here, but not necessarily predictions
    assert len(present) == C
    assert result["test_macro_f1"] == pytest.approx(
        f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
    p, r, f, n = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, name in enumerate(names):
        assert result["per_class"][name] == {"precision": pytest.approx(p[i]), "recall": pytest.approx(r[i]),
                                             "f1": pytest.approx(f[i]), "support": int(n[i])}
    pred = pd.read_csv(params.path(params.paths.eval_dir) / "predictions.csv")
    assert list(pred["predicted"]) == [names[i] for i in y_pred]
    assert pred["confidence"].to_numpy() == pytest.approx(probs.max(1), abs=1e-5)


def test_missing_model_is_a_clear_error(params):
    from kfer.reporting.evaluate import run_evaluate

    write_splits(params, [(params.class_names[0], "test", 10)])
    with pytest.raises(FileNotFoundError, match=r"model .*model\.keras not found: run `kfer train`"):
        run_evaluate(params)
    assert not params.path(params.paths.eval_metrics).exists()
    assert not params.path(params.paths.eval_dir).exists()


def test_empty_test_split_is_a_clear_error(params):
    from kfer.reporting.evaluate import run_evaluate

    names = params.class_names
    write_splits(params, [(names[0], "train", None), (names[1], "val", None)])
    save_intensity_model(params)
    with pytest.raises(ValueError, match="test split .* is empty"):
        run_evaluate(params)
    assert not params.path(params.paths.eval_metrics).exists()


def test_unknown_run_id_is_a_clear_error(params):
    from kfer.reporting.evaluate import run_evaluate

    write_splits(params, [(params.class_names[0], "test", value_of(0))])
    save_intensity_model(params)
    params.path(params.paths.train_run).write_text('{"run_id": "0123456789abcdef"}', encoding="utf-8")
    with pytest.raises(RuntimeError, match="run 0123456789abcdef .* not found in the tracking store"):
        run_evaluate(params)


# --- figures -----------------------------------------------------------------------------------------
def _render_problems(fn) -> list[str]:
    """Run fn, returning every missing-glyph warning (text: warnings; mathtext: logging)."""
    problems: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            problems.append(record.getMessage())

    handler = _Collect(level=logging.WARNING)
    mpl_log = logging.getLogger("matplotlib")
    mpl_log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        mpl_log.removeHandler(handler)
    problems += [str(w.message) for w in caught]
    return [p for p in problems if "glyph" in p.lower() or "missing" in p.lower()]


def test_figures_render_hangul_without_missing_glyphs(params, tmp_path):
    import matplotlib

    from kfer import plots

    assert plots.korean_font() is not None, "no Hangul font: pip install koreanize-matplotlib"
    labels = [plots.class_label(c.name, c.ko) for c in params.classes]
    assert labels[0] == f"{params.classes[0].name} {params.classes[0].ko}"  # "joy 기쁨"
    rc_before = dict(matplotlib.rcParams)

    cm = np.full((C, C), 0.05)
    np.fill_diagonal(cm, 0.7)
    cm[6] = np.nan  # a class without test images
    history = pd.DataFrame({"epoch": [1, 2, 3], "loss": [2.0, 1.5, 1.1], "val_loss": [2.1, 1.8, 1.6],
                            "val_macro_f1": [0.1, 0.3, 0.4], "learning_rate": [1e-3, 1e-4, 1e-5]})
    images = [np.full((S, S), 40 * i, dtype=np.uint8) for i in range(3)]
    captions = [f"{labels[i]}\n→ {labels[i + 1]}\np=0.{80 + i}" for i in range(3)]

    def render():
        plots.plot_confusion(cm, labels, tmp_path / "cm.png", "혼동 행렬 confusion −0.5")
        plots.plot_history(history, tmp_path / "history.png")
        plots.image_grid(images, captions, tmp_path / "grid.png", cols=2, title="오분류 misclassified")
        plots.image_grid([], [], tmp_path / "empty.png", empty_text="오분류 없음")

    assert _render_problems(render) == []
    for name in ("cm.png", "history.png", "grid.png", "empty.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert dict(matplotlib.rcParams) == rc_before  # no global font change leaks out
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []

    # the check itself works: Hangul in a font without it is reported
    def render_dejavu_only():
        with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}):
            fig = matplotlib.figure.Figure()
            fig.text(0.5, 0.5, "기쁨")
            fig.savefig(tmp_path / "bad.png")

    assert any("missing from font" in p for p in _render_problems(render_dejavu_only))


def test_history_with_missing_columns_and_empty(tmp_path):
    from kfer import plots

    plots.plot_history(pd.DataFrame({"loss": [1.0, 0.5]}), tmp_path / "h1.png")  # no epoch column
    plots.plot_history(pd.DataFrame(columns=["epoch", "loss"]), tmp_path / "h2.png")
    assert (tmp_path / "h1.png").exists() and (tmp_path / "h2.png").exists()
    with pytest.raises(ValueError, match="captions"):
        plots.image_grid([np.zeros((4, 4), np.uint8)], [], tmp_path / "g.png")


def test_photo_path_scores_the_logged_model_on_the_test_photos(make_params, monkeypatch, caplog):
    """The photo path runs the logged photo model on the raw test photos; with crop.box: match the faces it cuts
    are the crop stage's pixel for pixel, so its answers equal the crop path's, photo by photo."""
    import mlflow

    from kfer import tracking
    from kfer.data.crop import run_crop
    from kfer.demo.aihub import generate_aihub_photos
    from kfer.reporting.evaluate import run_evaluate
    from kfer.serving.publish import log_models

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = make_params({"crop": {"image_size": S, "workers": 1}, "train": {"experiment": "kfer-test"}})
    generate_aihub_photos(params.path(params.paths.raw), [(c.name, c.ko) for c in params.classes], n_persons=2,
                          per_class=1, size=(1280, 960), seed=5, validation_persons=0)
    report = run_crop(params)
    assert report["box_source"].get("matched", 0) >= 12, report["box_source"]
    manifest = pd.read_csv(params.path(params.paths.cropped) / "manifest.csv", dtype=str, keep_default_na=False)
    ok = manifest[manifest["status"] == "ok"]
    pd.DataFrame({"path": ok["path"], "label": ok["label"], "group": ok["group"], "split": "test"}).to_csv(
        params.path(params.paths.splits), index=False)
    model = save_intensity_model(params, sharpness=2000.0)
    with tracking.tracked_run(params, "train", log_params=False) as run:
        mlflow.set_tag(tracking.MODEL_URI_TAG, log_models(model, params)["model_uri"])  # as the train stage does
    params.path(params.paths.train_run).write_text(json.dumps({"run_id": run.info.run_id}), encoding="utf-8")

    with caplog.at_level(logging.INFO, logger="kfer.reporting.evaluate"):
        result = run_evaluate(params)
    n = len(ok)
    assert result["photo_images"] == n and result["photo_missed"] == report["box_source"].get("annotation", 0)
    assert result["photo_box_iou"] == pytest.approx(1.0)
    pred = pd.read_csv(params.path(params.paths.eval_dir) / "predictions.csv", dtype=str, keep_default_na=False)
    matched = (ok["box_source"] == "matched").to_numpy()
    assert (pred["photo_predicted"][matched] == pred["predicted"][matched]).all()
    if matched.all():
        assert result["photo_accuracy"] == result["test_accuracy"]
    assert "photo path (the logged photo model on" in caplog.text
    logged = mlflow.MlflowClient(tracking.tracking_uri(params)).get_run(run.info.run_id).data.metrics
    assert logged["photo_accuracy"] == pytest.approx(result["photo_accuracy"])

    # a sample: evaluate.photo_max_images photos, the others left blank
    params = make_params({"crop": {"image_size": S, "workers": 1}, "train": {"experiment": "kfer-test"},
                          "evaluate": {"photo_max_images": 5}})
    assert run_evaluate(params)["photo_images"] == 5
    pred = pd.read_csv(params.path(params.paths.eval_dir) / "predictions.csv", dtype=str, keep_default_na=False)
    assert (pred["photo_predicted"] != "").sum() == 5


def test_scores_against_the_uploader_and_the_majority_label(params, caplog):
    """splits.csv with the opinion columns: the same predictions scored against the uploader's label and against
    the annotators' majority (only where one exists), with the per-class agreement table."""
    from kfer.reporting.evaluate import run_evaluate

    names = params.class_names
    df = write_splits(params, known_rows(names))
    test = (df["split"] == "test").to_numpy()
    t = np.cumsum(test) - 1  # index among the test rows
    # the majority: the model's answer on every third test row, none elsewhere (a tie, or no votes)
    majority = [names[Y_PRED[t[i]]] if test[i] and t[i] % 3 == 0 else "" for i in range(len(df))]
    df = df.assign(label_uploader=df["label"], label_majority=majority,
                   # every other majority holds only half of the raters (shares): no strict majority, left out
                   votes=[("" if not m else f"{m}=0.500" if t[i] % 6 == 0 else f"{m}=2 {u}=1")
                          for i, (m, u) in enumerate(zip(majority, df["label"], strict=True))],
                   agreement=["2" if m else "" for m in majority])
    df.to_csv(params.path(params.paths.splits), index=False)
    save_intensity_model(params)

    with caplog.at_level(logging.INFO, logger="kfer.reporting.evaluate"):
        result = run_evaluate(params)

    n_majority = len(range(0, len(Y_TRUE), 3))
    assert result["label_kinds"]["uploader"] == {"accuracy": pytest.approx(EXPECTED_ACCURACY),
                                                 "macro_f1": pytest.approx(EXPECTED_MACRO_F1), "n": len(Y_TRUE),
                                                 "left_out": 0}
    assert result["label_kinds"]["majority"]["accuracy"] == 1.0
    assert result["label_kinds"]["majority"]["n"] == n_majority
    n_strict = len([k for k in range(0, len(Y_TRUE), 3) if k % 6])  # FER+'s rule: more than half of the raters
    assert 0 < n_strict < n_majority
    assert result["label_kinds"]["strict_majority"] == {"accuracy": 1.0, "macro_f1": pytest.approx(1.0),
                                                        "n": n_strict, "left_out": len(Y_TRUE) - n_strict}
    from kfer.reporting.metrics import flat_metrics

    flat = flat_metrics(result)  # what MLflow gets
    assert flat["test_accuracy_uploader"] == pytest.approx(EXPECTED_ACCURACY)
    assert flat["test_accuracy_majority"] == 1.0 and "test_macro_f1_majority" in flat
    joy = result["opinions"]["per_class"][names[0]]  # test rows 0, 1 are class 0; row 0 has a majority
    assert joy["photos"] == 2 and joy["with_votes"] == 1 and joy["majority_is_uploader"] == 1
    assert result["opinions"]["agreement"] == {"2": n_majority, "none": len(Y_TRUE) - n_majority}
    table = pd.read_csv(params.path(params.paths.eval_dir) / "label_agreement.csv")
    assert table["class"].tolist()[:C] == names and table["photos"].sum() == len(Y_TRUE)
    assert "against the majority label" in caplog.text
