"""Accuracy by group: the same predictions scored per value of each group field (source, gender, age group, a
groups table's columns; :mod:`kfer.data.groups`), with a 95% Wilson interval for each accuracy and the largest
gap between groups. One implementation for ``kfer evaluate`` (test split) and ``kfer evaluate --external``.

The table (``groups`` in ``reports/eval.json`` and in ``--external``'s ``metrics.json``)::

    {"min_n": 30, "interval": "wilson 95%",
     "fields": {<field>: {"values": {<value>: {"n", "claim": true, "accuracy", "accuracy_low", "accuracy_high",
                                               "macro_f1"} | {"n", "claim": false}},
                          "largest_gap": {"gap", "best", "worst", "intervals_overlap"} | null}},
     "worst": {"field", "value", "accuracy", "n"} | null,
     "largest_gap": {"field", "gap", "best", "worst", "intervals_overlap"} | null}

A group with fewer than ``min_n`` faces (``evaluate.group_min_n``) is listed with its count and ``claim: false``:
no accuracy, and left out of ``worst`` and the gaps. The group ``unknown`` (a value that was missing or could not
be read) is scored like any other but is no group of people: it is never the worst group nor an end of a gap.
``intervals_overlap`` says whether the two ends' intervals overlap (then the gap may be chance).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kfer.data.groups import UNKNOWN, decode, field_order
from kfer.reporting.metrics import compute_metrics, distinct_keys, metric_key, row_sources

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
CSV_FILE = "per_group.csv"
PLOT_FILE = "groups.png"
CSV_COLUMNS = ["field", "value", "n", "claim", "accuracy", "accuracy_low", "accuracy_high", "macro_f1"]
#: the headline keys (DVC metrics of ``kfer evaluate``)
HEADLINE = ("group_worst_accuracy", "group_largest_gap")


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / n`` (95% by default); (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if correct <= 0 else max(0.0, centre - half)
    high = 1.0 if correct >= n else min(1.0, centre + half)
    return low, high


def row_fields(rows: pd.DataFrame) -> dict[str, list[str]]:
    """Each group field's value per row: ``source`` (when rows name one; :func:`row_sources`) and the fields of
    the ``groups`` column (a row without a field is ``unknown`` in it). {} when there is none."""
    out: dict[str, list[str]] = {}
    sources = row_sources(rows)
    if sources is not None:
        out["source"] = sources
    if "groups" in rows.columns:
        decoded = [decode(text) for text in rows["groups"]]
        for field in field_order({f for d in decoded for f in d}):
            out[field] = [d.get(field, UNKNOWN) for d in decoded]
    return out


def _gap(values: dict[str, dict]) -> dict[str, Any] | None:
    scored = {v: m for v, m in values.items() if m["claim"] and v != UNKNOWN}
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda v: (scored[v]["accuracy"], v))
    worst = min(scored, key=lambda v: (scored[v]["accuracy"], v))
    b, w = scored[best], scored[worst]
    return {"gap": b["accuracy"] - w["accuracy"], "best": best, "worst": worst,
            "intervals_overlap": bool(w["accuracy_high"] >= b["accuracy_low"])}


def group_report(y_true: np.ndarray, y_pred: np.ndarray, fields: dict[str, list[str]], class_names: list[str],
                 min_n: int) -> dict[str, Any]:
    """The group table (see the module docstring) of predictions ``y_pred`` against ``y_true`` (class indices;
    a prediction outside them, e.g. a missed face, is wrong)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    report: dict[str, Any] = {"min_n": min_n, "interval": "wilson 95%", "fields": {}}
    worst, gaps = None, []
    for field, per_row in fields.items():
        column = np.asarray(per_row, dtype=object)
        values: dict[str, dict] = {}
        for value in sorted(set(per_row), key=lambda v: (v == UNKNOWN, v)):
            mask = column == value
            n = int(mask.sum())
            if n < min_n:
                values[value] = {"n": n, "claim": False}
                continue
            m = compute_metrics(y_true[mask], y_pred[mask], class_names)
            low, high = wilson(int((y_true[mask] == y_pred[mask]).sum()), n)
            values[value] = {"n": n, "claim": True, "accuracy": m["test_accuracy"], "accuracy_low": low,
                             "accuracy_high": high, "macro_f1": m["test_macro_f1"]}
            if value != UNKNOWN and (worst is None or m["test_accuracy"] < worst["accuracy"]):
                worst = {"field": field, "value": value, "accuracy": m["test_accuracy"], "n": n}
        gap = _gap(values)
        report["fields"][field] = {"values": values, "largest_gap": gap}
        if gap is not None:
            gaps.append({"field": field, **gap})
    report["worst"] = worst
    report["largest_gap"] = max(gaps, key=lambda g: g["gap"]) if gaps else None
    return report


def headline(report: dict[str, Any] | None) -> dict[str, float]:
    """The DVC metrics of the table: the worst group's accuracy and the largest gap (each when there is one)."""
    if not report:
        return {}
    out = {}
    if report.get("worst"):
        out["group_worst_accuracy"] = report["worst"]["accuracy"]
    if report.get("largest_gap"):
        out["group_largest_gap"] = report["largest_gap"]["gap"]
    return out


def flat(report: dict[str, Any] | None, prefix: str = "test") -> dict[str, float]:
    """MLflow metrics: ``<prefix>_accuracy_group_<field>_<value>`` and ``<prefix>_macro_f1_group_<field>_<value>`` of
    each group with a claim (names sanitized; values that would share a name get a hash), plus the headline as
    ``<prefix>_group_worst_accuracy`` and ``<prefix>_group_largest_gap``."""
    if not report:
        return {}
    out = {}
    for field, entry in report["fields"].items():
        values = entry["values"]
        for value, key in distinct_keys(list(values)).items():
            m = values[value]
            if m["claim"]:
                out[metric_key(f"{prefix}_accuracy_group_{field}_") + key] = float(m["accuracy"])
                out[metric_key(f"{prefix}_macro_f1_group_{field}_") + key] = float(m["macro_f1"])
    out.update({f"{prefix}_{k}": float(v) for k, v in headline(report).items()})
    return out


def table(report: dict[str, Any]) -> pd.DataFrame:
    """One row per field and value (:data:`CSV_COLUMNS`); the scores are blank for groups with no claim."""
    rows = [{"field": field, "value": value, **m}
            for field, entry in report["fields"].items() for value, m in entry["values"].items()]
    return pd.DataFrame(rows).reindex(columns=CSV_COLUMNS)


def describe(report: dict[str, Any]) -> list[str]:
    """Log lines: per field its groups (n, accuracy [interval]) and its largest gap."""
    lines = []
    for field, entry in report["fields"].items():
        cells = [(f"{v} n={m['n']} {m['accuracy']:.3f} [{m['accuracy_low']:.3f}, {m['accuracy_high']:.3f}]"
                  if m["claim"] else f"{v} n={m['n']} (too few, no claim)") for v, m in entry["values"].items()]
        gap = entry["largest_gap"]
        lines.append(f"{field}: " + "; ".join(cells)
                     + (f"; largest gap {gap['gap']:.3f} ({gap['best']} - {gap['worst']}"
                        f"{', intervals overlap' if gap['intervals_overlap'] else ''})" if gap else ""))
    return lines


def write_files(report: dict[str, Any], folder: Path, title: str) -> None:
    """``per_group.csv`` (:func:`table`) and ``groups.png`` (:func:`kfer.plots.plot_groups`) into ``folder``."""
    from kfer import plots

    table(report).to_csv(Path(folder) / CSV_FILE, index=False, lineterminator="\n", float_format="%.6f")
    plots.plot_groups(report, Path(folder) / PLOT_FILE, title=title)
