"""train.init_from: fine-tuning from a registered model, a run's model or a local .keras file (real TensorFlow,
real MLflow SQLite store and Model Registry, the real CLI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import keras
import mlflow
import numpy as np
import pytest
import yaml

from kfer import tracking
from kfer.serving import registry
from kfer.training.init import INIT_SOURCE_TAG, INIT_TAG, InitError, apply, load
from kfer.training.model import build_from_params
from kfer.training.train import run_train
from kfer.config import deep_merge
from tests.helpers import REPO, TINY, prepare_demo, subprocess_env, write_params

SETTINGS = deep_merge(TINY, {"train": {"epochs": 1, "registered_model": "kfer-init-test"}})
HEAD_LAYERS = ("head", "predictions")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny project trained once and registered (@champion): the model to start from."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path_factory.mktemp("init-from")
    params = prepare_demo(write_params(root, SETTINGS))
    result = run_train(params)
    registry.register(params, run_id=result["run_id"])
    yield params, result
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def _with(params, over: dict):
    return write_params(params.root, SETTINGS, over)


def _weights(model) -> dict[str, list[np.ndarray]]:
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.training
def test_registered_model_gives_every_weight_and_a_new_head_when_the_head_or_classes_differ(trained):
    params, result = trained
    source = _weights(keras.models.load_model(params.path(params.paths.model), compile=False))
    fresh = _weights(build_from_params(params))

    p = _with(params, {"train": {"init_from": "models:/kfer-init-test@champion"}})
    init = load(p)
    assert init.source.startswith("models:/kfer-init-test/1 (run ") and result["run_id"] in init.source
    assert init.classes == p.class_names  # the photo pyfunc states its classes
    model = build_from_params(p)
    apply(model, init, p)
    got = _weights(model)
    assert set(got) == set(source) and all(_same(got[n], source[n]) for n in got)  # backbone and head
    assert init.rebuilt == [] and len(init.loaded) == len(got)

    # another head size: the backbone loaded, the head and the softmax as a fresh build draws them
    p = _with(params, {"train": {"init_from": "models:/kfer-init-test@champion"}, "model": {"head_units": 6}})
    model = build_from_params(p)
    new_fresh = _weights(build_from_params(p))
    init = load(p)
    apply(model, init, p)
    got = _weights(model)
    assert init.rebuilt == list(HEAD_LAYERS)
    for name in got:
        if name in HEAD_LAYERS:
            assert _same(got[name], new_fresh[name]) and not _same(got[name], source[name]), name
        else:
            assert _same(got[name], source[name]) and not _same(got[name], fresh[name]), name

    # another class list (one class fewer): the head kept, the softmax built anew
    classes = [c.model_dump() for c in params.classes][:-1]
    dropped = {k: params.class_names[0] for k, v in params.data.label_map.items() if v == params.class_names[-1]}
    p = _with(params, {"train": {"init_from": "models:/kfer-init-test/1"}, "classes": classes,
                       "data": {"label_map": dropped}})  # (label_map may not name the dropped class)
    model = build_from_params(p)
    init = load(p)
    apply(model, init, p)
    assert init.rebuilt == ["predictions"] and _same(_weights(model)["head"], source["head"])
    assert model.output_shape == (None, len(classes))


@pytest.mark.training
def test_a_run_model_and_a_local_file_are_sources_too(trained):
    params, result = trained
    source = _weights(keras.models.load_model(params.path(params.paths.model), compile=False))
    p = _with(params, {"train": {"init_from": f"runs:/{result['run_id']}/keras_model"}})
    init = load(p)
    model = build_from_params(p)
    apply(model, init, p)
    assert all(_same(w, source[n]) for n, w in _weights(model).items())
    assert init.classes is None or init.classes == p.class_names

    folder = params.path(params.paths.init_models)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(params.path(params.paths.model), folder / "public.keras")  # the served model: flip TTA unwrapped
    p = _with(params, {"train": {"init_from": "models/init/public.keras"}, "model": {"tta_flip": True}})
    init = load(p)
    assert init.source.startswith("models/init/public.keras (sha256 ") and init.classes is None
    model = build_from_params(p)
    apply(model, init, p)
    assert all(_same(w, source[n]) for n, w in _weights(model).items())


@pytest.mark.training
@pytest.mark.parametrize("over, message", [
    ({"model": {"base_width": 8}}, "is another architecture: it has conv1_conv of shapes"),
    ({"model": {"blocks": [1, 1, 1]}}, "is another architecture: it has no layer conv4_block1_"),
    ({"model": {"blocks": [1]}}, "is another architecture: it has layers"),
    ({"crop": {"image_size": 40}}, "takes 32x32x1 faces; params give 40x40x1"),
])
def test_another_architecture_or_input_is_one_clear_error(trained, over, message):
    params, _ = trained
    p = _with(params, {"train": {"init_from": "models:/kfer-init-test@champion"}, **over})
    with pytest.raises(InitError, match=message):
        load(p)  # checked against params' model when loaded: before kfer train starts its run


@pytest.mark.training
@pytest.mark.parametrize("spec, message", [
    ("models:/no-such-model@champion", "train.init_from models:/no-such-model@champion: "),
    ("elsewhere/model.keras", "must be inside paths.init_models"),
    ("models/init/missing.keras", "no such file"),
    ("models/init/README.md", "not a .keras file"),
])
def test_a_bad_source_is_one_clear_error(trained, spec, message):
    params, _ = trained
    with pytest.raises(InitError, match=message):
        load(_with(params, {"train": {"init_from": spec}}))


@pytest.mark.training
def test_kfer_train_fine_tunes_and_tracks_where_the_weights_came_from(trained):
    params, _ = trained
    p = _with(params, {"train": {"init_from": "models:/kfer-init-test@champion"}})
    result = run_train(p, run_name="fine-tune")
    run = mlflow.MlflowClient(tracking.tracking_uri(p)).get_run(result["run_id"])
    assert run.data.params["train.init_from"] == "models:/kfer-init-test@champion"
    assert run.data.tags[INIT_TAG] == "models:/kfer-init-test@champion"
    assert run.data.tags[INIT_SOURCE_TAG].startswith("models:/kfer-init-test/1 (run ")
    report = json.loads(p.path(p.paths.train_metrics).read_text(encoding="utf-8"))
    assert report["init_from"]["rebuilt"] == [] and report["init_from"]["layers_loaded"] > 10

    # the CLI: a source of another architecture is one line, exit 2, and no run is started
    n_runs = len(mlflow.MlflowClient(tracking.tracking_uri(p)).search_runs(
        [run.info.experiment_id]))
    proc = subprocess.run([sys.executable, "-m", "kfer.cli", "--set", "model.base_width=8", "train"], cwd=p.root,
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("Error: train.init_from models:/kfer-init-test@champion is another architecture")
    assert "Traceback" not in proc.stderr
    assert len(mlflow.MlflowClient(tracking.tracking_uri(p)).search_runs([run.info.experiment_id])) == n_runs


def test_dvc_sees_init_from_and_the_local_models_folder():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage in ("train", "tune"):
        assert "${paths.init_models}" in stages[stage]["deps"], stage
        assert "train.init_from" in stages[stage]["params"], stage
    assert (REPO / "models" / "init").is_dir()  # exists in a fresh clone: DVC needs the dependency to exist


@pytest.mark.training
def test_a_served_flip_tta_model_loads_in_a_fresh_process(trained, tmp_path):
    """The served model of the real-faces recipe has flip TTA (a HorizontalFlip layer): `kfer train` in a new
    process must be able to load it as train.init_from (nothing else there has imported kfer.serving.layers)."""
    from kfer.serving.layers import with_flip_tta

    params, _ = trained
    folder = params.path(params.paths.init_models)
    folder.mkdir(parents=True, exist_ok=True)
    with_flip_tta(build_from_params(params)).save(folder / "tta.keras")
    _with(params, {"train": {"init_from": "models/init/tta.keras"}})
    code = ("from kfer.config import load_params; from kfer.training.init import load; "
            "print(load(load_params('params.yaml')).source)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=params.root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("models/init/tta.keras (sha256 ")
    _with(params, {})
