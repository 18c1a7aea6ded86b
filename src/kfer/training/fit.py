"""One fit → score → log step, shared by ``kfer train`` and every ``kfer tune`` trial.

:func:`fit_score_log` builds the network (from ``train.init_from``'s weights when given), fits it, keeps the
best epoch by the monitored metric, scores the model that would be served on the validation set and logs the run's
metrics to the active MLflow run. :func:`publish` logs the served model. Resume wraps the step rather than branching
through it: the fit is given an *attempt*, a :class:`kfer.training.resume.TrainBackup` (``kfer train``) or a
:class:`kfer.training.resume.NoBackup` (trials), with one interface: where to start, where the checkpoints go, the
callback that backs the epochs up, and the history over every attempt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kfer import selection, tracking
from kfer.config import Params
from kfer.training import distribute, resume
from kfer.training.init import InitWeights
from kfer.training.init import apply as init_weights
from kfer.training.schedule import callbacks, compile_model

log = logging.getLogger("kfer.training.train")


def strip_for_serving(model, params: Params | None = None):
    """A float32 copy with the same weights and no compile state, loadable with Keras once
    :mod:`kfer.serving.layers` is imported; wrapped in flip test-time augmentation when ``params.model.tta_flip``.
    A model trained under a mixed-precision policy is served in float32 (its weights are float32 already)."""
    import keras

    from kfer.serving.layers import with_flip_tta

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
    init: InitWeights | None = None,
):
    """Build, compile and fit; returns (best model, history DataFrame, seconds).

    ``train_ds`` is :func:`kfer.training.inputs.make_dataset`'s training dataset (from ``backup.epoch`` when
    resuming). ``strategy``: made by the caller before its datasets (:func:`kfer.training.distribute.strategy`),
    else here. ``backup``: resume from and back up into it (the history and seconds then cover every attempt);
    without it the fit is a :class:`kfer.training.resume.NoBackup`. ``init``: the model of ``train.init_from``
    (:func:`kfer.training.init.load`), whose weights the new model starts from."""
    import keras

    from kfer.training.model import build_from_params

    cfg = params.train
    attempt = backup or resume.NoBackup()
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
        ckpt = attempt.checkpoints(workdir)
        if attempt.done:
            log.info("train: the backup in %s has finished training: keeping its best model", attempt.dir)
            history, seconds = attempt.history(), attempt.seconds
        else:
            steps = int(train_ds.cardinality()) // (cfg.epochs - attempt.epoch)
            cbs = callbacks(params, ckpt, extra_callbacks, steps)
            attempt.watch(cbs, cfg.monitor)
            t0 = time.perf_counter()
            # shuffle=False: the tf.data pipeline orders each epoch (seeded); Keras ignores the flag but warns
            hist = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, steps_per_epoch=steps,
                             initial_epoch=attempt.epoch, class_weight=class_weight, shuffle=False, callbacks=cbs,
                             verbose=verbose)
            history, seconds = attempt.outcome(hist, time.perf_counter() - t0)
        best_file = attempt.best_file(ckpt)
        if best_file is not None and best_file.exists():
            best = compile_model(keras.models.load_model(best_file, compile=False), params)
        else:  # monitor never produced a value (e.g. empty validation set)
            best = model
    finally:
        distribute.reset_policy()
    return best, history, seconds


def score(model, params: Params, val_ds) -> dict[str, float]:
    """``best_val_loss``, ``best_val_accuracy``, ``best_val_macro_f1`` of the model as it is served
    (:func:`strip_for_serving`: flip TTA when ``model.tta_flip``), scored on a compiled copy: compiling the served
    model itself would save an optimizer into it."""
    scores = compile_model(strip_for_serving(model, params), params).evaluate(val_ds, verbose=0, return_dict=True)
    return {"best_val_loss": float(scores["loss"]), "best_val_accuracy": float(scores["accuracy"]),
            "best_val_macro_f1": float(scores["macro_f1"])}


@dataclass
class Fitted:
    """What :func:`fit_score_log` leaves: the best model, its history and seconds, and the run's metrics
    (``scored`` is False when ``stopped_at`` ended the fit early: no validation scores then)."""

    model: object
    history: pd.DataFrame
    seconds: float
    metrics: dict
    scored: bool = True


def fit_score_log(params: Params, train_ds, val_ds, class_weight: dict | None, workdir: Path, *, n_train: int,
                  n_val: int, metric: str, extra_callbacks: list | None = None, verbose: int = 2, strategy=None,
                  backup: resume.TrainBackup | None = None, init: InitWeights | None = None,
                  stopped_at: Callable[[], int | None] | None = None) -> Fitted:
    """:func:`fit`, then :func:`score`, then ``mlflow.log_metrics`` of the run's metrics in the active run:
    ``best_val_*``, ``best_epoch`` (by ``metric``), ``epochs_run``, ``train_seconds``, ``train_images_per_s``,
    ``train_images`` and ``val_images``. ``stopped_at`` (a pruned trial): when it returns an epoch, the fit ended
    there on purpose; ``pruned_epoch`` is logged and nothing is scored."""
    import mlflow

    model, history, seconds = fit(params, train_ds, val_ds, class_weight, workdir, extra_callbacks, verbose,
                                  strategy=strategy, backup=backup, init=init)
    metrics = {"epochs_run": int(len(history)), "train_seconds": round(seconds, 2),
               "train_images_per_s": round(n_train * len(history) / seconds, 2) if seconds else 0.0,
               "train_images": int(n_train), "val_images": int(n_val)}
    stop = stopped_at() if stopped_at is not None else None
    if stop is not None:
        metrics["pruned_epoch"] = stop + 1
        mlflow.log_metrics(metrics)
        return Fitted(model, history, seconds, metrics, scored=False)
    metrics = {**score(model, params, val_ds), "best_epoch": selection.best_epoch(history[metric], metric),
               **metrics}
    mlflow.log_metrics(metrics)
    return Fitted(model, history, seconds, metrics)


def calibrate(served, params: Params, val_ds, val_labels) -> dict:
    """Temperature scaling of ``served`` on the val split (:mod:`kfer.serving.calibration`): its probabilities on
    ``val_ds`` against ``val_labels`` (the split's hard labels, class names, in the dataset's order). Returns
    ``{"temperature", "val": report before/after}``; logs ``temperature``, ``val_ece`` and ``val_ece_calibrated``
    in the active run."""
    import mlflow

    from kfer.serving import calibration

    index = {n: i for i, n in enumerate(params.class_names)}
    y = np.array([index[c] for c in val_labels], dtype=np.int64)
    probs = np.asarray(served.predict(val_ds, verbose=0), dtype=np.float64)
    if len(probs) != len(y):
        raise RuntimeError(f"{len(probs)} val predictions for {len(y)} val faces")
    temperature = calibration.fit_temperature(probs, y)
    val = calibration.report(probs, y, temperature)
    mlflow.log_metrics({"temperature": temperature, "val_ece": val["ece_before"],
                        "val_ece_calibrated": val["ece_after"]})
    log.info("calibration: temperature %.3f fitted on %d val faces, ECE %.4f -> %.4f", temperature, val["n"],
             val["ece_before"], val["ece_after"])
    return {"temperature": temperature, "val": val}


def publish(served, params: Params, val_ds=None, onnx_path=None, temperature: float = 1.0) -> dict[str, str]:
    """Log ``served`` (:func:`strip_for_serving` of the fitted model) in the active run with
    :func:`kfer.serving.publish.log_models` (the photo model scales its probabilities by ``temperature``) and tag
    the run with both model URIs; returns them. The ONNX export the photo model runs (``onnx_path`` when already
    written, else made there) is checked on up to ``train.onnx_check_faces`` faces of ``val_ds``."""
    import mlflow

    from kfer.serving.export import dataset_faces
    from kfer.serving.publish import log_models

    faces = dataset_faces(val_ds, params.train.onnx_check_faces) if val_ds is not None else None
    uris = log_models(served, params, check_faces=faces, onnx_path=onnx_path,
                      temperature=temperature)  # generated input examples
    mlflow.set_tags({tracking.MODEL_URI_TAG: uris["model_uri"], tracking.KERAS_URI_TAG: uris["keras_model_uri"]})
    return uris
