"""What a trial trains on: the cropped train split, each image as itself and as its augmented copies made on
the fly (byte for byte the ``augment`` stage's images for the trial's strength)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from kfer.config import Params
from kfer.training.tune.study import TuneError

log = logging.getLogger("kfer.training.tune")


def trial_table(params: Params) -> pd.DataFrame:
    """The train split of ``splits.csv``, each image as copy 0 (itself) and copies 1..``augment.copies``.

    The same rows, in the same order, as the ``augment`` stage's manifest (which holds the files instead), less
    the pretraining sources' (``split: pretrain``): trials train without the pretraining phase.
    """
    from kfer.training.inputs import phase_tables, split_table

    train = split_table(params, "train")
    pre, train = phase_tables(params, train, train["source"])
    if len(pre):
        log.info("tune: trials leave out the %d pretraining images (%s): they train from scratch on the others",
                 len(pre), ", ".join(params.pretrain_sources))
    train = train[train["label"].isin(params.class_names) & ~train["path"].duplicated()].reset_index(drop=True)
    if train.empty:
        raise TuneError("the train split is empty: check the crop and split reports")
    k = params.augment.copies + 1
    out = train.loc[train.index.repeat(k), ["path", "label", "group"]].reset_index(drop=True)
    out["copy"] = np.tile(np.arange(k), len(train))
    return out
