"""The train images decoded once: an uncompressed, memory-mapped store that ``kfer train`` and ``kfer tune``
read pixels from instead of decoding a PNG per row per epoch.

With ``train.fresh_augmentation`` (and in every tuning trial) each train image is read 1 + ``augment.copies``
times an epoch, as itself and as each copy drawn on the fly. Decoding its PNG every time was 60% of that input
pipeline's CPU at 224 px (docs/performance.md, bench_train.py part d); the images are decoded once per data into
``paths.pixel_store``/<key>.npy instead, memory-mapped by every reader (the train stage, every trial and every
tuning worker). Size: images × S² × channels bytes (AI Hub at 224 px gray: ~50 KB an image).
Switched by ``train.pixel_cache`` and ``tune.pixel_cache``; the batches are the same bytes either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from kfer import files
from kfer.catalog import Catalog
from kfer.config import Params
from kfer.errors import UserError

log = logging.getLogger(__name__)

#: Free disk space kept beyond the store's size when it is built.
DISK_MARGIN = 256 << 20


class PixelStoreError(UserError):
    """The store cannot be built (a train image missing, undecodable or of another size; no disk space)."""


def _decode(path: str, channels: int) -> np.ndarray:
    """H×W×channels uint8 as ``tf.io.decode_png`` gives it (``make_dataset``'s file path): RGB order for colour."""
    if channels == 1:
        return files.read_image_gray(path)[:, :, None]
    import cv2

    img = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot decode image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def pixel_store_key(params: Params, paths: list[str]) -> str:
    """A name for the store of these images as they are now: their paths, sizes and modification times (a file
    rewritten by a new crop gets a new store), the crop size and the channels."""
    size, channels = params.crop.image_size, 1 if params.crop.grayscale else 3
    h = hashlib.blake2b(f"{size}\x1f{channels}\n".encode(), digest_size=12)
    for p in paths:
        try:
            st = os.stat(params.path(p))
        except FileNotFoundError:
            raise PixelStoreError(f"train image {p} is missing: run `dvc repro split` (or kfer crop and kfer "
                                  "split) again") from None
        h.update(f"{p}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(folder: Path):
    """One builder at a time per folder (several ``kfer tune`` on one machine); others wait, then reuse."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def decoded_images(params: Params, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(images, which) for :func:`kfer.training.inputs.make_dataset`'s ``pixels``: the distinct images of
    ``table`` decoded
    into a read-only memory-mapped uint8 array (M, S, S, C) under ``paths.pixel_store``, and each row's index in
    it. Built when missing (atomically, under a lock; progress shown), reused while the images are unchanged;
    stores of other data in that folder are removed when a new one is built."""
    size, channels = params.crop.image_size, 1 if params.crop.grayscale else 3
    which, unique = pd.factorize(table["path"].astype(str), sort=False)
    unique = list(unique)
    folder = Catalog(params).pixel_store
    target = folder / f"{pixel_store_key(params, unique)}.npy"
    shape = (len(unique), size, size, channels)
    with _locked(folder):
        if not target.exists():
            _build_store(params, unique, target, shape)
    store = np.load(target, mmap_mode="r")
    if store.shape != shape or store.dtype != np.uint8:
        raise PixelStoreError(f"{target} holds {store.dtype} {store.shape}, not uint8 {shape}: delete it")
    return store, which.astype(np.int64)


def _build_store(params: Params, paths: list[str], target: Path, shape: tuple[int, ...]) -> None:
    nbytes = int(np.prod(shape))
    files.clean_stale_tmp(target)
    free = shutil.disk_usage(target.parent).free
    if free < nbytes + DISK_MARGIN:
        raise PixelStoreError(f"decoding the train images once needs {nbytes / 2**20:,.0f} MiB in {target.parent} "
                              f"({free / 2**20:,.0f} MiB free): free space, move paths.pixel_store, or set "
                              "train.pixel_cache and tune.pixel_cache to false (slower epochs)")
    for old in target.parent.glob("*.npy"):  # stores of other data: this one supersedes them
        old.unlink(missing_ok=True)
    tmp = files.tmp_sibling(target)
    size, channels = shape[1], shape[3]
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)

        def one(i: int) -> None:  # cv2 releases the GIL while decoding: threads run in parallel
            path = params.path(paths[i])
            try:
                img = _decode(os.fspath(path), channels)
            except OSError:
                raise PixelStoreError(f"train image {paths[i]}: cannot decode it: run `dvc repro split` (or kfer "
                                      "crop) again") from None
            if img.shape != (size, size, channels):
                raise PixelStoreError(f"train image {paths[i]} is {img.shape[1]}x{img.shape[0]}, not the crop size "
                                      f"{size}x{size} of params.yaml: run `dvc repro split` (or kfer crop) again")
            out[i] = img

        def block(start: int) -> int:
            stop = min(start + 256, shape[0])
            for i in range(start, stop):
                one(i)
            return stop - start

        pool = ThreadPoolExecutor(files.resolve_workers(0))
        try:
            with tqdm(total=shape[0], unit="img", desc="decoding the train images once", mininterval=1.0) as bar:
                for n in pool.map(block, range(0, shape[0], 256)):
                    bar.update(n)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a bad image stops the build at once
        out.flush()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("decoded %d train images once into %s (%.0f MiB): training reads their pixels from there", shape[0],
             target, nbytes / 2**20)
