"""``kfer predict``: every face in new photos and its expression, with the registered (or any) photo model.

The model is the pyfunc logged by :func:`kfer.serving.publish.log_models`; its own copy of the crop code finds and
crops the faces, so prediction can never drift from training. Results are one dict per photo with a list of
faces (see :func:`predict_photos`); :func:`format_results` renders them for people or as JSON and
:func:`annotate` draws them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from kfer.config import Params
from kfer.data.images import ImageError, decode_image, read_bytes
from kfer.errors import KferError
from kfer.files import write_image


class ModelLoadError(KferError, RuntimeError):
    """The photo model cannot be loaded (no such URI, no champion yet, not a kfer photo model): one line, exit 1."""


log = logging.getLogger(__name__)

ANNOTATED_SUFFIX = ".pred.jpg"
EXPLAINED_SUFFIX = ".cam.png"  # <photo stem>.face<i>.cam.png


def default_model_uri(params: Params) -> str:
    return f"models:/{params.train.registered_model}@champion"


def load_photo_model(model_uri: str | None, params: Params):
    """Load the photo pyfunc (resolving ``models:/`` against the project's store) -> PhotoEmotionModel."""
    import mlflow
    import mlflow.pyfunc

    from kfer import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri(params))
    uri = model_uri or default_model_uri(params)
    saved_path = list(sys.path)
    try:
        pyfunc_model = mlflow.pyfunc.load_model(uri)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model {uri!r} from {tracking.tracking_uri(params)}: {exc}"
                           " (register one with `kfer register`, or pass --model)") from exc
    finally:
        # MLflow prepends the model's code folder (the serving modules, kfer.serving.publish.serving_modules)
        # to sys.path for good; in this process kfer is already imported, but worker processes spawned later
        # would import that partial copy of kfer instead of the installed one
        sys.path[:] = saved_path
    model = pyfunc_model.unwrap_python_model()
    if not hasattr(model, "predict_bytes"):
        raise ModelLoadError(f"{uri!r} is not a kfer photo model logged by this version of kfer "
                           "(kfer.serving.publish.log_models): retrain it")
    return model


def predict_photos(photos: list[Path], model_uri: str | None, params: Params,
                   annotate_dir: Path | None = None, model=None,
                   explain_dir: Path | None = None) -> list[dict[str, Any]]:
    """One result per photo, in order: ``{"photo", "n_faces", "faces", "error"}``.

    ``faces`` holds one dict per detected face, largest first (``face``, ``box`` [x0, y0, x1, y1],
    ``confidence``, ``label``, ``label_ko``, ``probability``, ``probabilities`` {class: p}); a photo without a
    face has ``faces == []``. An unreadable photo has ``error`` set (its reason) instead of stopping the
    others. With ``annotate_dir`` an annotated JPEG is written per readable photo (``annotated`` holds its
    path). With ``explain_dir`` each face's Grad-CAM overlay (:mod:`kfer.serving.explain`, the predicted class) is
    written as ``<photo stem>.face<i>.cam.png`` and the face's ``explanation`` holds its path. ``model`` (an
    already loaded PhotoEmotionModel) skips loading.
    """
    model = model or load_photo_model(model_uri, params)
    results = []
    used_names: set[str] = set()
    used_stems: set[str] = set()
    for photo in photos:
        photo = Path(photo)
        result: dict[str, Any] = {"photo": str(photo), "n_faces": 0, "faces": [], "error": None}
        try:
            data = read_bytes(photo)
            if explain_dir is None:
                faces = model.predict_bytes(data)
            else:
                faces, crops = model.predict_bytes_with_crops(data)
        except ImageError as exc:
            result["error"] = str(exc)
            log.warning("%s: %s", photo, exc)
            results.append(result)
            continue
        result["n_faces"] = len(faces)
        result["faces"] = faces
        if explain_dir is not None and faces:
            _explain(model, faces, crops, Path(explain_dir), unique_name(photo.stem, used_stems, ""))
        if annotate_dir is not None:
            out = Path(annotate_dir) / unique_name(photo.stem, used_names)
            annotate(decode_image(data, checked=True), faces, out)  # predict_bytes checked the bytes
            result["annotated"] = str(out)
        results.append(result)
    return results


def unique_name(stem: str, used: set[str], suffix: str = ANNOTATED_SUFFIX) -> str:
    """``stem + suffix``, or ``stem-1 + suffix``, ``stem-2`` … when ``used`` holds it already (then added)."""
    name, i = stem + suffix, 1
    while name in used:
        name, i = f"{stem}-{i}{suffix}", i + 1
    used.add(name)
    return name


def _explain(model, faces: list[dict[str, Any]], crops, out_dir: Path, stem: str) -> None:
    """Write each face's Grad-CAM overlay, captioned with its label, and note its path in the face's dict."""
    from kfer.serving import explain

    classes = [model.class_names.index(f["label"]) for f in faces]
    for f, picture in zip(faces, explain.explain_faces(model.keras_model, crops, classes), strict=True):
        out = out_dir / f"{stem}.face{f['face']}{EXPLAINED_SUFFIX}"
        write_image(out, explain.captioned(picture, f"{f['label']} {f['probability']:.0%}"))
        f["explanation"] = str(out)


def format_results(results: list[dict[str, Any]], as_json: bool = False) -> str:
    """Human-readable text (default) or JSON (UTF-8, Korean labels kept) of :func:`predict_photos` results."""
    if as_json:
        return json.dumps(results, ensure_ascii=False, indent=2)
    lines = []
    for r in results:
        if r.get("error"):
            lines.append(f"{r['photo']}: ERROR {r['error']}")
            continue
        lines.append(f"{r['photo']}: {r['n_faces']} face(s)" if r["faces"] else f"{r['photo']}: no face found")
        for f in r["faces"]:
            x0, y0, x1, y1 = f["box"]
            conf = "" if f.get("confidence") is None else f" (detector {f['confidence']:.2f})"
            lines.append(f"  face {f['face']} at [{x0}, {y0}, {x1}, {y1}]{conf}: "
                         f"{f['label_ko']} ({f['label']}) {f['probability']:.1%}")
            ranked = sorted(f["probabilities"].items(), key=lambda kv: -kv[1])
            lines.append("    " + "  ".join(f"{k} {v:.1%}" for k, v in ranked))
            if f.get("explanation"):
                lines.append(f"    explanation: {f['explanation']}")
        if r.get("annotated"):
            lines.append(f"  annotated: {r['annotated']}")
    return "\n".join(lines)


def annotate(bgr: np.ndarray, faces: list[dict[str, Any]], out_path: str | os.PathLike) -> Path:
    """Draw each face's box and label on a copy of ``bgr`` (:func:`draw_faces`) and write it as JPEG (works with
    non-ASCII paths), atomically."""
    import cv2

    return write_image(out_path, draw_faces(bgr, faces), [cv2.IMWRITE_JPEG_QUALITY, 90])


def draw_faces(bgr: np.ndarray, faces: list[dict[str, Any]]) -> np.ndarray:
    """A copy of ``bgr`` with each face's box and label: photos (:func:`annotate`) and video frames
    (:mod:`kfer.serving.video`) alike. A face with a ``face_id`` (a video's track) is labelled ``#<id> <label> <p>``.

    Labels are the English class names: OpenCV's Hershey fonts have no Hangul glyphs.
    """
    import cv2

    img = bgr.copy()
    h, w = img.shape[:2]
    scale = max(0.4, min(w, h) / 800.0)
    thick = max(1, int(round(2 * scale)))
    for f in faces:
        x0, y0, x1, y1 = (int(v) for v in f["box"])
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), (0, 255, 0), thick)
        text = ("" if f.get("face_id") is None else f"#{f['face_id']} ") + f"{f['label']} {f['probability']:.0%}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = y0 - base - 2 if y0 - th - base - 2 >= 0 else min(h - 1, y1 + th + 2)
        cv2.rectangle(img, (x0, ty - th - 2), (min(w - 1, x0 + tw + 2), ty + base), (0, 255, 0), cv2.FILLED)
        cv2.putText(img, text, (x0 + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return img
