"""``kfer tune --apply``: the best params written into params.yaml, its comments and layout kept."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import yaml

from kfer import files
from kfer.catalog import Catalog
from kfer.config import Params
from kfer.training.tune.study import TuneError

# --- applying the result -----------------------------------------------------------------------------------

def _round_trip_yaml():
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)  # this repository's style: params.yaml round-trips unchanged
    y.representer.add_representer(
        type(None), lambda r, d: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def apply_best(params: Params, params_file: str | os.PathLike) -> dict[str, tuple[Any, Any]]:
    """Write ``paths.tune_best`` into ``params_file`` (keeps comments and layout); returns {key: (old, new)}."""
    best_file = Catalog(params).tune_best
    if not best_file.exists():
        raise TuneError(f"{best_file} not found: run `kfer tune` (or dvc repro tune) first")
    best = yaml.safe_load(best_file.read_text(encoding="utf-8")) or {}
    path = Path(params_file)
    y = _round_trip_yaml()
    doc = y.load(path.read_text(encoding="utf-8"))
    changed: dict[str, tuple[Any, Any]] = {}
    for section, values in best.items():
        if section not in doc or not isinstance(values, dict):
            raise TuneError(f"{best_file}: section {section!r} is not in {path}")
        for key, value in values.items():
            old = doc[section].get(key)
            if old != value:
                doc[section][key] = value
                changed[f"{section}.{key}"] = (old, value)
    buf = io.StringIO()
    y.dump(doc, buf)
    Params.model_validate(yaml.safe_load(buf.getvalue()))  # never write an invalid params file
    with files.atomic_file(path) as fh:
        fh.write(buf.getvalue())
    return changed
