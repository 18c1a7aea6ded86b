"""The ``train`` stage: fit the custom ResNet50 on the augmented train set, select by a validation metric,
track everything in MLflow.

Inputs: ``<paths.augmented>/manifest.csv`` (train: originals + augmented copies) and ``paths.splits`` (val rows,
cropped, never augmented). The test split is not read here. Outputs for DVC: ``paths.model`` (best weights by
``train.monitor``, standard Keras layers only), ``paths.train_run`` (the MLflow run id that ``evaluate`` logs
into), ``paths.train_metrics`` (full report), ``paths.train_headline`` (DVC metrics) and ``paths.history``
(per-epoch, for ``dvc plots``).

With ``train.pretrain_epochs`` the manifest rows of the ``data.sources`` with ``split: pretrain`` are trained on
first, alone (:class:`Pretraining`, its own backup), and the other rows after, with a fresh optimizer.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import distribute, files, resume, selection, tracking
from .config import Params

log = logging.getLogger(__name__)


# --- data ---------------------------------------------------------------------------------------------------

def train_table(params: Params) -> pd.DataFrame:
    return files.read_table(params.path(params.paths.augmented) / "manifest.csv", ("path", "label"),
                            "augmented manifest", "kfer augment")


def split_table(params: Params, split: str) -> pd.DataFrame:
    df = files.read_table(params.path(params.paths.splits), ("path", "label", "split"), "splits file", "kfer split")
    return df[df["split"] == split].reset_index(drop=True)


def phase_tables(params: Params, table: pd.DataFrame, datasets: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pretraining rows, the other rows) of a train table; ``datasets``: each row's ``data.sources`` name.
    Rows of a source with ``split: pretrain`` are trained on in the first phase only (``train.pretrain_epochs``)."""
    sources = params.pretrain_sources
    if not sources:
        return table.iloc[:0], table
    pre = datasets.isin(sources).to_numpy()
    return table[pre].reset_index(drop=True), table[~pre].reset_index(drop=True)


def manifest_datasets(params: Params, manifest: pd.DataFrame) -> pd.Series:
    """The ``data.sources`` name of each augmented-manifest row, from ``splits.csv`` (the manifest's ``source``
    column is the cropped image a row was made from)."""
    splits = files.read_table(params.path(params.paths.splits), ("path", "source"), "splits file", "kfer split")
    out = manifest["source"].map(dict(zip(splits["path"], splits["source"], strict=True)))
    if out.isna().any():
        raise ValueError(f"{int(out.isna().sum())} rows of the augmented manifest are not in {params.paths.splits}:"
                         " re-run kfer augment")
    return out


def label_indices(params: Params, labels: pd.Series) -> np.ndarray:
    index = {name: i for i, name in enumerate(params.class_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not in params classes {params.class_names}")
    return labels.map(index).to_numpy(dtype=np.int32)


def decode_workers(params: Params) -> int:
    """``train.decode_workers`` as a number: ``auto`` = the cores this process may run on (affinity mask, so
    ``taskset`` and cpusets are respected)."""
    n = params.train.decode_workers
    return files.resolve_workers(0 if n == "auto" else int(n))


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return max(1, -(-n_rows // batch_size))


def make_dataset(
    params: Params,
    table: pd.DataFrame,
    training: bool,
    augment: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    first_epoch: int = 0,
    pixels: tuple[np.ndarray, np.ndarray] | None = None,
):
    """tf.data over PNG files: (epoch order) → parallel decode → (augment) → batch → prefetch.

    Yields (float32 (B, S, S, 1) raw pixels, one-hot (B, C)); ``batch_size`` defaults to ``train.batch_size``
    (pass the global batch under a distribution strategy). ``augment(image_uint8, row)`` is an optional numpy
    function applied to every image (on-the-fly augmentation for tuning; ``row`` is its row of ``table``), called
    for a whole batch at a time in one ``tf.numpy_function``. The maps run ``train.decode_workers`` calls in
    parallel, in order (``deterministic=True``): the batches do not depend on it.

    ``pixels`` = (images, which): the decoded images (uint8 (M, S, S, C), e.g. the memory-mapped store of
    :func:`kfer.tune.data.decoded_images`) and, per row of ``table``, its index in them. The rows' pixels are then
    read from there in the batch's numpy function instead of decoding a PNG per row: the same batches, byte for
    byte, when the store holds the decoded files.

    ``training``: one pass over the table per epoch for epochs ``first_epoch`` … ``train.epochs - 1``, in one
    dataset (fit it with :func:`steps_per_epoch` batches per epoch). Epoch ``e`` visits every row in an order
    that depends only on (``seed``, ``e``), so a run resumed at epoch ``e`` sees the batches the uninterrupted
    run saw. The order is a permutation of row numbers (8 bytes a row), never a window: a shuffle window of a
    few thousand rows over a class-sorted table (as the stages write them) gives single-class batches.
    Otherwise: one pass in table order.
    """
    import tensorflow as tf

    size, n_classes = params.crop.image_size, len(params.classes)
    channels = 1 if params.crop.grayscale else 3
    root = os.fspath(params.root)  # plain string joins: a Path per row cost ~9 s of start-up at 1M rows
    paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in table["path"].astype(str)]
    labels = label_indices(params, table["label"])
    seed = params.seed if seed is None else seed
    batch = batch_size or params.train.batch_size
    workers = decode_workers(params)
    alpha = params.train.mixup_alpha if training else 0.0
    paths_t, labels_t = tf.constant(paths, tf.string), tf.constant(labels, tf.int32)

    def decode(idx):
        img = tf.io.decode_png(tf.io.read_file(paths_t[idx]), channels=channels)
        img = tf.ensure_shape(img, (size, size, channels))
        return img, labels_t[idx], idx

    def augment_batch(images, rows):
        # one Python call per batch, not per image: tf.numpy_function costs ~0.2 ms of CPU a call
        # (benchmarks/bench_train.py part d, identity-fn)
        return np.stack([np.asarray(augment(img, row), dtype=np.uint8) for img, row in zip(images, rows)])

    def aug(img, label, idx):
        out = tf.numpy_function(augment_batch, [img, idx], tf.uint8, stateful=False)
        return tf.ensure_shape(out, (None, size, size, channels)), label, idx

    if pixels is not None:
        store, which = pixels
        which = np.asarray(which, dtype=np.int64)
        if len(which) != len(paths) or store.shape[1:] != (size, size, channels):
            raise ValueError(f"pixels: {len(which)} rows of {store.shape[1:]} images for a table of {len(paths)} "
                             f"rows of {(size, size, channels)}")

        def gather_batch(rows):  # the store's pages are read here, in parallel calls (numpy releases the GIL)
            out = np.empty((len(rows), size, size, channels), np.uint8)
            for j, row in enumerate(rows):
                img = store[which[row]]
                out[j] = img if augment is None else augment(img, row)
            return out

        def gather(idx):
            out = tf.numpy_function(gather_batch, [idx], tf.uint8, stateful=False)
            return tf.ensure_shape(out, (None, size, size, channels)), tf.gather(labels_t, idx), idx

    def one_pass(rows):
        if pixels is not None:
            ds = rows.batch(batch).map(gather, num_parallel_calls=workers, deterministic=True)
        else:
            ds = rows.map(decode, num_parallel_calls=workers, deterministic=True).batch(batch)
        if augment is not None and pixels is None:
            ds = ds.map(aug, num_parallel_calls=workers, deterministic=True)
        if alpha > 0:  # mixup seeds each batch from its rows: the row index is kept through batching
            ds = ds.map(lambda img, label, idx: (tf.cast(img, tf.float32), tf.one_hot(label, n_classes), idx),
                        num_parallel_calls=workers, deterministic=True)
            return ds.map(lambda x, y, idx: mixup(x, y, idx, alpha, seed), num_parallel_calls=workers,
                          deterministic=True)
        return ds.map(lambda img, label, idx: (tf.cast(img, tf.float32), tf.one_hot(label, n_classes)),
                      num_parallel_calls=workers, deterministic=True)

    n = len(paths)
    if training:
        def epoch(e):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), e]))
            return one_pass(tf.data.Dataset.from_tensor_slices(order))

        remaining = max(params.train.epochs - first_epoch, 0)
        ds = tf.data.Dataset.range(first_epoch, first_epoch + remaining).flat_map(epoch)
        ds = ds.apply(tf.data.experimental.assert_cardinality(remaining * steps_per_epoch(n, batch)))
    else:
        ds = one_pass(tf.data.Dataset.range(n))
    # tf.data's autotune thread costs this pipeline ~20% on 2 cores (iterator teardown waits for its wake-up
    # every epoch; benchmarks/bench_train.py part b): autotune off, and the maps' parallelism is set explicitly
    # (train.decode_workers) rather than left to the static default AUTOTUNE falls back to without autotune.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def mixup(images, onehot, rows, alpha: float, seed: int):
    """Mixup (Zhang et al. 2018) of one batch: image i becomes λᵢ·xᵢ + (1-λᵢ)·x_π(i), its target likewise, with
    λᵢ ~ Beta(α, α) and π a permutation of the batch. Seeded by ``seed`` and the batch's first row, so the
    same table order gives the same batches, and every epoch (a new order) new pairs."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    key = tf.stack([tf.constant(seed, tf.int64), rows[0]])
    g1 = tf.random.stateless_gamma([n], seed=key, alpha=alpha)
    g2 = tf.random.stateless_gamma([n], seed=key + tf.constant([0, 1 << 40], tf.int64), alpha=alpha)
    lam = g1 / tf.maximum(g1 + g2, 1e-12)
    perm = tf.random.experimental.stateless_shuffle(tf.range(n), seed=key + tf.constant([0, 2 << 40], tf.int64))
    lx = tf.reshape(lam, [-1, 1, 1, 1])
    ly = tf.reshape(lam, [-1, 1])
    return (lx * images + (1 - lx) * tf.gather(images, perm),
            ly * onehot + (1 - ly) * tf.gather(onehot, perm))


def class_weights(params: Params, table: pd.DataFrame) -> dict[int, float]:
    """Inverse-frequency weights (n / (k · count)) over the classes present in the train set."""
    idx = label_indices(params, table["label"])
    counts = np.bincount(idx, minlength=len(params.classes))
    present = counts > 0
    n, k = counts.sum(), present.sum()
    return {i: float(n / (k * c)) if c else 1.0 for i, c in enumerate(counts)}


# --- model compile & callbacks -----------------------------------------------------------------------------

def compile_model(model, params: Params, jit: bool = False):
    import keras

    from .model import MacroF1

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


def strip_for_serving(model, params: Params | None = None):
    """A float32 copy with the same weights and no compile state, loadable with Keras once :mod:`kfer.model` is
    imported; wrapped in flip test-time augmentation when ``params.model.tta_flip``. A model trained under a
    mixed-precision policy is served in float32 (its weights are float32 already)."""
    import keras

    from .model import with_flip_tta

    # from_config, not clone_model: clone_model would copy the compile state too
    clean = keras.Model.from_config(distribute.float32_config(model.get_config()))
    clean.set_weights(model.get_weights())
    return with_flip_tta(clean) if params is not None and params.model.tta_flip else clean


# --- pretraining ------------------------------------------------------------------------------------------

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


def _pretrain(model, phase: Pretraining, verbose: int) -> None:
    """Fit ``model`` for the pretraining phase (or restore its finished state from the backup)."""
    pre, backup = phase.params, phase.backup
    epochs = pre.train.epochs
    if backup and backup.done:
        backup.restore_into(model)
        log.info("train: pretraining finished in an earlier attempt: its weights restored from %s", backup.dir)
    else:
        first = backup.epoch if backup else 0
        steps = int(phase.dataset.cardinality()) // (epochs - first)
        cbs = callbacks(pre, None, phase.extra_callbacks, steps)
        if backup:
            cbs.append(backup.callback(cbs, "loss", backup.seconds))
        log.info("train: pretraining, %d epoch(s) of %d batches", epochs, steps)
        t0 = time.perf_counter()
        hist = model.fit(phase.dataset, epochs=epochs, steps_per_epoch=steps, initial_epoch=first,
                         class_weight=phase.class_weight, shuffle=False, callbacks=cbs, verbose=verbose)
        model._initial_epoch = None  # set by a resuming BackupAndRestore: Keras would start the main phase there
        if not backup:
            phase.history, phase.seconds = pd.DataFrame(hist.history), time.perf_counter() - t0
    if backup:
        phase.history, phase.seconds = backup.history(), backup.seconds


# --- the stage ----------------------------------------------------------------------------------------------

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
):
    """Build, compile and fit; returns (best model, history DataFrame, seconds). Used by train and tune.

    ``train_ds`` is :func:`make_dataset`'s training dataset (from ``backup.epoch`` when resuming). ``strategy``:
    made by the caller before its datasets (:func:`kfer.distribute.strategy`), else here. ``backup``: resume
    from and back up into it (the history and seconds then cover every attempt). ``pretrain``: a first phase
    on other rows (its own history and seconds); the main phase then starts from its weights with a fresh
    optimizer. A resumed main phase (``backup.epoch`` > 0) restores its own weights and skips it."""
    import keras

    from .model import build_from_params

    cfg = params.train
    distribute.set_determinism(params)
    keras.utils.set_random_seed(params.seed)
    strategy = strategy or distribute.strategy(params)
    distribute.set_policy(params)
    try:
        with strategy.scope():
            model = compile_model(build_from_params(params), params, jit=cfg.xla)
        if cfg.xla and not model.jit_compile:
            log.warning("train.xla: Keras did not jit-compile this model (a layer does not support XLA)")
        first = backup.epoch if backup else 0
        if pretrain is not None and not first and not (backup and backup.done):
            _pretrain(model, pretrain, verbose)
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

    from . import plots, serving

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
    tags = {"kfer.stage": "train"}
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
        train_ds = make_dataset(params, train_df, training=True, batch_size=batch, first_epoch=backup.epoch)
        val_ds = make_dataset(params, val_df, training=False, batch_size=batch)
        pretrain = _pretraining(params, pre_df, fp, batch, run.info.run_id) if len(pre_df) else None
        mlflow_cb = mlflow.keras.MlflowCallback()
        model, history, seconds = fit(params, train_ds, val_ds, weights, tmp, [mlflow_cb], strategy=strategy,
                                      backup=backup, pretrain=pretrain)

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
        files.write_json(params.path(params.paths.train_metrics), metrics)
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


def _pretraining(params: Params, table: pd.DataFrame, fp: str, batch: int, run_id: str) -> Pretraining:
    """The pretraining phase of ``kfer train``: its dataset (resumed by epoch from its backup in the ``pretrain``
    sub-folder of the run's), class weights, and its per-epoch metrics logged to MLflow as ``pretrain_*``."""
    import keras
    import mlflow

    pre = pretrain_params(params)
    backup = resume.TrainBackup(pre, fp, sub="pretrain")
    if backup.state is None or backup.run_id != run_id:
        backup.begin(run_id)

    class LogPretrain(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics({f"pretrain_{k}": float(v) for k, v in (logs or {}).items()}, step=epoch)

    return Pretraining(pre, make_dataset(pre, table, training=True, batch_size=batch, first_epoch=backup.epoch),
                       class_weights(pre, table) if params.train.class_weights else None, backup, [LogPretrain()],
                       history=backup.history(), seconds=backup.seconds)


def log_datasets(params: Params, tables: dict) -> None:
    """``mlflow.log_input`` for each (table, source path, context); the digest identifies the exact rows."""
    import warnings

    import mlflow

    for name, (df, source, context) in tables.items():
        with warnings.catch_warnings():  # MLflow 3.17 registers the local source twice and warns about it
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            ds = mlflow.data.from_pandas(df, source=str(params.path(source).resolve()), name=name)
        mlflow.log_input(ds, context=context)
