"""What a trial trains on: the cropped train split, each image as itself and as its augmented copies made on
the fly (byte for byte the ``augment`` stage's images for the trial's strength)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import Params
from .study import TuneError

def trial_table(params: Params) -> pd.DataFrame:
    """The train split of ``splits.csv``, each image as copy 0 (itself) and copies 1..``augment.copies``.

    The same rows, in the same order, as the ``augment`` stage's manifest (which holds the files instead).
    """
    from ..train import split_table

    train = split_table(params, "train")
    train = train[train["label"].isin(params.class_names) & ~train["path"].duplicated()].reset_index(drop=True)
    if train.empty:
        raise TuneError("the train split is empty: check the crop and split reports")
    k = params.augment.copies + 1
    out = train.loc[train.index.repeat(k), ["path", "label", "group"]].reset_index(drop=True)
    out["copy"] = np.tile(np.arange(k), len(train))
    return out


class OnTheFlyAugment:
    """``fn(image_uint8, row_index)`` for :func:`kfer.train.make_dataset`: row ``i`` of :func:`trial_table` is
    the image itself (copy 0) or :func:`kfer.augment.augment_image` with ``rng_for(seed, path, copy)`` at
    ``strength``: byte for byte what the augment stage writes for that strength."""

    def __init__(self, params: Params, table: pd.DataFrame, strength: float) -> None:
        self.cfg = params.augment
        self.seed = params.seed
        self.strength = float(strength)
        self.paths = list(table["path"])
        self.copies = table["copy"].to_numpy(dtype=np.int64)

    def __call__(self, image: np.ndarray, index) -> np.ndarray:
        from ..augment import augment_image, rng_for

        i = int(index)
        k = int(self.copies[i])
        if k == 0:
            return np.asarray(image, dtype=np.uint8)
        return augment_image(image, rng_for(self.seed, self.paths[i], k), self.cfg, self.strength)

