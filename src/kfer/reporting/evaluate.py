"""The ``evaluate`` stage: score the trained model on the held-out TEST split, once, and report.

This is the only code that reads the test rows of ``paths.splits``; training and tuning never see them.

Outputs
-------
``paths.eval_metrics`` (JSON, the full report)::

    {"test_accuracy": float, "test_macro_f1": float, "test_images": int,
     "per_class": {<class>: {"precision", "recall", "f1", "support"}},
     "per_source": {<source>: {"accuracy", "macro_f1", "n", "persons"}},
     "photo_accuracy": float, "photo_macro_f1": float, "photo_images": int, "photo_missed": int,
     "photo_box_iou": float,
     "label_kinds": {"uploader"|"majority"|"strict_majority": {"accuracy", "macro_f1", "n", "left_out"}},
     "opinions": {"agreement": {...}, "per_class": {<class>: {"photos", "with_votes", "majority_is_uploader", ...}}}}

``label_kinds`` scores the same predictions against the uploader's label, the annotators' majority and their strict
majority (``label_uploader``, ``label_majority`` of ``paths.splits``, and the class more than half of all raters
named, as FER+ scores; ``n`` = the test images that have that label, ``left_out`` the others), whatever
``data.label_policy`` trained on; ``opinions`` is how often the two agree per class on the test photos
(:class:`kfer.data.policy.AgreementTally`). Both are there when splits.csv carries the opinion columns.

``per_source`` is there only when the test rows carry a dataset name (column ``source`` of ``paths.splits``,
set by ``data.sources``): the same metrics on each source's test images alone (``n`` images of ``persons``
persons), sources sorted by name; rows without a name, if any, are the source ``(none)``.

``behaviour`` (:mod:`kfer.reporting.behaviour`): on ``evaluate.behaviour_max_images`` test faces, the share whose
predicted class stays the same and the accuracy under a mirror, brightness, contrast, rotation, blur and JPEG
re-compression: ``{"n", "accuracy", "checks": {<check>: {"same_prediction", "accuracy", "accuracy_change"}}}``.

``photo_*`` is the photo path (:mod:`kfer.reporting.external`): the photo model logged by the training run, as
``kfer predict`` and ``mlflow models serve`` run it, on the test photos themselves (``evaluate.photo_max_images``
of them, a seeded sample, 0 = all): the photo is read whole, the model finds and cuts the faces, and the face that
overlaps the crop stage's box is the answer. ``photo_missed`` photos where it found no such face count as wrong;
``photo_box_iou`` is the mean IoU of its boxes with the crop stage's (1.0 when training faces are cut as served
ones, ``crop.box: match``). Absent when there is no training run to load the model from.

``paths.eval_headline`` (JSON, the DVC metrics): ``test_accuracy``, ``test_macro_f1`` and ``photo_accuracy``
(when the photo path ran) of the report above, and ``group_worst_accuracy`` and ``group_largest_gap`` (when the group
table has them). (``label_kinds`` goes to MLflow as ``test_accuracy_uploader``, ``test_accuracy_majority``,
``test_accuracy_strict_majority`` and their macro-F1: `dvc metrics show` stays one table.)

``paths.eval_dir`` (built atomically, replaced whole):

* ``confusion_matrix.png``: row-normalized confusion matrix, labels "joy 기쁨";
* ``misclassified.png``: the (up to) 32 most confident mistakes, captioned "true → pred p=0.83";
* ``gradcam.png``: Grad-CAM heat maps of the predicted class (:func:`kfer.serving.explain.evaluation_grid`) on up to 8
  correct and 8 wrong test faces, the most confident of each true class in turn;
* ``per_class.csv``: class, ko, precision, recall, f1, support;
* ``predictions.csv``: path, actual, predicted, confidence, one row per test image in split-file order
  (for ``dvc plots`` with the ``confusion`` template, x: predicted, y: actual), and photo_predicted: the photo
  path's answer ("(missed)" when it found no labelled face, "" for photos outside its sample);
* ``per_source.csv`` (only with ``per_source``): source, n, persons, accuracy, macro_f1;
* ``label_agreement.csv`` (only with ``opinions``): class, photos, with_votes, majority_is_uploader,
  majority_is_uploader_fraction, mean_agreement;
* ``per_group.csv`` and ``groups.png`` (only with ``groups``): accuracy by group (:mod:`kfer.reporting.groups`).

``groups`` (when test rows have a source or group fields, column ``groups`` of ``paths.splits``) is the group
table of :mod:`kfer.reporting.groups`: per field and value the count, accuracy with its 95% Wilson interval and
macro-F1 (no claim below ``evaluate.group_min_n`` faces), the largest gap per field, the worst group; the DVC
metrics get ``group_worst_accuracy`` and ``group_largest_gap``, MLflow ``test_accuracy_group_<field>_<value>``.

Metric definitions (scikit-learn): accuracy over all test images; macro-F1 is the unweighted mean of the
per-class F1 over the classes that HAVE test images, the same definition as the train stage's ``macro_f1``
(a class absent from the test split is left out and warned about, not counted as 0); undefined precision or
recall (no predictions / no images of a class) are 0. ``per_class`` lists every class, support 0 included.

If ``paths.train_run`` exists, the MLflow training run it names is resumed and receives the flat metrics
(``test_accuracy``, ``test_macro_f1``, ``test_images``, ``test_{precision,recall,f1}_<class>``, and per source
``test_accuracy_<source>``, ``test_macro_f1_<source>``) and the eval files as artifacts under ``eval/``;
otherwise the files are still written and a warning says nothing was logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kfer.catalog import Catalog
from kfer.config import Params
from kfer.data.policy import AgreementTally, strict_majority
from kfer.files import atomic_dir, atomic_file, read_image_gray, write_json
from kfer.reporting import behaviour, card
from kfer.reporting import groups as by_group
from kfer.reporting.metrics import (
    NO_SOURCE,
    compute_metrics,
    flat_metrics,
    per_source_metrics,
    row_sources,
)
from kfer.serving import calibration

log = logging.getLogger(__name__)

TEST_SPLIT = "test"
MAX_MISCLASSIFIED = 32
PREDICTION_COLUMNS = ["path", "actual", "predicted", "confidence", "photo_predicted"]
PHOTO_MISSED_LABEL = "(missed)"
PER_CLASS_COLUMNS = ["class", "ko", "precision", "recall", "f1", "support"]
PER_SOURCE_COLUMNS = ["source", "n", "persons", "accuracy", "macro_f1"]
ARTIFACT_DIR = "eval"


# --- inputs ------------------------------------------------------------------------------------------
def load_test_split(params: Params) -> pd.DataFrame:
    """The test rows of ``paths.splits`` (columns path, label, ...), in file order; nothing else is read."""
    cat = Catalog(params)
    splits_path = cat.splits
    df = cat.read("splits", ("path", "label", "split"))
    test = df[df["split"] == TEST_SPLIT].reset_index(drop=True)
    if test.empty:
        raise ValueError(
            f"the test split in {splits_path} is empty ({len(df)} rows, none with split == 'test'): nothing to "
            "evaluate; give split.test a non-zero ratio in params.yaml and rerun `kfer split`"
        )
    unknown = sorted(set(test["label"]) - set(params.class_names))
    if unknown:
        raise ValueError(f"test rows of {splits_path} have labels that are not classes in params.yaml: {unknown}")
    return test


def _model_path(params: Params) -> Path:
    model_path = Catalog(params).model
    if not model_path.exists():
        raise FileNotFoundError(f"model {model_path} not found: run `kfer train` (dvc repro train) first")
    return model_path


def load_model(params: Params):
    """The trained Keras model (not compiled: evaluation needs no optimizer, loss or custom metrics)."""
    model_path = _model_path(params)
    import keras

    from kfer.serving import layers as _custom_layers  # noqa: F401 - registers kfer's layers (flip TTA) with Keras

    model = keras.models.load_model(model_path, compile=False)
    n_classes = len(params.class_names)
    out_shape = tuple(model.output_shape)
    if out_shape[-1] != n_classes:
        raise ValueError(
            f"model {model_path} outputs {out_shape[-1]} classes but params.yaml lists {n_classes}: "
            "retrain after changing `classes`"
        )
    in_shape = tuple(model.input_shape)
    size = params.crop.image_size
    if len(in_shape) != 4 or in_shape[-1] != 1 or any(d not in (None, size) for d in in_shape[1:3]):
        raise ValueError(
            f"model {model_path} expects input {in_shape}, evaluate feeds (N, {size}, {size}, 1) grayscale "
            "(crop.image_size); retrain after changing crop settings"
        )
    return model


def predict_images(model, paths: list[Path], batch_size: int, image_size: int) -> np.ndarray:
    """Softmax probabilities (N, C) for grayscale PNGs of side ``image_size``, fed as raw 0..255 float32.

    Batches have one fixed size (the last one is zero-padded), so the predict function is traced once.
    """
    n = len(paths)
    b = max(1, min(batch_size, n))
    out: list[np.ndarray] = []
    for start in range(0, n, b):
        chunk = paths[start : start + b]
        x = np.zeros((b, image_size, image_size, 1), dtype=np.float32)
        for i, p in enumerate(chunk):
            img = read_image_gray(p)
            if img.shape != (image_size, image_size):
                raise ValueError(f"{p} is {img.shape[1]}x{img.shape[0]}, expected {image_size}x{image_size}")
            x[i, ..., 0] = img
        probs = np.asarray(model.predict_on_batch(x), dtype=np.float64)
        out.append(probs[: len(chunk)])
    return np.concatenate(out, axis=0)


def label_kind_metrics(test: pd.DataFrame, y_pred: np.ndarray, names: list[str]) -> dict[str, dict]:
    """Accuracy and macro-F1 of the predictions against the uploader's label, the annotators' majority and their
    strict majority (``label_uploader``, ``label_majority``, and the class more than half of all raters named:
    :func:`kfer.data.policy.strict_majority`, FER+'s rule), each on the test images that have one (``n``; a source
    without votes has no majority; ``left_out``: the test images without that label)."""
    index = {n: i for i, n in enumerate(names)}
    out = {}
    kinds = {"uploader": test["label_uploader"], "majority": test["label_majority"],
             "strict_majority": test["votes"].astype(str).map(strict_majority)}
    for kind, column in kinds.items():
        has = column.isin(index).to_numpy()
        if not has.any():
            out[kind] = {"accuracy": None, "macro_f1": None, "n": 0, "left_out": int(len(test))}
            continue
        m = compute_metrics(column[has].map(index).to_numpy(dtype=np.int64), y_pred[has], names)
        out[kind] = {"accuracy": m["test_accuracy"], "macro_f1": m["test_macro_f1"], "n": int(has.sum()),
                     "left_out": int((~has).sum())}
    return out


def _write_eval_dir(
    params: Params, out: Path, test: pd.DataFrame, y_true: np.ndarray, probs: np.ndarray,
    metrics: dict[str, Any], photo_answers: list[str], model,
) -> None:
    from kfer import plots
    from kfer.serving import explain

    names = params.class_names
    labels = [plots.class_label(c.name, c.ko) for c in params.classes]
    y_pred = probs.argmax(axis=1)
    conf = probs[np.arange(len(y_pred)), y_pred]

    pd.DataFrame({
        "path": test["path"],
        "actual": [names[i] for i in y_true],
        "predicted": [names[i] for i in y_pred],
        "confidence": np.round(conf, 6),
        "photo_predicted": photo_answers,
    }, columns=PREDICTION_COLUMNS).to_csv(out / "predictions.csv", index=False, lineterminator="\n")

    pd.DataFrame(
        [[c.name, c.ko or "", *(metrics["per_class"][c.name][k] for k in ("precision", "recall", "f1", "support"))]
         for c in params.classes],
        columns=PER_CLASS_COLUMNS,
    ).to_csv(out / "per_class.csv", index=False, lineterminator="\n", float_format="%.6f")

    if metrics.get("per_source"):
        pd.DataFrame(
            [[name, m["n"], m["persons"], m["accuracy"], m["macro_f1"]] for name, m in metrics["per_source"].items()],
            columns=PER_SOURCE_COLUMNS,
        ).to_csv(out / "per_source.csv", index=False, lineterminator="\n", float_format="%.6f")

    if metrics.get("opinions"):
        pd.DataFrame([{"class": c, **row} for c, row in metrics["opinions"]["per_class"].items()]).to_csv(
            out / "label_agreement.csv", index=False, lineterminator="\n")

    if metrics.get("groups"):
        by_group.write_files(metrics["groups"], out, f"Test set (n={metrics['test_images']}): accuracy by group")

    if metrics.get("calibration"):
        plots.plot_reliability(metrics["calibration"], out / "reliability.png")

    if metrics.get("behaviour"):
        behaviour.write_files(metrics["behaviour"], out,
                              f"Behaviour checks on {metrics['behaviour']['n']} test faces")

    plots.plot_confusion(
        metrics["confusion_normalized"], labels, out / "confusion_matrix.png",
        title=(f"Test set (n={metrics['test_images']}): accuracy {metrics['test_accuracy']:.3f}, "
               f"macro-F1 {metrics['test_macro_f1']:.3f}"),
    )

    wrong = np.flatnonzero(y_pred != y_true)
    # most confident mistakes first; ties by file order (stable sort), so the selection is deterministic
    worst = wrong[np.argsort(-conf[wrong], kind="stable")][:MAX_MISCLASSIFIED]
    images = [read_image_gray(params.path(test["path"].iloc[i])) for i in worst]
    captions = [f"{labels[y_true[i]]}\n→ {labels[y_pred[i]]}\np={conf[i]:.2f}" for i in worst]
    plots.image_grid(
        images, captions, out / "misclassified.png", cols=8,
        title=(f"Most confident misclassifications{' 오분류' if plots.has_hangul_font() else ''}: "
               f"{len(worst)} of {len(wrong)} "
               "(actual → predicted)") if len(wrong) else None,
        empty_text=f"no misclassified test images ({len(y_true)} of {len(y_true)} correct)",
    )
    explain.evaluation_grid(model, lambda i: read_image_gray(params.path(test["path"].iloc[i])), y_true, y_pred,
                            conf, labels, out / explain.GRID_FILE)


def _train_run(params: Params):
    """The MLflow training run named in ``paths.train_run`` (an mlflow Run), or None when that file is absent."""
    run_file = Catalog(params).train_run
    if not run_file.exists():
        return None
    try:
        run_id = str(json.loads(run_file.read_text(encoding="utf-8"))["run_id"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{run_file} is not a JSON object with a run_id: {exc}") from exc

    import mlflow
    from mlflow.exceptions import MlflowException

    from kfer import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri(params))
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise RuntimeError(
            f"MLflow run {run_id} (from {run_file}) not found in the tracking store "
            f"{tracking.tracking_uri(params)}: was MLFLOW_TRACKING_URI different during training?"
        ) from exc


def _log_to_mlflow(params: Params, run, metrics: dict[str, Any], eval_dir: Path, metrics_path: Path,
                   model_card: str) -> str:
    """Resume the training run and log the test metrics, the eval files and the model card (replacing train's)."""
    import mlflow

    from kfer import tracking

    info = run.info
    if info.status != "FINISHED":
        log.warning("MLflow run %s is %s; logging the test metrics into it anyway", info.run_id, info.status)
    # resuming needs the run's own experiment active (it may differ from train.experiment, e.g. a tuning trial)
    experiment = mlflow.MlflowClient().get_experiment(info.experiment_id).name
    with tracking.tracked_run(params, run_id=info.run_id, experiment=experiment):
        mlflow.log_metrics({**flat_metrics(metrics), **by_group.flat(metrics.get("groups")),
                            **behaviour.flat(metrics.get("behaviour"))})
        mlflow.log_artifacts(str(eval_dir), artifact_path=ARTIFACT_DIR)
        mlflow.log_artifact(str(metrics_path), artifact_path=ARTIFACT_DIR)
        mlflow.log_text(model_card, card.ARTIFACT)
    return info.run_id


# --- photo path --------------------------------------------------------------------------------------
def photo_sample(params: Params, n: int) -> np.ndarray:
    """Indices of the test rows the photo path scores: all, or ``evaluate.photo_max_images`` drawn with the seed."""
    k = params.evaluate.photo_max_images
    if k == 0 or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(params.seed).choice(n, size=k, replace=False))


def photo_path(params: Params, run, test: pd.DataFrame,
               y_true: np.ndarray) -> tuple[dict[str, Any], list[str]] | None:
    """The ``photo_*`` metrics and each test row's photo-path answer (see the module docstring); None (warned)
    when the run logged no photo model."""
    from kfer import tracking
    from kfer.reporting import external
    from kfer.serving import predict

    uri = run.data.tags.get(tracking.MODEL_URI_TAG)
    if not uri:
        log.warning("training run %s has no photo model (tag %s): no photo-path metrics", run.info.run_id,
                    tracking.MODEL_URI_TAG)
        return None
    manifest_path = Catalog(params).crop_manifest
    manifest = Catalog(params).read("crop_manifest", ("path", "raw", "x0", "y0", "x1", "y1")).set_index("path")
    missing = sorted(set(test["path"]) - set(manifest.index))
    if missing:
        raise ValueError(f"{len(missing)} test image(s) are not in {params.rel(manifest_path)} (e.g. {missing[0]}): "
                         "rerun `kfer split` after `kfer crop`")
    rows = photo_sample(params, len(test))
    entries = manifest.loc[test["path"].iloc[rows]]
    photos = [params.path(r) for r in entries["raw"]]
    boxes = [tuple(int(float(v)) for v in b) if all(b) else None
             for b in entries[["x0", "y0", "x1", "y1"]].itertuples(index=False)]
    model = predict.load_photo_model(uri, params)
    results = external.score_photos(model, photos, boxes, params.class_names, desc="evaluate: test photos")
    y_pred = np.array([r.predicted for r in results], dtype=np.int64)
    m = compute_metrics(y_true[rows], y_pred, params.class_names)
    counts = external.summary(results)
    metrics = {"photo_accuracy": m["test_accuracy"], "photo_macro_f1": m["test_macro_f1"],
               "photo_images": int(len(rows)), "photo_missed": counts["missed"],
               "photo_box_iou": counts["box_iou"]}
    answers = [""] * len(test)
    for i, p in zip(rows, y_pred, strict=True):
        answers[i] = PHOTO_MISSED_LABEL if p == external.MISSED else params.class_names[p]
    return metrics, answers


# --- stage -------------------------------------------------------------------------------------------
def run_evaluate(params: Params) -> dict[str, Any]:
    """Evaluate ``paths.model`` on the test split; write the metrics JSON and eval folder; log to MLflow.

    Returns the metrics written to ``paths.eval_metrics``.
    """
    _model_path(params)  # a missing model is the first thing to report, before any loading
    test = load_test_split(params)
    model = load_model(params)
    names = params.class_names
    y_true = test["label"].map({n: i for i, n in enumerate(names)}).to_numpy(dtype=np.int64)
    probs = predict_images(model, [params.path(p) for p in test["path"]], params.train.batch_size,
                           params.crop.image_size)
    y_pred = probs.argmax(axis=1)

    full = compute_metrics(y_true, y_pred, names)
    metrics = {k: full[k] for k in ("test_accuracy", "test_macro_f1", "test_images", "per_class")}
    absent = [n for n, m in metrics["per_class"].items() if m["support"] == 0]
    if absent:
        log.warning("classes without test images (left out of test_macro_f1): %s", absent)
    sources = row_sources(test)
    if sources is not None:
        if NO_SOURCE in sources:
            log.warning("%d test image(s) have no source: reported as source %r", sources.count(NO_SOURCE),
                        NO_SOURCE)
        groups = test["group"] if "group" in test.columns else pd.Series([""] * len(test))
        # as in split: an image without a group is its own person
        persons = [g if g else f"\x00{p}" for g, p in zip(groups, test["path"], strict=True)]
        metrics["per_source"] = per_source_metrics(y_true, y_pred, sources, persons, names)
        for name, m in metrics["per_source"].items():
            log.info("evaluate: source %s: %d images, %d persons, accuracy %.4f, macro-F1 %.4f",
                     name, m["n"], m["persons"], m["accuracy"], m["macro_f1"])

    if "label_uploader" in test.columns:  # splits.csv with the opinions: what each kind of label says
        metrics["label_kinds"] = label_kind_metrics(test, y_pred, names)
        metrics["opinions"] = AgreementTally().add_frame(test).report(names)
        for kind, m in metrics["label_kinds"].items():
            if m["n"]:
                log.info("evaluate: against the %s label (%d images): accuracy %.4f, macro-F1 %.4f", kind, m["n"],
                         m["accuracy"], m["macro_f1"])

    fields = by_group.row_fields(test)
    if fields:
        metrics["groups"] = by_group.group_report(y_true, y_pred, fields, names, params.evaluate.group_min_n)
        for line in by_group.describe(metrics["groups"]):
            log.info("evaluate: by %s", line)

    train_report = Catalog(params).train_metrics
    fitted = json.loads(train_report.read_text(encoding="utf-8")).get("calibration") \
        if train_report.is_file() else None
    if fitted:  # the served model's temperature, fitted on val by the train stage: ECE before and after
        test_cal = calibration.report(probs, y_true, fitted["temperature"])
        metrics["calibration"] = {"temperature": fitted["temperature"], "splits": {"val": fitted["val"],
                                                                                    "test": test_cal}}
        log.info("evaluate: calibration (temperature %.3f): test ECE %.4f -> %.4f", fitted["temperature"],
                 test_cal["ece_before"], test_cal["ece_after"])
    else:
        log.warning("no calibration in %s: the model's probabilities are reported uncalibrated (retrain)",
                    params.rel(train_report))

    checked = behaviour.sample(len(test), params.evaluate.behaviour_max_images, params.seed)
    metrics["behaviour"] = behaviour.run_checks(
        model.predict_on_batch, [params.path(test["path"].iloc[i]) for i in checked], y_true[checked],
        y_pred[checked], params.crop.image_size, params.train.batch_size)
    log.info("evaluate: behaviour on %d test faces: %s", metrics["behaviour"]["n"],
             behaviour.describe(behaviour.flat(metrics["behaviour"])))

    run = _train_run(params)
    answers = [""] * len(test)
    if run is None:
        log.warning("%s not found: no photo-path metrics, and the test metrics are NOT logged to MLflow "
                    "(files are written)", params.rel(Catalog(params).train_run))
    elif (scored := photo_path(params, run, test, y_true)) is not None:
        photo, answers = scored
        metrics.update(photo)
        log.info("evaluate: photo path (the logged photo model on %d test photos): accuracy %.4f, macro-F1 %.4f, "
                 "%d missed, box IoU with the crop stage's %s", photo["photo_images"], photo["photo_accuracy"],
                 photo["photo_macro_f1"], photo["photo_missed"],
                 "n/a" if photo["photo_box_iou"] is None else f"{photo['photo_box_iou']:.3f}")

    eval_dir = Catalog(params).eval_dir
    with atomic_dir(eval_dir) as tmp:
        _write_eval_dir(params, tmp, test, y_true, probs, {**full, **metrics}, answers, model)
    metrics_path = Catalog(params).eval_metrics
    write_json(metrics_path, metrics)
    Catalog(params).write_json("eval_headline",  # DVC metrics: a few numbers, no per-class table
               {**{k: metrics[k] for k in ("test_accuracy", "test_macro_f1", "photo_accuracy")
                   if metrics.get(k) is not None}, **by_group.headline(metrics.get("groups"))})

    text = card.build_card(params, card.read_reports(params), None if run is None else run.info.run_id)
    with atomic_file(Catalog(params).model_card) as fh:
        fh.write(text)
    run_id = None if run is None else _log_to_mlflow(params, run, metrics, eval_dir, metrics_path, text)
    log.info(
        "evaluate: %d test images, accuracy %.4f, macro-F1 %.4f -> %s, %s%s",
        metrics["test_images"], metrics["test_accuracy"], metrics["test_macro_f1"],
        params.rel(metrics_path), params.rel(eval_dir),
        f" (MLflow run {run_id})" if run_id else " (not logged to MLflow)",
    )
    return metrics
