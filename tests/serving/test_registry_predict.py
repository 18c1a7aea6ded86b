"""Model tests of kfer.serving.registry and kfer.serving.predict, and of the model server, on a real MLflow
SQLite store.

One store per module (tiny models, logged once): two FINISHED runs with photo models whose validation and test
metrics disagree, a FAILED run and a run without a model that would win on the metric but are not eligible.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from kfer.demo.hostile import bomb_png
from tests.helpers import (
    MLFLOW_ENV,
    SHARED_DATA,
    free_port,
    params_at,
    shared_dir,
    store_folder,
    subprocess_env,
    tiny_model,
)

SERVER_START_TIMEOUT_S = 120


RAW_MD5, SPLITS_MD5 = "0123abcd0123abcd0123abcd0123abcd.dir", "89ab89ab89ab89ab89ab89ab89ab89ab"


def write_lineage(root: Path, raw_md5: str = RAW_MD5, splits_md5: str | None = SPLITS_MD5) -> None:
    """A data.dvc and a dvc.lock under root, as `dvc add` / `dvc repro` write them: the current data lineage."""
    (root / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": raw_md5, "path": "data/raw"}]}))
    stages = {"crop": {"outs": [{"path": "data/cropped", "md5": "4567ef014567ef014567ef014567ef01.dir"}]}}
    if splits_md5:
        stages["split"] = {"outs": [{"path": "data/splits.csv", "md5": splits_md5}]}
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))


def blank_jpeg() -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.full((120, 160, 3), 200, np.uint8))
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The module's store: runs a (val 0.5, test 0.95), b (val 0.8, test 0.1), failed (val 0.99), nomodel (0.97) on
    the current data lineage (write_lineage), and other (val 0.9, a model) trained on another splits.csv."""
    import mlflow

    from kfer import tracking
    from kfer.serving.publish import log_models

    root = tmp_path_factory.mktemp("registry")
    with store_folder(root):
        write_lineage(root)  # every run below gets these hashes as tags (tracking.lineage_tags)
        params = params_at(root)
        uri = tracking.tracking_uri(params)
        mlflow.set_tracking_uri(uri)
        mlflow.create_experiment(params.train.experiment,
                                 artifact_location=params.path(params.paths.mlflow_artifacts).resolve().as_uri())
        lineage = {"data.data.md5": "0123abcd", "dvc.crop.data/cropped": "4567ef01"}
        runs = {}
        for key, seed, val, test, loss in (("a", 1, 0.5, 0.95, 0.9), ("b", 2, 0.8, 0.1, 1.2)):
            with tracking.tracked_run(params, f"run-{key}", tags=lineage) as run:
                uris = log_models(tiny_model(len(params.classes), seed), params)
                mlflow.set_tags({tracking.MODEL_URI_TAG: uris["model_uri"],
                                 tracking.KERAS_URI_TAG: uris["keras_model_uri"]})
                mlflow.log_metrics({"best_val_macro_f1": val, "best_val_accuracy": val + 0.05,
                                    "best_val_loss": loss, "test_macro_f1": test})
            runs[key] = run.info.run_id
        with pytest.raises(RuntimeError), tracking.tracked_run(params, "run-failed") as run:
            mlflow.set_tag(tracking.MODEL_URI_TAG, "models:/m-0000000000000000000000000000dead")
            mlflow.log_metric("best_val_macro_f1", 0.99)
            raise RuntimeError("training crashed")
        runs["failed"] = run.info.run_id
        with tracking.tracked_run(params, "run-nomodel") as run:
            mlflow.log_metric("best_val_macro_f1", 0.97)
        runs["nomodel"] = run.info.run_id
        other = {**lineage, "dvc.split.data/splits.csv": "ffff0000ffff0000ffff0000ffff0000"}  # another split
        with tracking.tracked_run(params, "run-other-data", tags=other) as run:
            uris = log_models(tiny_model(len(params.classes), 3), params)
            mlflow.set_tags({tracking.MODEL_URI_TAG: uris["model_uri"],
                             tracking.KERAS_URI_TAG: uris["keras_model_uri"]})
            mlflow.log_metrics({"best_val_macro_f1": 0.9, "best_val_loss": 2.0})
        runs["other"] = run.info.run_id
        yield {"params": params, "runs": runs, "uri": uri, "root": root}


def versions(name: str):
    from mlflow import MlflowClient

    return sorted(MlflowClient().search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def test_register_picks_best_validation_run_and_is_idempotent(store):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from kfer.serving.registry import CHAMPION, RegistryError, register

    params, runs = store["params"], store["runs"]
    name = params.train.registered_model
    client = MlflowClient()

    # b: best validation F1 (a has the better TEST F1; failed/nomodel are not eligible; other is on other data)
    mv = register(params)
    assert mv.run_id == runs["b"] and int(mv.version) == 1
    assert mv.source == client.get_run(runs["b"]).data.tags["kfer.model_uri"]
    assert int(client.get_model_version_by_alias(name, CHAMPION).version) == 1
    assert mv.tags["best_val_macro_f1"] == "0.8" and mv.tags["test_macro_f1"] == "0.1"
    assert mv.tags["best_val_loss"] == "1.2" and "best_val_accuracy" in mv.tags
    assert mv.tags["data.data.md5"] == "0123abcd" and mv.tags["dvc.crop.data/cropped"] == "4567ef01"
    assert mv.tags["dvc.data.dvc"] == RAW_MD5 and mv.tags["dvc.split.data/splits.csv"] == SPLITS_MD5
    assert "git.commit" in mv.tags and mv.tags["kfer.selected_by"] == "best_val_macro_f1"

    assert int(register(params).version) == 1  # idempotent: no second version for the same run
    assert [int(v.version) for v in versions(name)] == [1]

    mv_a = register(params, run_id=runs["a"])  # explicit run: a new version, the alias follows
    assert int(mv_a.version) == 2 and mv_a.run_id == runs["a"]
    assert mv_a.tags["kfer.selected_by"] == "explicit run id"
    assert int(client.get_model_version_by_alias(name, CHAMPION).version) == 2
    assert int(register(params, run_id=runs["a"]).version) == 2
    assert int(register(params, metric="best_val_loss").version) == 2  # loss: lowest wins (a: 0.9 < b: 1.2)
    assert int(register(params).version) == 1  # back to the best F1, reusing version 1
    assert [int(v.version) for v in versions(name)] == [1, 2]
    assert int(client.get_model_version_by_alias(name, CHAMPION).version) == 1

    with pytest.raises(RegistryError, match="never a test metric"):
        register(params, metric="test_macro_f1")
    with pytest.raises(RegistryError, match="FAILED"):
        register(params, run_id=runs["failed"])
    with pytest.raises(RegistryError, match="no photo model"):
        register(params, run_id=runs["nomodel"])
    with pytest.raises(RegistryError, match="not found"):
        register(params, run_id="0" * 32)
    with pytest.raises(RegistryError, match="no MLflow experiment"):
        register(params_at(store["root"], {"train": {"experiment": "nothing-here"}}))

    # the champion loads by alias and is the photo model of run b
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    assert model.metadata.run_id == runs["b"]
    assert model.unwrap_python_model().predict_bgr(np.full((90, 120, 3), 200, np.uint8)) == []


def test_register_picks_among_runs_of_the_current_data_lineage(store, tmp_path, monkeypatch, caplog):
    import logging

    from click.testing import CliRunner
    from mlflow import MlflowClient

    from kfer.cli import main
    from kfer.serving.registry import (
        CHAMPION,
        RegistryError,
        best_run,
        data_lineage,
        register,
    )

    params, runs = store["params"], store["runs"]
    name = params.train.registered_model
    client = MlflowClient()
    assert data_lineage(params) == {"dvc.data.dvc": RAW_MD5, "dvc.split.data/splits.csv": SPLITS_MD5}
    assert best_run(params).info.run_id == runs["b"]  # other (0.9) beats b (0.8) but saw another split
    assert best_run(params, any_data=True).info.run_id == runs["other"]
    assert best_run(params, "best_val_loss", any_data=True).info.run_id == runs["a"]

    # the CLI: --any-data widens the choice to every run; without it, back to the current lineage
    params_file = store["root"] / f"params-{abs(hash(json.dumps(None, sort_keys=True)))}.yaml"
    assert params_file.is_file()
    res = CliRunner().invoke(main, ["--params", str(params_file), "register", "--any-data"])
    assert res.exit_code == 0, res.output
    mv = client.get_model_version_by_alias(name, CHAMPION)
    assert mv.run_id == runs["other"] and mv.tags["kfer.selected_by"] == "best_val_macro_f1 (any data)"
    # it prints the validation score it chose by, and that no behaviour checks were logged for this run
    assert "  best_val_macro_f1 0.9000\n  behaviour: not checked" in res.output
    for metric, value in {"behaviour_mirror_same": 1.0, "behaviour_mirror_accuracy": 0.75,
                          "behaviour_jpeg30_same": 0.9, "behaviour_jpeg30_accuracy": 0.7,
                          "behaviour_min_same": 0.9, "test_accuracy": 0.75}.items():
        client.log_metric(runs["b"], metric, value)  # as kfer evaluate logs them into the training run
    client.log_text(runs["b"], "# Model card: b\n", "model_card.md")  # as train and evaluate log it
    res = CliRunner().invoke(main, ["--params", str(params_file), "register"])
    assert res.exit_code == 0, res.output
    assert client.get_model_version_by_alias(name, CHAMPION).run_id == runs["b"]
    assert ("  best_val_macro_f1 0.8000, test_accuracy 0.7500\n  behaviour: mirror 100.0% same (acc 0.750), "
            "jpeg30 90.0% same (acc 0.700)") in res.output
    # the run's model card is the version's description; the version of a run without one has none
    assert client.get_model_version_by_alias(name, CHAMPION).description == "# Model card: b\n"
    assert not client.get_model_version(name, mv.version).description

    # the tuned (or an explicit) run is registered whatever its data, with a warning when it is not current
    summary = params.path(params.paths.tune_summary)
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps({"best_run_id": runs["other"], "best_trial": 3, "study_name": "s",
                                   "metric": "val_macro_f1"}), encoding="utf-8")
    try:
        with caplog.at_level(logging.WARNING, logger="kfer.serving.registry"):
            assert register(params, tuned=True).run_id == runs["other"]
        assert any("not trained on the current data" in r.getMessage() and runs["other"] in r.getMessage()
                   for r in caplog.records)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kfer.serving.registry"):
            assert register(params, run_id=runs["a"]).run_id == runs["a"]  # current lineage: no warning
        assert not [r for r in caplog.records if "not trained on the current data" in r.getMessage()]
    finally:
        summary.unlink()
    assert register(params).run_id == runs["b"]

    # a workspace whose dvc.lock names another splits.csv: no run matches, one line that names --any-data
    monkeypatch.setenv(MLFLOW_ENV, store["uri"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_lineage(elsewhere, splits_md5="1111222211112222111122221111aaaa")
    moved = params_at(elsewhere)
    with pytest.raises(RegistryError, match="none of the 3 eligible runs") as err:
        register(moved)
    assert "--any-data" in str(err.value) and "\n" not in str(err.value)
    assert best_run(moved, any_data=True).info.run_id == runs["other"]
    write_lineage(elsewhere, splits_md5=None)  # no split stage in dvc.lock: the lineage is unknown
    with pytest.raises(RegistryError, match="cannot tell the current data lineage.*--any-data"):
        register(params_at(elsewhere))


def test_register_without_eligible_runs(store, tmp_path):
    import mlflow

    from kfer.serving.registry import RegistryError, register

    params = params_at(store["root"], {"train": {"experiment": "empty"}})
    mlflow.set_tracking_uri(store["uri"])
    mlflow.create_experiment("empty", artifact_location=(tmp_path / "a").as_uri())
    with pytest.raises(RegistryError, match="no FINISHED run"):
        register(params)


def test_predict_photos_generated_image(store, tmp_path):
    from kfer.serving.predict import format_results, predict_photos
    from kfer.serving.registry import register

    register(store["params"])
    blank = tmp_path / "빈 사진.jpg"  # non-ASCII path on purpose
    blank.write_bytes(blank_jpeg())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    results = predict_photos([blank, broken], None, store["params"], annotate_dir=tmp_path / "out")
    assert results[0]["faces"] == [] and results[0]["n_faces"] == 0 and results[0]["error"] is None
    assert Path(results[0]["annotated"]).is_file()
    assert results[1]["error"] and "annotated" not in results[1]
    text = format_results(results)
    assert "no face found" in text and "ERROR" in text
    assert json.loads(format_results(results, as_json=True))[1]["photo"] == str(broken)


@pytest.fixture
def face_photos() -> Path:
    return shared_dir("face_detection")


def test_predict_photos_real_photo(face_photos, store, tmp_path):
    import cv2

    from kfer.serving.predict import format_results, predict_photos
    from kfer.serving.registry import register

    folder = face_photos
    params = store["params"]
    mv = register(params)
    photos = [folder / "fr_two_people.jpg", folder / "pf_free-mountain-vector-01.jpg"]
    results = predict_photos(photos, None, params, annotate_dir=tmp_path / "annotated")
    two, none = results
    assert two["n_faces"] == 2 and len(two["faces"]) == 2 and none["faces"] == []
    ko = {c.name: c.ko for c in params.classes}
    for i, face in enumerate(two["faces"]):
        assert face["face"] == i and face["label"] in params.class_names
        assert face["label_ko"] == ko[face["label"]]
        assert list(face["probabilities"]) == params.class_names
        assert face["probability"] == max(face["probabilities"].values())
        assert abs(sum(face["probabilities"].values()) - 1) < 1e-4
    img = cv2.imdecode(np.fromfile(two["annotated"], np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[:2] == (661, 1126)

    text = format_results(results)
    assert "fr_two_people.jpg: 2 face(s)" in text and two["faces"][0]["label_ko"] in text
    assert json.loads(format_results(results, as_json=True))[0]["faces"][1]["box"] == two["faces"][1]["box"]

    # an explicit URI (the LoggedModel itself) gives the same answer
    again = predict_photos(photos[:1], mv.source, params)
    assert [f["label"] for f in again[0]["faces"]] == [f["label"] for f in two["faces"]]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.slow
def test_model_server_serves_the_champion(store, tmp_path):
    from kfer.serving.registry import register

    params = store["params"]
    register(params)
    name = params.train.registered_model
    port = free_port()
    log_path = tmp_path / "server.log"
    # `mlflow models serve` execs `uvicorn` by name: subprocess_env puts the venv's bin on PATH
    env = subprocess_env(**{MLFLOW_ENV: store["uri"]}, MLFLOW_DISABLE_TELEMETRY="true", TF_CPP_MIN_LOG_LEVEL="2")
    real = (SHARED_DATA / "face_detection" / "fr_two_people.jpg")
    rows = [[base64.b64encode(blank_jpeg()).decode()]]
    if real.is_file():
        rows.insert(0, [base64.b64encode(real.read_bytes()).decode()])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=store["root"], start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /ping after {SERVER_START_TIMEOUT_S}s:\n" \
                                                f"{log_path.read_text()[-3000:]}"
            time.sleep(0.5)

        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": rows}})
        assert status == 200, body
        preds = body["predictions"]
        if real.is_file():
            assert len(preds) == 2 and {p["image"] for p in preds} == {0}
        else:
            assert preds == []
        for p in preds:
            assert p["label"] in params.class_names and p["label_ko"]
            assert abs(sum(p[f"p_{c}"] for c in params.class_names) - 1) < 1e-4

        status, body = _post(f"{base}/invocations",
                             {"dataframe_split": {"columns": ["image"], "data": [["%%% not base64"]]}})
        assert status == 400 and "row 0" in body.get("message", ""), body
        # a photo whose header claims 30000x30000 pixels among good ones: a client's error naming its row
        bomb = base64.b64encode(bomb_png()).decode()
        good = base64.b64encode(blank_jpeg()).decode()
        status, body = _post(f"{base}/invocations",
                             {"dataframe_split": {"columns": ["image"], "data": [[good], [bomb], [good]]}})
        assert status == 400 and body.get("error_code") == "INVALID_PARAMETER_VALUE", body
        assert "row 1: the photo is refused before decoding (too_many_pixels: 30000x30000" in body["message"], body
    finally:  # the server's own session: its uvicorn worker goes with it
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
