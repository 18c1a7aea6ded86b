"""The ``train`` stage: fit the custom ResNet50 on the augmented train set, select by a validation metric,
track everything in MLflow.

Inputs: ``<paths.augmented>/manifest.csv`` (train: originals + augmented copies; with
``train.fresh_augmentation`` the copies are drawn anew each epoch from the originals) and ``paths.splits`` (val
rows, cropped, never augmented). The test split is not read here. Outputs for DVC: ``paths.model`` (best weights by
``train.monitor``, standard Keras layers only), ``paths.onnx_model`` (that model exported to ONNX, checked against it
on validation faces: what the photo model runs), ``paths.train_run`` (the MLflow run id that ``evaluate`` logs
into), ``paths.train_metrics`` (full report), ``paths.train_headline`` (DVC metrics) and ``paths.history``
(per-epoch, for ``dvc plots``).

The stage reads its tables and makes its datasets (:mod:`kfer.training.inputs`), opens the MLflow run, runs the
fit → score → log step that tuning shares (:func:`kfer.training.fit.fit_score_log`) inside the run's backup
(:class:`kfer.training.resume.TrainBackup`, so a killed run resumes), publishes the served model and writes its
DVC outputs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from kfer import files, tracking
from kfer.catalog import Catalog
from kfer.config import Params
from kfer.reporting import card
from kfer.serving.export import export_onnx
from kfer.training import distribute, resume
from kfer.training.fit import calibrate, fit_score_log, publish, strip_for_serving
from kfer.training.init import load as load_init
from kfer.training.inputs import augmentation, class_weights, decoded_pixels, make_dataset, split_table, train_table

log = logging.getLogger(__name__)


def run_train(params: Params, run_name: str | None = None) -> dict:
    import mlflow

    from kfer import plots

    cfg = params.train
    strategy = distribute.strategy(params)  # first: refuses TF_CONFIG at once; made before any dataset
    batch = distribute.global_batch(params, strategy)
    train_df = train_table(params)
    val_df = split_table(params, "val")
    if train_df.empty:
        raise ValueError("the train set is empty: check the crop and split reports")
    if val_df.empty:
        raise ValueError("the val split is empty: check split ratios (split.val) and the split report")
    log.info("train: %d train images (augmented), %d val images, %d classes, batch %d on %d replica(s)",
             len(train_df), len(val_df), len(params.classes), batch, strategy.num_replicas_in_sync)
    fp = resume.fingerprint(params, train_df, val_df, batch)
    backup = resume.TrainBackup(params, fp)
    init = load_init(params)  # train.init_from, before the run: a bad source is one line, no empty run
    tags = {"kfer.stage": "train", **(init.tags() if init else {})}
    if backup.run_id:
        tags["kfer.resumed_after_epoch"] = str(backup.epoch)

    with tracking.tracked_run(params, run_name or "train", run_id=backup.run_id, tags=tags) as run, \
            tempfile.TemporaryDirectory(prefix="kfer-train-") as tmp:
        tmp = Path(tmp)
        if backup.run_id is None:
            log_datasets(params, {"train": (train_df, params.paths.augmented, "training"),
                                  "val": (val_df, params.paths.splits, "validation")})
            mlflow.log_params({"train.global_batch_size": batch, "train.replicas": strategy.num_replicas_in_sync})
            backup.begin(run.info.run_id)
        weights = class_weights(params, train_df) if cfg.class_weights else None
        rows, augment = augmentation(params, train_df)  # the stage's files, or new copies each epoch
        train_ds = make_dataset(params, rows, training=True, augment=augment, batch_size=batch,
                                first_epoch=backup.epoch, pixels=decoded_pixels(params, rows))
        val_ds = make_dataset(params, val_df, training=False, batch_size=batch)
        fitted = fit_score_log(params, train_ds, val_ds, weights, tmp, n_train=len(train_df), n_val=len(val_df),
                               metric=cfg.monitor, extra_callbacks=[mlflow.keras.MlflowCallback()],
                               strategy=strategy, backup=backup, init=init)
        model, history, seconds, metrics = fitted.model, fitted.history, fitted.seconds, fitted.metrics
        best_epoch = metrics["best_epoch"]

        history_png = tmp / "training_curves.png"
        plots.plot_history(history, history_png)
        mlflow.log_artifact(str(history_png))
        labels_json = tmp / "labels.json"
        labels_json.write_text(json.dumps([c.model_dump() for c in params.classes], ensure_ascii=False, indent=1),
                               encoding="utf-8")
        mlflow.log_artifact(str(labels_json))

        clean = strip_for_serving(model, params)  # what is saved and served (flip TTA when model.tta_flip)
        calibrated = calibrate(clean, params, val_ds, val_df["label"])  # the served model's temperature
        onnx_tmp = export_onnx(clean, tmp / "model.onnx")  # what the photo model runs (ONNX Runtime)
        uris = publish(clean, params, val_ds, onnx_path=onnx_tmp,  # checks it on val faces, logs both models
                       temperature=calibrated["temperature"])

        # DVC outputs, each written atomically
        model_path = Catalog(params).model
        model_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_model = model_path.parent / f".{model_path.name}{files.TMP_MARK}{os.getpid()}.keras"
        clean.save(tmp_model)
        os.replace(tmp_model, model_path)
        with files.atomic_file(Catalog(params).onnx_model, "wb") as fh:
            fh.write(onnx_tmp.read_bytes())
        with files.atomic_file(Catalog(params).history) as fh:
            history.to_csv(fh, index=False)
        report = {**metrics, "calibration": calibrated}
        if init is not None:
            report["init_from"] = {"spec": init.spec, "source": init.source, "layers_loaded": len(init.loaded),
                                   "rebuilt": init.rebuilt}
        Catalog(params).write_json("train_metrics", report)
        Catalog(params).write_json("train_headline", {  # DVC metrics: the selected epoch's scores
            "val_accuracy": metrics["best_val_accuracy"], "val_macro_f1": metrics["best_val_macro_f1"]})
        Catalog(params).write_json("train_run", {
            "run_id": run.info.run_id, "experiment_id": run.info.experiment_id, **uris})
        # the card of what is known now (evaluate replaces it with the test scores): never an older model's eval
        known = {k: v for k, v in card.read_reports(params).items() if k != "eval"}
        mlflow.log_text(card.build_card(params, known, run.info.run_id), card.ARTIFACT)
    backup.discard()  # the run ended well: its outputs are written

    log.info(
        "train: %s %s — best %s %.4f at epoch %d/%d (val acc %.4f), %.0f s, run %s",
        params.model.kernel_initializer, list(params.model.blocks), cfg.monitor,
        metrics[f"best_{cfg.monitor}"], best_epoch, metrics["epochs_run"], metrics["best_val_accuracy"],
        seconds, run.info.run_id,
    )
    return {**metrics, "run_id": run.info.run_id}


def log_datasets(params: Params, tables: dict) -> None:
    """``mlflow.log_input`` for each (table, source path, context); the digest identifies the exact rows."""
    import warnings

    import mlflow

    for name, (df, source, context) in tables.items():
        with warnings.catch_warnings():  # MLflow 3.17 registers the local source twice and warns about it
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            ds = mlflow.data.from_pandas(df, source=str(params.path(source).resolve()), name=name)
        mlflow.log_input(ds, context=context)
