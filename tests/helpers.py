"""What several test modules share: the repository and the real data, params and projects under a temporary
folder, tiny models and settings, and the environment of subprocesses. Fixtures live in conftest.py; every test
module imports these from here, never from another test module."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KFER_SHARED_DATA", REPO.parent / "shared" / "data"))
MLFLOW_ENV = "MLFLOW_TRACKING_URI"
TINY_MODEL_SIZE = 32  # the face side of tiny_model and params_at

#: the tiny model and training settings of the tests that train (32 px faces, one block per stage, 2 epochs)
TINY = {
    "crop": {"image_size": 32, "workers": 1},
    "augment": {"copies": 1, "workers": 1},
    "model": {"blocks": [1, 1], "base_width": 4, "head_units": 8},
    "train": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 0},
}


def shared_dir(name: str) -> Path:
    """A folder of the real shared data, or skip the test with a clear message."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real-image data not available: {path} is absent (set KFER_SHARED_DATA to its folder)")
    return path


# --- params and projects ---------------------------------------------------------------------------------

def write_params(root: Path, *overrides: dict | None):
    """Write ``root/params.yaml`` (the repository's, with each override merged in turn) and load it.

    Every path in it resolves under ``root``.
    """
    from kfer.config import deep_merge, load_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for over in overrides:
        raw = deep_merge(raw, over or {})
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return load_params(root / "params.yaml")


def params_at(root: Path, overrides: dict | None = None):
    """As :func:`write_params` with 32 px faces, into a file named by the overrides (``root/params-<hash>.yaml``),
    so that one folder (one MLflow store) holds params of several kinds."""
    from kfer.config import deep_merge, load_params

    raw = deep_merge(deep_merge(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")),
                                {"crop": {"image_size": TINY_MODEL_SIZE}}), overrides or {})  # crop: {...} keeps 32
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"params-{abs(hash(json.dumps(overrides, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return load_params(path)


def prepare_demo(params, n_persons: int = 5, per_class: int = 2, seed: int = 1):
    """Synthetic demo photos → crop → split → augment, into the folders ``params`` names; returns ``params``."""
    from kfer.data.augment import run_augment
    from kfer.data.crop import run_crop
    from kfer.data.split import run_split
    from kfer.demo.photos import generate_demo

    generate_demo(params.path(params.paths.raw), [(c.name, c.ko) for c in params.classes],
                  n_persons=n_persons, per_class=per_class, seed=seed)
    run_crop(params)
    run_split(params)
    run_augment(params)
    return params


AUGMENT_CLASSES = ["joy", "anger", "sadness"]  # the classes of augment_project's faces


def augment_project(root: Path, workers: int = 1, copies: int = 2, extra: dict | None = None):
    """A tiny project for the augment stage in ``root``: params.yaml (the repository's, ``augment.workers``,
    ``copies`` and ``extra`` set), per class of :data:`AUGMENT_CLASSES` five 24 px crops (persons 0-2 train, 3 val,
    4 test) and splits.csv, which also lists a corrupt train PNG and a missing one."""
    import cv2
    import pandas as pd

    params = write_params(root, {"augment": {"workers": workers, "copies": copies, **(extra or {})}})
    rows = []
    rng = np.random.default_rng(0)
    for label in AUGMENT_CLASSES:
        (root / "data" / "cropped" / label).mkdir(parents=True, exist_ok=True)
        for i, split in enumerate(["train", "train", "train", "val", "test"]):
            rel = f"data/cropped/{label}/p{i}_{label}.png"
            img = cv2.GaussianBlur(rng.integers(0, 256, (24, 24), dtype=np.uint8), (5, 5), 0)
            ok, buf = cv2.imencode(".png", img)
            assert ok
            (root / rel).write_bytes(buf.tobytes())
            rows.append({"path": rel, "label": label, "group": f"person{i}", "split": split})
    bad = "data/cropped/joy/corrupt.png"
    (root / bad).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    rows.append({"path": bad, "label": "joy", "group": "person9", "split": "train"})
    rows.append({"path": "data/cropped/anger/gone.png", "label": "anger", "group": "person8", "split": "train"})
    pd.DataFrame(rows).to_csv(root / "data" / "splits.csv", index=False)
    return params


def face_cropper(**settings):
    """A :class:`kfer.data.faces.FaceCropper` of the repository's params.yaml ``crop`` settings, with ``settings``
    (FaceCropper's field names) changed: the library has no defaults of its own."""
    import dataclasses

    from kfer.config import load_params
    from kfer.data.faces import FaceCropper

    return dataclasses.replace(FaceCropper.from_params(load_params(REPO / "params.yaml").crop), **settings)


def augment_cfg(**settings):
    """The repository's params.yaml ``augment`` section as an ``AugmentCfg``, with ``settings`` changed (validated)."""
    from kfer.config import AugmentCfg, load_params

    return AugmentCfg.model_validate({**load_params(REPO / "params.yaml").augment.model_dump(), **settings})


# --- models ----------------------------------------------------------------------------------------------

def tiny_model(n_classes: int = 7, seed: int = 1):
    """An untrained ResNet of one bottleneck block per stage, 4 filters wide, on 32 px faces."""
    from kfer.training.model import build_resnet

    return build_resnet(TINY_MODEL_SIZE, n_classes, blocks=(1, 1), base_width=4, head_units=0, seed=seed)


INTENSITY_SIZE = 32  # the face side of the intensity model
INTENSITY_CLASSES = 7  # the classes of params.yaml
CENTERS = (np.arange(INTENSITY_CLASSES) + 0.5) / INTENSITY_CLASSES  # class k <-> mean intensity after the 1/255 rescale


def value_of(k: int) -> int:
    """The pixel value of a flat face that the intensity model puts in class ``k``."""
    return int(round(255 * CENTERS[k]))


def save_intensity_model(params, sharpness: float = 200.0):
    """A model whose prediction is known, saved as ``params``' model: the class whose centre is nearest the image's
    mean intensity.

    logit_k = a·(2·c_k·m − c_k²) = a·(m² − (m − c_k)²): argmax is the nearest centre.
    """
    import keras
    from keras import layers

    inp = keras.Input((INTENSITY_SIZE, INTENSITY_SIZE, 1), name="image")
    x = layers.Rescaling(1.0 / 255.0)(inp)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(INTENSITY_CLASSES, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, out)
    model.get_layer("predictions").set_weights([
        (sharpness * 2 * CENTERS)[None, :].astype("float32"), (-sharpness * CENTERS**2).astype("float32"),
    ])
    path = params.path(params.paths.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return model


# --- MLflow stores ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def store_folder(root: Path) -> Iterator[None]:
    """For a module's own MLflow store under ``root``: no MLFLOW_TRACKING_URI from the environment and ``root`` as the
    working folder (whatever MLflow writes to ./mlruns stays there) while it lasts; then MLflow forgets the store and
    both are put back."""
    import mlflow

    old_env, old_cwd = os.environ.pop(MLFLOW_ENV, None), Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # forget the store (this also unsets the variable MLflow exported)
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop(MLFLOW_ENV, None)
        else:
            os.environ[MLFLOW_ENV] = old_env


# --- subprocesses ----------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (a server started later may still find it taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a ``kfer``, ``dvc``, ``mlflow`` or ``python`` subprocess: this process's without
    MLFLOW_TRACKING_URI (the project's own store), this interpreter's folder first on PATH (its kfer and dvc, as
    after ./setup.sh), and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != MLFLOW_ENV}
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", **extra}


def tool_env() -> dict[str, str]:
    """:func:`subprocess_env` for git, dvc and mlflow: a git identity (``dvc exp`` commits), DVC's tables at their
    full width (not cut to a terminal's), no DVC analytics."""
    return subprocess_env(COLUMNS="400", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                          GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def run_tool(cwd: Path, *cmd: str) -> str:
    """Run ``cmd`` (git, dvc, kfer, mlflow) in ``cwd`` with :func:`tool_env`; its output, or the test fails showing
    it."""
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out}"
    return out


# --- DVC end to end --------------------------------------------------------------------------------------

SMALL_PIPELINE = {  # dotted params of a small variant, so that the whole pipeline runs in about a minute on 2 cores
    "crop.image_size": 32,
    "augment.copies": 1,
    "model.blocks": [1, 1],
    "model.base_width": 4,
    "model.head_units": 8,
    "train.epochs": 2,
    "train.batch_size": 32,
    "tune.n_trials": 2,
}


def set_param(repo: Path, dotted: str, value) -> None:
    """Set one param (``train.epochs``) in ``repo/params.yaml``, its key order kept."""
    p = repo / "params.yaml"
    data = yaml.safe_load(p.read_text(encoding="utf-8"))
    *parents, leaf = dotted.split(".")
    node = data
    for k in parents:
        node = node[k]
    node[leaf] = value
    p.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")


def train_runs(repo: Path) -> list:
    """The MLflow runs of the train stage in ``repo``'s store (none when it has no store yet)."""
    import mlflow

    db = repo / "mlflow.db"
    if not db.exists():
        return []
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("kfer")
    return [] if exp is None else [r for r in client.search_runs([exp.experiment_id])
                                   if r.data.tags.get("kfer.stage") == "train"]
