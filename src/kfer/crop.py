"""The ``crop`` stage: raw photos -> one square grayscale face per image, plus a manifest and a report.

Output (built in a temporary folder, renamed into place when complete)::

    <paths.cropped>/<class>/<name>.png
    <paths.cropped>/manifest.csv     one row per raw file, skipped ones too (status = reason)
    <paths.crop_report>              counts by status, box source and class (DVC metrics)

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
from .config import Params
from .faces import FaceCropper, ImageError, read_image
from .readers import Record, nfc, read_records

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = [
    "path", "source", "label", "source_label", "group",
    "x0", "y0", "x1", "y1", "box_source", "confidence", "n_faces", "status",
]

_cropper: FaceCropper | None = None


def _init_worker(cropper: FaceCropper) -> None:
    global _cropper
    _cropper = cropper
    cv2.setNumThreads(1)  # same arithmetic in every worker, whatever the pool size


def _crop_one(item: tuple[str, tuple | None, str]) -> dict:
    """Crop one photo and write its PNG; never raises for bad input, returns the status instead."""
    source, annotation, out = item
    assert _cropper is not None, "worker not initialised"
    try:
        face = _cropper.crop_main(read_image(source), annotation)
    except ImageError as exc:
        return {"status": exc.reason, "detail": str(exc)}
    except cv2.error as exc:  # a decoder or resize failure on strange input
        return {"status": "opencv_error", "detail": str(exc).strip().splitlines()[-1]}
    files.write_png(out, face.image)
    return {
        "status": "ok",
        "box": face.box,
        "box_source": face.source,
        "confidence": "" if face.confidence is None else f"{face.confidence:.4f}",
        "n_faces": face.n_faces,
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
            (str(r.source), r.box if cfg.use_annotation_box else None, str(tmp / names[r.rel])) for r in todo
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
            res = outcomes[rec.rel] or {"status": rec.status}
            rows.append(_manifest_row(params, rec, res, out_root / names[rec.rel] if res["status"] == "ok" else None))
        with open(tmp / MANIFEST, "w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, MANIFEST_COLUMNS)
            w.writeheader()
            w.writerows(rows)

    report = _report(params, result, rows, workers)
    files.write_json(params.path(params.paths.crop_report), report)
    for reason, n in sorted(report["skipped"].items()):
        log.warning("crop: skipped %d file(s): %s", n, reason)
    log.info(
        "crop: %d of %d files -> %d faces in %s (%s), %d skipped, layout %s",
        report["ok"], report["total"], report["ok"], params.rel(out_root),
        ", ".join(f"{k} {v}" for k, v in report["box_source"].items()) or "none",
        report["total"] - report["ok"], result.layout,
    )
    return report


def _manifest_row(params: Params, rec: Record, res: dict, out: Path | None) -> dict:
    box = res.get("box") or (None,) * 4
    return {
        "path": params.rel(out) if out is not None else "",
        "source": params.rel(rec.source),
        "label": rec.label or "",
        "source_label": rec.source_label or "",
        "group": rec.group or "",
        **{k: ("" if v is None else v) for k, v in zip(("x0", "y0", "x1", "y1"), box, strict=True)},
        "box_source": res.get("box_source", ""),
        "confidence": res.get("confidence", ""),
        "n_faces": res.get("n_faces", ""),
        "status": res["status"],
    }


def _report(params: Params, result, rows: list[dict], workers: int) -> dict:
    status = Counter(r["status"] for r in rows)
    ok_rows = [r for r in rows if r["status"] == "ok"]
    return {
        "layout": result.layout,
        "total": len(rows),
        "ok": status.get("ok", 0),
        "ok_fraction": round(status.get("ok", 0) / len(rows), 4) if rows else 0.0,
        "skipped": {k: v for k, v in sorted(status.items()) if k != "ok"},
        "box_source": dict(sorted(Counter(r["box_source"] for r in ok_rows).items())),
        "per_class": {c: sum(r["label"] == c for r in ok_rows) for c in params.class_names},
        "persons": len({r["group"] for r in ok_rows}),
        "label_json": dict(sorted(result.label_counts.items())),
        "image_size": params.crop.image_size,
        "workers": workers,
    }
