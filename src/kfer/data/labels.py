"""AI Hub label JSON files: encodings, annotator voting and face boxes. No pixels, no file listing.

A label file is a JSON list of records (``{"data": [...]}`` wrappers are tolerated) with ``filename``,
``faceExp_uploader`` and ``annot_A/B/C`` = ``{"faceExp", "boxes": {minX, minY, maxX, maxY}}``. Files are read
as UTF-8, UTF-8 with a BOM, UTF-16 with a BOM or CP949 (the superset of EUC-KR that some releases of the
dataset ship); each file's encoding is recorded. A file that none of these decode, or that is not JSON, is a
:class:`LabelFileError` naming the file, unless the caller asks to skip it (``data.on_bad_label_file``).

Each record's opinions are kept as written (the annotators' ``faceExp`` values and ``faceExp_uploader``); the
reader maps them to classes and the label policy (:mod:`kfer.data.policy`) decides. The face box is the
per-coordinate median of the annotators' usable boxes. An annotator's box is dropped, and counted by reason,
when it is missing, not numeric, inverted (``minX > maxX`` or ``minY > maxY``) or of zero area; a record with
no usable box is counted by the reason of its boxes and its photo goes to the detector.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import math
import statistics
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kfer.errors import UserError

log = logging.getLogger(__name__)

ANNOTATORS = ("annot_A", "annot_B", "annot_C")
Box = tuple[float, float, float, float]


class LabelFileError(UserError):
    """A label file that cannot be read or parsed."""


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def decode_label_text(raw: bytes) -> tuple[str, str]:
    """Label file bytes -> (text, encoding name); LabelFileError when no supported encoding fits."""
    if raw.startswith(codecs.BOM_UTF8):
        return raw[len(codecs.BOM_UTF8):].decode("utf-8"), "utf-8-sig"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16"), "utf-16"
    for enc in ("utf-8", "cp949"):
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError:
            continue
    raise LabelFileError("not UTF-8, UTF-8 with BOM, UTF-16 or CP949/EUC-KR text")


def read_csv_table(path: Path, what: str) -> tuple[list[dict], list[str]]:
    """The rows and the header of a UTF-8 CSV table (a byte-order mark allowed): a votes or groups table. A file
    that cannot be read is one :class:`~kfer.errors.UserError` naming ``what`` and ``path``."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            return list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{what} {path} cannot be read: {exc}") from exc


def check_box(obj: object) -> tuple[Box | None, str]:
    """``{"minX","minY","maxX","maxY"}`` -> ((x0, y0, x1, y1), "") or (None, why): missing, not_numeric,
    inverted or zero_area."""
    if not isinstance(obj, dict):
        return None, "missing"
    try:
        x0, y0, x1, y1 = (float(obj[k]) for k in ("minX", "minY", "maxX", "maxY"))
    except KeyError:
        return None, "missing"
    except (TypeError, ValueError):
        return None, "not_numeric"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, "not_numeric"
    if x1 < x0 or y1 < y0:
        return None, "inverted"
    if x1 == x0 or y1 == y0:
        return None, "zero_area"
    return (x0, y0, x1, y1), ""


def annotated_box(record: dict) -> tuple[Box | None, Counter]:
    """The median of the annotators' usable boxes, and why the others were dropped (Counter of reasons)."""
    boxes, dropped = [], Counter()
    for k in ANNOTATORS:
        a = record.get(k)
        if not isinstance(a, dict):
            continue  # an annotator who is not there has no box to drop
        box, why = check_box(a.get("boxes"))
        if box is None:
            dropped[why] += 1
        else:
            boxes.append(box)
    if not boxes:
        return None, dropped
    return tuple(statistics.median(b[i] for b in boxes) for i in range(4)), dropped  # type: ignore[return-value]


def annotator_votes(record: dict) -> tuple[tuple[str, ...], int]:
    """(the annotators' ``faceExp`` values, NFC and stripped; how many annotators give none: absent or empty)."""
    votes, missing = [], 0
    for k in ANNOTATORS:
        a = record.get(k)
        value = a.get("faceExp") if isinstance(a, dict) else None
        if value is None or not str(value).strip():
            missing += 1
        else:
            votes.append(nfc(str(value)).strip())
    return tuple(votes), missing


@dataclass(frozen=True, slots=True)
class LabelRecord:
    """One usable record of an AI Hub label JSON file: what its people said, as written (mapped to classes and
    voted on by the reader, which knows the label map: :mod:`kfer.data.readers`)."""

    filename: str
    box: Box | None
    votes: tuple[str, ...] = ()  # the annotators' faceExp values
    votes_missing: int = 0  # annotators without a faceExp
    uploader: str | None = None  # faceExp_uploader
    box_issue: str = ""  # why box is None: the reasons of the dropped annotator boxes, or no_box
    gender: str | None = None  # the record's gender and age (group fields when the file name lacks them)
    age: str | None = None


@dataclass
class LabelIndex:
    """Label JSON records by NFC file name, with counts of what could not be used and each file's encoding."""

    records: dict[str, LabelRecord] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    files: dict[str, dict] = field(default_factory=dict)  # file (as given) -> {encoding, records} or {error}


def _records_of(data: object) -> list | None:
    if isinstance(data, dict):  # tolerate {"data": [...]} wrappers
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    return data if isinstance(data, list) else None


def read_label_file(path: Path) -> tuple[list, str]:
    """The records of one label file and its encoding; LabelFileError naming the file otherwise."""
    try:
        text, encoding = decode_label_text(Path(path).read_bytes())
        records = _records_of(json.loads(text))
    except OSError as exc:
        raise LabelFileError(f"label file {path} cannot be read: {exc.strerror or exc}") from exc
    except LabelFileError as exc:
        raise LabelFileError(f"label file {path} is {exc}") from exc
    except json.JSONDecodeError as exc:
        raise LabelFileError(f"label file {path} is not valid JSON: {exc}") from exc
    if records is None:
        raise LabelFileError(f"label file {path} holds no list of records (top level: {type(records).__name__})")
    return records, encoding


def load_label_json(paths: list[Path], on_bad: str = "error", names: dict[Path, str] | None = None) -> LabelIndex:
    """Read every label file into one index. ``on_bad``: "error" raises for an unreadable file, "skip" logs,
    counts (``bad_label_file``) and goes on. ``names`` maps a path to how the report names it."""
    index = LabelIndex()
    for path in paths:
        shown = (names or {}).get(path, str(path))
        try:
            data, encoding = read_label_file(path)
        except LabelFileError as exc:
            if on_bad != "skip":
                raise LabelFileError(f"{exc}; fix or re-download it, or set data.on_bad_label_file: skip "
                                     "to crop without it (its photos then take the file-name label)") from exc
            log.warning("%s: skipped (data.on_bad_label_file: skip)", exc)
            index.counts["bad_label_file"] += 1
            index.files[shown] = {"error": str(exc)}
            continue
        n_before = index.counts["label_records"]
        for rec in data:
            if not isinstance(rec, dict) or not isinstance(rec.get("filename"), str):
                index.counts["bad_label_record"] += 1
                continue
            name = nfc(Path(rec["filename"]).name)
            votes, missing = annotator_votes(rec)
            uploader = rec.get("faceExp_uploader")
            uploader = nfc(str(uploader)).strip() or None if uploader is not None else None
            box, dropped = annotated_box(rec)
            for why, n in dropped.items():
                index.counts[f"annotator_box_{why}"] += n
            issue = "" if box is not None else ("+".join(sorted(dropped)) or "no_box")
            if name in index.records:
                index.counts["duplicate_label_record"] += 1
            index.records[name] = LabelRecord(name, box, votes, missing, uploader, issue,
                                              *(None if rec.get(k) is None else nfc(str(rec[k])).strip() or None
                                                for k in ("gender", "age")))
            index.counts["label_records"] += 1
        index.files[shown] = {"encoding": encoding, "records": index.counts["label_records"] - n_before}
    return index
