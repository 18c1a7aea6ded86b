#!/usr/bin/env python
"""he_normal vs glorot_uniform, over several seeds, on real faces with a person-disjoint split (TFEID).

The original project concluded "he_normal, not glorot_uniform, for ReLU" from single runs. This script trains
the same model with each initializer over ``--seeds`` (everything else fixed: data, split, augmentation
settings, head, learning rate, epochs) and reports the validation metric as mean ± standard deviation
(sample std, n-1) with min/max, and a paired comparison by seed. Optionally it adds the tuned params: the best
trial of a study it runs itself on the same split (``--tune-trials N``) or a ``tune/best_params.yaml`` file
(``--best-params FILE``), trained over the same seeds. Note that a tuned row is chosen on the val split, so its
val numbers are optimistic; the TEST columns (test is used for nothing but this report) are the fair
comparison.

Setup, in a temporary project (removed unless ``--keep-dir``): ``params.yaml`` = the repository's with
``paths.raw`` = the TFEID folder (``<label>/`` folders), ``data.group`` = regex ``^(\\d{2})`` on the file name
(the performer), the repository's label map (disgust has no class and is dropped), ``crop.image_size`` =
``--image-size``. Crop and split run once (split seed ``--split-seed``). Each run then trains with
``seed`` = the run's seed, which sets the initial weights, the data order and the augmentation draws; the train
images are augmented on the fly exactly as ``kfer tune`` does (``augment.copies`` copies at
``augment.strength``, :func:`kfer.data.augment.augment_image`). The kept weights are the best epoch by
``--metric``.

Usage (from the repository root)::

    .venv/bin/python benchmarks/init_comparison.py [--image-size 48] [--epochs 12] [--seeds 1,2,3]
        [--blocks 3,4,6,3 --width 64] [--copies N] [--tune-trials N | --best-params FILE] [--persons N]
        [--keep-dir DIR] [--data DIR]

Prints a markdown table (and writes it to ``--out`` when given). Exits 2 when the data folder is absent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tfeid_project as tfeid  # noqa: E402 - the TFEID flags, overrides and project folder
from harness import ints, write_params  # noqa: E402

INITS = ("he_normal", "glorot_uniform")


def parse(argv):
    ap = tfeid.common_parser(__doc__, image_size=48, epochs=12, patience=0,
                             blocks_help="model.blocks (default params.yaml's: ResNet50)",
                             width_help="model.base_width (default params.yaml's)")
    ap.add_argument("--seeds", type=ints, default=[1, 2, 3], help="training seeds (default 1,2,3)")
    ap.add_argument("--split-seed", type=int, default=42, help="seed of the person-disjoint split (default 42)")
    ap.add_argument("--metric", default="val_macro_f1", choices=["val_macro_f1", "val_accuracy"],
                    help="validation metric reported and used to keep the best epoch (default val_macro_f1)")
    ap.add_argument("--tune-trials", type=int, default=0,
                    help="run an Optuna study with this budget on the same split and add its best params as a row")
    ap.add_argument("--tune-timeout", type=float, default=None, help="wall-time limit of that study, seconds")
    ap.add_argument("--best-params", type=Path, default=None,
                    help="add a row for these params (a tune/best_params.yaml) instead of running a study")
    ap.add_argument("--persons", type=int, default=None,
                    help="use only the first N performers (quick checks; default all 20)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    return ap.parse_args(argv)


def _raw_folder(data: Path, root: Path, persons: int | None) -> Path:
    """The TFEID folder itself, or a folder of symlinks to the images of the first ``persons`` performers."""
    if not persons:
        return data.resolve()
    import re

    images = sorted(p for p in data.glob("*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    ids = sorted({m.group(1) for p in images if (m := re.match(tfeid.GROUP_PATTERN, p.name))})[:persons]
    raw = root / "raw"
    for p in images:
        m = re.match(tfeid.GROUP_PATTERN, p.name)
        if m and m.group(1) in ids:
            (raw / p.parent.name).mkdir(parents=True, exist_ok=True)
            (raw / p.parent.name / p.name).symlink_to(p.resolve())
    return raw


def build_params(args, root: Path, raw: Path):
    common = tfeid.common_overrides(args)
    over = {
        **tfeid.tfeid_overrides(raw, args.image_size, args.split_seed),
        **common,
        "train": {**common["train"], "monitor": args.metric, "experiment": "init-comparison"},
        "tune": {"metric": args.metric, "experiment": "init-comparison-tune",
                 "n_trials": max(args.tune_trials, 1), "timeout_s": args.tune_timeout},
    }
    return write_params(root, over), over


def train_once(params, values: dict, seed: int, val_df, test_df) -> dict:
    """One training run with the searched keys set to ``values`` and ``seed`` as the training seed."""
    import keras

    from kfer import selection
    from kfer.config import Params, _deep_merge
    from kfer.data.augment import OnTheFlyAugment
    from kfer.training.fit import fit
    from kfer.training.inputs import class_weights, make_dataset
    from kfer.training.tune.data import trial_table
    from kfer.training.tune.trials import with_values

    p = with_values(params, values)
    p2 = Params.model_validate(_deep_merge(p.model_dump(mode="json"), {"seed": seed}))
    p2._root = params.root
    p = p2
    table = trial_table(p)
    train_ds = make_dataset(p, table, training=True, augment=OnTheFlyAugment(p, table, p.augment.strength))
    val_ds = make_dataset(p, val_df, training=False)
    test_ds = make_dataset(p, test_df, training=False)
    weights = class_weights(p, table) if p.train.class_weights else None
    progress = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: logging.getLogger("bench").info(
        "  epoch %d/%d %s %.4f", e + 1, p.train.epochs, p.train.monitor, float(logs.get(p.train.monitor, math.nan))))
    with tempfile.TemporaryDirectory(prefix="kfer-bench-") as tmp:
        model, history, seconds = fit(p, train_ds, val_ds, weights, Path(tmp), [progress], verbose=0)
    val = model.evaluate(val_ds, verbose=0, return_dict=True)
    test = model.evaluate(test_ds, verbose=0, return_dict=True)
    col = history[p.train.monitor]
    keras.backend.clear_session()
    return {"val_macro_f1": float(val["macro_f1"]), "val_accuracy": float(val["accuracy"]),
            "test_macro_f1": float(test["macro_f1"]), "test_accuracy": float(test["accuracy"]),
            "best_epoch": selection.best_epoch(col, p.train.monitor), "epochs": int(len(history)), "seconds": seconds,
            "train_images": int(len(table))}


def _values(best_file: Path, default: dict) -> dict:
    """The searched values of a best-params file (params.yaml layout) over ``default``."""
    from kfer.training.tune.trials import SEARCHED

    best = yaml.safe_load(best_file.read_text(encoding="utf-8")) or {}
    return {**default, **{name: best[sec][key] for name, (sec, key) in SEARCHED.items()
                          if key in (best.get(sec) or {})}}


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def _pm(xs: list[float]) -> str:
    m, s = _stats(xs)
    return f"{m:.3f} ± {s:.3f}" if not math.isnan(s) else f"{m:.3f}"


def table(rows: list[tuple[str, dict, list[dict]]], metric: str) -> str:
    short = metric.removeprefix("val_")
    out = [f"| config | init | head | strength | lr | seeds | val {short} mean ± sd | val min–max "
           f"| TEST macro-F1 mean ± sd | TEST acc mean ± sd | best epoch | s/run |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v, runs in rows:
        vals = [r[metric] for r in runs]
        out.append(
            f"| {name} | {v['kernel_initializer']} | {v['head_units']} | {v['strength']:.3g} | "
            f"{v['learning_rate']:.3g} | {len(runs)} | {_pm(vals)} | {min(vals):.3f}–{max(vals):.3f} | "
            f"{_pm([r['test_macro_f1'] for r in runs])} | {_pm([r['test_accuracy'] for r in runs])} | "
            f"{statistics.fmean(r['best_epoch'] for r in runs):.1f} | "
            f"{statistics.fmean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(out)


def paired(a: list[dict], b: list[dict], metric: str, names: str = "he_normal − glorot_uniform") -> str:
    """``a`` − ``b`` per seed (same seed: same data order and augmentation draws, other settings)."""
    d = [x[metric] - y[metric] for x, y in zip(a, b, strict=True)]
    m, s = _stats(d)
    text = f"paired difference {names} in {metric} over {len(d)} seeds: {m:+.3f}"
    if len(d) > 1:
        text += f" ± {s:.3f} (sd); per seed {', '.join(f'{x:+.3f}' for x in d)}"
        try:
            from scipy import stats

            t = stats.ttest_rel([x[metric] for x in a], [y[metric] for y in b])
            text += f"; paired t-test p = {t.pvalue:.2g}"
        except Exception:  # noqa: BLE001 - scipy absent or degenerate (all differences equal)
            pass
    return text


def main(argv=None) -> int:
    args = parse(argv)
    if args.tune_trials and args.best_params:
        print("give --tune-trials or --best-params, not both", file=sys.stderr)
        return 2
    return tfeid.run_in_project(args.data, args.keep_dir, "kfer-initcmp-", lambda root, data: run(args, root, data))


def run(args, root: Path, data: Path) -> int:
    t_all = time.perf_counter()
    params, over = build_params(args, root, _raw_folder(data, root, args.persons))

    from kfer.data.crop import run_crop
    from kfer.data.split import run_split
    from kfer.training.inputs import split_table

    crop = run_crop(params)
    run_split(params)
    val_df, test_df = split_table(params, "val"), split_table(params, "test")
    train_df = split_table(params, "train")
    m = params.model
    default = {"kernel_initializer": m.kernel_initializer, "head_units": m.head_units,
               "strength": params.augment.strength, "learning_rate": params.train.learning_rate}
    setup = (f"TFEID {crop['ok']} faces ({', '.join(f'{k} {v}' for k, v in crop['per_class'].items() if v)}), "
             f"person-disjoint split (seed {params.seed}): train {len(train_df)} images / "
             f"{train_df['group'].nunique()} persons, val {len(val_df)} / {val_df['group'].nunique()}, "
             f"test {len(test_df)} / {test_df['group'].nunique()}; {params.crop.image_size}px gray; "
             f"ResNet{2 + 3 * sum(m.blocks)} width {m.base_width}; {params.train.epochs} epochs, batch "
             f"{params.train.batch_size}, Adam, LR schedule {params.train.lr_schedule}, early stopping "
             f"{params.train.early_stopping_patience or 'off'}; augment.copies {params.augment.copies} on the fly; "
             f"best epoch by {args.metric}; seeds {args.seeds}")
    print(f"\n== setup ==\n{setup}\noverrides: {json.dumps(over, ensure_ascii=False)}\n", flush=True)

    rows: list[tuple[str, dict, list[dict]]] = []

    def series(name: str, values: dict) -> list[dict]:
        runs = []
        for seed in args.seeds:
            logging.getLogger("bench").info("%s seed %d: %s", name, seed, values)
            r = train_once(params, values, seed, val_df, test_df)
            logging.getLogger("bench").info("%s seed %d: %s %.4f, TEST macro-F1 %.4f, %.0f s", name, seed,
                                            args.metric, r[args.metric], r["test_macro_f1"], r["seconds"])
            runs.append(r)
        rows.append((name, values, runs))
        return runs

    by_init = {}
    for init in INITS:
        label = f"{init} (default params)" if init == default["kernel_initializer"] else init
        by_init[init] = series(label, {**default, "kernel_initializer": init})

    tuned_values, tuned_name = None, None
    if args.best_params:
        tuned_values, tuned_name = _values(args.best_params, default), f"tuned ({args.best_params.name})"
    elif args.tune_trials:
        from kfer.training.tune.stage import run_tune

        t0 = time.perf_counter()
        summary = run_tune(params, n_trials=args.tune_trials, timeout=args.tune_timeout)
        tuned_values = _values(params.path(params.paths.tune_best), default)
        tuned_name = (f"tuned (trial {summary['best_trial']}, best of {summary['n_complete']} complete + "
                      f"{summary['n_pruned']} pruned trials, {time.perf_counter() - t0:.0f} s)")
    tuned_runs = series(tuned_name, tuned_values) if tuned_values is not None else None

    md = table(rows, args.metric)
    lines = ["", "== result ==", "", f"Setup: {setup}.", "", md, "",
             paired(by_init["he_normal"], by_init["glorot_uniform"], args.metric)]
    if tuned_runs is not None:  # the tuned params were chosen on val: compare them on test
        if (default_runs := by_init.get(default["kernel_initializer"])) is not None:
            lines.append(paired(tuned_runs, default_runs, "test_macro_f1", "tuned − default params"))
    total = time.perf_counter() - t_all
    lines.append(f"\nwall time {total:.0f} s ({total / 60:.1f} min)")
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        args.out.write_text(text.lstrip() + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
