"""Shared setup of the TFEID benchmarks (``tfeid_accuracy.py``, ``init_comparison.py``; ``bench_crop.py`` and
``profile_crop_phases.py`` take the data folder and the person regex from here).

Each builds a temporary kfer project (``harness.write_params``): a ``params.yaml`` = the repository's with
overrides, raw data = the TFEID folder (``<label>/`` folders, the performer = the first two digits of the file
name), every output inside the project folder. The folder is removed at the end unless ``--keep-dir`` names it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import in_project_dir, ints, shared_data  # noqa: E402

DATA_NAME = "tfeid_chen2013"
GROUP_PATTERN = r"^(\d{2})"
NOISY_LOGGERS = ("mlflow", "alembic", "urllib3", "matplotlib", "PIL", "absl", "h5py")


def default_data() -> Path:
    """``$KFER_SHARED_DATA/tfeid_chen2013``, by default ``../shared/data/tfeid_chen2013`` beside the repository."""
    return shared_data(DATA_NAME)


def add_common_args(ap: argparse.ArgumentParser, *, image_size: int, epochs: int, patience: int,
                    blocks_help: str, width_help: str) -> None:
    """The flags both TFEID scripts take: data and project folder, crop size, epochs, and the params they
    override when given (read back by :func:`common_overrides`)."""
    ap.add_argument("--data", type=Path, default=None, help=f"TFEID folder (default ../shared/data/{DATA_NAME})")
    ap.add_argument("--keep-dir", type=Path, default=None,
                    help="use this folder as the project (created; must be empty or absent) and keep it")
    ap.add_argument("--image-size", type=int, default=image_size, help=f"crop side in pixels (default {image_size})")
    ap.add_argument("--epochs", type=int, default=epochs, help=f"epochs per run (default {epochs})")
    ap.add_argument("--patience", type=int, default=patience,
                    help=f"early-stopping patience in epochs, 0 = off (default {patience})")
    ap.add_argument("--blocks", type=ints, default=None, help=blocks_help)
    ap.add_argument("--width", type=int, default=None, help=width_help)
    for flag, kind, key in (("--head-units", int, "model.head_units"), ("--lr", float, "train.learning_rate"),
                            ("--batch", int, "train.batch_size"), ("--copies", int, "augment.copies")):
        ap.add_argument(flag, type=kind, default=None, help=f"{key} (default params.yaml's)")


def common_parser(doc: str, **defaults) -> argparse.ArgumentParser:
    """The script's parser: its docstring's first paragraph as the description, the flags of
    :func:`add_common_args` (``defaults``: its keyword arguments)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, **defaults)
    return ap


def common_overrides(args: argparse.Namespace) -> dict:
    """``augment``/``model``/``train`` overrides from the flags of :func:`add_common_args` (unset ones left out)."""
    def given(**kv):
        return {k: v for k, v in kv.items() if v is not None}

    return {
        "augment": given(copies=args.copies),
        "model": given(blocks=args.blocks, base_width=args.width, head_units=args.head_units),
        "train": {"epochs": args.epochs, "early_stopping_patience": args.patience,
                  **given(learning_rate=args.lr, batch_size=args.batch)},
    }


def tfeid_overrides(raw: Path, image_size: int, seed: int | None = None) -> dict:
    """The params overrides that point a project at TFEID: raw folder (absolute), layout, person key, crop size
    (and the seed, when given)."""
    return {
        **({} if seed is None else {"seed": seed}),
        # raw is absolute; every other path stays relative to the folder holding params.yaml, i.e. the project
        "paths": {"raw": str(raw)},
        "data": {"layout": "folders", "group": {"source": "regex", "pattern": GROUP_PATTERN}},
        "crop": {"image_size": image_size, "workers": 0},
    }


def run_in_project(data: Path | None, keep_dir: Path | None, prefix: str,
                   body: Callable[[Path, Path], int]) -> int:
    """Check the data, make the project folder, run ``body(root, data)``, then remove the folder (or keep it).

    Returns 2 with a message when the data folder is absent or ``keep_dir`` is not empty, else ``body``'s code.
    ``MLFLOW_TRACKING_URI`` is dropped so that MLflow runs land in the project's own store.
    """
    data = data or default_data()
    if not data.is_dir():
        print(f"TFEID data not found: {data} is absent. Put the TFEID folders there, pass --data DIR, or set "
              f"KFER_SHARED_DATA to the folder that holds {DATA_NAME}.", file=sys.stderr)
        return 2

    def set_up_and_run(root: Path) -> int:
        if os.environ.pop("MLFLOW_TRACKING_URI", None):
            print("note: MLFLOW_TRACKING_URI ignored; the MLflow store is inside the project folder")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)
        return body(root, data)

    return in_project_dir(keep_dir, prefix, set_up_and_run, kept="\nproject kept in {folder} (MLflow store: "
                          "{folder}/mlflow.db, artifacts {folder}/mlartifacts)")
