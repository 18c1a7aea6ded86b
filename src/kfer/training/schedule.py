"""Compiling a model for training: the optimizer (weight decay), the loss (label smoothing), the metrics, and the
callbacks that set and log the learning rate (warm-up, cosine, plateau), stop early and checkpoint the best epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kfer.config import Params


def compile_model(model, params: Params, jit: bool = False):
    import keras

    from kfer.serving.layers import MacroF1

    model.compile(
        optimizer=make_optimizer(params),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.train.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"), MacroF1()],
        jit_compile=jit,
    )
    return model


def make_optimizer(params: Params):
    """``train.optimizer`` at ``train.learning_rate``; weight decay (adamw, sgd) spares batch-norm and biases."""
    import keras

    cfg = params.train
    wd = cfg.weight_decay  # 0 with adam (params check it)
    if cfg.optimizer == "adam":
        opt = keras.optimizers.Adam(cfg.learning_rate)
    elif cfg.optimizer == "adamw":
        opt = keras.optimizers.AdamW(cfg.learning_rate, weight_decay=wd)
    else:
        opt = keras.optimizers.SGD(cfg.learning_rate, momentum=0.9, nesterov=True, weight_decay=wd or None)
    if wd:
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return opt


def lr_at(params: Params, step: int, steps_per_epoch: int) -> float | None:
    """The learning rate of batch ``step`` (0-based, counted over all epochs) set by the warm-up and the cosine
    schedule; None where neither applies (plateau and none after the warm-up: the optimizer's value stands)."""
    cfg = params.train
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.learning_rate * (step + 1) / warm
    if cfg.lr_schedule != "cosine":
        return None
    total = max(cfg.epochs * steps_per_epoch - warm, 1)
    return float(cfg.learning_rate * 0.5 * (1 + np.cos(np.pi * min(step - warm, total) / total)))


def _StepLearningRate(params: Params, steps_per_epoch: int):  # noqa: N802 - a callback factory
    import keras

    class StepLR(keras.callbacks.Callback):
        """Sets the learning rate before every batch from :func:`lr_at` (warm-up, cosine)."""

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            lr = lr_at(params, self.epoch * steps_per_epoch + batch, steps_per_epoch)
            if lr is not None:
                self.model.optimizer.learning_rate = lr

    return StepLR()


def callbacks(params: Params, checkpoint: Path | None, extra: list | None = None, steps_per_epoch: int = 0) -> list:
    """Schedule, LR logging, early stopping, best checkpoint (unless ``checkpoint`` is None), then ``extra``.
    ``steps_per_epoch`` (batches per epoch) is needed by the warm-up and the cosine schedule, which set the rate
    per batch."""
    import keras

    cfg = params.train
    mode = cfg.monitor_mode
    cbs: list = []
    if cfg.lr_schedule == "plateau":
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor=cfg.monitor, mode=mode, factor=cfg.lr_factor,
                                                     patience=cfg.lr_patience, verbose=0))
    if cfg.lr_schedule == "cosine" or cfg.warmup_epochs:
        if steps_per_epoch < 1:
            raise ValueError("callbacks: the warm-up and the cosine schedule need steps_per_epoch")
        cbs.append(_StepLearningRate(params, steps_per_epoch))
    cbs.append(_LogLearningRate())
    if cfg.early_stopping_patience:
        cbs.append(keras.callbacks.EarlyStopping(monitor=cfg.monitor, mode=mode,
                                                 patience=cfg.early_stopping_patience, verbose=0))
    if checkpoint is not None:
        cbs.append(keras.callbacks.ModelCheckpoint(str(checkpoint), monitor=cfg.monitor, mode=mode,
                                                   save_best_only=True, verbose=0))
    return cbs + (extra or [])


def _LogLearningRate():  # noqa: N802 - a callback factory
    import keras

    class LogLR(keras.callbacks.Callback):
        """Put the learning rate of the epoch into the logs (history, CSV, MLflow)."""

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    return LogLR()
