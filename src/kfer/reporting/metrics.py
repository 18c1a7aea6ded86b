"""Classification metrics, one implementation for the evaluate stage, external photo sets and benchmarks:
accuracy, macro-F1 over the classes present, per-class scores and confusion matrices, per-source scores, and
their flat MLflow names."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from kfer.files import short_hash

NO_SOURCE = "(none)"  # the name of test rows without a source when other rows have one


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the classes present in ``y_true``, per-class precision/recall/F1/support for
    every class, confusion matrices.

    Returns the JSON-able metrics plus ``"confusion"`` (counts, rows actual) and ``"confusion_normalized"``
    (row-normalized; NaN rows for classes without test images) as arrays.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    labels = list(range(len(class_names)))
    prec, rec, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    present = [k for k in labels if support[k] > 0]  # as train's MacroF1: absent classes are not counted
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    rows = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cm_norm = np.where(rows > 0, cm / np.maximum(rows, 1), np.nan)
    return {
        "test_accuracy": float(accuracy_score(y_true, y_pred)),
        "test_macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "test_images": int(len(y_true)),
        "per_class": {
            name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion": cm,
        "confusion_normalized": cm_norm,
    }


def row_sources(test: pd.DataFrame) -> list[str] | None:
    """The source name of each test row, or None when no row has one (no ``data.sources``, old splits files)."""
    if "source" not in test.columns or not (test["source"] != "").any():
        return None
    return [s or NO_SOURCE for s in test["source"]]


def per_source_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, sources: list[str], persons: list[str], class_names: list[str]
) -> dict[str, dict[str, Any]]:
    """``{source: {accuracy, macro_f1, n, persons}}`` by :func:`compute_metrics` on each source's rows alone
    (so macro-F1 averages over the classes that source has), sources sorted by name."""
    src = np.asarray(sources, dtype=object)
    who = np.asarray(persons, dtype=object)
    out = {}
    for name in sorted(set(sources)):
        mask = src == name
        m = compute_metrics(y_true[mask], y_pred[mask], class_names)
        out[name] = {"accuracy": m["test_accuracy"], "macro_f1": m["test_macro_f1"], "n": m["test_images"],
                     "persons": len(set(who[mask]))}
    return out


def metric_key(name: str) -> str:
    """MLflow metric names allow letters, digits, ``_-. /``; anything else becomes ``_``."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name)


def distinct_keys(names: list[str]) -> dict[str, str]:
    """Each name's metric-name suffix (sources, group values): ``metric_key(name)``, plus a short hash of the name
    where two names would share one (e.g. names in Hangul, which become all ``_``)."""
    keys = {n: metric_key(n) for n in names}
    taken = list(keys.values())
    return {n: k if taken.count(k) == 1 else f"{k}_{short_hash(n, 6)}" for n, k in keys.items()}


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics JSON as flat MLflow metrics: test_accuracy, test_macro_f1, test_images, test_f1_<class>...,
    with sources test_accuracy_<source>, test_macro_f1_<source>, the photo_* metrics, and test_ece /
    test_ece_calibrated when calibrated (the group table's are :func:`kfer.reporting.groups.flat`'s)."""
    flat = {k: float(metrics[k]) for k in ("test_accuracy", "test_macro_f1", "test_images")}
    flat.update({k: float(v) for k, v in metrics.items() if k.startswith("photo_") and v is not None})
    for name, m in metrics["per_class"].items():
        for k in ("precision", "recall", "f1"):
            flat[metric_key(f"test_{k}_{name}")] = float(m[k])
    for kind, m in (metrics.get("label_kinds") or {}).items():
        if m["n"]:
            flat[f"test_accuracy_{kind}"] = float(m["accuracy"])
            flat[f"test_macro_f1_{kind}"] = float(m["macro_f1"])
    per_source = metrics.get("per_source") or {}
    for name, key in distinct_keys(list(per_source)).items():
        for k in ("accuracy", "macro_f1"):
            flat[f"test_{k}_{key}"] = float(per_source[name][k])
    test_cal = (metrics.get("calibration") or {}).get("splits", {}).get("test")
    if test_cal:
        flat["test_ece"], flat["test_ece_calibrated"] = float(test_cal["ece_before"]), float(test_cal["ece_after"])
    return flat


# --- outputs -----------------------------------------------------------------------------------------
