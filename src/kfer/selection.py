"""Which value of a metric is best: its direction, the best epoch of a history, the better of two values.

The one home of this rule for training (kept epoch, early stopping, LR schedule), resume (best checkpoint),
tuning (objective direction, pruning report) and registration (ranking runs): a metric whose name ends in
``loss`` is better lower, every other (accuracy, macro-F1) better higher.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def mode(metric: str) -> str:
    """Keras' ``mode`` for callbacks monitoring ``metric``: ``"min"`` or ``"max"``."""
    return "min" if lower_is_better(metric) else "max"


def direction(metric: str) -> str:
    """Optuna's study direction for ``metric``: ``"minimize"`` or ``"maximize"``."""
    return "minimize" if lower_is_better(metric) else "maximize"


def best_epoch(values: Iterable[float | None], metric: str) -> int | None:
    """The 1-based epoch of the best value (the first one on ties); ``None``/NaN values are skipped; ``None``
    when there is no finite value."""
    best, at = None, None
    low = lower_is_better(metric)
    for i, v in enumerate(values):
        if v is None or not math.isfinite(float(v)):
            continue
        v = float(v)
        if best is None or (v < best if low else v > best):
            best, at = v, i + 1
    return at


def best_value(values: Iterable[float | None], metric: str) -> float | None:
    """The best finite value of ``values`` for ``metric`` (``None`` when there is none)."""
    values = list(values)
    at = best_epoch(values, metric)
    return None if at is None else float(values[at - 1])


def at_least_as_good(value: float, than: float, metric: str) -> bool:
    return value <= than if lower_is_better(metric) else value >= than
