"""The ``train`` stage's data: the tables it reads (augmented manifest, splits), the tf.data pipeline
(:func:`make_dataset`: seeded per-epoch order, parallel decode, on-the-fly augmentation, mixup) and class weights."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pandas as pd

from kfer import files
from kfer.catalog import Catalog
from kfer.config import Params
from kfer.data.policy import OPINION_COLUMNS, hard_labels, targets


def train_table(params: Params) -> pd.DataFrame:
    """The augmented manifest's rows (every column of its contract, else one error naming the stage to re-run),
    each with its original's opinions (``splits.csv``, by the ``original`` column) for the soft policy's targets."""
    manifest = Catalog(params).read("augment_manifest")
    if params.data.label_policy != "soft":
        return manifest
    return pd.concat([manifest.reset_index(drop=True), of_originals(params, manifest, OPINION_COLUMNS)], axis=1)


def of_originals(params: Params, manifest: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """``columns`` of ``splits.csv`` for each augmented-manifest row, from the row of its cropped original (the
    manifest's ``original`` column), in the manifest's order."""
    splits = Catalog(params).read("splits", ("path", *columns)).set_index("path")
    missing = ~manifest["original"].isin(splits.index)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} rows of the augmented manifest are not in {params.paths.splits}: "
                         "re-run kfer augment")
    return splits.loc[manifest["original"], list(columns)].reset_index(drop=True)


def split_table(params: Params, split: str) -> pd.DataFrame:
    return Catalog(params).read("splits", ("path", "label"), split=split)


def with_label(table: pd.DataFrame, label: str) -> pd.DataFrame:
    """``table`` scored against another label: ``policy`` (its ``label``), ``uploader`` or ``majority`` (the hard
    labels of those policies, from the opinion columns); rows without that label are left out."""
    if label == "policy":
        return table
    hard = hard_labels(table, label)
    return table.assign(label=hard)[(hard != "").to_numpy()].reset_index(drop=True)


def target_matrix(params: Params, table: pd.DataFrame, training: bool) -> np.ndarray:
    """float32 (rows, classes) targets of ``table``: one-hot of ``label``, or, training under the soft policy,
    the vote distributions (:func:`kfer.data.policy.targets`)."""
    soft = training and params.data.label_policy == "soft"
    if soft and "votes" not in table.columns:
        raise ValueError("data.label_policy soft: the train rows carry no votes column (re-run kfer split)")
    return targets(table, "soft" if soft else "majority", params.class_names, params.data.soft_uploader_weight,
                   labels=table["label"])


def augmentation(params: Params, table: pd.DataFrame) -> tuple[pd.DataFrame, Callable | None]:
    """(rows, augment) for :func:`make_dataset` over rows of the augmented manifest: the stage's files as they are
    (no augment), or with ``train.fresh_augmentation`` each row read from its cropped original (``original``) and
    augmented on the fly with new draws every epoch (:class:`kfer.data.augment.OnTheFlyAugment`; epoch 0 is byte for
    byte the stage's files)."""
    if not params.train.fresh_augmentation:
        return table, None
    from kfer.data.augment import OnTheFlyAugment

    rows = table.assign(path=table["original"]).reset_index(drop=True)
    return rows, OnTheFlyAugment(params, rows, params.augment.strength, fresh=True)


def decoded_pixels(params: Params, rows: pd.DataFrame) -> tuple | None:
    """``make_dataset``'s ``pixels`` for the train rows (as :func:`augmentation` gives them): their images decoded
    once (:func:`kfer.data.pixels.decoded_images`), or None with ``train.pixel_cache`` off."""
    if not params.train.pixel_cache:
        return None
    from kfer.data.pixels import decoded_images

    return decoded_images(params, rows[["path"]])


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
    augment: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    first_epoch: int = 0,
    pixels: tuple[np.ndarray, np.ndarray] | None = None,
):
    """tf.data over PNG files: (epoch order) → parallel decode → (augment) → batch → prefetch.

    Yields (float32 (B, S, S, 1) raw pixels, targets (B, C): one-hot, or training under ``data.label_policy: soft``
    the vote distributions, :func:`target_matrix`); ``batch_size`` defaults to ``train.batch_size``
    (pass the global batch under a distribution strategy). ``augment(image_uint8, row, epoch)`` is an optional
    numpy function applied to every image (on-the-fly augmentation, :class:`kfer.data.augment.OnTheFlyAugment`; ``row``
    is its row of ``table``, ``epoch`` the epoch's number, 0 outside training), called for a whole batch at a time
    in one ``tf.numpy_function``. The maps run ``train.decode_workers`` calls in
    parallel, in order (``deterministic=True``): the batches do not depend on it.

    ``pixels`` = (images, which): the decoded images (uint8 (M, S, S, C), e.g. the memory-mapped store of
    :func:`kfer.data.pixels.decoded_images`) and, per row of ``table``, its index in them. The rows' pixels are then
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

    size = params.crop.image_size
    channels = 1 if params.crop.grayscale else 3
    root = os.fspath(params.root)  # plain string joins: a Path per row cost ~9 s of start-up at 1M rows
    paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in table["path"].astype(str)]
    y = target_matrix(params, table, training)
    seed = params.seed if seed is None else seed
    batch = batch_size or params.train.batch_size
    workers = decode_workers(params)
    alpha = params.train.mixup_alpha if training else 0.0
    paths_t, targets_t = tf.constant(paths, tf.string), tf.constant(y, tf.float32)

    def decode(idx):
        img = tf.io.decode_png(tf.io.read_file(paths_t[idx]), channels=channels)
        img = tf.ensure_shape(img, (size, size, channels))
        return img, targets_t[idx], idx

    def augment_batch(images, rows, e):
        # one Python call per batch, not per image: tf.numpy_function costs ~0.2 ms of CPU a call
        # (docs/performance.md, bench_train.py part d, identity-fn)
        return np.stack([np.asarray(augment(img, row, e), dtype=np.uint8) for img, row in zip(images, rows)])

    def aug(img, label, idx, e):
        out = tf.numpy_function(augment_batch, [img, idx, e], tf.uint8, stateful=False)
        return tf.ensure_shape(out, (None, size, size, channels)), label, idx

    if pixels is not None:
        store, which = pixels
        which = np.asarray(which, dtype=np.int64)
        if len(which) != len(paths) or store.shape[1:] != (size, size, channels):
            raise ValueError(f"pixels: {len(which)} rows of {store.shape[1:]} images for a table of {len(paths)} "
                             f"rows of {(size, size, channels)}")

        def gather_batch(rows, e):  # the store's pages are read here, in parallel calls (numpy releases the GIL)
            out = np.empty((len(rows), size, size, channels), np.uint8)
            for j, row in enumerate(rows):
                img = store[which[row]]
                out[j] = img if augment is None else augment(img, row, e)
            return out

        def gather(idx, e):
            out = tf.numpy_function(gather_batch, [idx, e], tf.uint8, stateful=False)
            return tf.ensure_shape(out, (None, size, size, channels)), tf.gather(targets_t, idx), idx

    def one_pass(rows, e):
        if pixels is not None:
            ds = rows.batch(batch).map(lambda idx: gather(idx, e), num_parallel_calls=workers, deterministic=True)
        else:
            ds = rows.map(decode, num_parallel_calls=workers, deterministic=True).batch(batch)
        if augment is not None and pixels is None:
            ds = ds.map(lambda img, label, idx: aug(img, label, idx, e), num_parallel_calls=workers,
                        deterministic=True)
        if alpha > 0:  # mixup seeds each batch from its rows: the row index is kept through batching
            ds = ds.map(lambda img, target, idx: (tf.cast(img, tf.float32), target, idx),
                        num_parallel_calls=workers, deterministic=True)
            return ds.map(lambda x, y, idx: mixup(x, y, idx, alpha, seed), num_parallel_calls=workers,
                          deterministic=True)
        return ds.map(lambda img, target, idx: (tf.cast(img, tf.float32), target),
                      num_parallel_calls=workers, deterministic=True)

    n = len(paths)
    if training:
        def epoch(e):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), e]))
            return one_pass(tf.data.Dataset.from_tensor_slices(order), e)

        remaining = max(params.train.epochs - first_epoch, 0)
        ds = tf.data.Dataset.range(first_epoch, first_epoch + remaining).flat_map(epoch)
        ds = ds.apply(tf.data.experimental.assert_cardinality(remaining * steps_per_epoch(n, batch)))
    else:
        ds = one_pass(tf.data.Dataset.range(n), tf.constant(0, tf.int64))
    # tf.data's autotune thread costs this pipeline ~20% on 2 cores (iterator teardown waits for its wake-up
    # every epoch; docs/performance.md, bench_train.py part b): autotune off, and the maps' parallelism is set
    # explicitly (train.decode_workers) rather than left to the static default AUTOTUNE falls back to without
    # autotune.
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
