#!/usr/bin/env python
"""Accuracy on real faces with a person-disjoint split: the whole pipeline on TFEID.

Runs ``run_crop → run_split → run_augment → run_train → run_evaluate`` in a temporary project: a ``params.yaml``
copied from the repository with overrides, every output (crops, splits, augmented images, model, MLflow store)
inside the temporary folder (removed at the end unless ``--keep-dir DIR`` is given, which is then used as the
project folder and kept).

Data: TFEID (Chen & Yen 2007; 840 photos 256×256 of 20 Taiwanese performers in ``<label>/`` folders) at
``../shared/data/tfeid_chen2013`` relative to the repository root (``--data`` or ``KFER_SHARED_DATA`` to change).
The person is the first two digits of the file name (``data.group``: regex ``^(\\d{2})``), so no performer
is in two splits; the script checks that on ``splits.csv`` and on the augmented train manifest.

Labels go through the repository's default ``data.label_map``: happy→joy, angry→anger, sad→sadness,
fear→anxiety, surprise→embarrassment, neutral→neutral. TFEID's ``disgust`` has no AI Hub class: its images are
counted as ``unknown_label`` by the crop stage and excluded (the model still has 7 outputs; ``hurt`` has no
TFEID images, so it is absent from every split and left out of macro-F1).

Prints: settings, the crop report, split counts with the persons of each split, augment counts, the training
history, the best validation macro-F1, TEST accuracy and macro-F1, per-class precision/recall/F1, the
majority-class baseline, and wall time per stage.

Usage (from the repository root)::

    .venv/bin/python benchmarks/tfeid_accuracy.py [--image-size 64] [--epochs 15] [--model resnet50]
        [--blocks 3,4,6,3 --width 64] [--seed 42] [--batch 32] [--lr 1e-3] [--patience 5] [--copies 2]
        [--keep-dir DIR] [--data DIR]

Exits 2 with a message when the data folder is absent.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tfeid_project as tfeid  # noqa: E402 - the TFEID flags, overrides and project folder
from harness import write_params  # noqa: E402

# model presets: (blocks, base width)
MODELS = {
    "resnet50": ((3, 4, 6, 3), 64),   # the real thing (same backbone as keras.applications.ResNet50)
    "resnet26": ((2, 2, 2, 2), 64),
    "resnet50-half": ((3, 4, 6, 3), 32),
    "resnet14-small": ((1, 1, 1, 1), 32),
}


def parse(argv):
    ap = tfeid.common_parser(__doc__, image_size=64, epochs=15, patience=5,
                             blocks_help="override the preset's blocks, e.g. 3,4,6,3",
                             width_help="override the preset's base width")
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet50", help="model preset (default resnet50)")
    ap.add_argument("--init", default=None, help="model.kernel_initializer (default: params.yaml's)")
    ap.add_argument("--bn-momentum", type=float, default=None, help="model.bn_momentum (default: params.yaml's)")
    ap.add_argument("--seed", type=int, default=42, help="params seed: split, augmentation, init (default 42)")
    return ap.parse_args(argv)


def build_params(args, root: Path, data: Path):
    common = tfeid.common_overrides(args)
    blocks, width = MODELS[args.model]
    model = {"blocks": list(blocks), "base_width": width, **common["model"]}
    for key, val in (("kernel_initializer", args.init), ("bn_momentum", args.bn_momentum)):
        if val is not None:
            model[key] = val
    over = {**tfeid.tfeid_overrides(data.resolve(), args.image_size, args.seed), **common, "model": model,
            "train": {**common["train"], "experiment": "tfeid"}}
    return write_params(root, over), over


def main(argv=None) -> int:
    args = parse(argv)
    return tfeid.run_in_project(args.data, args.keep_dir, "kfer-tfeid-", lambda root, data: run(args, root, data))


def run(args, root: Path, data: Path) -> int:
    import pandas as pd

    t_all = time.perf_counter()
    params, over = build_params(args, root, data)
    import tensorflow as tf

    from kfer import tracking
    from kfer.data.augment import run_augment
    from kfer.data.crop import run_crop
    from kfer.data.split import run_split
    from kfer.reporting.evaluate import run_evaluate
    from kfer.training.train import run_train

    m, t = params.model, params.train
    print("== settings ==")
    print(f"project folder: {root}   data: {data}")
    print(f"machine: nproc {len(os.sched_getaffinity(0))}, TensorFlow {tf.__version__}, "
          f"GPUs {len(tf.config.list_physical_devices('GPU'))}, load average {os.getloadavg()[0]:.2f}")
    print(f"overrides of the repository params.yaml: {json.dumps(over, ensure_ascii=False)}")
    print(f"seed {params.seed}; crop {params.crop.image_size}px gray, detector {params.crop.detector} "
          f"(threshold {params.crop.threshold}, margin {params.crop.margin}); split "
          f"{params.split.train}/{params.split.val}/{params.split.test} by person (regex "
          f"{tfeid.GROUP_PATTERN!r} on the file name); augment copies {params.augment.copies} strength {params.augment.strength}")
    print(f"model: blocks {list(m.blocks)} (ResNet{2 + 3 * sum(m.blocks)}), base width {m.base_width}, "
          f"head {m.head_units}, init {m.kernel_initializer}, BN momentum {m.bn_momentum}")
    print(f"train: max {t.epochs} epochs, batch {t.batch_size}, Adam lr {t.learning_rate}, monitor {t.monitor}, "
          f"early stopping patience {t.early_stopping_patience}, LR schedule {t.lr_schedule} "
          f"(factor {t.lr_factor}, patience {t.lr_patience}), class weights {t.class_weights}")
    folders = sorted(p.name for p in data.iterdir() if p.is_dir())
    print("label map (TFEID folder → class): " + ", ".join(
        f"{f}→{params.map_label(f) or 'none (unknown_label, excluded)'}" for f in folders))
    print(f"MLflow store: {tracking.tracking_uri(params)}")
    print(flush=True)
    times: dict[str, float] = {}

    # --- crop ----------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    crop = run_crop(params)
    times["crop"] = time.perf_counter() - t0
    print("\n== crop ==")
    print(f"{crop['total']} files (layout {crop['layout']}), {crop['ok']} faces cropped ({crop['ok_fraction']:.1%}), "
          f"skipped {crop['skipped'] or 'none'}; box source {crop['box_source']}; persons {crop['persons']}")
    print(f"faces per class: {crop['per_class']}")
    manifest = pd.read_csv(params.path(params.paths.cropped) / "manifest.csv", dtype=str, keep_default_na=False)
    unk = manifest[manifest["status"] == "unknown_label"]
    if len(unk):
        by_src = unk["source_label"].value_counts().to_dict()
        print(f"unknown_label (excluded, no class in params): {len(unk)} images, source labels {by_src}")
    print(f"crop wall time {times['crop']:.1f} s", flush=True)

    # --- split ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    split = run_split(params)
    times["split"] = time.perf_counter() - t0
    splits = pd.read_csv(params.path(params.paths.splits), dtype=str, keep_default_na=False)
    print("\n== split (person-disjoint) ==")
    assert (splits["group"] != "").all(), "some images have no person"
    per_group = splits.groupby("group")["split"].nunique()
    leaked = per_group[per_group > 1]
    assert leaked.empty, f"persons in more than one split: {leaked.to_dict()}"
    names = ["train", "val", "test"]
    for s in names:
        rows = splits[splits["split"] == s]
        persons = sorted(rows["group"].unique())
        print(f"{s:>5}: {len(rows):4d} images, {len(persons):2d} persons {persons}; per class "
              f"{ {c: n for c, n in split['per_class'][s].items() if n} }")
    print(f"check: {splits['group'].nunique()} persons, each in exactly one split (read from {params.paths.splits}): OK")
    if split["warnings"]:
        print("split warnings:\n  " + "\n  ".join(split["warnings"]))

    # --- augment -------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    aug = run_augment(params)
    times["augment"] = time.perf_counter() - t0
    amani = pd.read_csv(params.path(params.paths.augmented) / "manifest.csv", dtype=str, keep_default_na=False)
    train_groups = set(splits.loc[splits["split"] == "train", "group"])
    assert set(amani["group"]) <= train_groups, "augmented images from persons outside the train split"
    assert set(amani["source"]) <= set(splits.loc[splits["split"] == "train", "path"])
    print("\n== augment ==")
    print(f"{aug['train_images']} train images -> {aug['originals']} originals + {aug['augmented']} augmented "
          f"(copies {aug['copies']}); per class {aug['per_class']}; skipped {aug['skipped'] or 'none'}; "
          f"all from train persons: OK; {times['augment']:.1f} s", flush=True)

    # --- train ---------------------------------------------------------------------------------------------
    print("\n== train ==", flush=True)
    t0 = time.perf_counter()
    tr = run_train(params, run_name="tfeid")
    times["train"] = time.perf_counter() - t0
    hist = pd.read_csv(params.path(params.paths.history))
    cols = [c for c in ("epoch", "loss", "accuracy", "macro_f1", "val_loss", "val_accuracy", "val_macro_f1",
                        "learning_rate") if c in hist.columns]
    print("\nhistory:")
    print(hist[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"best val macro-F1 {tr['best_val_macro_f1']:.4f} (val accuracy {tr['best_val_accuracy']:.4f}, "
          f"val loss {tr['best_val_loss']:.4f}) at epoch {tr['best_epoch']} of {tr['epochs_run']}; "
          f"{tr['train_images']} train images/epoch, {tr['train_images_per_s']:.1f} img/s, "
          f"fit {tr['train_seconds']:.0f} s, stage {times['train']:.0f} s; MLflow run {tr['run_id']}", flush=True)

    # --- evaluate ------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ev = run_evaluate(params)
    times["evaluate"] = time.perf_counter() - t0
    test = splits[splits["split"] == "test"]
    train_rows = splits[splits["split"] == "train"]
    majority = train_rows["label"].value_counts().idxmax()
    baseline = float((test["label"] == majority).mean())
    print("\n== TEST (persons never seen in training or validation) ==")
    print(f"test images {ev['test_images']} from {test['group'].nunique()} persons {sorted(test['group'].unique())}")
    print(f"TEST accuracy {ev['test_accuracy']:.4f}   TEST macro-F1 {ev['test_macro_f1']:.4f}   "
          f"(majority-class baseline '{majority}': accuracy {baseline:.4f}; chance over "
          f"{test['label'].nunique()} present classes ≈ {1 / test['label'].nunique():.3f})")
    print(f"{'class':>14} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>7}")
    for c, v in ev["per_class"].items():
        print(f"{c:>14} {v['precision']:9.3f} {v['recall']:7.3f} {v['f1']:7.3f} {v['support']:7d}"
              + ("   (no test images: not in macro-F1)" if v["support"] == 0 else ""))
    pred = pd.read_csv(params.path(params.paths.eval_dir) / "predictions.csv", dtype=str, keep_default_na=False)
    print("predicted class counts on test:", pred["predicted"].value_counts().to_dict())
    print("confusion (rows actual, columns predicted):")
    print(pd.crosstab(pred["actual"], pred["predicted"]).to_string())

    total = time.perf_counter() - t_all
    print("\n== wall time ==")
    print("  ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"   total {total:.0f} s ({total / 60:.1f} min)")
    print(f"\nRESULT: person-disjoint TFEID (6 classes, disgust excluded), {params.crop.image_size}px, "
          f"ResNet{2 + 3 * sum(m.blocks)} width {m.base_width} from scratch, seed {params.seed}: "
          f"TEST accuracy {ev['test_accuracy']:.3f}, macro-F1 {ev['test_macro_f1']:.3f} "
          f"on {ev['test_images']} images of {test['group'].nunique()} unseen persons "
          f"(val best macro-F1 {tr['best_val_macro_f1']:.3f}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
