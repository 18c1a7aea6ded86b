#!/usr/bin/env python
"""Does the blurred FER2013 train copy help as pretraining? Two trainings side by side on one split.

The project is the one ``real_faces.py --blurred pretrain`` builds (its ``make_project``; crop and split run as
the ``kfer`` commands), so the blurred 28k sit in the train split beside the sharp train faces. The same model (the
recipe of ``real_faces.py``) is trained twice, in memory, with kfer's own pieces (``kfer.model``,
``kfer.train.make_dataset`` with the tuning path's on-the-fly augmentation and decoded store, the recipe's
optimizer, schedule, label smoothing and class weights):

* **A**: ``--epochs`` epochs on the sharp train faces and their ``augment.copies`` augmented copies, from scratch;
* **B**: first ``--pre-epochs`` epochs on the blurred faces (every other one augmented), then the same as A from
  those weights (a fresh optimizer and schedule).

After every epoch of the sharp phase it prints val accuracy per source (flip TTA, as the recipe serves) and
val macro-F1 over all sources; at the end one ``RESULT`` line per variant. Nothing is registered or logged.

Usage (from the repository root; about 20 minutes on 2 cores with the defaults)::

    .venv/bin/python benchmarks/real_faces_pretrain.py [--keep-dir DIR] [--pre-epochs 3] [--epochs 12]
        [--variants A,B]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_faces as rf  # noqa: E402

BLURRED = "fer2013_blurred"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep-dir", type=Path, default=None, help="the project folder (created, or reused)")
    ap.add_argument("--pre-epochs", type=int, default=3, help="epochs on the blurred faces (B)")
    ap.add_argument("--epochs", type=int, default=12, help="epochs on the sharp faces (A and B)")
    ap.add_argument("--variants", default="A,B")
    args = ap.parse_args(argv)
    root = (args.keep_dir or Path(tempfile.mkdtemp(prefix="kfer-pretrain-"))).resolve()
    try:
        return run(root, args)
    finally:
        if args.keep_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args) -> int:
    if not (root / "data" / "splits.csv").exists():
        root.mkdir(parents=True, exist_ok=True)
        rf.make_project(root, argparse.Namespace(blurred="pretrain", pretrain_epochs=args.pre_epochs, overrides={}))
        for stage in ("crop", "split"):
            rf.kfer(root, stage, log=root / "pretrain.log")

    import keras

    from kfer.config import load_params
    from kfer.evaluate import compute_metrics
    from kfer.files import read_image_gray
    from kfer.model import build_from_params
    from kfer.train import callbacks, class_weights, compile_model, make_dataset
    from kfer.tune import OnTheFlyAugment, decoded_images
    from kfer.tune.data import trial_table

    base = load_params(root / "params.yaml")
    names = base.class_names
    splits = pd.read_csv(root / "data" / "splits.csv", dtype=str, keep_default_na=False)
    train = splits[splits["split"] == "train"].reset_index(drop=True)
    blurred = train[train["source"] == BLURRED].reset_index(drop=True)
    sharp = trial_table(base)  # the other train faces and their copies (the blurred source has split: pretrain)
    pre = blurred[["path", "label", "group"]].copy()
    pre["copy"] = np.arange(len(pre)) % 2  # every other blurred face augmented
    val = splits[splits["split"] == "val"].reset_index(drop=True)
    val_x = np.stack([read_image_gray(root / p) for p in val["path"]])[..., None].astype(np.float32)
    truth = np.array([names.index(v) for v in val["label"]])
    print(f"train: {len(blurred)} blurred faces, {len(sharp)} sharp rows (faces × (1 + {base.augment.copies} "
          f"copies)); val {len(val)} faces", flush=True)

    def scores(model) -> dict:
        probs = model.predict(val_x, batch_size=512, verbose=0) + model.predict(val_x[:, :, ::-1], batch_size=512,
                                                                                verbose=0)
        pred = probs.argmax(1)
        out = {s: round(compute_metrics(truth[i], pred[i], names)["test_accuracy"], 3)
               for s, i in val.groupby("source").indices.items()}
        out["macro_f1"] = round(compute_metrics(truth, pred, names)["test_macro_f1"], 3)
        return out

    def phase(model, table: pd.DataFrame, epochs: int, report: bool) -> float:
        p = base.updated({"train": {"epochs": epochs}})
        ds = make_dataset(p, table, training=True, augment=OnTheFlyAugment(p, table, p.augment.strength),
                          pixels=decoded_images(p, table))
        compile_model(model, p)  # a fresh optimizer per phase
        steps = int(ds.cardinality()) // epochs
        cbs = [c for c in callbacks(p, root / "unused.keras", None, steps)  # the LR schedule; no val here
               if not isinstance(c, (keras.callbacks.ModelCheckpoint, keras.callbacks.EarlyStopping))]

        class Report(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                extra = f" val {scores(self.model)}" if report else ""
                print(f"    epoch {epoch + 1}/{epochs} loss {logs['loss']:.3f} accuracy {logs['accuracy']:.3f}"
                      f"{extra}", flush=True)

        weights = class_weights(p, table) if p.train.class_weights else None
        t0 = time.perf_counter()
        model.fit(ds, epochs=epochs, steps_per_epoch=steps, class_weight=weights, callbacks=[*cbs, Report()],
                  verbose=0)
        return time.perf_counter() - t0

    for variant in args.variants.split(","):
        keras.utils.set_random_seed(base.seed)
        model = build_from_params(base)
        t_pre = 0.0
        if variant == "B":
            print(f"== B: {args.pre_epochs} epochs on the {len(pre)} blurred faces", flush=True)
            t_pre = phase(model, pre, args.pre_epochs, report=False)
        print(f"== {variant}: {args.epochs} epochs on the {len(sharp)} sharp rows", flush=True)
        t = phase(model, sharp, args.epochs, report=True)
        print(f"RESULT {variant}: pretraining {t_pre:.0f} s, sharp phase {t:.0f} s, val {scores(model)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
