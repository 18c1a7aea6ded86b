"""Synthetic phone-sized photos in the exact on-disk shape of the AI Hub download, for tests and benchmarks.

The real "한국인 감정인식을 위한 복합 영상" download unpacks as one photo folder and one label folder per split and
emotion (square brackets are part of the names)::

    Training/[원천]EMOIMG_기쁨_TRAIN_01/<name>.jpg
    Training/[라벨]EMOIMG_기쁨_TRAIN/img_emotion_training_data(기쁨).json
    Validation/[원천]EMOIMG_기쁨_VALID_01/<name>.jpg
    Validation/[라벨]EMOIMG_기쁨_VALID/img_emotion_validation_data(기쁨).json

File names and label records are those of :mod:`kfer.demo.photos` (same persons, faces, name and record format), but
the photos look like a phone's: ``size`` (default 3088×2208) upright, the face 10–40% of the short side, and
what phones do to JPEG files:

* about ``exif_fraction`` of the photos are stored rotated (90° either way or 180°) with the EXIF Orientation
  (6, 8, 3) that turns them upright again; about half of the others carry EXIF with Orientation 1;
* about ``trailer_fraction`` have bytes after the JPEG end marker ``FF D9``: half a Samsung ``SEFH…SEFT``
  trailer, half an MP4 blob (as Motion Photos append);
* the label JSON is written in ``label_encoding`` (cp949 by default, as the real files are; or utf-8,
  utf-8-sig) with the Korean text really in that encoding.

Annotator boxes are always in the upright (EXIF-applied) frame, each annotator's the true box jittered by a
few pixels; the returned summary holds the true boxes. Same arguments → byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import struct
import unicodedata
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from kfer.demo import faces
from kfer.demo.photos import (
    LABELS_FILE,
    PLACES,
    aihub_file_name,
    annotator_votes,
    photo_date,
)
from kfer.files import atomic_dir

SPLITS = {"Training": ("TRAIN", "training"), "Validation": ("VALID", "validation")}
LABEL_ENCODINGS = ("cp949", "utf-8", "utf-8-sig")
ORIENTATIONS = (6, 8, 3)  # the m-th rotated photo gets ORIENTATIONS[m % 3]
_STORE_ROTATION = {6: cv2.ROTATE_90_COUNTERCLOCKWISE, 8: cv2.ROTATE_90_CLOCKWISE, 3: cv2.ROTATE_180}
_FACE_SIDE = (0.11, 0.40)  # head height / the photo's short side (the box's longer side stays in 10-40%)
_BG_FACTOR = 8  # the background is drawn at 1/8 size and enlarged (smooth, as out of focus)


def photo_dir(split: str, ko: str, part: int = 1) -> str:
    """``Training/[원천]EMOIMG_기쁨_TRAIN_01`` (relative to the dataset root)."""
    return unicodedata.normalize("NFC", f"{split}/[원천]EMOIMG_{ko}_{SPLITS[split][0]}_{part:02d}")


def label_path(split: str, ko: str) -> str:
    """``Training/[라벨]EMOIMG_기쁨_TRAIN/img_emotion_training_data(기쁨).json``."""
    tag, word = SPLITS[split]
    return unicodedata.normalize("NFC", f"{split}/[라벨]EMOIMG_{ko}_{tag}/img_emotion_{word}_data({ko}).json")


def _every(k: int, fraction: float, phase: float) -> bool:
    """True for about ``fraction`` of k = 0, 1, 2, ..., spread evenly (exact over any run of indices)."""
    return math.floor((k + 1) * fraction + phase) > math.floor(k * fraction + phase)


def _upright_photo(person, expr, rng: np.random.Generator, w: int, h: int,
                   grain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One upright BGR uint8 photo of ``w``×``h`` and the head's box (minX, minY, maxX, maxY) in its pixels.

    The face is drawn by :func:`kfer.demo.photos.draw_face` on its small canvas and warped (scale + tilt) straight
    into the region it covers; only that region is blended in float, so a 7-megapixel photo costs ~0.1 s.
    """
    face, alpha, a = faces.draw_face(person, expr, rng)
    head_h = float(rng.uniform(*_FACE_SIDE)) * min(w, h)
    scale = head_h / (2 * faces.HEAD_HALF_HEIGHT * faces.FACE_SCALE)
    angle = float(rng.uniform(-10, 10))
    lo, hi = faces.head_extent(a, angle, scale)
    cx, cy = faces.place_head(rng, lo, hi, w, h)
    m = cv2.getRotationMatrix2D((faces.HEAD_X, faces.HEAD_Y), angle, scale)  # canvas -> photo, before the translation
    m[:, 2] += (cx - faces.HEAD_X, cy - faces.HEAD_Y)
    box = np.array([lo[0] + cx, lo[1] + cy, hi[0] + cx, hi[1] + cy])

    # Background: drawn small, enlarged, then the camera's tone curve and sensor noise over the whole frame.
    bw, bh = max(64, -(-w // _BG_FACTOR)), max(64, -(-h // _BG_FACTOR))
    bg = np.clip(np.round(faces.background(rng, bw, bh)), 0, 255).astype(np.uint8)
    img = cv2.resize(bg, (w, h), interpolation=cv2.INTER_LINEAR)

    # The torso continues to the bottom of the photo: extend the canvas downwards (replicating its last row).
    sin, cos = abs(math.sin(math.radians(angle))), math.cos(math.radians(angle))
    need = ((h - cy) / scale + faces.CANVAS_W / 2 * sin) / cos + faces.HEAD_Y + 2
    extra = max(0, math.ceil(need - faces.CANVAS_H))
    rgba = cv2.copyMakeBorder(np.dstack([face, alpha]), 0, extra, 0, 0, cv2.BORDER_REPLICATE)
    cw, ch = faces.CANVAS_W, faces.CANVAS_H + extra
    corners = np.array([(0, 0), (cw, 0), (0, ch), (cw, ch)], float) @ m[:, :2].T + m[:, 2]
    x0, y0 = (max(0, math.floor(v)) for v in corners.min(0))
    x1, y1 = min(w, math.ceil(corners[:, 0].max())), min(h, math.ceil(corners[:, 1].max()))
    if x1 > x0 and y1 > y0:
        m_roi = m.copy()
        m_roi[:, 2] -= (x0, y0)
        warped = cv2.warpAffine(rgba, m_roi, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT)
        roi = img[y0:y1, x0:x1].astype(np.float32)
        fa = warped[..., 3:]
        img[y0:y1, x0:x1] = np.clip(np.round(roi + (warped[..., :3] - roi) * fa), 0, 255).astype(np.uint8)

    # Camera: contrast, brightness, colour cast and gamma as one per-channel lookup table.
    contrast, bright = float(rng.uniform(0.75, 1.2)), float(rng.uniform(-28, 28))
    cast, gamma = rng.normal(0, 6, 3), float(rng.uniform(0.8, 1.25))
    v = np.arange(256, dtype=np.float64)[:, None]
    lin = np.clip(np.round((v - 128) * contrast + 128 + bright + cast[None, :]), 0, 255)
    lut = np.round(255 * (lin / 255) ** gamma).astype(np.uint8).reshape(1, 256, 3)
    img = cv2.LUT(img, lut)
    # Sensor noise: uniform random bytes mapped to a gaussian's quantiles (fast), added with saturation.
    sigma = float(rng.uniform(0.8, 2.5)) * grain
    q = np.round(sigma * _normal_quantiles()).astype(np.int16)
    raw = rng.bit_generator.random_raw(-(-img.size // 8)).view(np.uint8)[: img.size].reshape(img.shape)
    img = cv2.add(img, cv2.LUT(raw, np.clip(q, 0, 255).astype(np.uint8)))
    img = cv2.subtract(img, cv2.LUT(raw, np.clip(-q, 0, 255).astype(np.uint8)))
    return img, box


_QUANTILES: np.ndarray | None = None


def _normal_quantiles() -> np.ndarray:
    """The standard normal's quantiles at (u + 0.5) / 256, u = 0..255."""
    global _QUANTILES
    if _QUANTILES is None:
        from statistics import NormalDist

        nd = NormalDist()
        _QUANTILES = np.array([nd.inv_cdf((u + 0.5) / 256) for u in range(256)])
    return _QUANTILES


def _exif(orientation: int, date: str) -> bytes:
    ex = Image.Exif()
    ex[0x010F] = "samsung"  # Make
    ex[0x0110] = "SM-G991N"  # Model
    ex[0x0112] = orientation
    ex[0x0132] = f"{date[0:4]}:{date[4:6]}:{date[6:8]} {date[8:10]}:{date[10:12]}:{date[12:14]}"  # DateTime
    return ex.tobytes()


def _samsung_trailer(rng: np.random.Generator, date: str) -> bytes:
    """A Samsung-style trailer: data blocks, then the ``SEFH`` directory, its size and ``SEFT``."""
    entries = [(0x0A01, b"Image_UTC_Data", date[:14].encode()),
               (0x0A20, b"MCC_Data", b"450"),
               (0x0BA1, b"Camera_Capture_Mode_Info", bytes(rng.integers(0, 256, int(rng.integers(16, 400)),
                                                                        dtype=np.uint8)))]
    blocks = [struct.pack("<HHI", 0, kind, len(name)) + name + data for kind, name, data in entries]
    blob = b"".join(blocks)
    table, start = b"", 0
    for (kind, _, _), block in zip(entries, blocks, strict=True):
        # Each entry: its type, how far back from the directory its block starts, and its length.
        table += struct.pack("<HHII", 0, kind, len(blob) - start, len(block))
        start += len(block)
    head = b"SEFH" + struct.pack("<II", 106, len(entries)) + table
    return blob + head + struct.pack("<I", len(head)) + b"SEFT"


def _mp4_trailer(rng: np.random.Generator) -> bytes:
    """The start of an MP4 file (``ftyp`` + ``mdat`` boxes) of a few KB, as a Motion Photo appends."""
    n = int(rng.integers(2048, 8192))
    payload = bytes(rng.integers(0, 256, n, dtype=np.uint8))
    return (b"\x00\x00\x00\x18ftypmp42" + b"\x00\x00\x00\x00mp42isom"
            + struct.pack(">I", n + 8) + b"mdat" + payload)


def generate_aihub_photos(
    out_dir: Path,
    classes: list[tuple[str, str]],
    n_persons: int = 5,
    per_class: int = 2,
    size: tuple[int, int] = (3088, 2208),
    seed: int = 0,
    exif_fraction: float = 1 / 3,
    trailer_fraction: float = 0.3,
    label_encoding: str = "cp949",
    validation_persons: int | None = None,
    quality: int = 90,
    grain: float = 1.0,
) -> dict:
    """Write phone-sized synthetic photos in the AI Hub download layout to ``out_dir`` (replaced atomically).

    ``classes`` are (name, ko) pairs as in params.yaml. ``size`` is the upright (EXIF-applied) width×height.
    The last ``validation_persons`` persons (default: a fifth, at least 1 when there are 2 or more) go to
    ``Validation/``, the others to ``Training/``. Returns a summary: counts (``images``, ``persons``,
    ``bytes``, ``exif_rotated``, ``with_trailer``, ``splits``, ``per_class``, ...) and per file name its
    relative ``paths``, true upright ``boxes`` [x0, y0, x1, y1], EXIF ``orientation`` (1 = stored upright)
    and ``trailer`` ("samsung", "mp4" or None).

    ``grain`` scales the sensor noise: 1 gives ~0.45 MB per 3088×2208 photo at quality 90 (smooth synthetic
    scenes compress well), 4-5 gives 1.5-2 MB, the size of a real phone photo's (what a decoder's entropy
    stage pays for).
    """
    out_dir = Path(out_dir)
    w, h = (int(v) for v in size)
    if n_persons < 1 or per_class < 1:
        raise ValueError("n_persons and per_class must be at least 1")
    if w < 64 or h < 64:
        raise ValueError("width and height must be at least 64 pixels")
    if not (0 <= exif_fraction <= 1 and 0 <= trailer_fraction <= 1):
        raise ValueError("exif_fraction and trailer_fraction must be within [0, 1]")
    if grain < 0:
        raise ValueError("grain must be >= 0")
    if label_encoding not in LABEL_ENCODINGS:
        raise ValueError(f"label_encoding must be one of {LABEL_ENCODINGS}, not {label_encoding!r}")
    n_val = (max(1, n_persons // 5) if n_persons > 1 else 0) if validation_persons is None else validation_persons
    if not 0 <= n_val <= n_persons:
        raise ValueError(f"validation_persons must be within [0, {n_persons}]")
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not any((out_dir / n).exists() for n in (*SPLITS, LABELS_FILE)))):
        raise FileExistsError(f"{out_dir} exists and does not hold a demo dataset; remove it first")
    specs = [(name, unicodedata.normalize("NFC", ko or name)) for name, ko in classes]
    keys = [faces.expression_key(name, ko) for name, ko in specs]
    all_ko = [ko for _, ko in specs]
    jitter = max(1.0, 0.0015 * min(w, h))  # annotators' disagreement on the box, pixels (sd)

    out = {"paths": {}, "boxes": {}, "orientation": {}, "trailer": {}}
    splits = {s: {"images": 0, "persons": 0} for s in SPLITS}
    per_class_n = {name: 0 for name, _ in specs}
    counts = {"agree": 0, "disagree": 0, "tie": 0}
    total = k = n_rot = n_trail = n_long = 0
    label_files = []
    with atomic_dir(out_dir) as tmp:
        records: dict[tuple[str, str], list[dict]] = {}
        for i in tqdm(range(n_persons), desc="demo-data (AI Hub photos)", unit="person"):
            split = "Validation" if i >= n_persons - n_val else "Training"
            splits[split]["persons"] += 1
            person = faces.make_person(seed, i)
            for ci, ((name, ko), key) in enumerate(zip(specs, keys, strict=True)):
                folder = tmp / photo_dir(split, ko)
                folder.mkdir(parents=True, exist_ok=True)
                for j in range(per_class):
                    rng = np.random.default_rng([seed, 3, i, ci, j])
                    img, box = _upright_photo(person, faces.EXPRESSIONS[key], rng, w, h, grain)
                    place = PLACES[int(rng.integers(len(PLACES)))]
                    long_form = (i + 2 * ci + j) % 3 == 0
                    date = photo_date(person, ci + 1, j + 1, offset_s=ci * 600 + j * 37)
                    fname = aihub_file_name(person, ko, date, place if long_form else None)
                    orientation, exif = 1, b""
                    if _every(k, exif_fraction, 0.0):
                        orientation = ORIENTATIONS[n_rot % len(ORIENTATIONS)]
                        img = cv2.rotate(img, _STORE_ROTATION[orientation])
                        n_rot += 1
                    if orientation != 1 or k % 2 == 0:
                        exif = _exif(orientation, date)
                    buf = io.BytesIO()
                    Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)).save(buf, "JPEG", quality=quality,
                                                                                exif=exif)
                    data = buf.getvalue()
                    trailer = None
                    if _every(k, trailer_fraction, 0.5):
                        trailer = "samsung" if n_trail % 2 == 0 else "mp4"
                        t_rng = np.random.default_rng([seed, 4, i, ci, j])  # the photo's bytes stay the same
                        data += _samsung_trailer(t_rng, date) if trailer == "samsung" else _mp4_trailer(t_rng)
                        n_trail += 1
                    (folder / fname).write_bytes(data)
                    k += 1
                    total += len(data)
                    n_long += long_form
                    labels, kind = annotator_votes(rng, ko, all_ko)
                    counts[kind] += 1
                    rec = {"filename": fname, "gender": person.gender, "age": person.age, "isProf": "일반인",
                           "faceExp_uploader": ko, "bg_uploader": place}
                    for tag, lab in zip("ABC", labels, strict=True):
                        jb = np.clip(box + rng.normal(0, jitter, 4), 0, [w - 1, h - 1, w - 1, h - 1])
                        rec[f"annot_{tag}"] = {
                            "boxes": {"minX": round(float(jb[0]), 4), "minY": round(float(jb[1]), 4),
                                      "maxX": round(float(jb[2]), 4), "maxY": round(float(jb[3]), 4)},
                            "faceExp": lab,
                            "bg": place,
                        }
                    records.setdefault((split, ko), []).append(rec)
                    rel = f"{photo_dir(split, ko)}/{fname}"
                    out["paths"][fname] = rel
                    out["boxes"][fname] = [round(float(v), 2) for v in box]
                    out["orientation"][fname] = orientation
                    out["trailer"][fname] = trailer
                    splits[split]["images"] += 1
                    per_class_n[name] += 1
        for (split, ko), recs in records.items():
            path = tmp / label_path(split, ko)
            path.parent.mkdir(parents=True, exist_ok=True)
            data = (json.dumps(recs, ensure_ascii=False, indent=1) + "\n").encode(label_encoding)
            path.write_bytes(data)
            total += len(data)
            label_files.append(label_path(split, ko))
    return {
        "images": k,
        "persons": n_persons,
        "bytes": total,
        "size": [w, h],
        "exif_rotated": n_rot,
        "with_trailer": n_trail,
        "splits": splits,
        "per_class": per_class_n,
        "long_names": n_long,
        "disagreements": counts["disagree"],
        "ties": counts["tie"],
        "label_files": label_files,
        "label_encoding": label_encoding,
        **out,
    }
