"""Group fields of a face: who is in the photo (gender, age group, any column of a per-person table), for
accuracy by group (:mod:`kfer.reporting.groups`). No pixels are touched.

* AI Hub photos: ``gender`` and ``age_group`` from the file name, or from the label JSON record when the name
  does not parse (:func:`aihub_fields`);
* any source: a table with one row per person (``data.groups`` / ``data.sources.<name>.groups``, e.g. TFEID's
  ``performers.csv``), read by :func:`load_table`.

Values are normalized so that sources read alike (:func:`normalize`): gender 남/M/male -> ``male``, 여/F/female ->
``female``; an age (TFEID's 24) or an AI Hub decade (20) -> ``20s``. A value that is missing or cannot be read is
:data:`UNKNOWN`. The fields travel as one text column ``groups`` of the crop manifest and splits.csv,
``gender=male;age_group=20s`` (:func:`encode`, :func:`decode`); the source name is a column of its own.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from kfer.config import GroupsCfg
from kfer.data.labels import nfc, read_csv_table
from kfer.errors import MissingInputError, UserError

UNKNOWN = "unknown"
#: the fields AI Hub names and label records give, and the order reports list fields in (others after, sorted)
AIHUB_FIELDS = ("gender", "age_group")
GENDERS = {"남": "male", "남자": "male", "남성": "male", "m": "male", "male": "male", "man": "male",
           "여": "female", "여자": "female", "여성": "female", "f": "female", "female": "female", "woman": "female"}
_DECADE = re.compile(r"^(\d+(?:\.\d*)?)\s*(?:s|대|세)?$")
_SEPARATORS = str.maketrans({";": ",", "=": "-", "\n": " ", "\r": " "})


def gender(value: object) -> str:
    """``male`` / ``female`` for the usual spellings (Korean, M/F, English words; any case); other text kept
    lowercased; missing or blank -> ``unknown``."""
    text = _text(value).lower()
    return GENDERS.get(text, text) if text else UNKNOWN


def age_group(value: object) -> str:
    """The decade of an age in years or of an AI Hub age group: 24 -> ``20s``, 20 -> ``20s``, "60대" -> ``60s``;
    anything else (blank, not a number, outside 0-129) -> ``unknown``."""
    m = _DECADE.match(_text(value).lower())
    if not m:
        return UNKNOWN
    age = float(m.group(1))
    if not math.isfinite(age) or not 0 <= age < 130:
        return UNKNOWN
    return f"{int(age // 10) * 10}s"


def normalize(field: str, value: object) -> str:
    """A field's value as reports show it: gender and age_group normalized, other fields' text as written."""
    if field == "gender":
        return gender(value)
    if field == "age_group":
        return age_group(value)
    return _text(value) or UNKNOWN


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return " ".join(nfc(str(value)).translate(_SEPARATORS).split())


def encode(fields: dict[str, str] | tuple[tuple[str, str], ...]) -> str:
    """``gender=male;age_group=20s`` (the manifest's and splits.csv's ``groups`` column, fields in
    :func:`field_order`); "" for no fields."""
    fields = dict(fields)
    return ";".join(f"{k}={fields[k]}" for k in field_order(fields))


def decode(text: str | None) -> dict[str, str]:
    """The fields of a ``groups`` cell (:func:`encode`); a blank cell has none."""
    out = {}
    for part in str(text or "").split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip() or UNKNOWN
    return out


def aihub_fields(gender_value: object, age_value: object) -> dict[str, str]:
    return {"gender": gender(gender_value), "age_group": age_group(age_value)}


def field_order(fields) -> list[str]:
    """Group fields in report order: source, gender, age_group, then the others sorted."""
    first = ("source", *AIHUB_FIELDS)
    return [f for f in first if f in fields] + sorted(f for f in fields if f not in first)


def load_table(cfg: GroupsCfg, base: Path, root: Path, file_set: set[Path], where: str,
               counts: Counter) -> tuple[Path, dict[str, dict[str, str]], dict]:
    """(the table's path, {person: {field: value}}, the crop report's entry for the table) of a groups table.

    ``where`` names the params key (``data.sources.tfeid.groups``) in errors. A ``columns`` entry or ``key`` that
    names no column of the table is one clear error. Rows are counted in ``counts`` by what went wrong:
    ``groups_row_bad_key`` (blank, or ``key_pattern`` does not match) and ``groups_row_duplicate`` (a person seen
    before: the first row counts); values that cannot be read become ``unknown`` (counted per field in the crop
    report's ``groups``)."""
    path = base / cfg.file
    if path not in file_set:
        raise MissingInputError(f"{where}.file {cfg.file!r}: {path} is not a file under {root}")
    rows, columns = read_csv_table(path, "groups table")
    for what, column in [(f"{where}.key", cfg.key), *((f"{where}.columns.{f}", c) for f, c in cfg.columns.items())]:
        if column not in columns:
            raise UserError(f"groups table {path} has no column {column!r} ({what}; it has {columns[:12]})")
    rx = re.compile(cfg.key_pattern) if cfg.key_pattern else None
    table: dict[str, dict[str, str]] = {}
    mine: Counter[str] = Counter()
    for row in rows:
        key = _text(row.get(cfg.key))
        if rx is not None and key:
            m = rx.search(key)
            key = m.group(1) if m and m.group(1) else ""
        if not key:
            mine["groups_row_bad_key"] += 1
            continue
        if key in table:
            mine["groups_row_duplicate"] += 1
            continue
        table[key] = {field: normalize(field, row.get(column)) for field, column in cfg.columns.items()}
    counts.update(mine)
    info = {"encoding": "utf-8", "records": len(rows), "persons": len(table), **dict(sorted(mine.items())),
            "group_columns": dict(cfg.columns)}
    return path, table, info
