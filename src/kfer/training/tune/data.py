"""What a trial trains on: the cropped train split, each image as itself and as its augmented copies made on
the fly (byte for byte the ``augment`` stage's images for the trial's strength)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kfer.config import Params
from kfer.data.policy import OPINION_COLUMNS, hard_labels, low_agreement
from kfer.training.tune.study import TuneError


def trial_table(params: Params) -> pd.DataFrame:
    """The train split of ``splits.csv``, each image as copy 0 (itself) and copies 1..``augment.copies``.

    The same rows, in the same order, as the ``augment`` stage's manifest (which holds the files instead).
    """
    from kfer.training.inputs import split_table

    train = split_table(params, "train")
    train = train[train["label"].isin(params.class_names) & ~train["path"].duplicated()].reset_index(drop=True)
    if train.empty:
        raise TuneError("the train split is empty: check the crop and split reports")
    k = params.augment.copies + 1
    columns = ["path", "label", "group", *(c for c in OPINION_COLUMNS if c in train.columns)]
    out = train.loc[train.index.repeat(k), columns].reset_index(drop=True)
    out["copy"] = np.tile(np.arange(k), len(train))
    return out


def check_label_search(params: Params) -> None:
    """A searched ``min_agreement`` cannot go below ``data.min_agreement``: those photos are not in splits.csv."""
    space = params.tune.space
    if space.min_agreement is not None and space.min_agreement[0] < params.data.min_agreement:
        raise TuneError(f"tune.space.min_agreement starts at {space.min_agreement[0]}, below data.min_agreement "
                        f"{params.data.min_agreement}: the split stage dropped those train photos; lower "
                        "data.min_agreement (and re-run kfer split) or raise the range")


def trial_rows(p: Params, table: pd.DataFrame, pixels):
    """(rows, pixels) one trial trains on: ``table`` (:func:`trial_table`) relabelled by the trial's
    ``data.label_policy`` and less its photos below the trial's ``data.min_agreement``; ``pixels``
    (store, row index) cut to match. With the label search off, ``table`` as it is."""
    space = p.tune.space
    if space.label_policy is None and space.min_agreement is None:
        return table, pixels
    if "label_uploader" not in table.columns:
        raise TuneError(f"{p.paths.splits} has no opinion columns (label_uploader, votes, ...), which "
                        "tune.space.label_policy / min_agreement need: re-run `dvc repro split` (or kfer crop, "
                        "kfer split)")
    label = hard_labels(table, p.data.label_policy)
    keep = (label != "").to_numpy() & ~low_agreement(table, p.data.min_agreement)
    if not keep.any():
        raise TuneError(f"no train photo left under data.label_policy {p.data.label_policy}, data.min_agreement "
                        f"{p.data.min_agreement}")
    rows = table.assign(label=label)[keep].reset_index(drop=True)
    return rows, (None if pixels is None else (pixels[0], np.asarray(pixels[1])[keep]))


def validation_label_name(params: Params) -> str:
    """``tune.validation_label`` as the log and the summary say it: ``uploader``, ``majority`` or
    ``policy (<data.label_policy>)``."""
    label = params.tune.validation_label
    return f"policy ({params.data.label_policy})" if label == "policy" else label


def validation_table(params: Params) -> pd.DataFrame:
    """The val split scored against ``tune.validation_label``: one label for every trial, whatever it trains on."""
    from kfer.training.inputs import split_table, with_label

    return with_label(split_table(params, "val"), params.tune.validation_label)
