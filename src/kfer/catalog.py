"""The files passed between stages: for each, its path (from ``params.paths``), its columns, a reader that checks
them and an atomic writer. Stages ask a :class:`Catalog` for ``splits``, ``crop_manifest``, ``model``, ...; no
stage spells a file name or reads a stage's CSV by hand.

The tables, the contract between the data stages and training (paths in them relative to the repository root):

* ``crop_manifest``: ``<paths.cropped>/manifest.csv``, written by ``kfer crop``, columns
  :data:`CROP_MANIFEST_COLUMNS`: one row per raw path, skipped ones with their reason;
* ``splits``: ``paths.splits``, written by ``kfer split``, columns :data:`SPLITS_COLUMNS`: one row per face;
* ``augment_manifest``: ``<paths.augmented>/manifest.csv``, written by ``kfer augment``, columns
  :data:`AUGMENT_MANIFEST_COLUMNS`: one row per train image (originals and copies), ``original`` the cropped
  original's path (as in ``splits``), ``path`` the image's own (the original's for copy 0).

Every other file of ``params.paths`` (reports, headline metrics, the model, the history) is reached as an
attribute of the catalog (``Catalog(params).train_run``) and JSON is written with :meth:`Catalog.write_json`.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfer import files
from kfer.config import Params, PathsCfg
from kfer.errors import MissingInputError, UserError

if TYPE_CHECKING:
    import pandas as pd

MANIFEST_NAME = "manifest.csv"  # the table inside the cropped and the augmented folders
CROP_MANIFEST_COLUMNS = (
    "path", "raw", "source", "label", "source_label", "label_from",
    "label_uploader", "label_majority", "votes", "agreement", "group", "groups",
    "x0", "y0", "x1", "y1", "box_source", "confidence", "n_faces", "match_iou", "status", "detail",
)
#: ``label`` is the hard label of ``data.label_policy``; the four opinion columns (:mod:`kfer.data.policy`) are the
#: crop manifest's, so that training and tuning can apply another policy
SPLITS_COLUMNS = ("path", "label", "group", "source", "split", "label_uploader", "label_majority", "votes",
                  "agreement", "groups")
#: ``groups``: the face's group fields, ``gender=male;age_group=20s`` (:mod:`kfer.data.groups`), for accuracy by group
#: ``original`` is the cropped original's path; ``source`` (the dataset name) is a column of the other two tables only
AUGMENT_MANIFEST_COLUMNS = ("path", "original", "label", "group", "copy")


@dataclass(frozen=True)
class Table:
    what: str  # how errors name it
    stage: str  # the stage that writes it
    columns: tuple[str, ...]
    lineterminator: str  # as the stage has always written it (its bytes are DVC-tracked)


TABLES = {
    "crop_manifest": Table("crop manifest", "crop", CROP_MANIFEST_COLUMNS, "\r\n"),
    "splits": Table("splits file", "split", SPLITS_COLUMNS, "\n"),
    "augment_manifest": Table("augmented manifest", "augment", AUGMENT_MANIFEST_COLUMNS, "\n"),
}


def stage_hint(stage: str) -> str:
    """``"crop"`` -> ``"`dvc repro crop` (or `kfer crop`)"``: the stage that makes a file, both ways."""
    return f"`dvc repro {stage}` (or `kfer {stage}`)"


def read_table(path: str | Path, required: Iterable[str], what: str, stage: str,
               also: Iterable[str] | None = None) -> pd.DataFrame:
    """A stage's CSV as strings, with clear errors naming the stage to run. With ``also``, only the ``required``
    columns and those of ``also`` that the file has are read (a 500k-row manifest then costs what its reader
    needs, not all its columns); without it, every column."""
    import pandas as pd  # here, not at import: the CLI and the data stages' workers load this module

    required = tuple(required)
    wanted = None if also is None else {*required, *also}.__contains__
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{what} {path} not found: run {stage_hint(stage)} first")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", usecols=wanted)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise UserError(f"{what} {path} is not a readable CSV ({reason}): re-run {stage_hint(stage)}") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        has = list(pd.read_csv(path, nrows=0, encoding="utf-8").columns)
        raise UserError(f"{what} {path} lacks column(s) {missing} (has {has}): re-run {stage_hint(stage)}")
    return df


class Catalog:
    """The files of one project (``params``): ``Catalog(params).<paths key>`` is that path resolved against the
    repository root, plus the tables' readers and writers."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def __getattr__(self, key: str) -> Path:
        if key in PathsCfg.model_fields:
            return self.params.path(getattr(self.params.paths, key))
        raise AttributeError(f"the catalog has no file {key!r} (params.paths has {sorted(PathsCfg.model_fields)})")

    @property
    def crop_manifest(self) -> Path:
        return self.cropped / MANIFEST_NAME

    @property
    def augment_manifest(self) -> Path:
        return self.augmented / MANIFEST_NAME

    # --- tables -------------------------------------------------------------------------------------------
    def read(self, table: str, required: Iterable[str] | None = None, also: Iterable[str] | None = None,
             split: str | None = None) -> pd.DataFrame:
        """The table's rows as strings; ``required`` columns (default: all of the contract) must be there, ``also``
        are read when present (see :func:`read_table`). ``split``: only the rows of that split (splits only)."""
        spec = TABLES[table]
        need = tuple(spec.columns if required is None else required)
        if split is not None:
            need = need if "split" in need else (*need, "split")
        df = read_table(getattr(self, table), need, spec.what, spec.stage, also=also)
        if split is not None:
            df = df[df["split"] == split].reset_index(drop=True)
        return df

    @contextlib.contextmanager
    def table_writer(self, table: str, folder: Path | None = None) -> Iterator[csv.DictWriter]:
        """A ``csv.DictWriter`` of the table's columns, header written, into its file atomically (into ``folder``,
        the stage's temporary output folder, for the manifests written beside their images). Rows are written as
        they come: memory stays flat on a 500k-row table."""
        spec = TABLES[table]
        target = getattr(self, table) if folder is None else Path(folder) / MANIFEST_NAME
        with files.atomic_file(target) as fh:  # newline="": the csv module writes the line ends
            out = csv.DictWriter(fh, spec.columns, lineterminator=spec.lineterminator)
            out.writeheader()
            yield out

    def write(self, table: str, df: pd.DataFrame) -> Path:
        """A whole table, atomically, in the contract's column order."""
        spec = TABLES[table]
        target = getattr(self, table)
        with files.atomic_file(target) as fh:
            df.to_csv(fh, index=False, columns=list(spec.columns), lineterminator=spec.lineterminator)
        return target

    # --- JSON reports -------------------------------------------------------------------------------------
    def write_json(self, key: str, obj: Any) -> Path:
        """A report or headline metrics file of ``params.paths`` (``crop_report``, ``train_headline``, ...)."""
        target = getattr(self, key)
        files.write_json(target, obj)
        return target
