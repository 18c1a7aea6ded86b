"""crop -> split -> augment on photos shaped like the real AI Hub download (kfer.demo_aihub): the download's
folder layout with square brackets, CP949 label files, EXIF-rotated phone photos and trailers after FF D9."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from kfer.augment import run_augment
from kfer.crop import MANIFEST, run_crop
from kfer.demo_aihub import generate_aihub_photos
from kfer.faces import FaceCropper, square_box
from kfer.images import decode_image
from kfer.readers import read_records
from kfer.split import run_split


def _rows(params) -> list[dict]:
    with open(params.path(params.paths.cropped) / MANIFEST, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def aihub_project(tmp_path_factory):
    from .conftest import write_params

    root = tmp_path_factory.mktemp("aihub")
    params = write_params(root, {"crop": {"workers": 2, "image_size": 48}})
    classes = [(c.name, c.ko) for c in params.classes]
    summary = generate_aihub_photos(params.path(params.paths.raw), classes, n_persons=5, per_class=2,
                                    size=(960, 720), seed=3)
    report = run_crop(params)
    return params, summary, report


def test_every_photo_is_accounted_for_and_every_box_is_the_annotation(aihub_project):
    params, summary, report = aihub_project
    raw = params.path(params.paths.raw)
    on_disk = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file())
    rows = _rows(params)
    assert sorted(Path(r["raw"]).relative_to(params.rel(raw)).as_posix() for r in rows) == on_disk
    photos = [r for r in rows if r["status"] != "label_file"]
    assert len(photos) == summary["images"] == 5 * 7 * 2 and report["ok"] == summary["images"]
    assert report["skipped"] == {} and report["box_source"] == {"annotation": summary["images"]}
    assert summary["exif_rotated"] > 0 and summary["with_trailer"] > 0
    assert report["label_from"].keys() <= {"json_majority", "json_uploader"}
    assert {v["encoding"] for v in report["label_files"].values()} == {"cp949"}
    assert len(report["label_files"]) == 2 * 7  # one per emotion in Training/ and Validation/
    assert report["annotation_boxes"]["records_without_box"] == 0
    # the crop box is the square around the annotators' median box, in the upright frame
    for r in photos:
        name = Path(r["raw"]).name
        x0, y0, x1, y1 = summary["boxes"][name]
        want = square_box((x0, y0, x1, y1), params.crop.margin, 960, 720)
        got = tuple(int(r[k]) for k in ("x0", "y0", "x1", "y1"))
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 6, (name, got, want)


def test_rotated_and_trailer_photos_crop_like_the_full_colour_decode(aihub_project):
    params, summary, _ = aihub_project
    raw = params.path(params.paths.raw)
    cropper = FaceCropper.from_params(params.crop)
    by_name = {Path(r["raw"]).name: r for r in _rows(params) if r["status"] == "ok"}
    annotated = {r.raw.name: r.box for r in read_records(params).records}  # what the stage used
    checked = 0
    for name, orientation in summary["orientation"].items():
        if orientation == 1 and summary["trailer"][name] is None:
            continue
        data = (raw / summary["paths"][name]).read_bytes()
        box = annotated[name]
        full = cropper.crop_main(decode_image(data), box).image
        stage = cv2.imread(str(params.path(by_name[name]["path"])), cv2.IMREAD_GRAYSCALE)
        assert np.abs(full.astype(int) - stage.astype(int)).mean() <= 2.0, name
        checked += 1
    assert checked >= 10


def test_split_and_augment_follow_on_the_aihub_shaped_set(aihub_project):
    params, summary, _ = aihub_project
    split = run_split(params)
    assert sum(split["counts"].values()) == summary["images"]
    with open(params.path(params.paths.splits), encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    person_split: dict[str, str] = {}
    for r in rows:
        assert person_split.setdefault(r["group"], r["split"]) == r["split"]  # no person in two splits
    aug = run_augment(params)
    assert aug["originals"] == split["counts"]["train"] and aug["skipped"] == {}
    assert aug["augmented"] == params.augment.copies * split["counts"]["train"]
    assert json.loads(params.path(params.paths.augment_report).read_text()) == aug


def test_crop_outputs_follow_the_umask(aihub_project):
    params, _, _ = aihub_project
    out = params.path(params.paths.cropped)
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    png = next(out.rglob("*.png"))
    assert (png.stat().st_mode & 0o777) == 0o666 & ~mask


def test_aihub_photos_and_a_pre_cropped_set_in_one_raw_folder(tmp_path):
    from .conftest import write_params

    params = write_params(tmp_path, {
        "crop": {"workers": 1, "image_size": 48},
        "data": {"sources": {
            "aihub": {"layout": "aihub"},
            "fer2013": {"layout": "folders", "detector": "none", "group": {"source": "regex", "pattern": r"^(p\d)"}},
        }},
    })
    raw = params.path(params.paths.raw)
    summary = generate_aihub_photos(raw / "aihub", [(c.name, c.ko) for c in params.classes], n_persons=3,
                                    per_class=1, size=(640, 480), seed=1)
    rng = np.random.default_rng(0)
    for label in ("happy", "sad", "angry"):
        (raw / "fer2013" / label).mkdir(parents=True)
        for i in range(6):
            cv2.imwrite(str(raw / "fer2013" / label / f"p{i % 3}_{i}.png"), rng.integers(0, 255, (48, 48), np.uint8))
    report = run_crop(params)
    assert report["per_source"]["aihub"]["ok"] == summary["images"] == 3 * 7
    assert report["per_source"]["fer2013"] == {"total": 18, "ok": 18, "persons": 3}
    assert report["box_source"] == {"annotation": 21, "whole_image": 18}
    run_split(params)
    with open(params.path(params.paths.splits), encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["source"] for r in rows} == {"aihub", "fer2013"}
    assert all(r["group"].startswith(r["source"] + "/") for r in rows)
