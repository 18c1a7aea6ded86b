"""The ``crop`` stage: raw photos -> one square grayscale face per image, plus a manifest and a report.

Output (built in a temporary folder, renamed into place when complete)::

    <paths.cropped>/<class>/<name>.png
    <paths.cropped>/manifest.csv     one row per path under the raw folder: photos, skipped files (status =
                                     reason, detail = its text), label files, broken links
    <paths.crop_report>              counts by status, box source, label source and class; label files and
                                     their encodings; annotation boxes clamped or not used (DVC metrics)

Photos are read with :meth:`kfer.faces.FaceCropper.crop_bytes`, which cuts the box ``crop.box`` chooses: by
default the detector's box that matches the annotation, i.e. the face as ``kfer predict`` cuts it. Detection
runs on a reduced colour decode and a large JPEG's face is cut from a reduced gray decode. A folder where
nothing is usable is an error naming the reasons; the previous output is then left as it was.

Work is spread over ``crop.workers`` processes; results come back in input order and every worker runs
OpenCV single-threaded, so the files are identical whatever the worker count.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import cv2
from tqdm import tqdm

from . import files
from .config import Params, UserError
from .faces import FaceCropper, ImageError
from .images import read_bytes
from .readers import ReadResult, Record, nfc, read_records

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = [
    "path", "raw", "source", "label", "source_label", "label_from", "group",
    "x0", "y0", "x1", "y1", "box_source", "confidence", "n_faces", "match_iou", "status", "detail",
]
NOT_PHOTOS = ("label_file",)  # rows that are not counted as photos (the label JSON files themselves)
HINTS = {
    "no_face": "pre-cropped faces (FER2013, CK+) need crop.detector: none",
    "too_small": "lower crop.min_image_side, or use larger photos",
    "unknown_label": "add the labels to data.label_map",
    "no_label": "check data.layout (aihub file names or <label>/ folders)",
    "no_group": "set data.group for this layout (regex, folder or none)",
    "no_source": "add the folder to data.sources",
}

_cropper: FaceCropper | None = None


def _init_worker(cropper: FaceCropper) -> None:
    global _cropper
    _cropper = cropper
    cv2.setNumThreads(1)  # same arithmetic in every worker, whatever the pool size


def _box_note(annotation, face, match_iou: float) -> str:
    notes = []
    if face.box_issue == "clamped":
        notes.append(f"annotation box {tuple(round(v) for v in annotation)} partly outside the image: clamped")
    if face.box_issue == "outside":
        notes.append(f"annotation box {tuple(round(v) for v in annotation)} outside the image: not used, "
                     f"{face.source} instead")
    if face.source == "annotation" and face.match_iou is not None:
        notes.append(f"no detector box matched the annotation (best IoU {face.match_iou:.2f} < crop.match_iou "
                     f"{match_iou}; {face.n_faces} face(s) found): annotation box used")
    return "; ".join(notes)


def _crop_one(item: tuple[str, tuple | None, str, str | None]) -> dict:
    """Crop one photo and write its PNG; never raises for bad input, returns the status and detail instead."""
    source, annotation, out, detector = item
    assert _cropper is not None, "worker not initialised"
    try:
        face = _cropper.with_detector(detector).crop_bytes(read_bytes(source), annotation)
    except ImageError as exc:
        return {"status": exc.reason, "detail": exc.detail}
    except cv2.error as exc:  # a decoder or resize failure on strange input
        return {"status": "opencv_error", "detail": str(exc).strip().splitlines()[-1]}
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop a 500k-photo run; counted and shown
        return {"status": "error", "detail": f"{type(exc).__name__}: {exc}"}
    files.write_png(out, face.image)
    return {
        "status": "ok",
        "box": face.box,
        "box_source": face.source,
        "box_issue": face.box_issue,
        "detail": _box_note(annotation, face, _cropper.match_iou),
        "confidence": "" if face.confidence is None else f"{face.confidence:.4f}",
        "n_faces": face.n_faces,
        "match_iou": "" if face.match_iou is None else f"{face.match_iou:.4f}",
    }


def output_names(records: list[Record]) -> dict[str, str]:
    """``<class>/<stem>.png`` per usable record; stems that collide within a class get a path hash."""
    wanted = {r.rel: f"{r.label}/{nfc(Path(r.rel).stem)}" for r in records if r.status == "ok"}
    seen = Counter(wanted.values())
    return {
        rel: (f"{name}-{files.short_hash(rel)}" if seen[name] > 1 else name) + ".png"
        for rel, name in wanted.items()
    }


def run_crop(params: Params, raw_root: Path | None = None) -> dict:
    cfg = params.crop
    result = read_records(params, raw_root)
    records = result.records
    names = output_names(records)
    out_root = params.path(params.paths.cropped)
    workers = files.resolve_workers(cfg.workers)
    cropper = FaceCropper.from_params(cfg)
    rows: list[dict] = []

    with files.atomic_dir(out_root) as tmp:
        for label in params.class_names:
            (tmp / label).mkdir()
        todo = [r for r in records if r.rel in names]
        items = [
            (str(r.raw), r.box, str(tmp / names[r.rel]), r.detector)
            for r in todo
        ]
        outcomes = dict.fromkeys(r.rel for r in records)
        results = files.parallel_map(
            _crop_one, items, workers, cfg.chunksize, initializer=_init_worker, initargs=(cropper,)
        )
        for rec, res in tqdm(
            zip(todo, results, strict=True), total=len(todo), desc="crop", unit="img", mininterval=1.0
        ):
            outcomes[rec.rel] = res
        for rec in records:
            res = outcomes[rec.rel] or {"status": rec.status, "detail": rec.detail}
            rows.append(_manifest_row(params, rec, res, out_root / names[rec.rel] if res["status"] == "ok" else None))
        report = _report(params, result, rows, outcomes, workers)
        if report["ok"] == 0:
            files.write_json(params.path(params.paths.crop_report), report)
            raise UserError(_nothing_usable(params, report))
        with open(tmp / MANIFEST, "w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, MANIFEST_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    files.write_json(params.path(params.paths.crop_report), report)
    for reason, n in sorted(report["skipped"].items()):
        log.warning("crop: skipped %d file(s): %s", n, reason)
    for name, info in report["label_files"].items():
        log.info("crop: label file %s: %s", name, info.get("error") or f"{info['records']} records, {info['encoding']}")
    log.info(
        "crop: %d of %d files -> %d faces in %s (%s), %d skipped, %d label file(s), layout %s",
        report["ok"], report["total"], report["ok"], params.rel(out_root),
        ", ".join(f"{k} {v}" for k, v in report["box_source"].items()) or "none",
        report["total"] - report["ok"], len(report["label_files"]),
        result.layout if not params.data.sources else ", ".join(f"{k} {v}" for k, v in result.layouts.items()),
    )
    return report


def _nothing_usable(params: Params, report: dict) -> str:
    skipped = report["skipped"]
    top = sorted(skipped, key=lambda k: -skipped[k])
    hints = "; ".join(HINTS[k] for k in top if k in HINTS)
    return (f"crop: no usable photo in {params.path(params.paths.raw)}: {report['total']} file(s), skipped "
            + ", ".join(f"{k} {skipped[k]}" for k in top)
            + (f" ({hints})" if hints else "") + f"; see {params.rel(params.path(params.paths.crop_report))}")


def _manifest_row(params: Params, rec: Record, res: dict, out: Path | None) -> dict:
    box = res.get("box") or (None,) * 4
    detail = "; ".join(dict.fromkeys(d for d in (rec.detail, res.get("detail", "")) if d))
    return {
        "path": params.rel(out) if out is not None else "",
        "raw": params.rel(rec.raw),
        "source": rec.source,
        "label": rec.label or "",
        "source_label": rec.source_label or "",
        "label_from": rec.label_from,
        "group": rec.group or "",
        **{k: ("" if v is None else v) for k, v in zip(("x0", "y0", "x1", "y1"), box, strict=True)},
        "box_source": res.get("box_source", ""),
        "confidence": res.get("confidence", ""),
        "n_faces": res.get("n_faces", ""),
        "match_iou": res.get("match_iou", ""),
        "status": res["status"],
        "detail": detail,
    }


def _match_counts(ok_rows: list[dict]) -> dict:
    tried = [r for r in ok_rows if r["match_iou"] != ""]
    if not tried:
        return {}
    ious = [float(r["match_iou"]) for r in tried if r["box_source"] == "matched"]
    return {"matched_to_detector": len(ious), "unmatched_annotation_used": len(tried) - len(ious),
            "match_iou_mean": round(sum(ious) / len(ious), 4) if ious else None}


def _report(params: Params, result: ReadResult, rows: list[dict], outcomes: dict, workers: int) -> dict:
    photos = [r for r in rows if r["status"] not in NOT_PHOTOS]
    status = Counter(r["status"] for r in photos)
    ok_rows = [r for r in photos if r["status"] == "ok"]
    annotated = [r for r in result.records if r.label_from.startswith("json")]
    issues = Counter((o or {}).get("box_issue", "") for o in outcomes.values() if o and o["status"] == "ok")
    dropped = {k.removeprefix("annotator_box_"): v for k, v in sorted(result.label_counts.items())
               if k.startswith("annotator_box_")}
    report = {
        "layout": result.layout,
        "total": len(photos),
        "ok": status.get("ok", 0),
        "ok_fraction": round(status.get("ok", 0) / len(photos), 4) if photos else 0.0,
        "skipped": {k: v for k, v in sorted(status.items()) if k != "ok"},
        "box_source": dict(sorted(Counter(r["box_source"] for r in ok_rows).items())),
        "annotation_boxes": {
            "records_with_box": sum(r.box is not None for r in annotated),
            "records_without_box": sum(r.box is None for r in annotated),
            "annotator_boxes_dropped": dropped,  # missing / not_numeric / inverted / zero_area: not used
            "clamped_to_image": issues.get("clamped", 0),  # partly outside: clamped, used
            "outside_image_not_used": issues.get("outside", 0),  # wholly outside: detector / whole image
            # crop.box match: annotations a detector box matched (that box cut), and those none did (annotation cut)
            **_match_counts(ok_rows),
        },
        "label_from": dict(sorted(Counter(r["label_from"] for r in ok_rows).items())),
        "per_class": {c: sum(r["label"] == c for r in ok_rows) for c in params.class_names},
        "persons": len({r["group"] for r in ok_rows}),
        "label_files": dict(sorted(result.label_files.items())),
        "label_json": dict(sorted(result.label_counts.items())),
        "image_size": params.crop.image_size,
        "workers": workers,
    }
    if params.data.sources:
        report["layouts"] = result.layouts
        report["per_source"] = {
            name: {"total": sum(r["source"] == name for r in photos), "ok": sum(r["source"] == name for r in ok_rows),
                   "persons": len({r["group"] for r in ok_rows if r["source"] == name})}
            for name in params.data.sources
        }
    return report
