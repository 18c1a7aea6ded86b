"""Turn a raw data folder into records (file, label, person, optional face box). No pixels are touched.

Three layouts, one interface (:func:`read_records`):

* ``aihub`` file names ``(title)_(gender)_(age)_(emotion)[_(place)]_(date).jpg`` (AI Hub "한국인 감정인식을 위한
  복합 영상"), optionally with label JSON files listing ``filename``, ``faceExp_uploader`` and
  ``annot_A/B/C`` = ``{"faceExp", "boxes": {minX, minY, maxX, maxY}}``. The label is the annotators' majority
  (a three-way tie follows ``data.vote_tie``) and the face box is the per-coordinate median of the annotators'
  boxes. Without a JSON record the emotion field of the file name is the label.
* ``folders``: ``<root>/<label>/<image>`` as FER2013 and CK+ are shipped.
* ``auto``: ``aihub`` when any file name parses as AI Hub, else ``folders``.

Korean text is NFC-normalized (archives made on macOS carry NFD). Source labels go through
``data.label_map``; an unknown label is counted (status ``unknown_label``), never guessed.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import Params

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
ANNOTATORS = ("annot_A", "annot_B", "annot_C")

# title_gender_age_emotion[_place]_date ; the date is 14 digits, optionally followed by -NNN-NNN.
AIHUB_NAME = re.compile(
    r"^(?P<title>[^_]+)_(?P<gender>[^_]+)_(?P<age>\d+)_(?P<emotion>[^_]+)"
    r"(?:_(?P<place>.+))?_(?P<date>\d{8,14}(?:-\d+)*)$"
)

Box = tuple[float, float, float, float]


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@dataclass(frozen=True)
class AihubName:
    title: str
    gender: str
    age: int
    emotion: str
    place: str | None
    date: str

    def field(self, name: str) -> str | None:
        value = getattr(self, name)
        return None if value is None else str(value)


def parse_aihub_name(filename: str) -> AihubName | None:
    """Parse an AI Hub file name (with or without folder and extension); None when it does not match."""
    stem = nfc(Path(filename).stem)
    m = AIHUB_NAME.match(stem)
    if not m:
        return None
    d = m.groupdict()
    return AihubName(d["title"], d["gender"], int(d["age"]), d["emotion"], d["place"], d["date"])


@dataclass(frozen=True)
class LabelRecord:
    """One usable record of an AI Hub label JSON file."""

    filename: str
    label: str | None  # source label after voting; None on an unresolved tie
    box: Box | None
    votes: tuple[str, ...] = ()


def parse_box(obj: object) -> Box | None:
    """``{"minX","minY","maxX","maxY"}`` -> (x0, y0, x1, y1); None when absent or degenerate."""
    if not isinstance(obj, dict):
        return None
    try:
        x0, y0, x1, y1 = (float(obj[k]) for k in ("minX", "minY", "maxX", "maxY"))
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def vote_label(record: dict, tie: str = "uploader") -> tuple[str | None, tuple[str, ...]]:
    """Annotators' majority; on a tie (or no annotator) the uploader's label when ``tie == "uploader"``."""
    votes = tuple(
        nfc(str(a["faceExp"])).strip()
        for a in (record.get(k) for k in ANNOTATORS)
        if isinstance(a, dict) and a.get("faceExp")
    )
    uploader = record.get("faceExp_uploader")
    uploader = nfc(str(uploader)).strip() if uploader else None
    if votes:
        top, n = Counter(votes).most_common(1)[0]
        if n * 2 > len(votes):
            return top, votes
    return (uploader if tie == "uploader" else None), votes


def median_box(record: dict) -> Box | None:
    boxes = [b for b in (parse_box((record.get(k) or {}).get("boxes")) for k in ANNOTATORS) if b]
    if not boxes:
        return None
    return tuple(statistics.median(b[i] for b in boxes) for i in range(4))  # type: ignore[return-value]


@dataclass
class LabelIndex:
    """Label JSON records by NFC file name, with counts of what could not be used."""

    records: dict[str, LabelRecord] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)


def load_label_json(paths: list[Path], tie: str = "uploader") -> LabelIndex:
    index = LabelIndex()
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("label file %s unreadable (%s): skipped", path, exc)
            index.counts["bad_label_file"] += 1
            continue
        if isinstance(data, dict):  # tolerate {"data": [...]} wrappers
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        if not isinstance(data, list):
            index.counts["bad_label_file"] += 1
            continue
        for rec in data:
            if not isinstance(rec, dict) or not isinstance(rec.get("filename"), str):
                index.counts["bad_label_record"] += 1
                continue
            name = nfc(Path(rec["filename"]).name)
            label, votes = vote_label(rec, tie)
            if name in index.records:
                index.counts["duplicate_label_record"] += 1
            index.records[name] = LabelRecord(name, label, median_box(rec), votes)
            index.counts["label_records"] += 1
    return index


@dataclass(frozen=True)
class Record:
    """One raw file and what the readers know about it. ``status`` is "ok" or the reason it is skipped."""

    source: Path  # absolute path of the raw file
    rel: str  # path relative to the raw root, POSIX, NFC
    source_label: str | None
    label: str | None  # class name
    group: str | None  # the person
    box: Box | None = None  # annotated face box in source pixels
    status: str = "ok"


@dataclass
class ReadResult:
    layout: str
    records: list[Record]
    label_counts: Counter  # what happened to label JSON records

    def by_status(self) -> Counter:
        return Counter(r.status for r in self.records)


def _list_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: nfc(p.as_posix()))


def detect_layout(files: list[Path]) -> str:
    return "aihub" if any(parse_aihub_name(f.name) for f in files if f.suffix.lower() in IMAGE_EXTS) else "folders"


def read_records(params: Params, root: Path | None = None) -> ReadResult:
    """All files under the raw root as records, sorted by relative path."""
    root = Path(root) if root is not None else params.path(params.paths.raw)
    if not root.is_dir():
        raise FileNotFoundError(
            f"raw data folder {root} not found: run `dvc pull data.dvc` (demo data) or put your photos there"
        )
    cfg = params.data
    files = _list_files(root)
    label_files = {p for p in root.glob(cfg.labels_glob) if p.is_file()}
    layout = cfg.layout if cfg.layout != "auto" else detect_layout(files)
    index = load_label_json(sorted(label_files), cfg.vote_tie) if layout == "aihub" else LabelIndex()
    group_rx = re.compile(cfg.group.pattern) if cfg.group.source == "regex" else None

    records: list[Record] = []
    used_labels: set[str] = set()
    for path in files:
        if path in label_files:
            continue
        rel = nfc(path.relative_to(root).as_posix())
        name = nfc(path.name)
        if path.suffix.lower() not in IMAGE_EXTS:
            records.append(Record(path, rel, None, None, None, status="not_an_image"))
            continue
        parsed = parse_aihub_name(name)
        box: Box | None = None
        if layout == "aihub":
            lab = index.records.get(name)
            if lab is not None:
                used_labels.add(name)
                source_label, box = lab.label, lab.box
            else:
                source_label = parsed.emotion if parsed else None
        else:
            source_label = nfc(path.parent.name) if path.parent != root else None

        group = _group(cfg.group.source, cfg.group.field, group_rx, parsed, rel, name)
        label = params.map_label(source_label)
        if source_label is None:
            status = "label_tie" if layout == "aihub" and name in index.records else "no_label"
        elif label is None:
            status = "unknown_label"
        elif group is None:
            status = "no_group"
        else:
            status = "ok"
        records.append(Record(path, rel, source_label, label, group, box, status))

    counts = Counter(index.counts)
    counts["label_records_unmatched"] = len(set(index.records) - used_labels)
    return ReadResult(layout, records, counts)


def _group(source: str, field_name: str, rx: re.Pattern | None, parsed: AihubName | None, rel: str, name: str):
    if source == "field":
        return parsed.field(field_name) if parsed else None
    if source == "regex":
        m = rx.search(name) if rx else None
        return m.group(1) if m else None
    if source == "folder":
        parent = Path(rel).parent.as_posix()
        return parent if parent != "." else None
    return rel  # "none": every image its own group
