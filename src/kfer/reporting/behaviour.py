"""Behaviour checks of a trained model (the Made-With-ML kind): does its answer hold when a face changes in ways
that do not change the expression?

On the test faces (the crop stage's gray crops, as evaluation feeds them; ``evaluate.behaviour_max_images`` of
them, a seeded sample, 0 = all), each check transforms every face once and predicts again:

* ``mirror``: the face flipped left to right (a model with flip TTA, ``model.tta_flip``, averages both views, so
  its answer holds by construction);
* ``brighter`` / ``darker``: every grey level × 1.2 / × 0.8 (clipped to 0..255);
* ``contrast_up`` / ``contrast_down``: the distance from the face's mean grey level × 1.2 / × 0.8;
* ``rotate_left`` / ``rotate_right``: 10° about the centre, the border replicated (as augmentation fills);
* ``blur``: a Gaussian blur of sigma = image side / 48 (1 px at 48, 4.7 px at 224: the same mild blur of the face
  at any size);
* ``jpeg30``: encoded as JPEG at quality 30 and decoded again.

Per check: ``same_prediction`` (the share of faces whose predicted class is the one predicted on the face as it
is), ``accuracy`` under the change and ``accuracy_change`` (that minus the accuracy on the same faces unchanged).
The faces are read and checked one batch at a time, so memory does not grow with the test split; the cost is one
prediction per face and check (10 × the test split's, or of the sample).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from kfer.files import read_image_gray

log = logging.getLogger(__name__)

Check = Callable[[np.ndarray], np.ndarray]  # one face, uint8 (S, S) -> uint8 (S, S)


def _scaled(face: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(face.astype(np.float32) * factor, 0, 255).round().astype(np.uint8)


def _contrast(face: np.ndarray, factor: float) -> np.ndarray:
    f = face.astype(np.float32)
    mean = f.mean()
    return np.clip((f - mean) * factor + mean, 0, 255).round().astype(np.uint8)


def _rotated(face: np.ndarray, degrees: float) -> np.ndarray:
    h, w = face.shape
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0)
    return cv2.warpAffine(face, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _blurred(face: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(face, (0, 0), sigmaX=face.shape[0] / 48.0)


def _jpeg(face: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", face, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


CHECKS: dict[str, Check] = {
    "mirror": lambda f: np.ascontiguousarray(f[:, ::-1]),
    "brighter": lambda f: _scaled(f, 1.2),
    "darker": lambda f: _scaled(f, 0.8),
    "contrast_up": lambda f: _contrast(f, 1.2),
    "contrast_down": lambda f: _contrast(f, 0.8),
    "rotate_left": lambda f: _rotated(f, 10.0),
    "rotate_right": lambda f: _rotated(f, -10.0),
    "blur": _blurred,
    "jpeg30": lambda f: _jpeg(f, 30),
}


def sample(n_faces: int, max_images: int, seed: int) -> np.ndarray:
    """Sorted indices of the faces checked: all (``max_images`` 0 or ≥ ``n_faces``) or a seeded sample."""
    if max_images == 0 or max_images >= n_faces:
        return np.arange(n_faces)
    return np.sort(np.random.default_rng(seed).choice(n_faces, size=max_images, replace=False))


def run_checks(predict: Callable[[np.ndarray], np.ndarray], paths: list, y_true: np.ndarray,
               base: np.ndarray, image_size: int, batch_size: int,
               checks: dict[str, Check] | None = None) -> dict[str, Any]:
    """Every check on the faces at ``paths`` (gray PNGs of side ``image_size``; ``y_true`` their class indices,
    ``base`` the classes the model predicted on them as they are, e.g. evaluate's: not predicted again).

    ``predict`` maps a float32 batch (B, S, S, 1) of 0..255 to probabilities (B, C). Returns ``{"n", "accuracy"
    (unchanged), "checks": {name: {"same_prediction", "accuracy", "accuracy_change"}}}``.
    """
    checks = CHECKS if checks is None else checks
    n = len(paths)
    if n == 0:
        raise ValueError("no test faces to check")
    base = np.asarray(base, dtype=np.int64)
    if len(base) != n:
        raise ValueError(f"{len(base)} predictions for {n} faces")
    changed = {name: np.empty(n, dtype=np.int64) for name in checks}
    b = max(1, min(batch_size, n))
    x = np.zeros((b, image_size, image_size, 1), dtype=np.float32)  # one batch shape: one traced function

    def argmax(faces: list[np.ndarray]) -> np.ndarray:
        x[:] = 0
        for i, face in enumerate(faces):
            x[i, ..., 0] = face
        return np.asarray(predict(x))[: len(faces)].argmax(axis=1)

    for start in range(0, n, b):
        faces = []
        for p in paths[start:start + b]:
            face = read_image_gray(p)
            if face.shape != (image_size, image_size):
                raise ValueError(f"{p} is {face.shape[1]}x{face.shape[0]}, expected {image_size}x{image_size}")
            faces.append(face)
        for name, check in checks.items():
            changed[name][start:start + len(faces)] = argmax([check(f) for f in faces])
    accuracy = float((base == y_true).mean())
    out = {}
    for name, pred in changed.items():
        acc = float((pred == y_true).mean())
        out[name] = {"same_prediction": float((pred == base).mean()), "accuracy": acc,
                     "accuracy_change": acc - accuracy}
    return {"n": n, "accuracy": accuracy, "checks": out}


def write_files(report: dict[str, Any], out, title: str) -> None:
    """``behaviour.csv`` (check, same_prediction, accuracy, accuracy_change) and ``behaviour.png`` in ``out``."""
    import pandas as pd

    from kfer import plots

    pd.DataFrame([{"check": name, **m} for name, m in report["checks"].items()]).to_csv(
        out / "behaviour.csv", index=False, lineterminator="\n", float_format="%.6f")
    plots.plot_behaviour(report, out / "behaviour.png", title)


def flat(report: dict[str, Any] | None) -> dict[str, float]:
    """MLflow metrics: ``behaviour_<check>_same`` and ``behaviour_<check>_accuracy``, and the smallest share kept
    (``behaviour_min_same``)."""
    if not report:
        return {}
    out = {}
    for name, m in report["checks"].items():
        out[f"behaviour_{name}_same"] = m["same_prediction"]
        out[f"behaviour_{name}_accuracy"] = m["accuracy"]
    out["behaviour_min_same"] = min(m["same_prediction"] for m in report["checks"].values())
    return out


def describe(metrics: dict[str, float]) -> str:
    """One line from a run's ``behaviour_*`` metrics (as :func:`flat` logs them), '' when it has none: per check
    the share of answers kept, then the accuracy under it."""
    names = [k[len("behaviour_"):-len("_same")] for k in metrics
             if k.startswith("behaviour_") and k.endswith("_same") and k != "behaviour_min_same"]
    order = [c for c in CHECKS if c in names] + sorted(set(names) - set(CHECKS))
    return ", ".join(f"{c} {metrics[f'behaviour_{c}_same']:.1%} same (acc {metrics[f'behaviour_{c}_accuracy']:.3f})"
                     for c in order if f"behaviour_{c}_accuracy" in metrics)
