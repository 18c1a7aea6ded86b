"""Score a photo model on labelled photos through the served path.

The photo goes in whole; the model (:class:`kfer.serving.PhotoEmotionModel`, as ``kfer predict`` and
``mlflow models serve`` run it) finds and cuts the faces itself; the answer for the photo is the label of the
face that is the labelled one. This is what a user of the model gets, so it is scored beside the crop-path
metrics, which feed the crop stage's faces straight to the classifier.

Which face is the labelled one: with a reference box (the square the crop stage cut for training), the served
face whose box overlaps it most; without one, the largest face. A photo where no served face overlaps the
reference (or no face is found at all) is *missed*: it counts as wrong, and is counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .faces import Box, box_iou
from .images import ImageError, read_bytes

log = logging.getLogger(__name__)

MISSED = -1  # predicted class index of a photo whose labelled face the model did not find


@dataclass(frozen=True)
class PhotoResult:
    predicted: int  # class index, MISSED when the labelled face was not found
    n_faces: int  # faces the model found in the photo
    iou: float | None = None  # IoU of the chosen face's box with the reference box
    error: str = ""  # the photo could not be read (then missed)


def pick_face(faces: list[dict[str, Any]], reference: Box | None) -> tuple[dict[str, Any] | None, float | None]:
    """The labelled face among a photo's served ``faces`` (largest first) and its IoU with ``reference``."""
    if not faces:
        return None, None
    if reference is None:
        return faces[0], None
    scored = [(box_iou(f["box"], reference), i) for i, f in enumerate(faces)]
    best, i = max(scored, key=lambda t: (t[0], -t[1]))
    return (faces[i], best) if best > 0 else (None, best)


def score_photos(model, photos: list[Path], references: list[Box | None], class_names: list[str],
                 desc: str = "photos") -> list[PhotoResult]:
    """One :class:`PhotoResult` per photo, in order; unreadable photos are logged, counted as missed."""
    index = {name: i for i, name in enumerate(class_names)}
    out = []
    for photo, ref in tqdm(zip(photos, references, strict=True), total=len(photos), desc=desc, unit="photo",
                           mininterval=1.0):
        try:
            faces = model.predict_bytes(read_bytes(photo))
        except ImageError as exc:
            log.warning("%s: %s", photo, exc)
            out.append(PhotoResult(MISSED, 0, None, str(exc)))
            continue
        face, iou = pick_face(faces, ref)
        out.append(PhotoResult(MISSED if face is None else index[face["label"]], len(faces), iou))
    return out


def summary(results: list[PhotoResult]) -> dict[str, Any]:
    """Counts over :func:`score_photos` results: missed, unreadable, mean IoU of the found faces."""
    ious = [r.iou for r in results if r.predicted != MISSED and r.iou is not None]
    return {
        "missed": sum(r.predicted == MISSED for r in results),
        "unreadable": sum(bool(r.error) for r in results),
        "box_iou": float(np.mean(ious)) if ious else None,
    }
