"""The ``crop`` stage: raw photos -> one square grayscale face per image, plus a manifest and a report.

Output (built in a temporary folder, renamed into place when complete)::

    <paths.cropped>/<class>/<name>.png
    <paths.cropped>/manifest.csv     one row per path under the raw folder: photos, skipped files (status =
                                     reason, detail = its text), label files, broken links
    <paths.crop_report>              counts by status, box source, label source and class; label files and
                                     their encodings; annotation boxes clamped or not used
    <paths.crop_headline>            DVC metrics: images (faces written), skipped (files not cropped)

Photos are read with :meth:`kfer.data.faces.FaceCropper.crop_bytes`, which cuts the box ``crop.box`` chooses: by
default the detector's box that matches the annotation, i.e. the face as ``kfer predict`` cuts it. Detection
runs on a reduced colour decode and a large JPEG's face is cut from a reduced gray decode; a photo whose header
claims more than ``crop.max_megapixels`` is skipped as ``too_many_pixels`` before anything is decoded. A folder where
nothing is usable is an error naming the reasons; the previous output is then left as it was.

Work is spread over ``crop.workers`` processes; results come back in input order and every worker runs
OpenCV single-threaded, so the files are identical whatever the worker count.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from pathlib import Path

import cv2
from tqdm import tqdm

from kfer import files
from kfer.catalog import Catalog
from kfer.config import Params
from kfer.data import groups as group_fields
from kfer.data.faces import FaceCropper, ImageError
from kfer.data.images import read_bytes
from kfer.data.policy import AgreementTally
from kfer.data.readers import ReadResult, Record, nfc, read_records
from kfer.errors import UserError

log = logging.getLogger(__name__)

NOT_PHOTOS = ("label_file",)  # rows that are not counted as photos (the label JSON files themselves)
HINTS = {
    "no_face": "pre-cropped faces (FER2013, CK+) need crop.detector: none",
    "too_small": "lower crop.min_image_side, or use larger photos",
    "too_many_pixels": "the header claims more than crop.max_megapixels (a decompression bomb, or a huge scan): "
                       "refused before decoding; raise crop.max_megapixels (at most 178) if such photos are real",
    "unknown_label": "add the labels to data.label_map",
    "no_label": "check data.layout (aihub file names or <label>/ folders)",
    "no_group": "set data.group for this layout (regex, folder or none)",
    "no_source": "add the folder to data.sources",
    "not_a_face": "the raters' largest share says 'not a face' (data.votes): dropped, never its folder label",
    "no_class_votes": "the raters' largest share names no class (unknown, or a label data.label_map leaves out): "
                      "dropped, never its folder label",
}

#: label-record fallbacks the crop report counts (``label_json``), and the rule each follows
FALLBACKS = {
    "annotator_unknown_label": "an annotator's faceExp that is no class still votes (a majority for it makes the "
                               "photo unknown_label) but is left out of the votes column and soft targets",
    "uploader_missing": "faceExp_uploader absent: the file name's emotion is the uploader's label",
    "uploader_unknown_label": "faceExp_uploader not a known label: the file name's emotion is the uploader's label",
    "no_usable_annotator": "no annotator label usable: the photo takes the uploader's label",
    "votes_missing": "photos the votes table does not list keep their folder label, without votes",
    "votes_not_numeric": "votes table rows with a share that is not a finite number >= 0: that photo keeps its "
                         "folder label, without votes",
    "votes_empty": "votes table rows whose shares are all 0: that photo keeps its folder label, without votes",
    "votes_row_no_file": "votes table rows whose key names no image of the source: not used",
    "votes_row_duplicate": "votes table rows whose key was seen before: the first row counts",
    "groups_person_missing": "photos whose person the groups table does not list: its fields are unknown",
    "groups_row_bad_key": "groups table rows with a blank key or one data.groups.key_pattern does not match: not used",
    "groups_row_duplicate": "groups table rows whose person was seen before: the first row counts",
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
    out_root = Catalog(params).cropped
    workers = files.resolve_workers(cfg.workers)
    cropper = FaceCropper.from_params(cfg)
    tally = _Tally(params)

    with files.atomic_dir(out_root) as tmp:
        for label in params.class_names:
            (tmp / label).mkdir()
        # tasks are made as the pool takes them and manifest rows are written as results arrive (in input
        # order), not collected: what the stage holds per photo is its record, not its row or outcome
        items = ((str(r.raw), r.box, str(tmp / names[r.rel]), r.detector) for r in records if r.rel in names)
        results = files.parallel_map(
            _crop_one, items, workers, cfg.chunksize, initializer=_init_worker, initargs=(cropper,),
            workers_param="crop.workers",
        )
        with contextlib.closing(results), Catalog(params).table_writer("crop_manifest", tmp) as w:
            progress = tqdm(total=len(names), desc="crop", unit="img", mininterval=1.0)
            for rec in records:
                if rec.rel in names:
                    res = next(results)
                    progress.update()
                else:
                    res = {"status": rec.status, "detail": rec.detail}
                row = _manifest_row(params, rec, res, out_root / names[rec.rel] if res["status"] == "ok" else None)
                tally.add(row, res)
                w.writerow(row)
            progress.close()
            if next(results, None) is not None:
                raise RuntimeError("crop: more results than photos")  # a bug, never bad input
        report = _report(params, result, tally, workers)
        if report["ok"] == 0:
            _write_reports(params, report)
            raise UserError(_nothing_usable(params, report))

    _write_reports(params, report)
    for reason, n in sorted(report["skipped"].items()):
        log.warning("crop: skipped %d file(s): %s", n, reason)
    for key, rule in FALLBACKS.items():
        if report["label_json"].get(key):
            log.warning("crop: %d %s: %s", report["label_json"][key], key.replace("_", " "), rule)
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
    return (f"crop: no usable photo in {Catalog(params).raw}: {report['total']} file(s), skipped "
            + ", ".join(f"{k} {skipped[k]}" for k in top)
            + (f" ({hints})" if hints else "") + f"; see {params.rel(Catalog(params).crop_report)}")


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
        **rec.opinions.row(),
        "group": rec.group or "",
        "groups": group_fields.encode(rec.groups),
        **{k: ("" if v is None else v) for k, v in zip(("x0", "y0", "x1", "y1"), box, strict=True)},
        "box_source": res.get("box_source", ""),
        "confidence": res.get("confidence", ""),
        "n_faces": res.get("n_faces", ""),
        "match_iou": res.get("match_iou", ""),
        "status": res["status"],
        "detail": detail,
    }


class _Tally:
    """The crop report's counts, added up row by row as the manifest is written."""

    def __init__(self, params: Params):
        self.status: Counter[str] = Counter()
        self.box_source: Counter[str] = Counter()
        self.label_from: Counter[str] = Counter()
        self.per_class: Counter[str] = Counter()
        self.box_issue: Counter[str] = Counter()
        self.persons: set[str] = set()
        self.opinions = AgreementTally()
        self.matched = self.match_tried = 0
        self.match_iou_sum = 0.0
        self.source_total: Counter[str] = Counter()
        self.source_ok: Counter[str] = Counter()
        self.source_persons: dict[str, set[str]] = {name: set() for name in params.data.sources}
        self.groups: dict[str, Counter[str]] = {}

    def add(self, row: dict, res: dict) -> None:
        if row["status"] in NOT_PHOTOS:
            return
        self.status[row["status"]] += 1
        self.source_total[row["source"]] += 1
        if row["status"] != "ok":
            return
        self.box_source[row["box_source"]] += 1
        self.label_from[row["label_from"]] += 1
        self.per_class[row["label"]] += 1
        self.opinions.add(row["label_uploader"], row["label_majority"], row["votes"], row["agreement"])
        self.box_issue[res.get("box_issue", "")] += 1
        self.persons.add(row["group"])
        for field, value in group_fields.decode(row["groups"]).items():
            self.groups.setdefault(field, Counter())[value] += 1
        self.source_ok[row["source"]] += 1
        if row["source"] in self.source_persons:
            self.source_persons[row["source"]].add(row["group"])
        if row["match_iou"] != "":
            self.match_tried += 1
            if row["box_source"] == "matched":
                self.matched += 1
                self.match_iou_sum += float(row["match_iou"])

    def match_counts(self) -> dict:
        """Annotations a detector box matched (that box cut), and those none did (the annotation cut)."""
        if not self.match_tried:
            return {}
        return {"matched_to_detector": self.matched, "unmatched_annotation_used": self.match_tried - self.matched,
                "match_iou_mean": round(self.match_iou_sum / self.matched, 4) if self.matched else None}


def _write_reports(params: Params, report: dict) -> None:
    """The full report (a plain file) and its headline numbers (the DVC metrics ``paths.crop_headline``)."""
    Catalog(params).write_json("crop_report", report)
    Catalog(params).write_json("crop_headline",
                     {"images": report["ok"], "skipped": report["total"] - report["ok"]})


def _report(params: Params, result: ReadResult, tally: _Tally, workers: int) -> dict:
    total, ok = sum(tally.status.values()), tally.status.get("ok", 0)
    annotated = [r for r in result.records if r.label_from.startswith("json")]
    dropped = {k.removeprefix("annotator_box_"): v for k, v in sorted(result.label_counts.items())
               if k.startswith("annotator_box_")}
    report = {
        "layout": result.layout,
        "total": total,
        "ok": ok,
        "ok_fraction": round(ok / total, 4) if total else 0.0,
        "skipped": {k: v for k, v in sorted(tally.status.items()) if k != "ok"},
        "box_source": dict(sorted(tally.box_source.items())),
        "annotation_boxes": {
            "records_with_box": sum(r.box is not None for r in annotated),
            "records_without_box": sum(r.box is None for r in annotated),
            "annotator_boxes_dropped": dropped,  # missing / not_numeric / inverted / zero_area: not used
            "clamped_to_image": tally.box_issue.get("clamped", 0),  # partly outside: clamped, used
            "outside_image_not_used": tally.box_issue.get("outside", 0),  # wholly outside: detector / whole image
            # crop.box match: annotations a detector box matched (that box cut), and those none did (annotation cut)
            **tally.match_counts(),
        },
        "label_from": dict(sorted(tally.label_from.items())),
        "per_class": {c: tally.per_class.get(c, 0) for c in params.class_names},
        # the faces cut, by uploader's label: with votes, how often the annotators' majority says the same, the
        # mean agreement; and how many faces each data.min_agreement would keep (agreement histogram)
        "opinions": tally.opinions.report(params.class_names),
        "persons": len(tally.persons),
        # the faces cut, per group field and value (unknown: missing or unreadable; kfer.data.groups)
        "groups": {f: dict(sorted(tally.groups[f].items())) for f in group_fields.field_order(tally.groups)},
        "label_files": dict(sorted(result.label_files.items())),
        "label_json": dict(sorted(result.label_counts.items())),
        "image_size": params.crop.image_size,
        "workers": workers,
    }
    if params.data.sources:
        report["layouts"] = result.layouts
        report["per_source"] = {
            name: {"total": tally.source_total.get(name, 0), "ok": tally.source_ok.get(name, 0),
                   "persons": len(tally.source_persons[name])}
            for name in params.data.sources
        }
    return report
