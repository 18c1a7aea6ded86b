"""The ``train`` stage: fit the custom ResNet50 on the augmented train set, select by a validation metric,
track everything in MLflow.

Inputs: ``<paths.augmented>/manifest.csv`` (train: originals + augmented copies; with
``train.fresh_augmentation`` the copies are drawn anew each epoch from the originals) and ``paths.splits`` (val
rows, cropped, never augmented). The test split is not read here. Outputs for DVC: ``paths.model`` (best weights by
``train.monitor``, standard Keras layers only), ``paths.train_run`` (the MLflow run id that ``evaluate`` logs
into), ``paths.train_metrics`` (full report), ``paths.train_headline`` (DVC metrics) and ``paths.history``
(per-epoch, for ``dvc plots``).

With ``train.pretrain_epochs`` the manifest rows of the ``data.sources`` with ``split: pretrain`` are trained on
first, alone (:class:`Pretraining`, its own backup), and the other rows after, with a fresh optimizer.

One concern a file: :mod:`.data` (tables, tf.data, mixup, class weights), :mod:`.schedule` (compile, optimizer,
learning-rate callbacks), :mod:`.pretrain` (the pretraining phase); this module runs the stage (:func:`fit`,
:func:`run_train`) and re-exports the others' names.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import distribute, files, resume, selection, tracking
from ..config import Params
from .data import (augmentation, class_weights, decode_workers, decoded_pixels, label_indices, make_dataset,
                   manifest_datasets, mixup, phase_tables, split_table, steps_per_epoch, train_table)
from .init import InitWeights
from .init import apply as init_weights
from .init import load as load_init
from .pretrain import Pretraining, pretrain_params, pretraining, run_pretraining
from .schedule import callbacks, compile_model, lr_at, make_optimizer

__all__ = ["InitWeights", "Pretraining", "augmentation", "callbacks", "class_weights", "compile_model",
           "decode_workers", "decoded_pixels", "fit", "init_weights", "label_indices", "load_init", "log_datasets",
           "lr_at", "make_dataset", "make_optimizer", "manifest_datasets", "mixup", "phase_tables",
           "pretrain_params", "pretraining", "run_pretraining", "run_train", "split_table", "steps_per_epoch",
           "strip_for_serving", "train_table"]

log = logging.getLogger(__name__)


def strip_for_serving(model, params: Params | None = None):
    """A float32 copy with the same weights and no compile state, loadable with Keras once :mod:`kfer.model` is
    imported; wrapped in flip test-time augmentation when ``params.model.tta_flip``. A model trained under a
    mixed-precision policy is served in float32 (its weights are float32 already)."""
    import keras

    from ..model import with_flip_tta

    # from_config, not clone_model: clone_model would copy the compile state too
    clean = keras.Model.from_config(distribute.float32_config(model.get_config()))
    clean.set_weights(model.get_weights())
    return with_flip_tta(clean) if params is not None and params.model.tta_flip else clean



def fit(
    params: Params,
    train_ds,
    val_ds,
    class_weight: dict | None,
    workdir: Path,
    extra_callbacks: list | None = None,
    verbose: int = 2,
    strategy=None,
    backup: resume.TrainBackup | None = None,
    pretrain: Pretraining | None = None,
    init: InitWeights | None = None,
):
    """Build, compile and fit; returns (best model, history DataFrame, seconds). Used by train and tune.

    ``train_ds`` is :func:`make_dataset`'s training dataset (from ``backup.epoch`` when resuming). ``strategy``:
    made by the caller before its datasets (:func:`kfer.distribute.strategy`), else here. ``backup``: resume
    from and back up into it (the history and seconds then cover every attempt). ``pretrain``: a first phase
    on other rows (its own history and seconds); the main phase then starts from its weights with a fresh
    optimizer. A resumed main phase (``backup.epoch`` > 0) restores its own weights and skips it. ``init``: the
    model of ``train.init_from`` (:func:`kfer.train.init.load`), whose weights the new model starts from."""
    import keras

    from ..model import build_from_params

    cfg = params.train
    distribute.set_determinism(params)
    keras.utils.set_random_seed(params.seed)
    strategy = strategy or distribute.strategy(params)
    distribute.set_policy(params)
    try:
        with strategy.scope():
            model = build_from_params(params)
            if init is not None:
                init_weights(model, init, params)
            model = compile_model(model, params, jit=cfg.xla)
        if cfg.xla and not model.jit_compile:
            log.warning("train.xla: Keras did not jit-compile this model (a layer does not support XLA)")
        first = backup.epoch if backup else 0
        if pretrain is not None and not first and not (backup and backup.done):
            run_pretraining(model, pretrain, verbose)
            with strategy.scope():  # a fresh optimizer (and schedule) for the main phase
                model = compile_model(model, params, jit=cfg.xla)
        ckpt = backup.checkpoint_pattern() if backup else workdir / "best.keras"
        seconds = backup.seconds if backup else 0.0
        if backup and backup.done:
            log.info("train: the backup in %s has finished training: keeping its best model", backup.dir)
            history = backup.history()
        else:
            steps = int(train_ds.cardinality()) // (cfg.epochs - first)
            cbs = callbacks(params, ckpt, extra_callbacks, steps)
            if backup:  # last: its on_train_begin restores what the others' on_train_begin reset
                cbs.append(backup.callback(cbs, cfg.monitor, seconds))
            t0 = time.perf_counter()
            # shuffle=False: the tf.data pipeline orders each epoch (seeded); Keras ignores the flag but warns
            hist = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, steps_per_epoch=steps,
                             initial_epoch=first, class_weight=class_weight, shuffle=False, callbacks=cbs,
                             verbose=verbose)
            if backup:
                history, seconds = backup.history(), backup.seconds
            else:
                seconds = time.perf_counter() - t0
                history = pd.DataFrame(hist.history)
                history.insert(0, "epoch", np.arange(1, len(history) + 1))
        best_file = backup.best_checkpoint() if backup else ckpt
        if best_file is not None and best_file.exists():
            best = compile_model(keras.models.load_model(best_file, compile=False), params)
        else:  # monitor never produced a value (e.g. empty validation set)
            best = model
    finally:
        distribute.reset_policy()
    return best, history, seconds


def run_train(params: Params, run_name: str | None = None) -> dict:
    import mlflow

    from .. import plots, serving

    cfg = params.train
    strategy = distribute.strategy(params)  # first: refuses TF_CONFIG at once; made before any dataset
    batch = distribute.global_batch(params, strategy)
    manifest = train_table(params)
    val_df = split_table(params, "val")
    pre_df, train_df = (phase_tables(params, manifest, manifest_datasets(params, manifest))
                        if params.pretrain_sources else (manifest.iloc[:0], manifest))
    if train_df.empty:
        raise ValueError("the train set is empty: check the crop and split reports")
    if val_df.empty:
        raise ValueError("the val split is empty: check split ratios (split.val) and the split report")
    if params.pretrain_sources and pre_df.empty:
        raise ValueError(f"train.pretrain_epochs: the data.sources with split: pretrain "
                         f"({', '.join(params.pretrain_sources)}) have no train images: check the crop report")
    log.info("train: %d train images (augmented), %d val images, %d classes, batch %d on %d replica(s)%s",
             len(train_df), len(val_df), len(params.classes), batch, strategy.num_replicas_in_sync,
             f"; first {cfg.pretrain_epochs} epoch(s) on {len(pre_df)} pretraining images" if len(pre_df) else "")
    fp = resume.fingerprint(params, manifest, val_df, batch)
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
        pre_rows, pre_augment = augmentation(pretrain_params(params), pre_df) if len(pre_df) else (pre_df, None)
        pixels, pre_pixels = decoded_pixels(params, rows, pre_rows)
        train_ds = make_dataset(params, rows, training=True, augment=augment, batch_size=batch,
                                first_epoch=backup.epoch, pixels=pixels)
        val_ds = make_dataset(params, val_df, training=False, batch_size=batch)
        pretrain = (pretraining(params, pre_rows, pre_augment, pre_pixels, fp, batch, run.info.run_id)
                    if len(pre_df) else None)
        mlflow_cb = mlflow.keras.MlflowCallback()
        model, history, seconds = fit(params, train_ds, val_ds, weights, tmp, [mlflow_cb], strategy=strategy,
                                      backup=backup, pretrain=pretrain, init=init)

        clean = strip_for_serving(model, params)  # what is saved and served (flip TTA when model.tta_flip)
        # scored on a compiled copy: compiling `clean` itself would save an optimizer into the served model
        scores = compile_model(strip_for_serving(model, params), params).evaluate(val_ds, verbose=0,
                                                                                 return_dict=True)
        best_epoch = selection.best_epoch(history[cfg.monitor], cfg.monitor)
        metrics = {
            "best_val_loss": float(scores["loss"]),
            "best_val_accuracy": float(scores["accuracy"]),
            "best_val_macro_f1": float(scores["macro_f1"]),
            "best_epoch": best_epoch,
            "epochs_run": int(len(history)),
            "train_seconds": round(seconds, 2),
            "train_images_per_s": round(len(train_df) * len(history) / seconds, 2) if seconds else 0.0,
            "train_images": int(len(train_df)),
            "val_images": int(len(val_df)),
        }
        if pretrain is not None:
            last = pretrain.history.iloc[-1] if len(pretrain.history) else {}
            metrics.update({"pretrain_images": int(len(pre_df)), "pretrain_epochs": int(len(pretrain.history)),
                            "pretrain_seconds": round(pretrain.seconds, 2),
                            "pretrain_loss": float(last.get("loss", float("nan"))),
                            "pretrain_accuracy": float(last.get("accuracy", float("nan")))})
        # pretrain_loss/accuracy are logged per epoch already (their last value is the report's)
        mlflow.log_metrics({k: v for k, v in metrics.items() if k not in ("pretrain_loss", "pretrain_accuracy")})

        history_png = tmp / "training_curves.png"
        plots.plot_history(history, history_png)
        mlflow.log_artifact(str(history_png))
        labels_json = tmp / "labels.json"
        labels_json.write_text(json.dumps([c.model_dump() for c in params.classes], ensure_ascii=False, indent=1),
                               encoding="utf-8")
        mlflow.log_artifact(str(labels_json))

        uris = serving.log_models(clean, params)  # generated input examples: no dataset face in the model
        mlflow.set_tags({tracking.MODEL_URI_TAG: uris["model_uri"],
                         tracking.KERAS_URI_TAG: uris["keras_model_uri"]})

        # DVC outputs, each written atomically
        model_path = params.path(params.paths.model)
        model_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_model = model_path.parent / f".{model_path.name}{files.TMP_MARK}{os.getpid()}.keras"
        clean.save(tmp_model)
        os.replace(tmp_model, model_path)
        with files.atomic_file(params.path(params.paths.history)) as fh:
            history.to_csv(fh, index=False)
        files.write_json(params.path(params.paths.train_metrics), metrics if init is None else {
            **metrics, "init_from": {"spec": init.spec, "source": init.source, "layers_loaded": len(init.loaded),
                                     "rebuilt": init.rebuilt}})
        files.write_json(params.path(params.paths.train_headline), {  # DVC metrics: the selected epoch's scores
            "val_accuracy": metrics["best_val_accuracy"], "val_macro_f1": metrics["best_val_macro_f1"]})
        files.write_json(params.path(params.paths.train_run), {
            "run_id": run.info.run_id, "experiment_id": run.info.experiment_id, **uris})
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
