"""``kfer predict`` on videos and cameras (kfer.serving.video):
a generated video of two synthetic faces, a tiny photo model.

The video (3 s at 10 fps, 320×240, mp4v): face A moves right over frames 0–11 and 15–29, face B left over frames
5–11 and 15–29, no face on frames 12–14. The default sampling at 10 fps is every 2nd frame: 15 analysed frames, of
which 12 and 14 show no face; both faces come back after those 2 missed samples and keep their ids.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import params_at, store_folder, tiny_model

FPS, N_FRAMES = 10.0, 30
GAP = range(12, 15)  # frames without a face


def _faces():
    from kfer.demo.video import MovingFace

    def along(person, expr, x0, dx, y, ranges):  # one face moving dx px per frame, hidden outside ranges
        return [MovingFace(person, expr, (x0 + a * dx, y), (x0 + (b - 1) * dx, y), a, b, head_height=85)
                for a, b in ranges]

    return along(0, "joy", 70, 1.5, 105, [(0, 12), (15, 30)]) + along(1, "anger", 250, -1.0, 110, [(5, 12), (15, 30)])


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    from kfer.demo.video import write_demo_video

    path = tmp_path_factory.mktemp("video") / "두 사람.mp4"  # non-ASCII on purpose
    info = write_demo_video(path, _faces(), N_FRAMES, FPS)
    assert [info["faces_per_frame"][i] for i in (0, 6, 12, 16)] == [1, 2, 0, 2]
    return path


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory):
    """A tiny untrained photo model logged in a store of its own: (params file, model URI, loaded model)."""
    import mlflow

    from kfer import tracking
    from kfer.serving.predict import load_photo_model
    from kfer.serving.publish import log_models

    root = tmp_path_factory.mktemp("video-store")
    with store_folder(root):
        params = params_at(root)
        mlflow.set_tracking_uri(tracking.tracking_uri(params))
        with tracking.tracked_run(params, "video-model"):
            uri = log_models(tiny_model(len(params.classes), 7), params)["model_uri"]
        params_file = next(root.glob("params-*.yaml"))
        yield params_file, uri, load_photo_model(uri, params)


def _kfer(photo_model, *args):
    from click.testing import CliRunner

    from kfer.cli import main

    params_file, uri, _ = photo_model
    return CliRunner().invoke(main, ["--params", str(params_file), "predict", "--model", uri, *args])


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# --- the tracker ------------------------------------------------------------------------------------------

def test_tracker_keeps_ids_of_moving_boxes_and_across_missed_frames():
    from kfer.serving.video import MAX_MISSED, IoUTracker

    t = IoUTracker()
    assert t.update([(0, 0, 10, 10), (50, 50, 60, 60)]) == [1, 2]
    assert t.update([(52, 50, 62, 60), (2, 0, 12, 10)]) == [2, 1]  # order of the detections does not matter
    for _ in range(MAX_MISSED):  # unseen for MAX_MISSED sampled frames: still alive
        assert t.update([]) == []
    assert t.update([(3, 1, 13, 11), (52, 50, 62, 60)]) == [1, 2]  # both back: same ids
    for _ in range(MAX_MISSED):
        t.update([(3, 1, 13, 11)])
    assert t.live == [1, 2]
    t.update([(3, 1, 13, 11)])
    assert t.live == [1]  # 2 was missed MAX_MISSED + 1 times in a row: ended
    assert t.update([(52, 50, 62, 60)]) == [3] and t.n_tracks == 3  # ids are never reused


def test_tracker_threshold_and_greedy_matching():
    from kfer.serving.video import IOU_THRESHOLD, IoUTracker

    t = IoUTracker()
    t.update([(0, 0, 10, 10)])
    assert t.update([(8, 0, 18, 10)]) == [2]  # IoU 2/18 < threshold: a new face
    assert IOU_THRESHOLD > 2 / 18
    t = IoUTracker()
    t.update([(0, 0, 10, 10)])
    # two candidates for track 1: the better overlap takes it, the other starts a track
    assert t.update([(3, 0, 13, 10), (1, 0, 11, 10)]) == [2, 1]
    assert IoUTracker(iou_threshold=0.1).update([]) == []


def test_small_helpers():
    from kfer.serving.video import default_every, is_video, parse_source, source_name

    assert [default_every(f) for f in (30, 25, 10, 5, 2, 0)] == [6, 5, 2, 1, 1, 1]
    assert is_video("a/B.MP4") and is_video("x.webm") and not is_video("photo.jpg")
    assert parse_source("0") == 0 and parse_source(" 2 ") == 2 and parse_source("rtsp://h/s") == "rtsp://h/s"
    assert source_name(0) == "camera0" and source_name("rtsp://h/s") == "stream" and source_name("d/v.avi") == "v"


# --- videos end to end ------------------------------------------------------------------------------------

def test_predict_video_csv_timeline_and_annotated_video(photo_model, video, tmp_path):
    import cv2

    res = _kfer(photo_model, str(video), "--out", str(tmp_path / "out"), "--annotate-dir", str(tmp_path / "ann"))
    assert res.exit_code == 0, res.output
    csv_path = tmp_path / "out" / "두 사람.faces.csv"
    line = res.output.rpartition(f"{video}: ")[2]  # the summary, after the progress bar on stderr
    assert "30 frames read, 15 analysed (every 2, 10 fps), 23 faces in 2 tracks" in line
    assert "2 analysed frames without a face" in line and str(csv_path) in line

    rows = _rows(csv_path)
    classes = photo_model[2].class_names
    assert list(rows[0]) == ["frame", "time_s", "face_id", "x0", "y0", "x1", "y1", "label", "label_ko",
                             "probability", *(f"p_{c}" for c in classes)]
    frames = sorted({int(r["frame"]) for r in rows})
    assert frames == [f for f in range(0, N_FRAMES, 2) if f not in GAP]
    for r in rows:
        assert float(r["time_s"]) == pytest.approx(int(r["frame"]) / FPS)
        p = np.array([float(r[f"p_{c}"]) for c in classes])
        assert abs(p.sum() - 1) < 1e-4 and r["label"] == classes[int(p.argmax())]
        assert float(r["probability"]) == pytest.approx(p.max(), abs=1e-6)
    # two moving faces -> two ids, each on its own side of the frame, kept across the faceless frames 12-14
    by_id: dict[str, list] = {}
    for r in rows:
        by_id.setdefault(r["face_id"], []).append(r)
    assert sorted(by_id) == ["1", "2"]
    a, b = by_id["1"], by_id["2"]
    assert len(a) == 13 and len(b) == 10
    assert all(int(r["x1"]) < 160 for r in a) and all(int(r["x0"]) > 160 for r in b)
    assert int(a[-1]["x0"]) > int(a[0]["x0"]) and int(b[-1]["x0"]) < int(b[0]["x0"])  # moving as drawn

    timeline = tmp_path / "out" / "두 사람.timeline.png"
    img = cv2.imdecode(np.fromfile(timeline, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] > 400 and img.shape[1] > 800
    assert timeline.stat().st_size > 20_000 and img.std() > 10  # drawn, not blank

    cap = cv2.VideoCapture(str(tmp_path / "ann" / "두 사람.pred.mp4"))
    assert cap.isOpened() and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(FPS)
    n, first = 0, None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        first = frame if first is None else first
        n += 1
    cap.release()
    assert n == N_FRAMES and first.shape == (240, 320, 3)
    assert not list((tmp_path / "ann").glob(".*"))  # no temporary file left


def test_predict_video_json_and_every(photo_model, video, tmp_path):
    import json

    res = _kfer(photo_model, str(video), "--out", str(tmp_path), "--every", "5", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # the progress bar goes to stderr
    assert len(out) == 1 and out[0]["video"] == str(video)
    assert out[0]["every"] == 5 and out[0]["frames_analysed"] == 6 and out[0]["frames_without_face"] == 0
    assert {int(r["frame"]) for r in _rows(tmp_path / "두 사람.faces.csv")} == {0, 5, 10, 15, 20, 25}


@pytest.mark.parametrize("content", [b"\x00\x01garbage" * 300, b""], ids=["garbage", "empty"])
def test_unreadable_video_is_one_line_error(photo_model, tmp_path, content):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(content)
    res = _kfer(photo_model, str(bad), "--out", str(tmp_path))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "broken.mp4" in lines[0]
    assert "cannot open it as a video" in lines[0]
    assert not list(tmp_path.glob("*.csv"))


def test_camera_path_on_the_same_file_gives_the_same_csv(photo_model, video, tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert _kfer(photo_model, str(video), "--out", str(tmp_path / "file")).exit_code == 0
    res = _kfer(photo_model, "--camera", str(video), "--out", str(tmp_path / "camera"))
    assert res.exit_code == 0, res.output
    file_csv, cam_csv = tmp_path / "file" / "두 사람.faces.csv", tmp_path / "camera" / "두 사람.faces.csv"
    assert cam_csv.read_bytes() == file_csv.read_bytes()
    assert "15 analysed" in res.output


def test_no_display_falls_back_to_the_csv(photo_model, video, tmp_path, monkeypatch):
    """DISPLAY set but a headless OpenCV (the wheel kfer pins): cv2.imshow raises, the loop goes on without."""
    import cv2

    from kfer.serving.video import analyse_video

    monkeypatch.setenv("DISPLAY", ":97")

    def no_gui(*_args):
        raise cv2.error("The function is not implemented (headless build)")

    monkeypatch.setattr(cv2, "imshow", no_gui)
    summary = analyse_video(str(video), photo_model[2], tmp_path, show=True, progress=False, timeline=False)
    assert not summary.shown and summary.frames_analysed == 15 and len(_rows(tmp_path / "두 사람.faces.csv")) == 23


def test_ctrl_c_mid_stream_leaves_a_complete_csv_and_the_summary(photo_model, video, tmp_path, monkeypatch):
    from kfer.serving.video import analyse_video

    full = analyse_video(str(video), photo_model[2], tmp_path / "full", progress=False, timeline=False)
    seen = []

    def stop_after_4(frame, faces):
        seen.append(frame)
        if len(seen) == 4:
            raise KeyboardInterrupt

    cut = analyse_video(str(video), photo_model[2], tmp_path / "cut", annotate_dir=tmp_path / "cut",
                        on_frame=stop_after_4, progress=False)
    assert cut.interrupted and cut.frames_analysed == 4 and cut.frames_read == 7
    assert "stopped by Ctrl-C" in cut.line() and "4 analysed" in cut.line()
    rows, all_rows = _rows(Path(cut.csv)), _rows(Path(full.csv))
    assert rows == all_rows[:len(rows)] and {r["frame"] for r in rows} == {"0", "2", "4", "6"}
    assert Path(cut.timeline).stat().st_size > 10_000 and Path(cut.annotated).is_file()

    # through the CLI: Ctrl-C on the camera is its normal end (exit 0), with the summary printed
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    model_class = type(photo_model[2])
    real = model_class.predict_bgr
    calls = []

    def interrupted(self, bgr):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, bgr)

    monkeypatch.setattr(model_class, "predict_bgr", interrupted)
    res = _kfer(photo_model, "--camera", str(video), "--out", str(tmp_path / "cli"))
    assert res.exit_code == 0, res.output
    assert "stopped by Ctrl-C" in res.output and "2 analysed" in res.output
    assert {r["frame"] for r in _rows(tmp_path / "cli" / "두 사람.faces.csv")} == {"0", "2"}


def test_large_faces_in_hd_video_are_one_track_each(photo_model, tmp_path):
    """At 1280×720 with 200-px heads the SSD also finds a smaller box inside each face (97 of 150 frames):
    without faces.drop_nested a third track appears."""
    from kfer.demo.video import MovingFace, write_demo_video
    from kfer.serving.video import analyse_video

    faces = [MovingFace(0, "joy", (160, 300), (480, 300), 0, 60, head_height=200),
             MovingFace(1, "anger", (1100, 320), (800, 320), 10, 60, head_height=180)]
    path = tmp_path / "hd.mp4"
    write_demo_video(path, faces, 60, fps=30, size=(1280, 720))
    summary = analyse_video(path, photo_model[2], tmp_path, progress=False, timeline=False)
    assert summary.frames_analysed == 10 and summary.tracks == 2
    assert summary.faces == 10 + 8  # face B enters at frame 10: analysed frames 12, 18, ..., 54


def test_missing_camera_is_one_line_error(photo_model):
    res = _kfer(photo_model, "--camera", "97")
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "camera 97" in errors[0] and "no such camera" in errors[0]
    assert "Traceback" not in res.output
