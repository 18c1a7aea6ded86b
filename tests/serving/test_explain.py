"""Grad-CAM (kfer.serving.explain):
maps on tiny models (shape, range, the all-zero case, the flip-TTA wrapper), overlays;
a model trained on the synthetic demo faces looks at the drawn eyes and mouth, not at the background (the demo
draws them at known places); ``kfer predict --explain`` and the evaluate stage's grid, end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.helpers import REPO

# Keras' own model.save under numpy 2 (not kfer code)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

S = 48  # face side everywhere here
CLASSES = [("joy", "기쁨"), ("embarrassment", "당황"), ("anger", "분노")]  # grin / "o" mouth / narrowed eyes
TEST_PERSONS = 3  # of the demo's persons, held out of training
# mean heat on eyes + mouth / mean heat on the background, required of the trained model. Measured on the held-out
# faces (2 cores, TF 2.21): 5.2 and 6.5 for training seeds 0 and 1; the same network untrained, seeds 0-5, 0.0-1.95
# (random convolutions already answer to the drawn lines a little); a flat or noise map 1.0
MIN_RATIO = 3.0


def tiny_model(n_classes: int = 3, seed: int = 0, base_width: int = 4):
    from kfer.training.model import build_resnet

    return build_resnet(S, n_classes, blocks=(1, 1), base_width=base_width, head_units=0, seed=seed,
                        stem="compact", bn_momentum=0.9)


def noise_faces(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, S, S)).astype(np.uint8)


# --- grad_cam and overlay on tiny models --------------------------------------------------------------
def test_grad_cam_shape_range_layer_and_classes():
    from kfer.serving import explain

    model, x = tiny_model(), noise_faces()
    heat = explain.grad_cam(model, x)
    assert heat.shape == (5, S, S) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    assert all(np.isclose(h.max(), 1.0) or h.max() == 0.0 for h in heat)  # each map scaled to its own maximum
    assert explain.feature_layer(model).name == "conv3_block1_out"  # the last 4-D map before avg_pool
    np.testing.assert_allclose(explain.grad_cam(model, x[..., None]), heat, atol=1e-6)  # (N, S, S, 1) too

    predicted = model.predict(x[..., None].astype("float32"), verbose=0).argmax(1)
    np.testing.assert_allclose(explain.grad_cam(model, x, predicted), heat, atol=1e-6)  # default: the predicted class
    per_class = [explain.grad_cam(model, x[:1], k)[0] for k in range(3)]
    assert not np.allclose(per_class[0], per_class[1])  # the class matters
    assert explain.grad_cam(model, x[:0]).shape == (0, S, S)
    with pytest.raises(ValueError, match="class_index"):
        explain.grad_cam(model, x, 3)


def test_all_zero_gradients_give_zeros_not_nan():
    from kfer.serving import explain

    model = tiny_model()
    dense = model.get_layer("predictions")
    dense.set_weights([np.zeros_like(w) for w in dense.get_weights()])  # the class score ignores the features
    heat = explain.grad_cam(model, noise_faces(3))
    assert heat.shape == (3, S, S) and not np.isnan(heat).any() and (heat == 0).all()


def test_flip_tta_model_is_explained_through_its_unmirrored_branch():
    from kfer.serving import explain
    from kfer.serving.layers import with_flip_tta

    model, x = tiny_model(), noise_faces()
    tta = with_flip_tta(model)
    tta_class = tta.predict(x[..., None].astype("float32"), verbose=0).argmax(1)  # the class the wrapper answers
    np.testing.assert_allclose(explain.grad_cam(tta, x), explain.grad_cam(model, x, tta_class), atol=1e-6)


def test_overlay_blends_jet_colours_onto_gray_or_bgr():
    from kfer.serving import explain

    face = noise_faces(1)[0]
    heat = np.linspace(0, 1, S * S, dtype=np.float32).reshape(S, S)
    out = explain.overlay(face, heat)
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    bgr = cv2.cvtColor(face, cv2.COLOR_GRAY2BGR)
    assert (explain.overlay(face, heat, alpha=0.0) == bgr).all()  # alpha 0: the face alone
    np.testing.assert_array_equal(explain.overlay(bgr, heat), out)  # gray and BGR faces alike
    jet = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    assert (explain.overlay(face, heat, alpha=1.0) == jet).all()
    hot, cold = explain.overlay(np.full((S, S), 128, np.uint8), heat)[[-1, 0], [-1, 0]]
    assert hot[2] > hot[0] and cold[0] > cold[2]  # BGR: red where the heat is 1, blue where it is 0
    small = explain.overlay(face, np.full((6, 6), np.nan, np.float32))  # NaN as 0, resized to the face
    assert small.shape == (S, S, 3)
    big = explain.captioned(out, "joy 97%")
    assert big.shape[1] == 4 * S and big.shape[0] > 4 * S  # whole-factor enlargement over a caption strip


def test_pick_faces_is_deterministic_round_robin_over_true_classes():
    from kfer.serving.explain import pick_faces

    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    conf = np.array([0.5, 0.9, 0.9, 0.4, 0.8, 0.7, 0.2, 0.6])
    assert pick_faces(np.arange(8), groups, conf, 5).tolist() == [1, 4, 5, 2, 3]  # ties by index
    assert pick_faces(np.array([6, 0]), groups, conf, 8).tolist() == [0, 6]
    assert pick_faces(np.array([], dtype=int), groups, conf, 8).tolist() == []


# --- a model trained on the demo faces -----------------------------------------------------------------
def cut_face(gray: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The head of a demo photo as an S×S face: centred on the head box, its height plus 10 % on each side (as
    crop.margin 0.1), the border replicated rather than the square shifted, so the head centre is the face's."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    scale = S / (1.2 * (box[3] - box[1]))
    m = np.float32([[scale, 0, S / 2 - scale * cx], [0, scale, S / 2 - scale * cy]])
    return cv2.warpAffine(gray, m, (S, S), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


def demo_regions() -> tuple[np.ndarray, np.ndarray]:
    """Masks (S, S) of the eyes + brows and mouth, and of the background, from where kfer.demo draws them.

    Face units: head centre (0, 0), half-height 100, y down; a face (:func:`cut_face`) spans ±120. The demo puts
    the eyes at y = -12, x = ±(29..35) (13 wide), brows at y = -35 (raised to -51), the mouth at y = 46..54,
    22..33 half-wide, opening down to +20; the head turns ±6 and tilts ±10°: hence generous boxes. The head is
    an ellipse of half-width 72..86; background is everything outside (x/90)² + (y/110)² = 1.
    """
    u = (np.arange(S) + 0.5 - S / 2) * 240 / S
    x, y = np.meshgrid(u, u)
    eyes = (np.abs(x) <= 55) & (y >= -60) & (y <= 8)
    mouth = (np.abs(x) <= 45) & (y >= 30) & (y <= 80)
    return eyes | mouth, (x / 90) ** 2 + (y / 110) ** 2 > 1.0


def heat_ratio(heat: np.ndarray) -> float:
    """Mean heat on the eyes + mouth over mean heat on the background, all faces pooled (1.0 for a flat map)."""
    features, background = demo_regions()
    return float(heat[:, features].mean() / max(float(heat[:, background].mean()), 1e-9))


def three_class_params(root: Path):
    """The repository's params.yaml with only CLASSES (and their label_map), faces of S px, paths under root."""
    from kfer.config import load_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["classes"] = [{"name": n, "ko": k} for n, k in CLASSES]
    raw["data"]["label_map"] = {k: n for n, k in CLASSES}
    raw["crop"]["image_size"] = S
    raw["train"]["experiment"] = "kfer-test"
    (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return load_params(root / "params.yaml")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project of three classes at S px: the demo photos (16 persons × 3 classes × 5), their faces cut at the
    known head boxes, and a tiny ResNet trained on 13 persons (the other 3 held out). About 30 s on 2 cores."""
    import keras

    from kfer.demo.photos import LABELS_FILE, generate_demo

    root = tmp_path_factory.mktemp("explain")
    params = three_class_params(root)
    raw = params.path(params.paths.raw)
    generate_demo(raw, CLASSES, n_persons=16, per_class=5, seed=3)
    label_of = {ko: i for i, (_, ko) in enumerate(CLASSES)}
    faces, labels, persons, files = [], [], [], []
    for rec in json.loads((raw / LABELS_FILE).read_text(encoding="utf-8")):
        gray = cv2.imdecode(np.fromfile(raw / rec["filename"], np.uint8), cv2.IMREAD_GRAYSCALE)
        box = np.mean([[rec[f"annot_{t}"]["boxes"][k] for k in ("minX", "minY", "maxX", "maxY")] for t in "ABC"], 0)
        faces.append(cut_face(gray, box))
        labels.append(label_of[rec["faceExp_uploader"]])
        persons.append(rec["filename"].split("_")[0])
        files.append(raw / rec["filename"])
    faces, labels, persons = np.stack(faces), np.array(labels), np.array(persons)
    held_out = np.isin(persons, sorted(set(persons))[-TEST_PERSONS:])

    model = tiny_model(base_width=16, seed=0)
    untrained = keras.models.clone_model(model)
    untrained.set_weights(model.get_weights())
    train_x = np.concatenate([faces[~held_out], faces[~held_out][:, :, ::-1]])[..., None].astype("float32")
    train_y = np.concatenate([labels[~held_out], labels[~held_out]])  # + mirrored faces: the demo is symmetric
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(train_x, train_y, epochs=18, batch_size=16, verbose=0)
    return {"root": root, "params": params, "model": model, "untrained": untrained, "faces": faces,
            "labels": labels, "held_out": held_out, "files": files}


@pytest.mark.training
def test_trained_model_looks_at_the_eyes_and_mouth_not_the_background(project):
    from kfer.serving import explain

    faces, labels, held = project["faces"], project["labels"], project["held_out"]
    model = project["model"]
    accuracy = (model.predict(faces[held][..., None].astype("float32"), verbose=0).argmax(1) == labels[held]).mean()
    trained = heat_ratio(explain.grad_cam(model, faces[held]))
    untrained = heat_ratio(explain.grad_cam(project["untrained"], faces[held]))
    flat, noise = heat_ratio(np.ones((1, S, S))), heat_ratio(np.random.default_rng(0).random((held.sum(), S, S)))
    print(f"held-out accuracy {accuracy:.2f}; heat ratio eyes+mouth / background: trained {trained:.2f}, "
          f"untrained {untrained:.2f}, flat {flat:.2f}, noise {noise:.2f}")
    assert accuracy >= 0.6  # it learnt the expressions (chance: 0.33)
    assert trained > MIN_RATIO
    # the threshold means something: a flat or random map, or the same network before training, fails it
    assert flat == pytest.approx(1.0) and noise < 1.2 and untrained < MIN_RATIO and trained > 1.5 * untrained


# --- end to end ----------------------------------------------------------------------------------------
@pytest.fixture
def mlflow_store(project, monkeypatch):
    """The project's own MLflow store (never a server from the environment); MLflow's ./mlruns stays there."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project["root"])
    yield
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # set_tracking_uri exports it


@pytest.mark.training
def test_predict_explain_writes_an_overlay_per_face(project, mlflow_store, tmp_path):
    from click.testing import CliRunner

    from kfer import tracking
    from kfer.cli import main
    from kfer.serving.publish import log_models

    params = project["params"]
    with tracking.tracked_run(params, "explain-model", log_params=False):
        uri = log_models(project["model"], params)["model_uri"]
    photos = [project["files"][i] for i in np.flatnonzero(project["held_out"])[:2]]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "설명"  # non-ASCII folder on purpose
    result = CliRunner().invoke(main, ["--params", str(project["root"] / "params.yaml"), "predict", *map(str, photos),
                                       str(broken), "--model", uri, "--explain", str(out), "--json"])
    assert result.exit_code == 1, result.output  # the broken photo: its error, as without --explain
    results = json.loads(result.stdout)
    assert results[-1]["error"] and results[-1]["faces"] == []
    written = sorted(p.name for p in out.iterdir())
    faces = [(Path(r["photo"]).stem, f) for r in results[:-1] for f in r["faces"]]
    assert faces, "the detector found no demo face"
    assert written == sorted(f"{stem}.face{f['face']}.cam.png" for stem, f in faces)
    for _, f in faces:
        img = cv2.imdecode(np.fromfile(f["explanation"], np.uint8), cv2.IMREAD_COLOR)
        assert Path(f["explanation"]).parent == out and img.shape[1] == 4 * S and img.shape[0] > 4 * S


@pytest.mark.training
def test_evaluate_writes_and_logs_the_gradcam_grid(project, mlflow_store):
    import mlflow

    from kfer import tracking
    from kfer.files import write_png
    from kfer.reporting.evaluate import run_evaluate
    from kfer.serving.explain import GRID_FILE

    params = project["params"]
    rows = []
    for i in np.flatnonzero(project["held_out"]):
        name = CLASSES[project["labels"][i]][0]
        rel = f"data/cropped/{name}/test_{i:03d}.png"
        params.path(rel).parent.mkdir(parents=True, exist_ok=True)
        write_png(params.path(rel), project["faces"][i])
        rows.append({"path": rel, "label": name, "group": f"p{i}", "split": "test"})
    pd.DataFrame(rows).to_csv(params.path(params.paths.splits), index=False)
    model_path = params.path(params.paths.model)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    project["model"].save(model_path)
    with tracking.tracked_run(params, "train", log_params=False) as run:
        mlflow.log_metric("val_accuracy", 0.5)
    params.path(params.paths.train_run).write_text(json.dumps({"run_id": run.info.run_id}), encoding="utf-8")

    run_evaluate(params)
    grid = params.path(params.paths.eval_dir) / GRID_FILE
    img = cv2.imdecode(np.fromfile(grid, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[1] > 8 * 100  # a row of up to 8 faces
    colour = np.abs(img[..., 2].astype(int) - img[..., 0].astype(int))
    assert (colour > 60).mean() > 0.01  # heat colours drawn, not only gray faces
    client = mlflow.MlflowClient(tracking.tracking_uri(params))
    assert f"eval/{GRID_FILE}" in {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
