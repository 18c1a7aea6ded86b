"""The optional pretraining phase of ``kfer train`` (``train.pretrain_epochs``, the ``data.sources`` with
``split: pretrain``): its params, its rows' dataset and backup (resumed by epoch like the main phase), and the fit
that :func:`kfer.training.fit.fit` runs before the main phase."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pandas as pd

from kfer.config import Params
from kfer.training import resume
from kfer.training.inputs import class_weights, make_dataset
from kfer.training.schedule import callbacks

log = logging.getLogger("kfer.training.train")


def pretrain_params(params: Params) -> Params:
    """The params of the pretraining phase: ``train.pretrain_epochs`` epochs, the same optimizer and learning
    rate, a warm-up of ``train.warmup_epochs`` (at most all epochs but the last) and the cosine schedule when
    ``train.lr_schedule`` is cosine, else a constant rate (plateau needs validation scores, and the
    pretraining phase is not validated). No early stopping, no checkpoint: its last weights start the main phase."""
    cfg = params.train
    epochs = cfg.pretrain_epochs
    return params.updated({"train": {
        "epochs": epochs, "warmup_epochs": min(cfg.warmup_epochs, epochs - 1),
        "lr_schedule": "cosine" if cfg.lr_schedule == "cosine" else "none", "early_stopping_patience": 0}})


@dataclass
class Pretraining:
    """The first phase of :func:`fit`: ``dataset`` (:func:`make_dataset` of ``params`` =
    :func:`pretrain_params`, from ``backup.epoch``), its class weights, its backup (a :class:`resume.TrainBackup`
    of its own, resumed by epoch like the main phase) and extra callbacks (e.g. MLflow logging). ``fit`` fills in
    ``history`` and ``seconds``."""

    params: Params
    dataset: object
    class_weight: dict | None = None
    backup: resume.TrainBackup | None = None
    extra_callbacks: list = field(default_factory=list)
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    seconds: float = 0.0
    images: int = 0  # rows of the phase (its train images)


def run_pretraining(model, phase: Pretraining, verbose: int) -> None:
    """Fit ``model`` for the pretraining phase (or restore its finished state from the backup)."""
    pre = phase.params
    attempt = phase.backup or resume.NoBackup()
    if attempt.done:
        attempt.restore_into(model)
        log.info("train: pretraining finished in an earlier attempt: its weights restored from %s", attempt.dir)
        phase.history, phase.seconds = attempt.history(), attempt.seconds
        return
    epochs = pre.train.epochs
    steps = int(phase.dataset.cardinality()) // (epochs - attempt.epoch)
    cbs = callbacks(pre, None, phase.extra_callbacks, steps)
    attempt.watch(cbs, "loss")
    log.info("train: pretraining, %d epoch(s) of %d batches", epochs, steps)
    t0 = time.perf_counter()
    hist = model.fit(phase.dataset, epochs=epochs, steps_per_epoch=steps, initial_epoch=attempt.epoch,
                     class_weight=phase.class_weight, shuffle=False, callbacks=cbs, verbose=verbose)
    model._initial_epoch = None  # set by a resuming BackupAndRestore: Keras would start the main phase there
    phase.history, phase.seconds = attempt.outcome(hist, time.perf_counter() - t0)


def pretraining(params: Params, rows: pd.DataFrame, augment, pixels: tuple | None, fp: str, batch: int,
                run_id: str) -> Pretraining:
    """The pretraining phase of ``kfer train``: its dataset (``rows``, ``augment``: :func:`augmentation` of its
    rows under :func:`pretrain_params`; ``pixels``: their decoded images or None, see :func:`make_dataset`;
    resumed by epoch from its backup in the ``pretrain`` sub-folder of the run's), class weights, and its
    per-epoch metrics logged to MLflow as ``pretrain_*``."""
    import keras
    import mlflow

    pre = pretrain_params(params)
    backup = resume.TrainBackup(pre, fp, sub="pretrain")
    if backup.state is None or backup.run_id != run_id:
        backup.begin(run_id)

    class LogPretrain(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics({f"pretrain_{k}": float(v) for k, v in (logs or {}).items()}, step=epoch)

    return Pretraining(pre, make_dataset(pre, rows, training=True, augment=augment, batch_size=batch,
                                         first_epoch=backup.epoch, pixels=pixels),
                       class_weights(pre, rows) if params.train.class_weights else None, backup, [LogPretrain()],
                       history=backup.history(), seconds=backup.seconds, images=len(rows))
