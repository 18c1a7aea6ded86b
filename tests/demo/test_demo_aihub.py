"""Phone-sized synthetic photos in the AI Hub download layout: folders, names, label encoding, EXIF, trailers."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from kfer.config import load_params
from kfer.demo.aihub import generate_aihub_photos, label_path, photo_dir
from tests.helpers import REPO

CLASSES = [(c.name, c.ko) for c in load_params(REPO / "params.yaml").classes]
KO = [ko for _, ko in CLASSES]
W, H = 640, 480
N_PERSONS, PER_CLASS, N_VAL = 3, 2, 1
N = N_PERSONS * PER_CLASS * len(CLASSES)
NAME_RX = re.compile(
    r"^(?P<title>[0-9a-f]{64})_(?P<gender>남|여)_(?P<age>[1-6]0)_(?P<emotion>[^_]+)"
    r"(?:_(?P<place>[^_]+))?_(?P<date>\d{14}-\d{3}-\d{3})\.jpg$"
)
ARGS = dict(n_persons=N_PERSONS, per_class=PER_CLASS, size=(W, H), seed=5, validation_persons=N_VAL)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("aihub") / "raw"
    return out, generate_aihub_photos(out, CLASSES, **ARGS)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _upright(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def test_layout_names_and_records(photos):
    out, s = photos
    assert s["images"] == N == len(s["paths"]) and s["persons"] == N_PERSONS
    assert s["splits"] == {"Training": {"images": (N_PERSONS - N_VAL) * PER_CLASS * len(KO), "persons": 2},
                           "Validation": {"images": N_VAL * PER_CLASS * len(KO), "persons": 1}}
    expected_dirs = set()
    for split, tag, word in (("Training", "TRAIN", "training"), ("Validation", "VALID", "validation")):
        for ko in KO:
            expected_dirs |= {f"{split}/[원천]EMOIMG_{ko}_{tag}_01", f"{split}/[라벨]EMOIMG_{ko}_{tag}"}
            assert photo_dir(split, ko) == f"{split}/[원천]EMOIMG_{ko}_{tag}_01"
            assert label_path(split, ko) == f"{split}/[라벨]EMOIMG_{ko}_{tag}/img_emotion_{word}_data({ko}).json"
    dirs = {p.relative_to(out).as_posix() for p in out.glob("*/*") if p.is_dir()}
    assert dirs == expected_dirs and {p.name for p in out.iterdir()} == {"Training", "Validation"}
    files = _tree(out)
    assert sum(k.endswith(".json") for k in files) == 2 * len(KO) == len(s["label_files"])
    assert sum(k.endswith(".jpg") for k in files) == N and s["bytes"] == sum(map(len, files.values()))

    titles: dict[str, set[str]] = {"Training": set(), "Validation": set()}
    for split in ("Training", "Validation"):
        for ko in KO:
            records = json.loads((out / label_path(split, ko)).read_bytes().decode("cp949"))
            on_disk = sorted(p.name for p in (out / photo_dir(split, ko)).iterdir())
            assert sorted(r["filename"] for r in records) == on_disk and len(on_disk) == PER_CLASS * (
                N_PERSONS - N_VAL if split == "Training" else N_VAL)
            for r in records:
                m = NAME_RX.match(r["filename"])
                assert m and unicodedata.is_normalized("NFC", r["filename"]), r["filename"]
                assert m["emotion"] == ko == r["faceExp_uploader"]
                assert m["gender"] == r["gender"] and int(m["age"]) == r["age"]
                assert set(r) >= {"filename", "gender", "age", "isProf", "faceExp_uploader", "bg_uploader",
                                  "annot_A", "annot_B", "annot_C"}
                for t in "ABC":
                    assert r[f"annot_{t}"]["faceExp"] in KO
                    assert set(r[f"annot_{t}"]["boxes"]) == {"minX", "minY", "maxX", "maxY"}
                titles[split].add(m["title"])
    assert len(titles["Training"]) == 2 and len(titles["Validation"]) == 1
    assert not titles["Training"] & titles["Validation"]  # a person is in one split
    assert 0 < s["long_names"] < N  # both name forms


def test_label_file_encodings(photos, tmp_path):
    out, s = photos
    raw = (out / s["label_files"][0]).read_bytes()
    text = raw.decode("cp949")
    assert any("\uac00" <= ch <= "\ud7a3" for ch in text)  # Hangul really there, not \\u escapes
    assert "\\u" not in text
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    for enc, bom in (("utf-8", False), ("utf-8-sig", True)):
        s2 = generate_aihub_photos(tmp_path / enc, CLASSES[:1], n_persons=1, per_class=1, size=(W, H),
                                   label_encoding=enc)
        data = (tmp_path / enc / s2["label_files"][0]).read_bytes()
        assert data.startswith(b"\xef\xbb\xbf") == bom
        assert json.loads(data.decode("utf-8-sig"))[0]["faceExp_uploader"] == KO[0]
    with pytest.raises(ValueError, match="label_encoding"):
        generate_aihub_photos(tmp_path / "x", CLASSES[:1], n_persons=1, per_class=1, label_encoding="latin-1")


def test_exif_orientation_and_upright_size(photos):
    out, s = photos
    orient = {}
    for name, rel in s["paths"].items():
        data = (out / rel).read_bytes()
        im = Image.open(io.BytesIO(data))
        tag = im.getexif().get(0x0112)
        orient[name] = tag or 1
        assert im.size == ((H, W) if tag in (6, 8) else (W, H))  # stored size
        up = _upright(data)
        assert up.size == (W, H)
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # OpenCV applies EXIF too
        ref = cv2.cvtColor(np.asarray(up.convert("RGB")), cv2.COLOR_RGB2BGR)
        assert bgr.shape == (H, W, 3) and np.abs(bgr.astype(int) - ref).mean() < 2
    assert orient == s["orientation"]
    rotated = [o for o in orient.values() if o != 1]
    assert len(rotated) == s["exif_rotated"] and abs(len(rotated) / N - 1 / 3) <= 1 / N
    assert set(rotated) == {3, 6, 8}


def test_trailers_after_end_marker(photos, tmp_path):
    out, s = photos
    plain = tmp_path / "plain"
    generate_aihub_photos(plain, CLASSES, **ARGS, trailer_fraction=0.0)
    kinds = {"samsung": 0, "mp4": 0}
    for name, rel in s["paths"].items():
        data, base = (out / rel).read_bytes(), (plain / rel).read_bytes()
        assert base.endswith(b"\xff\xd9")
        kind = s["trailer"][name]
        if kind is None:
            assert data == base
            continue
        kinds[kind] += 1
        assert data.startswith(base) and len(data) > len(base)  # the same JPEG, then the trailer
        tail = data[len(base):]
        if kind == "samsung":
            assert tail.endswith(b"SEFT") and b"SEFH" in tail
        else:
            assert tail.startswith(b"\x00\x00\x00\x18ftypmp42") and 2000 < len(tail) < 10000
        im = Image.open(io.BytesIO(data))
        im.load()  # PIL decodes it, trailer and all
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    assert sum(kinds.values()) == s["with_trailer"] and abs(s["with_trailer"] / N - 0.3) <= 1 / N
    assert abs(kinds["samsung"] - kinds["mp4"]) <= 1


def test_deterministic(photos, tmp_path):
    out, _ = photos
    again = tmp_path / "again"
    generate_aihub_photos(again, CLASSES, **ARGS)
    assert _tree(again) == _tree(out)
    other = tmp_path / "other"
    generate_aihub_photos(other, CLASSES, **{**ARGS, "seed": 6})
    assert _tree(other) != _tree(out)


def _edges(gray: np.ndarray) -> np.ndarray:
    g = cv2.GaussianBlur(gray.astype(np.float32), (0, 0), 1.5)  # sensor noise out
    return np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))


def test_boxes_are_upright_and_hold_the_face(photos):
    out, s = photos
    records = {}
    for rel in s["label_files"]:
        records.update({r["filename"]: r for r in json.loads((out / rel).read_bytes().decode("cp949"))})
    for name, rel in s["paths"].items():
        x0, y0, x1, y1 = box = s["boxes"][name]
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        assert 0.10 <= max(x1 - x0, y1 - y0) / min(W, H) <= 0.40
        ann = np.array([[records[name][f"annot_{t}"]["boxes"][k] for k in ("minX", "minY", "maxX", "maxY")]
                        for t in "ABC"])
        assert np.abs(np.median(ann, 0) - box).max() < 5  # annotators: a few pixels around the truth
        mag = _edges(np.asarray(_upright((out / rel).read_bytes()).convert("L")))
        b = [int(round(v)) for v in box]
        inside = np.zeros(mag.shape, bool)
        inside[b[1]:b[3], b[0]:b[2]] = True
        assert mag[inside].mean() > 3 * mag[~inside].mean(), name  # eyes, brows, mouth, hairline are there


def test_full_size_photo(tmp_path):
    s = generate_aihub_photos(tmp_path / "big", CLASSES[:1], n_persons=1, per_class=3, validation_persons=0)
    assert s["images"] == 3 and s["exif_rotated"] == 1 and s["with_trailer"] == 1
    for name, rel in s["paths"].items():
        data = (tmp_path / "big" / rel).read_bytes()
        assert _upright(data).size == (3088, 2208)
        x0, y0, x1, y1 = s["boxes"][name]
        assert 0 <= x0 < x1 <= 3088 and 0 <= y0 < y1 <= 2208 and 220 <= max(x1 - x0, y1 - y0) <= 884
        assert 100_000 < len(data) < 8_000_000


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("not a dataset")
    with pytest.raises(FileExistsError):
        generate_aihub_photos(tmp_path / "mine", CLASSES[:1], n_persons=1, per_class=1, size=(W, H))
    assert (tmp_path / "mine" / "thesis.txt").exists()


def test_cli_demo_data_aihub_photos(tmp_path):
    from kfer.cli import main

    out = tmp_path / "raw"
    res = CliRunner().invoke(main, ["--params", str(REPO / "params.yaml"), "demo-data", "--aihub-photos",
                                    "--size", "320x240", "--persons", "2", "--per-class", "1",
                                    "--label-encoding", "utf-8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lab = out / label_path("Validation", KO[0])
    assert json.loads(lab.read_text(encoding="utf-8"))[0]["faceExp_uploader"] == KO[0]
    jpg = next((out / photo_dir("Training", KO[0])).iterdir())
    assert _upright(jpg.read_bytes()).size == (320, 240)
    res = CliRunner().invoke(main, ["--params", str(REPO / "params.yaml"), "demo-data", "--aihub-photos",
                                    "--size", "320by240", "--out", str(out)])
    assert res.exit_code != 0 and "WxH" in res.output


def test_bench_crop_aihub_smoke():
    from kfer.data.faces import FaceCropper

    if not hasattr(FaceCropper, "crop_bytes"):
        pytest.skip("FaceCropper.crop_bytes is not there yet")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_crop.py"), "--aihub", "3",
                          "--size", "640x480", "--rounds", "1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"^ratio new/old\s*:\s*[\d.]+x", res.stdout, flags=re.M), res.stdout
    assert re.search(r"^agreement\s*:.*mean", res.stdout, flags=re.M), res.stdout
