"""The crop stage on generated photos (every kind of bad input) and on the real TFEID photos."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from kfer.catalog import MANIFEST_NAME as MANIFEST
from kfer.data.crop import run_crop
from kfer.demo.hostile import bomb_jpeg, bomb_png
from tests.helpers import shared_dir, subprocess_env

KO = {"joy": "기쁨", "anger": "분노", "sadness": "슬픔", "neutral": "중립"}


def _face_photo(rng: np.random.Generator, w=320, h=240):
    """A face-ish drawing at a random place; returns the image and its face box."""
    img = np.full((h, w, 3), rng.integers(30, 220, 3), np.uint8)
    r = int(rng.integers(30, 60))
    cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
    cv2.ellipse(img, (cx, cy), (r, int(r * 1.25)), 0, 0, 360, (160, 180, 220), -1)
    for dx in (-r // 3, r // 3):
        cv2.circle(img, (cx + dx, cy - r // 4), max(2, r // 8), (40, 40, 40), -1)
    cv2.ellipse(img, (cx, cy + r // 2), (r // 3, r // 6), 0, 0, 180, (30, 30, 120), 2)
    return img, (cx - r, cy - int(r * 1.25), cx + r, cy + int(r * 1.25))


def _annot(label, box):
    return {"faceExp": label, "boxes": dict(zip(("minX", "minY", "maxX", "maxY"), map(float, box)))}


def make_aihub_raw(raw: Path, persons=4, per_class=2, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    labels = []
    for p in range(persons):
        title = f"{p:064x}"
        for ko in KO.values():
            for k in range(per_class):
                img, box = _face_photo(rng)
                name = f"{title}_여_20_{ko}_2021010100{p:02d}{k:02d}-001-00{k}.jpg"
                (raw / name).write_bytes(cv2.imencode(".jpg", img)[1].tobytes())
                labels.append({"filename": name, "faceExp_uploader": ko,
                               "annot_A": _annot(ko, box), "annot_B": _annot(ko, box), "annot_C": _annot(ko, box)})
    (raw / "labels.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
    return labels


def add_bad_files(raw: Path) -> dict[str, str]:
    """One file per skip reason (or conversion), named in the AI Hub convention."""
    t = "b" * 64
    name = lambda i: f"{t}_남_30_기쁨_20210101{i:06d}.jpg"  # noqa: E731
    good = cv2.imencode(".jpg", _face_photo(np.random.default_rng(9))[0])[1].tobytes()
    files = {
        name(1): b"",                           # zero bytes
        name(2): b"plain text, not an image",   # non-image content with an image name
        name(3): good[: len(good) // 2],        # truncated
        name(4): np.random.default_rng(1).integers(0, 255, (60, 80, 3), np.uint8),  # no face, no box -> detector
        name(5): bomb_jpeg(),                   # a header claiming 30000x30000: refused before decoding
        name(6).replace(".jpg", ".png"): bomb_png(),
    }
    out = {}
    for n, data in files.items():
        if isinstance(data, np.ndarray):
            data = cv2.imencode(".jpg", data)[1].tobytes()
        (raw / n).write_bytes(data)
    out = {name(1): "empty_file", name(2): "not_an_image", name(3): "truncated", name(4): "no_face",
           name(5): "too_many_pixels", name(6).replace(".jpg", ".png"): "too_many_pixels"}
    # convertible modes, each with a box in the label JSON
    rgb = cv2.cvtColor(_face_photo(np.random.default_rng(2))[0], cv2.COLOR_BGR2RGB)
    conv = {
        f"{t}_남_30_분노_20210102000001.png": Image.fromarray(rgb).convert("RGBA"),
        f"{t}_남_30_분노_20210102000002.png": Image.fromarray(rgb).convert("P"),
        f"{t}_남_30_분노_20210102000003.jpg": Image.fromarray(rgb).convert("CMYK"),
    }
    sixteen = f"{t}_남_30_분노_20210102000004.png"  # 16-bit gray PNG
    (raw / sixteen).write_bytes(cv2.imencode(".png", rgb[..., 0].astype(np.uint16) * 257)[1].tobytes())
    out[sixteen] = "ok"
    extra = [{"filename": sixteen, "annot_A": _annot("분노", (100, 60, 200, 180))}]
    for n, im in conv.items():
        im.save(raw / n)
        out[n] = "ok"
        extra.append({"filename": n, "annot_A": _annot("분노", (100, 60, 200, 180))})
    (raw / "more_labels.json").write_text(json.dumps(extra, ensure_ascii=False), encoding="utf-8")
    (raw / "README.txt").write_text("not an image")
    out["README.txt"] = "not_an_image"
    return out


def _read_manifest(root: Path) -> list[dict]:
    with open(root / "data" / "cropped" / MANIFEST, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_crop_stage_counts_every_bad_file_and_converts_modes(tmp_path, make_params):
    params = make_params({"crop": {"workers": 1, "image_size": 48}})
    raw = params.path(params.paths.raw)
    make_aihub_raw(raw, persons=2, per_class=1)
    expected = add_bad_files(raw)
    report = run_crop(params)

    rows = {Path(r["raw"]).name: r for r in _read_manifest(tmp_path)}
    bomb = next(n for n in expected if n.endswith(".png") and expected[n] == "too_many_pixels")
    for name, status in expected.items():
        assert rows[name]["status"] == status, name
    assert report["skipped"] == {"empty_file": 1, "no_face": 1, "not_an_image": 2, "too_many_pixels": 2,
                                 "truncated": 1}
    assert report["ok"] == 2 * 4 + 4 and report["total"] == report["ok"] + 7
    assert rows[bomb]["detail"] == "30000x30000 = 900.0 MP > crop.max_megapixels 50" and not rows[bomb]["path"]
    # the detector's box matching each annotation, or the annotation (counted) where none matched
    assert set(report["box_source"]) <= {"matched", "annotation"} and sum(report["box_source"].values()) == 12
    assert report["annotation_boxes"]["unmatched_annotation_used"] == report["box_source"].get("annotation", 0)
    assert json.loads(params.path(params.paths.crop_report).read_text()) == report
    assert json.loads(params.path(params.paths.crop_headline).read_text()) == {"images": 12, "skipped": 7}  # DVC
    for r in rows.values():
        if r["status"] == "ok":
            img = cv2.imread(str(tmp_path / r["path"]), cv2.IMREAD_UNCHANGED)
            assert img.shape == (48, 48) and img.dtype == np.uint8
            assert r["path"].startswith(f"data/cropped/{r['label']}/")
    assert len(list((tmp_path / "data" / "cropped").rglob("*.png"))) == report["ok"]


def test_output_is_identical_for_any_worker_count(tmp_path, make_params):
    outs = {}
    for workers in (1, 2):
        root = tmp_path / f"w{workers}"
        params = make_params({"crop": {"workers": workers, "chunksize": 3}}, root=root)
        make_aihub_raw(params.path(params.paths.raw), persons=3, per_class=2)
        run_crop(params)
        cropped = root / "data" / "cropped"
        outs[workers] = {p.relative_to(cropped).as_posix(): p.read_bytes() for p in sorted(cropped.rglob("*"))
                         if p.is_file()}
    assert outs[1].keys() == outs[2].keys() and len(outs[1]) == 3 * 4 * 2 + 1
    assert outs[1] == outs[2]


@pytest.mark.slow
def test_interrupted_crop_leaves_previous_output_whole(tmp_path, make_params):
    params = make_params({"crop": {"workers": 1, "image_size": 32}})
    raw = params.path(params.paths.raw)
    make_aihub_raw(raw, persons=1, per_class=1)
    run_crop(params)
    cropped = tmp_path / "data" / "cropped"
    before = sorted(p.relative_to(cropped) for p in cropped.rglob("*"))
    # a bigger dataset, then kill the stage while it writes
    for p in raw.iterdir():
        p.unlink()
    make_aihub_raw(raw, persons=6, per_class=12, seed=3)
    proc = subprocess.Popen([sys.executable, "-m", "kfer.cli", "crop"], cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(
            len(list(t.rglob("*.png"))) > 5 for t in (tmp_path / "data").glob(".cropped.tmp-*")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.relative_to(cropped) for p in cropped.rglob("*")) == before  # old output untouched
    run_crop(params)  # the next run cleans the leftovers and completes
    assert not list((tmp_path / "data").glob(".cropped.tmp-*"))
    assert len(list(cropped.rglob("*.png"))) == 6 * 4 * 12


@pytest.mark.realdata
@pytest.mark.slow
def test_tfeid_photos_crop_with_95_percent_faces_found(tmp_path, make_params):
    src = shared_dir("tfeid_chen2013")
    params = make_params({
        "paths": {"raw": str(src)},
        # disgust has no AI Hub class; mapped here only so that all 840 photos go through the detector
        "data": {"layout": "folders", "group": {"source": "regex", "pattern": r"^(\d{2})"},
                 "label_map": {"disgust": "hurt"}},
        "crop": {"image_size": 48},
    })
    report = run_crop(params)
    images = report["total"] - report["skipped"].get("not_an_image", 0)
    assert images == 840
    found = report["box_source"].get("detector", 0)
    assert found / images >= 0.95, report
    assert report["persons"] == 20
    rows = [r for r in _read_manifest(tmp_path) if r["status"] == "ok"]
    assert all(r["n_faces"] == "1" for r in rows[:50]), "one face per TFEID photo (ghost boxes filtered)"


def _folders_params(make_params, raw, **crop):
    return make_params({"paths": {"raw": str(raw)},
                        "data": {"layout": "folders", "group": {"source": "none"}},
                        "crop": {"workers": 1, "image_size": 48, **crop}})


def test_pre_cropped_faces_need_detector_none_and_then_all_crop(tmp_path, make_params):
    raw = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for label in ("happy", "sad"):
        (raw / label).mkdir(parents=True)
        for i in range(6):
            cv2.imwrite(str(raw / label / f"{i}.jpg"), np.full((48, 48), int(rng.integers(0, 255)), np.uint8))
    from kfer.errors import UserError

    with pytest.raises(UserError, match=r"no_face 12 \(pre-cropped faces \(FER2013, CK\+\) need crop.detector: none"):
        run_crop(_folders_params(make_params, raw))
    report = run_crop(_folders_params(make_params, raw, detector="none"))
    assert report["ok"] == report["total"] == 12 and report["box_source"] == {"whole_image": 12}


def test_nothing_usable_is_one_line_from_the_cli_and_keeps_the_old_output(tmp_path, make_params):
    params = make_params({"crop": {"workers": 1, "image_size": 32}})
    raw = params.path(params.paths.raw)
    make_aihub_raw(raw, persons=1, per_class=1)
    run_crop(params)
    before = sorted(p.name for p in (tmp_path / "data" / "cropped").rglob("*"))
    for p in raw.glob("*.jpg"):
        p.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "kfer.cli", "crop"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error")]
    assert len(err) == 1 and "empty_file 4" in err[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "data" / "cropped").rglob("*")) == before


def test_manifest_detail_too_small_and_boxes_outside_the_image(tmp_path, make_params):
    params = make_params({"crop": {"workers": 1, "image_size": 32, "detector": "none"}})
    raw = params.path(params.paths.raw)
    raw.mkdir(parents=True)
    t = "c" * 64
    img, box = _face_photo(np.random.default_rng(4))
    names = {k: f"{t}_남_30_기쁨_2021010100000{i}.png" for i, k in enumerate(("clamped", "outside", "tiny", "inv"))}
    for k, n in names.items():
        cv2.imwrite(str(raw / n), img if k != "tiny" else img[:20, :20])
    recs = [
        {"filename": names["clamped"], "annot_A": _annot("기쁨", (-30, -20, 100, 120))},
        {"filename": names["outside"], "annot_A": _annot("기쁨", (1000, 1000, 1100, 1100))},
        {"filename": names["tiny"], "annot_A": _annot("기쁨", box)},
        {"filename": names["inv"], "annot_A": _annot("기쁨", (200, 200, 100, 100))},
    ]
    (raw / "l.json").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    report = run_crop(params)
    rows = {Path(r["raw"]).name: r for r in _read_manifest(tmp_path)}
    assert rows[names["clamped"]]["box_source"] == "annotation" and "clamped" in rows[names["clamped"]]["detail"]
    assert rows[names["outside"]]["box_source"] == "whole_image"
    assert "outside the image: not used" in rows[names["outside"]]["detail"]
    assert rows[names["tiny"]]["status"] == "too_small" and "20x20" in rows[names["tiny"]]["detail"]
    assert rows[names["inv"]]["box_source"] == "whole_image" and "inverted" in rows[names["inv"]]["detail"]
    assert rows["l.json"]["status"] == "label_file" and "utf-8" in rows["l.json"]["detail"]
    boxes = report["annotation_boxes"]
    assert boxes["clamped_to_image"] == 1 and boxes["outside_image_not_used"] == 1
    assert boxes["annotator_boxes_dropped"] == {"inverted": 1} and boxes["records_without_box"] == 1
    assert report["label_from"] == {"json_majority": 3} and report["skipped"] == {"too_small": 1}
    assert report["label_files"] == {"l.json": {"encoding": "utf-8", "records": 4}}


@pytest.mark.realdata
@pytest.mark.parametrize("folder", ["fer2013/publictest", "ckplus48", "ckplus48_hugoiwnl"])
def test_public_pre_cropped_sets_crop_100_percent_with_detector_none(tmp_path, make_params, folder):
    src = shared_dir(folder)
    params = make_params({
        "paths": {"raw": str(src)},
        "data": {"layout": "folders", "group": {"source": "none"},
                 "label_map": {"disgust": "hurt", "contempt": "hurt"}},
        "crop": {"image_size": 48, "detector": "none", "workers": 2},
    })
    report = run_crop(params)
    photos = report["total"] - report["skipped"].get("not_an_image", 0)  # manifest.csv / README beside them
    assert set(report["skipped"]) <= {"not_an_image"}
    assert report["ok"] == photos and report["box_source"] == {"whole_image": photos}
