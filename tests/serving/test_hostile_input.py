"""Hostile input to the served path (issue 34): a photo whose header claims 30000×30000 pixels among good ones,
and a video whose frames are over the limit. ``kfer predict`` answers the rest and names the file in one line;
the served model refuses the request with an error naming the row, a client's error (HTTP 400).

One tiny photo model, logged with ``crop.max_megapixels: 0.05`` (so that a 320×240 video is over it and a
160×120 one is not): the limit travels in the model's config.json, not in the params of whoever loads it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kfer.demo.hostile import BOMB_SIDE, bomb_jpeg, bomb_png
from tests.helpers import params_at, store_folder, tiny_model

LIMIT = 0.05  # MP: 160×120 (0.019) is under it, 320×240 (0.077) over it
BOMB_DETAIL = f"{BOMB_SIDE}x{BOMB_SIDE} = 900.0 MP > crop.max_megapixels {LIMIT:g}"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(params file, model URI, root) of a tiny photo model logged with crop.max_megapixels LIMIT."""
    import mlflow

    from kfer import tracking
    from kfer.serving.publish import log_models

    root = tmp_path_factory.mktemp("hostile-store")
    with store_folder(root):
        params = params_at(root, {"crop": {"max_megapixels": LIMIT}})
        mlflow.set_tracking_uri(tracking.tracking_uri(params))
        with tracking.tracked_run(params, "hostile-model"):
            uri = log_models(tiny_model(len(params.classes), 5), params)["model_uri"]
        yield next(root.glob("params-*.yaml")), uri, root


def _jpeg(w: int, h: int) -> bytes:
    import cv2

    return cv2.imencode(".jpg", np.full((h, w, 3), 200, np.uint8))[1].tobytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_the_served_model_refuses_a_bomb_row_naming_it_as_a_client_error(model):
    import mlflow
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    _, uri, _ = model
    config = json.loads((Path(mlflow.artifacts.download_artifacts(uri)) / "artifacts" / "config.json")
                        .read_text(encoding="utf-8"))
    assert config["crop"]["max_megapixels"] == LIMIT  # the limit travels with the model

    photo = mlflow.pyfunc.load_model(uri)
    good = _b64(_jpeg(160, 120))
    assert len(photo.predict(pd.DataFrame({"image": [good, good]}))) == 0  # no face, no error
    for bomb in (bomb_png(), bomb_jpeg()):
        with pytest.raises(MlflowException) as exc:
            photo.predict(pd.DataFrame({"image": [good, _b64(bomb), good]}))
        assert exc.value.message == (f"row 1: the photo is refused before decoding (too_many_pixels: "
                                     f"{BOMB_DETAIL})")
        # what `mlflow models serve` answers with (scoring_server: e.get_http_status_code()): a client's error
        assert exc.value.error_code == "INVALID_PARAMETER_VALUE" and exc.value.get_http_status_code() == 400
    # an ordinary photo over the model's limit is refused the same way, an undecodable one as before
    with pytest.raises(MlflowException, match=r"^row 0: the photo is refused before decoding \(too_many_pixels: "
                                              r"320x240 = 0\.1 MP > crop\.max_megapixels 0\.05\)$"):
        photo.predict(pd.DataFrame({"image": [_b64(_jpeg(320, 240))]}))
    with pytest.raises(MlflowException, match=r"^row 2: the photo cannot be decoded \(not_an_image"):
        photo.predict(pd.DataFrame({"image": [good, good, _b64(b"certainly not a photo")]}))


def _kfer(model, *args):
    from click.testing import CliRunner

    from kfer.cli import main

    params_file, uri, _ = model
    return CliRunner().invoke(main, ["--params", str(params_file), "predict", "--model", uri, *args])


def test_predict_names_the_bomb_in_one_line_and_answers_the_rest(model, tmp_path):
    bomb, photo, jbomb = tmp_path / "bomb.png", tmp_path / "photo.jpg", tmp_path / "bomb.jpg"
    bomb.write_bytes(bomb_png())
    photo.write_bytes(_jpeg(160, 120))
    jbomb.write_bytes(bomb_jpeg())
    res = _kfer(model, str(bomb), str(photo), str(jbomb))
    assert res.exit_code == 1, res.output  # as for any photo that cannot be read: the others answered
    assert "Traceback" not in res.output and "DecompressionBomb" not in res.output
    assert f"{bomb}: ERROR too_many_pixels: {BOMB_DETAIL}" in res.output.splitlines()
    assert f"{jbomb}: ERROR too_many_pixels: {BOMB_DETAIL}" in res.output.splitlines()
    assert f"{photo}: no face found" in res.output.splitlines()

    res = _kfer(model, "--json", str(bomb), str(photo))
    results = json.loads(res.output[res.output.index("[\n"):])
    assert res.exit_code == 1
    assert [r["error"] for r in results] == [f"too_many_pixels: {BOMB_DETAIL}", None]


def test_a_video_over_the_limit_is_refused_in_one_line_and_the_rest_analysed(model, tmp_path):
    from kfer.demo.video import write_demo_video

    big, small, photo = tmp_path / "big.mp4", tmp_path / "small.mp4", tmp_path / "photo.jpg"
    write_demo_video(big, [], 4, fps=10, size=(320, 240))
    write_demo_video(small, [], 4, fps=10, size=(160, 120))
    photo.write_bytes(_jpeg(160, 120))
    out = tmp_path / "out"
    res = _kfer(model, str(photo), str(big), str(small), "--out", str(out), "--annotate-dir", str(out))
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = res.output.splitlines()
    assert f"{big}: ERROR too_many_pixels: 320x240 = 0.1 MP > crop.max_megapixels {LIMIT:g}" in lines
    assert f"{small}: 4 frames read, 2 analysed" in res.output  # (after its progress bar, on the same line here)
    assert f"{photo}: no face found" in lines
    assert sorted(p.name for p in out.iterdir()) == ["photo.pred.jpg", "small.faces.csv", "small.pred.mp4",
                                                      "small.timeline.png"]  # nothing of big.mp4

    res = _kfer(model, "--json", str(big), str(small), "--out", str(tmp_path / "json"))
    assert res.exit_code == 1
    summaries = json.loads(res.output[res.output.index("[\n"):])
    assert summaries[0]["video"] == str(big) and summaries[0]["error"].startswith("too_many_pixels: 320x240")
    assert summaries[0]["frames_read"] == 0 and summaries[1]["error"] == "" and summaries[1]["frames_read"] == 4
