"""Exporting the served classifier to the serving runtime (ONNX, run by ONNX Runtime: :mod:`kfer.serving.runtime`)
and proving the export predicts what the Keras model predicts.

:func:`export_onnx` writes the Keras model (:func:`kfer.training.fit.strip_for_serving`'s, flip TTA included when
``model.tta_flip``) as float32 ONNX with Keras 3's own exporter (``model.export(format="onnx")``, tf2onnx inside);
:func:`compare` runs both on the same faces; :func:`verify` refuses an export whose argmax differs on any face or
whose largest probability difference exceeds ``train.onnx_tolerance``. ``kfer train`` and tune's best trial export,
verify on validation faces and log the file in the run (:func:`kfer.serving.publish.log_models`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kfer.errors import KferError
from kfer.serving.runtime import OnnxClassifier, as_faces

BATCH = 64


class ExportMismatch(KferError, RuntimeError):
    """The exported model does not predict what the Keras model predicts (argmax or probabilities)."""


@dataclass(frozen=True)
class Agreement:
    """Keras vs the runtime on the same faces."""

    faces: int
    argmax_agree: int  # faces with the same predicted class
    max_prob_diff: float  # largest |p_keras - p_runtime| over every face and class

    @property
    def all_agree(self) -> bool:
        return self.argmax_agree == self.faces

    def ok(self, tolerance: float) -> bool:
        return self.all_agree and self.max_prob_diff <= tolerance

    def metrics(self) -> dict[str, float]:
        """For ``mlflow.log_metrics``: ``onnx_check_faces``, ``onnx_argmax_agreement`` (a fraction),
        ``onnx_max_prob_diff``."""
        return {"onnx_check_faces": self.faces, "onnx_argmax_agreement": self.argmax_agree / max(self.faces, 1),
                "onnx_max_prob_diff": self.max_prob_diff}

    def describe(self) -> str:
        return (f"argmax agrees on {self.argmax_agree}/{self.faces} faces, "
                f"largest probability difference {self.max_prob_diff:.3g}")

    def as_dict(self) -> dict:
        return asdict(self)


def export_onnx(keras_model, path: str | os.PathLike) -> Path:
    """Write ``keras_model`` as ONNX to ``path`` (atomically: a partial file is never left under that name).
    Input: ``float32 (batch, S, S, C)``, the batch dynamic; output: the model's probabilities."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(d) for d in keras_model.input_shape[1:])
    keras_model(np.zeros((1, *shape), np.float32))  # Keras exports only a model that has been called
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        with warnings.catch_warnings():
            # Keras 3.15's vendored tf2onnx patch on NumPy 2: hasattr(np, "object")
            warnings.filterwarnings("ignore", category=FutureWarning, message="In the future `np.object`")
            keras_model.export(str(tmp), format="onnx", verbose=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def compare(keras_model, classifier: OnnxClassifier, faces, batch: int = BATCH) -> Agreement:
    """Both models on the same faces, ``batch`` at a time."""
    x = as_faces(faces)
    if len(x) == 0:
        return Agreement(0, 0, 0.0)
    agree, diff = 0, 0.0
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        p_keras = np.asarray(keras_model.predict_on_batch(chunk), dtype=np.float32)
        p_rt = classifier.predict(chunk)
        agree += int(np.sum(p_keras.argmax(axis=1) == p_rt.argmax(axis=1)))
        diff = max(diff, float(np.max(np.abs(p_keras.astype(np.float64) - p_rt.astype(np.float64)))))
    return Agreement(len(x), agree, diff)


def verify(keras_model, onnx_path: str | os.PathLike, faces, tolerance: float) -> Agreement:
    """:func:`compare` the exported file with ``keras_model`` on ``faces``; :class:`ExportMismatch` unless every
    argmax agrees and the largest probability difference is at most ``tolerance``."""
    agreement = compare(keras_model, OnnxClassifier(onnx_path), faces)
    if not agreement.ok(tolerance):
        raise ExportMismatch(f"the ONNX export of the classifier ({onnx_path}) does not match the Keras model: "
                             f"{agreement.describe()} (train.onnx_tolerance {tolerance:g})")
    return agreement


def dataset_faces(dataset, limit: int) -> np.ndarray:
    """Up to ``limit`` input faces from a batched ``tf.data`` dataset of ``(x, y[, w])`` (the validation set)."""
    taken, n = [], 0
    if limit > 0:
        for element in dataset:
            x = element[0] if isinstance(element, (tuple, list)) else element
            x = np.asarray(x, dtype=np.float32)[:limit - n]
            taken.append(x)
            n += len(x)
            if n >= limit:
                break
    return np.concatenate(taken) if taken else np.zeros((0,), np.float32)
