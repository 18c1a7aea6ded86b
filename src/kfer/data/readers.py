"""Turn a raw data folder into records (file, label, person, optional face box). No pixels are touched.

Every path under the raw folder becomes exactly one :class:`Record`: photos, label files (status
``label_file``), other files (``not_an_image``), broken symbolic links (``broken_link``), sockets and other
non-files (``not_a_file``) and folders that cannot be listed (``unreadable_folder``). Nothing is dropped.

Three layouts, one interface (:func:`read_records`):

* ``aihub`` file names ``(title)_(gender)_(age)_(emotion)[_(place)]_(date).jpg`` (AI Hub "한국인 감정인식을 위한
  복합 영상"), optionally with label JSON files (:mod:`kfer.data.labels`: voting, boxes, encodings). AI Hub's own
  download layout works as is: ``Training/[원천]EMOIMG_기쁨_TRAIN_01/*.jpg`` beside
  ``Training/[라벨]EMOIMG_기쁨_TRAIN/img_emotion_training_data(기쁨).json`` (and ``Validation/…_VALID``): label
  records are matched to photos by file name, wherever the files sit. Without a JSON record the emotion
  field of the file name is the label.
* ``folders``: ``<root>/<label>/<image>`` as FER2013 and CK+ are shipped.
* ``auto``: ``aihub`` when any file name parses as AI Hub, else ``folders``.

``data.sources`` puts several datasets side by side: each sub-folder of the raw folder named there is read
with its own layout, label-map additions, person key and detector, and its persons are namespaced by the
source name (``fer2013/S001``), so two datasets' "S001" never merge. Files outside every source are counted
as ``no_source``.

Korean text is NFC-normalized (archives made on macOS carry NFD). Source labels go through
``data.label_map``; an unknown label is counted (status ``unknown_label``), never guessed.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kfer.catalog import Catalog
from kfer.config import GroupCfg, GroupsCfg, Params, VotesCfg
from kfer.data import groups as group_fields
from kfer.data.labels import LabelIndex, LabelRecord, load_label_json, nfc, read_csv_table
from kfer.data.policy import NO_CLASS, Opinions, majority_of, no_class_top, opinions
from kfer.errors import MissingInputError, UserError

log = logging.getLogger(__name__)

#: statuses of a photo whose raters' largest share names no class (see ``_table_label``)
VOTED_NO_CLASS = ("not_a_face", "no_class_votes")
#: votes-table labels that say "this is not a face" (FER+'s NF)
NOT_A_FACE = frozenset({"nf", "not_a_face"})

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

# title_gender_age_emotion[_place]_date ; the date is 14 digits, optionally followed by -NNN-NNN.
AIHUB_NAME = re.compile(
    r"^(?P<title>[^_]+)_(?P<gender>[^_]+)_(?P<age>\d+)_(?P<emotion>[^_]+)"
    r"(?:_(?P<place>.+))?_(?P<date>\d{8,14}(?:-\d+)*)$"
)

Box = tuple[float, float, float, float]


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


@dataclass(frozen=True, slots=True)
class Record:
    """One raw path and what the readers know about it. ``status`` is "ok" or the reason it is skipped.

    Slotted, with the path as a string: a 500k-photo folder holds 500k of these through the crop stage (a
    ``Path`` and an instance ``__dict__`` cost ~1.5 KB more per photo)."""

    raw: str  # absolute path of the raw file
    rel: str  # path relative to the raw root, POSIX, NFC
    source_label: str | None
    label: str | None  # class name
    group: str | None  # the person (namespaced by source when data.sources is used)
    box: Box | None = None  # annotated face box in source pixels (upright frame)
    status: str = "ok"
    detail: str = ""  # the reason's text for a skip, or a note (e.g. why an annotation has no box)
    source: str = ""  # the data.sources name; "" without data.sources
    label_from: str = ""  # json_majority | json_uploader | filename | folder | votes_majority | not_a_face | ...
    detector: str | None = None  # the source's crop.detector override
    opinions: Opinions = Opinions()  # the uploader's label, the annotators' votes (kfer.data.policy)
    groups: tuple[tuple[str, str], ...] = ()  # group fields (gender, age_group, ...: kfer.data.groups)


@dataclass(frozen=True)
class Source:
    """How one part of the raw folder is read (the whole folder when data.sources is not used)."""

    name: str  # "" for the whole raw folder
    base: Path
    layout: str
    label_map: dict
    group: GroupCfg
    detector: str | None
    votes: VotesCfg | None = None
    groups: GroupsCfg | None = None


@dataclass
class ReadResult:
    layout: str  # the layout read ("sources" with data.sources; see ``layouts``)
    records: list[Record]
    label_counts: Counter  # what happened to label JSON records
    label_files: dict[str, dict] = field(default_factory=dict)  # label file -> {encoding, records} | {error}
    layouts: dict[str, str] = field(default_factory=dict)  # source -> layout

    def by_status(self) -> Counter:
        return Counter(r.status for r in self.records)


def list_paths(root: Path) -> list[tuple[Path, str, str]]:
    """Every non-folder path under ``root`` as (path, kind, detail), kind one of file, broken_link,
    not_a_file, unreadable, unreadable_folder, link_cycle; sorted by NFC path. Symbolic links (DVC's symlink
    cache) are followed, except a link to a folder that encloses it (a cycle)."""
    out: list[tuple[Path, str, str]] = []

    def onerror(exc: OSError) -> None:
        out.append((Path(exc.filename), "unreadable_folder", exc.strerror or str(exc)))

    for folder, dirs, names in os.walk(root, onerror=onerror, followlinks=True):
        here = os.path.realpath(folder)
        for d in list(dirs):
            p = Path(folder) / d
            if p.is_symlink():
                target = os.path.realpath(p)
                if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                    dirs.remove(d)
                    out.append((p, "link_cycle", f"symbolic link to the enclosing folder {os.readlink(p)}: "
                                                 "not followed"))
        for name in names:
            p = Path(folder) / name
            try:
                mode = os.stat(p).st_mode
            except FileNotFoundError:
                out.append((p, "broken_link", f"symbolic link to missing {os.readlink(p)}"))
                continue
            except OSError as exc:
                out.append((p, "unreadable", exc.strerror or str(exc)))
                continue
            if stat.S_ISREG(mode):
                out.append((p, "file", ""))
            else:
                out.append((p, "not_a_file", "socket, pipe or device"))
    return sorted(out, key=lambda t: nfc(t[0].as_posix()))


def detect_layout(files: list[Path]) -> str:
    return "aihub" if any(parse_aihub_name(f.name) for f in files if f.suffix.lower() in IMAGE_EXTS) else "folders"


def _sources(params: Params, root: Path) -> list[Source]:
    cfg = params.data
    if not cfg.sources:
        return [Source("", root, cfg.layout, {}, cfg.group, None, cfg.votes, cfg.groups)]
    out = []
    for name, scfg in cfg.sources.items():
        base = root / name
        if not base.is_dir():
            raise MissingInputError(f"data.sources names {name!r}, but {base} is not a folder")
        out.append(Source(name, base, scfg.layout, scfg.label_map, scfg.group or cfg.group, scfg.detector,
                          scfg.votes or cfg.votes, scfg.groups or cfg.groups))
    return out


def read_records(params: Params, root: Path | None = None) -> ReadResult:
    """All paths under the raw root as records, sorted by relative path."""
    root = Path(root) if root is not None else Catalog(params).raw
    if not root.is_dir():
        raise MissingInputError(
            f"raw data folder {root} not found: run `dvc pull data.dvc` (demo data) or put your photos there"
        )
    entries = list_paths(root)
    if not entries:
        raise UserError(f"raw data folder {root} is empty: put your photos there (see the README, "
                        "'Using the real AI Hub data') or run `dvc pull data.dvc` for the demo data")
    sources = _sources(params, root)
    owner: dict[Path, Source] = {}
    for path, _, _ in entries:
        src = next((s for s in sources if s.base == root or s.base in path.parents), None)
        if src is not None:
            owner[path] = src

    result = ReadResult("", [], Counter())
    by_rel: dict[str, Record] = {}
    for src in sources:
        mine = [e for e in entries if owner.get(e[0]) is src]
        records, layout = _read_source(params, root, src, mine, result)
        result.layouts[src.name] = layout
        by_rel.update((r.rel, r) for r in records)
    for path, _, _ in entries:
        if path not in owner:
            rel = nfc(path.relative_to(root).as_posix())
            by_rel[rel] = Record(str(path), rel, None, None, None, status="no_source",
                                 detail=f"outside every data.sources folder ({', '.join(params.data.sources)})")
    result.records = [by_rel[k] for k in sorted(by_rel)]
    result.layout = "sources" if params.data.sources else result.layouts[""]
    return result


def _read_source(params: Params, root: Path, src: Source, entries: list, result: ReadResult):
    cfg = params.data
    files = [p for p, kind, _ in entries if kind == "file"]
    layout = src.layout if src.layout != "auto" else detect_layout(files)
    file_set = set(files)
    label_files = {p for p in src.base.glob(cfg.labels_glob) if p in file_set} if layout == "aihub" else set()
    index = LabelIndex()
    if layout == "aihub" and label_files:
        index = load_label_json(sorted(label_files, key=lambda p: nfc(p.as_posix())), cfg.on_bad_label_file,
                                names={p: nfc(p.relative_to(root).as_posix()) for p in label_files})
    result.label_files.update(index.files)
    votes_file, votes_table = _votes_table(params, root, src, file_set, result) if src.votes else (None, {})
    groups_file, groups_table = _groups_table(root, src, file_set, result) if src.groups else (None, {})
    group_rx = re.compile(src.group.pattern) if src.group.source == "regex" else None
    prefix = f"{src.name}/" if src.name else ""

    records: list[Record] = []
    used_labels: set[str] = set()
    for path, kind, detail in entries:
        rel = nfc(path.relative_to(root).as_posix())
        common = {"source": src.name, "detector": src.detector}
        if kind != "file":
            records.append(Record(str(path), rel, None, None, None, status=kind, detail=detail, **common))
            continue
        if path == votes_file:
            info = result.label_files.get(rel, {})
            records.append(Record(str(path), rel, None, None, None, status="label_file",
                                  detail=f"votes table, {info.get('records', 0)} rows", **common))
            continue
        if path == groups_file:
            info = result.label_files.get(rel, {})
            records.append(Record(str(path), rel, None, None, None, status="label_file",
                                  detail=f"groups table, {info.get('persons', 0)} persons", **common))
            continue
        if path in label_files:
            info = index.files.get(rel, {})
            status = "bad_label_file" if "error" in info else "label_file"
            records.append(Record(str(path), rel, None, None, None, status=status,
                                  detail=info.get("error") or f"{info.get('records', 0)} records, "
                                                              f"{info.get('encoding', 'not read')}",
                                  **common))
            continue
        name = nfc(path.name)
        if path.suffix.lower() not in IMAGE_EXTS:
            records.append(Record(str(path), rel, None, None, None, status="not_an_image",
                                  detail=f"extension {path.suffix or '(none)'!r} is not an image type", **common))
            continue
        parsed = parse_aihub_name(name)
        rel_in_source = nfc(path.relative_to(src.base).as_posix())
        box: Box | None = None
        note = ""
        ops = Opinions()
        label: str | None = None
        lab = index.records.get(name) if layout == "aihub" else None
        if lab is not None:
            used_labels.add(name)
            box = lab.box
            if box is None:
                note = f"label record has no usable box ({lab.box_issue})"
            source_label, label, label_from, ops = json_label(params, src.label_map, lab, parsed, cfg.vote_tie,
                                                              result.label_counts)
        else:
            if layout == "aihub":
                source_label = parsed.emotion if parsed else None
                label_from = "filename" if parsed else ""
            else:
                in_base = path.parent.relative_to(src.base)
                source_label = nfc(path.parent.name) if in_base.parts else None
                label_from = "folder" if source_label else ""
            label = params.map_label(source_label, src.label_map)
            ops = Opinions(label or "")
            if src.votes and label is not None:
                ops, label, label_from, note = _table_label(rel_in_source, votes_table, ops, label, label_from,
                                                            cfg.vote_tie, result.label_counts)

        group = _group(src.group.source, src.group.field, group_rx, parsed, rel_in_source, name)
        fields = _fields(layout, parsed, lab, src.groups, groups_table, group, result.label_counts)
        if group is not None:
            group = prefix + group
        if label is None and label_from == "tie":
            status = "label_tie"
            note = "the annotators disagree (no majority) and data.vote_tie is skip"
        elif label is None and label_from in VOTED_NO_CLASS:
            status = label_from
        elif source_label is None:
            status = "no_label"
            note = "no label: not in a <label>/ folder and no AI Hub file name or label record"
        elif label is None:
            status = "unknown_label"
            note = f"label {source_label!r} is neither a class nor in data.label_map"
        elif group is None:
            status = "no_group"
            note = f"no person key from data.group ({src.group.source})"
        else:
            status = "ok"
        records.append(Record(str(path), rel, source_label, label, group, box, status, note, label_from=label_from,
                              opinions=ops, groups=fields, **common))

    result.label_counts.update(index.counts)
    result.label_counts["label_records_unmatched"] += len(set(index.records) - used_labels)
    return records, layout


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


def _fields(layout: str, parsed: AihubName | None, lab: LabelRecord | None, cfg: GroupsCfg | None,
            table: dict[str, dict[str, str]], person: str | None, counts: Counter) -> tuple[tuple[str, str], ...]:
    """A photo's group fields: AI Hub's gender and age group (the file name's, else the label record's), then the
    groups table's fields of its person (all ``unknown`` when the table lacks the person: counted
    ``groups_person_missing``)."""
    fields: dict[str, str] = {}
    if layout == "aihub":
        if parsed is not None:
            fields = group_fields.aihub_fields(parsed.gender, parsed.age)
        else:
            fields = group_fields.aihub_fields(lab.gender if lab else None, lab.age if lab else None)
    if cfg is not None:
        row = table.get(person or "")
        if row is None:
            counts["groups_person_missing"] += 1
            row = dict.fromkeys(cfg.columns, group_fields.UNKNOWN)
        fields.update(row)
    return tuple(fields.items())


def _groups_table(root: Path, src: Source, file_set: set[Path], result: ReadResult):
    """(the groups table's path, {person: {field: value}}) of the source (:func:`kfer.data.groups.load_table`)."""
    where = f"data.sources.{src.name}.groups" if src.name else "data.groups"
    path, table, info = group_fields.load_table(src.groups, src.base, root, file_set, where, result.label_counts)
    result.label_files[nfc(path.relative_to(root).as_posix())] = info
    return path, table


def json_label(params: Params, label_map: dict[str, str], lab: LabelRecord, parsed: AihubName | None, tie: str,
               counts: Counter):
    """(source label, class or None, label_from, opinions) of a photo with an AI Hub label record.

    The annotators' votes are mapped to classes. An annotator with no ``faceExp`` does not vote (counted
    ``annotator_no_label``); one whose label is no class votes for it (counted ``annotator_unknown_label``): it can
    block a majority, it is left out of ``votes`` (and so of soft targets), and when it is the majority the photo is
    ``unknown_label``. The uploader's label is ``faceExp_uploader``, or, when that is missing or unknown (counted),
    the file name's emotion (counted ``uploader_from_file_name``). The photo's label is the majority; on a tie
    ``data.vote_tie`` (uploader, or skip: label None, label_from "tie"); with no annotator vote the uploader's label
    (counted ``no_usable_annotator``)."""
    def to_class(text: str | None) -> str | None:
        return params.map_label(text, label_map)

    keys: Counter[str] = Counter()  # a class, or NO_CLASS + a label that is none (it still counts as a vote)
    raw_of: dict[str, str] = {}
    for v in lab.votes:
        c = to_class(v)
        if c is None:
            counts["annotator_unknown_label"] += 1
        key = c if c is not None else NO_CLASS + v
        keys[key] += 1
        raw_of.setdefault(key, v)
    if lab.votes_missing:
        counts["annotator_no_label"] += lab.votes_missing
    uploader_raw = lab.uploader
    uploader = to_class(uploader_raw)
    if uploader is None:
        counts["uploader_missing" if uploader_raw is None else "uploader_unknown_label"] += 1
        fallback = parsed.emotion if parsed else None
        uploader = to_class(fallback)
        if uploader is not None:
            counts["uploader_from_file_name"] += 1
            uploader_raw = fallback
        else:
            uploader_raw = uploader_raw or fallback
    top = majority_of(keys)
    ops = opinions(uploader, keys, shares=False)
    if top is not None:  # a majority; one for a label that is no class makes the photo unknown_label, as ever
        return raw_of[top], (None if top.startswith(NO_CLASS) else top), "json_majority", ops
    if keys:
        if tie != "uploader":
            return uploader_raw, None, "tie", ops
    else:
        counts["no_usable_annotator"] += 1
    return uploader_raw, uploader, "json_uploader", ops


def _votes_table(params: Params, root: Path, src: Source, file_set: set[Path], result: ReadResult):
    """(the table's path, {image path in the source: {class or NO_CLASS + label: share}}) of the source's votes
    table (``data.votes``). Every ``<prefix><label>`` column counts: a row's values are normalized over all of them
    (shares or counts alike), so a vote for a label that is no class (FER+'s ``unknown`` and ``nf``, or a class the
    label map leaves out) keeps its weight. Rows that cannot be used are counted by reason in the crop report's
    ``label_json``: ``votes_not_numeric`` (a value that is not a finite number >= 0; that image has no votes),
    ``votes_empty`` (every value 0), ``votes_row_no_file`` (the key names no image of this source) and
    ``votes_row_duplicate`` (a key seen before: the first row counts). A table whose vote columns name no class
    is one clear error."""
    import math

    cfg = src.votes
    path = src.base / cfg.file
    if path not in file_set:
        raise MissingInputError(f"data.votes.file {cfg.file!r}: {path} is not a file under {root}")
    shown = nfc(path.relative_to(root).as_posix())
    rows, header = read_csv_table(path, "votes table")
    columns = header if rows else []
    if cfg.key not in columns:
        raise UserError(f"votes table {path} has no column {cfg.key!r} (data.votes.key; has {columns[:8]})")
    mapped = {c: params.map_label(c[len(cfg.prefix):], src.label_map) for c in columns if c.startswith(cfg.prefix)}
    if not any(mapped.values()):
        raise UserError(f"votes table {path}: no column {cfg.prefix}<label> names a class or a data.label_map "
                        f"label (columns {columns[:12]})")
    # a column that names no class is a vote for no class when it holds numbers (FER+'s unknown, nf), and no vote
    # column at all when it holds text (TFEID's vote_top: the majority's name)
    keys = {c: k if k is not None else NO_CLASS + c[len(cfg.prefix):] for c, k in mapped.items()
            if k is not None or all(_is_number(row[c]) for row in rows)}
    images = {nfc(p.relative_to(src.base).as_posix()) for p in file_set if p.suffix.lower() in IMAGE_EXTS}
    counts: Counter[str] = Counter()
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        key = nfc(str(row.get(cfg.key) or "").strip())
        if key in table:
            counts["votes_row_duplicate"] += 1
            continue
        if key not in images:
            counts["votes_row_no_file"] += 1
            continue
        try:
            values = [(keys[c], float(row[c] or 0)) for c in keys]
        except (TypeError, ValueError):
            values = None
        if values is None or any(not math.isfinite(v) or v < 0 for _, v in values):
            counts["votes_not_numeric"] += 1
            table[key] = {}
            continue
        total = sum(v for _, v in values)
        if total <= 0:
            counts["votes_empty"] += 1
            table[key] = {}
            continue
        votes: Counter[str] = Counter()
        for k, v in values:
            votes[k] += v / total
        table[key] = dict(votes)
    result.label_counts.update(counts)
    result.label_files[shown] = {"encoding": "utf-8", "records": len(rows),
                                 "rows_used": sum(bool(v) for v in table.values()), **dict(sorted(counts.items())),
                                 "vote_columns": dict(sorted((c, k) for c, k in mapped.items() if k is not None)),
                                 "vote_columns_no_class": sorted(c for c, k in mapped.items() if k is None and c in keys),
                                 "not_vote_columns": sorted(c for c in mapped if c not in keys)}
    return path, table


def _is_number(text: str | None) -> bool:
    try:
        float(text or 0)
    except ValueError:
        return False
    return True


def _table_label(rel: str, table: dict, ops: Opinions, label: str, label_from: str, tie: str, counts: Counter):
    """A folder-layout photo with a votes table: (opinions, label, label_from, note). Its folder is the uploader's
    (performed) label; the raters' shares give the majority, which is the photo's label (a tie: ``data.vote_tie``).
    A photo whose largest share is for no class gets no label: label_from ``not_a_face`` (the top is FER+'s ``nf``)
    or ``no_class_votes`` (``unknown``, a label the label map leaves out), skipped by the crop stage and counted by
    that reason, never trained as its folder label. A photo the table does not list keeps its folder label
    (counted ``votes_missing``); one whose row was unusable (counted by the table's reason) too."""
    votes = table.get(rel)
    if votes is None:
        counts["votes_missing"] += 1
        return ops, label, label_from, ""
    ops = opinions(ops.uploader, votes, shares=True)
    if not ops.agreement:  # an unusable row, already counted
        return ops, label, label_from, ""
    nobody = no_class_top(votes)
    if nobody:
        share = max(votes.values())
        reason = "not_a_face" if any(n.lower() in NOT_A_FACE for n in nobody) else "no_class_votes"
        return ops, None, reason, (f"the raters' largest share ({'/'.join(nobody)} {share:.2f}) names no class: "
                                   "not trained as its folder label")
    if ops.majority:
        return ops, ops.majority, "votes_majority", ""
    if tie != "uploader":
        return ops, None, "tie", ""
    return ops, label, label_from, ""
