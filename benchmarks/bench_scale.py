#!/usr/bin/env python
"""Scale benchmark: do the data stages and DVC cost the same per image at 1k, 5k and 20k AI Hub-shaped photos,
with flat memory? And what do ``mlflow.log_input`` and ``kfer train``'s start-up cost at 1M table rows?

Three parts (``--parts``, default all):

``stages`` — for each N of ``--sizes`` (default 1000,5000,20000) a fresh kfer project in the work folder:
``git init`` + ``dvc init``, the repository's ``dvc.yaml``, ``.dvcignore`` and ``src/`` (dvc.yaml lists source
files as stage deps), a ``params.yaml`` = the repository's with ``crop.image_size`` = ``--image-size`` (224, the
AI Hub setting) and every path relative to the project, the photos in ``data/raw``. Timed, each as a subprocess
of this script, in this order:

* ``dvc add data/raw`` — cache.type left at DVC's default (reflink,copy; on ext4 that is a copy): what
  versioning the raw photos costs, and the bytes it adds to the cache;
* ``dvc repro -s crop``, ``dvc repro -s split``, ``dvc repro -s augment`` — each the stage command
  (``kfer <stage>``, as dvc.yaml runs it) plus DVC's hashing of its deps and caching of its outs;
* ``dvc status`` (everything up to date);
* ``dvc add data/raw`` again into an empty cache with ``cache.type hardlink,symlink`` and DVC's hash cache (the
  state database in ``core.site_cache_dir``, set inside the project) removed, so the photos are hashed again:
  how much of the first add was the copy, and whether the file system allows links (the link kind used and the
  bytes the cache then adds are printed).

Per step: wall seconds (Popen to ``os.wait4``), seconds per image (per raw photo; per cropped face for split;
per train image for augment, its unit of work), ``cmd s`` = how long the ``kfer`` process lived, seen by the
memory sampler (±0.1 s; the rest of a repro is DVC), peak memory = the maximum over time of the summed PSS of
the whole process tree (dvc, the stage, its pool workers: crop and augment use ``crop.workers`` /
``augment.workers`` processes), sampled with psutil every 0.1 s. PSS shares each shared page among the processes
mapping it, so the sum is the tree's real footprint; the summed RSS (an upper bound: libraries and a fork's
copy-on-write pages counted in every process) and ``ru_maxrss`` from ``os.wait4`` (the largest single process)
are printed beside it. Also CPU seconds of the tree (wait4's rusage) and CPU seconds used by *other* processes
meanwhile (``/proc/stat`` minus ours; above ``--max-other`` the step is flagged ``BUSY``: its time is not
trustworthy).
Then a table over N: per-image cost ratio largest N / smallest N per step (target ≤ 1.15) and peak-memory ratio
(target within ±10%), PASS/FAIL. A fixed start-up (imports, pool, DVC) makes small N look *more* expensive per
image, so a ratio above 1 means the per-image work itself grows; the linear fit (fixed s + marginal s/img) over
the N's says the same without that bias.

Photos: :func:`kfer.demo.aihub.generate_aihub_photos` (``--size``, default 1440x1083, the smallest real AI Hub
size; EXIF rotation, trailers after FF D9, CP949 label JSON, the AI Hub folder layout), ``--per-class`` photos
per person and class. Generation is not measured. It runs once, for the largest N, in chunks of
``--chunk-persons`` persons, one chunk per task on all cores (chunk c uses seed ``seed·10000 + c``; persons
differ across chunks since their ids hash the seed); the persons are ordered chunk by chunk, and the raw folder
of each N holds the first ⌈N / (7 · per-class)⌉ persons, hardlinked from the generated files (copied where
links fail), with label JSON files rewritten (same encoding) to list exactly those photos. Why not the full
JSON in every N: the reader would count the other photos' records as ``label_records_unmatched`` and every
small N's crop would parse the largest N's JSON, biasing the per-image cost down the sizes; why not generate
per N: 26k photos instead of 20k for the defaults, and nothing to reuse. Chunks are cached in ``--work-dir``
(keyed by size, per-class, grain, seed and chunk size), so a rerun with the same folder generates nothing.
The crop report of every N is checked: nothing skipped, no unmatched label record.

``log_input`` — ``kfer.training.train.log_datasets`` (``mlflow.data.from_pandas`` + ``mlflow.log_input``, as
``kfer train`` calls it) of a ``--rows``-row (path, label, split) table inside ``kfer.tracking.tracked_run``,
into a fresh SQLite MLflow store in the work folder, in a child process: seconds of from_pandas (the digest)
and log_input apart, peak memory.

``startup`` — ``kfer train``'s start-up at ``--rows`` rows, without training and without images: synthetic
``splits.csv`` and augmented ``manifest.csv`` of ``--rows`` rows each (paths to images that do not exist),
then ``train_table``, ``split_table(…, "val")``, ``class_weights``, the TensorFlow import and ``make_dataset``
for train and val, each timed with its peak memory, in a child process. An audit hook counts every file the
start-up opens or lists under the image folders (it should be 0).

At the end: a markdown table to paste in the README, and an EXTRAPOLATION to 500k photos on 16 cores. Each
step's seconds are fitted as fixed + marginal × images over the N's (one N: its seconds per image); for
crop/augment the command's marginal part × the cores used here (= core-seconds per image: their pools use
every core) × 500k (augment: × the train fraction) / 16, plus the DVC part of the step serial; split and the
DVC steps serial (marginal × 500k). Linear in N and in cores, no I/O limit: a rough guide, not a measurement
(split, for one, swaps persons pairwise up to 1000 persons, which is not linear).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_scale.py [--sizes 1000,5000,20000] [--size 1440x1083] [--per-class 4]
        [--image-size 224] [--parts stages,log_input,startup] [--rows 1000000] [--work-dir DIR] [--keep]
        [--wait-idle S] [--max-other CPU_S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    REPO,
    StepError,
    child_env,
    machine_info,
    measure,
    remove_or_keep,
    run_quiet,
    usable_cores,
    wait_idle,
    wh,
    write_params,
)

SAMPLE_S = 0.1  # psutil sampling period of the process-tree memory
PROJECT_FILES = ("dvc.yaml", ".dvcignore", "src", "models/init")  # copied into every project (dvc.yaml's deps)
PARTS = ("stages", "log_input", "startup")
PER_IMAGE_TARGET = 1.15  # per-image cost, largest N / smallest N
MEMORY_TARGET = 0.10  # peak memory within ±10% across N
EXTRAPOLATE_N, EXTRAPOLATE_CORES = 500_000, 16
PARALLEL_STEPS = ("crop", "augment")  # their commands use a pool of crop.workers / augment.workers = all cores
STEPS = ("add_copy", "crop", "split", "augment", "status", "add_link")
STEP_LABEL = {"add_copy": "dvc add data/raw (copy)", "crop": "dvc repro -s crop", "split": "dvc repro -s split",
              "augment": "dvc repro -s augment", "status": "dvc status", "add_link": "dvc add data/raw (hardlink)"}
UNIT = {"split": "face", "augment": "train img"}


# ------------------------------------------------------------------------------------------------------------
# measuring a subprocess: wall, CPU, memory of the process tree, lifetime of the kfer command
# ------------------------------------------------------------------------------------------------------------

def run_step(cmd: list[str], cwd: Path, log_path: Path) -> dict:
    """Run ``cmd`` (output to ``log_path``); wall, CPU (child + reaped descendants), memory, kfer lifetime."""
    m = measure(cmd, cwd, log_path, env=child_env(), period=SAMPLE_S, pss=True, watch="kfer")
    if m["rc"] != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise StepError(f"`{' '.join(cmd)}` failed (exit {m['rc']}) in {cwd}; its output ends with:\n{tail}")
    return {"s": m["s"], "cpu_s": m["cpu_s"], "other_cpu_s": m["other_cpu_s"], "peak_mib": m["pss_mib"],
            "cmd_peak_mib": m["cmd_pss_mib"], "rss_mib": m["rss_mib"], "procs": m["procs"],
            "largest_mib": m["largest_mib"], "cmd_s": m["cmd_s"]}


# ------------------------------------------------------------------------------------------------------------
# photos: generated once in chunks of persons (parallel, cached), subsets of persons per N
# ------------------------------------------------------------------------------------------------------------

def _gen_chunk(task: dict) -> dict:
    """Pool task: one chunk of persons -> ``<pool>/chunk-NNNN/`` (AI Hub layout) and its index JSON beside it."""
    import kfer.demo.aihub as demo_aihub

    demo_aihub.tqdm = lambda it, **_kw: it  # one progress bar (the parent's), not one per worker
    t0 = time.perf_counter()
    out = Path(task["pool"]) / f"chunk-{task['chunk']:04d}"
    summary = demo_aihub.generate_aihub_photos(
        out, task["classes"], n_persons=task["persons"], per_class=task["per_class"], size=tuple(task["size"]),
        seed=task["seed"] * 10_000 + task["chunk"], grain=task["grain"])
    photos: dict[str, list[str]] = {}
    for name, rel in summary["paths"].items():  # in generation order: person by person
        photos.setdefault(name.split("_", 1)[0], []).append(rel)
    index = {"persons": list(photos), "photos": photos, "label_files": summary["label_files"],
             "label_encoding": summary["label_encoding"], "images": summary["images"], "bytes": summary["bytes"]}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out.with_suffix(".json"))  # the chunk counts as done only once its index exists
    return {"chunk": task["chunk"], "images": summary["images"], "s": time.perf_counter() - t0}


def generate_pool(pool: Path, n_chunks: int, classes, args, size) -> list[dict]:
    """Make sure chunks 0..n_chunks-1 exist (generating the missing ones on all cores); return their indexes."""
    import multiprocessing as mp

    from tqdm import tqdm

    pool.mkdir(parents=True, exist_ok=True)
    missing = [c for c in range(n_chunks) if not (pool / f"chunk-{c:04d}.json").exists()]
    if missing:
        workers = min(len(missing), usable_cores())
        tasks = [{"pool": str(pool), "chunk": c, "classes": classes, "persons": args.chunk_persons,
                  "per_class": args.per_class, "size": size, "seed": args.seed, "grain": args.grain}
                 for c in missing]
        t0 = time.perf_counter()
        n = 0
        with mp.get_context("spawn").Pool(workers) as p:
            for res in tqdm(p.imap_unordered(_gen_chunk, tasks), total=len(tasks), desc="generate photos",
                            unit="chunk", mininterval=5.0):
                n += res["images"]
        print(f"generated    : {n} photos in {len(missing)} chunk(s) in {time.perf_counter() - t0:.0f} s "
              f"({workers} processes; not part of any timing)", flush=True)
    else:
        print(f"generated    : all {n_chunks} chunk(s) found in {pool}, nothing generated", flush=True)
    return [json.loads((pool / f"chunk-{c:04d}.json").read_text(encoding="utf-8")) for c in range(n_chunks)]


def build_raw(pool: Path, chunks: list[dict], n_persons: int, dest: Path) -> dict:
    """``dest`` = the first ``n_persons`` persons' photos (hardlinks, else copies) and label JSON listing them."""
    chosen: list[tuple[int, str]] = [(c, t) for c, idx in enumerate(chunks) for t in idx["persons"]][:n_persons]
    names: set[str] = set()
    links = copies = size = 0
    for c, title in chosen:
        base = pool / f"chunk-{c:04d}"
        for rel in chunks[c]["photos"][title]:
            src, dst = base / rel, dest / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
                links += 1
            except OSError:
                shutil.copy2(src, dst)
                copies += 1
            size += dst.stat().st_size
            names.add(Path(rel).name)
    labels: dict[str, list] = {}
    encodings: dict[str, str] = {}
    for c in sorted({c for c, _ in chosen}):
        enc = chunks[c]["label_encoding"]
        for rel in chunks[c]["label_files"]:
            recs = json.loads((pool / f"chunk-{c:04d}" / rel).read_bytes().decode(enc))
            labels.setdefault(rel, []).extend(r for r in recs if r["filename"] in names)
            encodings[rel] = enc
    for rel, recs in labels.items():
        if recs:
            p = dest / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes((json.dumps(recs, ensure_ascii=False, indent=1) + "\n").encode(encodings[rel]))
    return {"photos": len(names), "persons": len(chosen), "bytes": size, "links": links, "copies": copies,
            "label_files": sum(bool(r) for r in labels.values()), "records": sum(len(r) for r in labels.values())}


# ------------------------------------------------------------------------------------------------------------
# the stages part
# ------------------------------------------------------------------------------------------------------------

def make_project(root: Path, image_size: int) -> None:
    """A git + DVC project with the repository's dvc.yaml and its deps, crop.image_size set, one process a stage."""
    write_params(root, {"crop": {"image_size": image_size, "workers": 0}, "augment": {"workers": 0}},
                 files=PROJECT_FILES, dvc=True)


def _inodes(folder: Path) -> set[tuple[int, int]]:
    out = set()
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            st = p.stat()  # follows symbolic links (DVC's symlink cache type) to the file they point to
            out.add((st.st_dev, st.st_ino))
    return out


def cache_usage(cache: Path, raw: Path) -> dict:
    """Bytes in the cache, and the bytes of cache files that are not the same file as one in ``raw``."""
    shared = _inodes(raw)
    total = extra = files = 0
    for p in cache.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            total += st.st_size
            files += 1
            if (st.st_dev, st.st_ino) not in shared:
                extra += st.st_size
    return {"bytes": total, "extra_bytes": extra, "files": files}


def link_kinds(raw: Path, cache: Path) -> dict:
    """How the photos in ``raw`` relate to the cache after an add: hardlinked, symlinked or separate copies."""
    in_cache = _inodes(cache)
    kinds = {"hardlink": 0, "symlink": 0, "copy": 0}
    for p in raw.rglob("*"):
        if p.is_symlink():
            kinds["symlink"] += 1
        elif p.is_file():
            st = p.stat()
            kinds["hardlink" if (st.st_dev, st.st_ino) in in_cache else "copy"] += 1
    return kinds


def _fs_type(path: Path) -> str:
    try:
        return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def run_size(n: int, root: Path, pool: Path, chunks: list[dict], args, n_classes: int) -> dict:
    """One N: project, raw folder, the timed steps, the checks; returns the measurements."""
    persons = math.ceil(n / (n_classes * args.per_class))
    shutil.rmtree(root, ignore_errors=True)
    make_project(root, args.image_size)
    raw = build_raw(pool, chunks, persons, root / "data" / "raw")
    logs = root.parents[1] / "logs"
    logs.mkdir(exist_ok=True)
    print(f"\n== N = {n} requested: {raw['photos']} photos of {raw['persons']} persons ({raw['bytes'] / 1e6:.0f} MB, "
          f"{raw['links']} hardlinked, {raw['copies']} copied), {raw['label_files']} label files with "
          f"{raw['records']} records; project {root} ==", flush=True)
    if args.wait_idle > 0:
        print(f"  wait-idle: {wait_idle(args.wait_idle)}", flush=True)
    res: dict = {"n": raw["photos"], "persons": raw["persons"], "raw_bytes": raw["bytes"], "steps": {}}

    def step(name: str, cmd: list[str], per: int) -> dict:
        m = run_step(cmd, root, logs / f"n{n}-{name}.log")
        if name in ("crop", "split", "augment") and f"Running stage '{name}'" not in (
                logs / f"n{n}-{name}.log").read_text(encoding="utf-8", errors="replace"):
            raise StepError(f"`{' '.join(cmd)}` did not run the stage (see {logs / f'n{n}-{name}.log'})")
        m["per"] = per
        res["steps"][name] = m
        busy = " BUSY" if m["other_cpu_s"] > args.max_other else ""
        cmd_s = f", cmd {m['cmd_s']:.1f} s" if m["cmd_s"] is not None else ""
        unit = UNIT.get(name, "img")
        print(f"  {STEP_LABEL[name]:28s} {m['s']:8.2f} s{cmd_s:14s} {1000 * m['s'] / per:8.3f} ms/{unit} (per {per});"
              f" peak PSS {m['peak_mib']:5.0f} MiB (kfer command {m['cmd_peak_mib']:4.0f}; RSS sum {m['rss_mib']:5.0f})"
              f" in {m['procs']} proc"
              f" [largest {m['largest_mib']:.0f}]; cpu {m['cpu_s']:.1f} s, other {m['other_cpu_s']:.1f} cpu-s{busy}",
              flush=True)
        return m

    cache = root / ".dvc" / "cache"
    step("add_copy", ["dvc", "add", "data/raw"], raw["photos"])
    res["cache_raw_copy"] = cache_usage(cache, root / "data" / "raw")
    step("crop", ["dvc", "repro", "-s", "crop"], raw["photos"])
    crop = json.loads((root / "reports" / "crop.json").read_text(encoding="utf-8"))
    res["crop_report"] = {k: crop.get(k) for k in ("total", "ok", "skipped", "box_source", "label_json")}
    unmatched = (crop.get("label_json") or {}).get("label_records_unmatched", 0)
    print(f"  crop report: ok {crop['ok']}/{crop['total']}, skipped {crop['skipped'] or 'nothing'}, box source "
          f"{crop.get('box_source')}, label records unmatched {unmatched}"
          + ("" if not crop["skipped"] and not unmatched and crop["total"] == raw["photos"]
             else "  <-- NOT CLEAN: check the raw folder"), flush=True)
    step("split", ["dvc", "repro", "-s", "split"], max(1, crop["ok"]))
    split = json.loads((root / "reports" / "split.json").read_text(encoding="utf-8"))
    res["split_counts"], res["groups"] = split["counts"], split["groups"]
    train = split["counts"].get("train", 0)
    step("augment", ["dvc", "repro", "-s", "augment"], max(1, train))
    res["train_fraction"] = train / max(1, crop["ok"])
    step("status", ["dvc", "status"], raw["photos"])
    res["cache_total"] = cache_usage(cache, root / "data" / "raw")

    # the raw photos again, into an empty cache, links allowed, the hash cache cleared: a first add with links
    (root / "data" / "raw.dvc").unlink()
    shutil.rmtree(root / ".dvc" / "site", ignore_errors=True)
    link_cache = root / ".dvc" / "cache-link"
    run_quiet(["dvc", "config", "cache.dir", str(link_cache)], root)
    run_quiet(["dvc", "config", "cache.type", "hardlink,symlink"], root)
    step("add_link", ["dvc", "add", "data/raw"], raw["photos"])
    res["cache_raw_link"] = cache_usage(link_cache, root / "data" / "raw")
    res["link_kinds"] = link_kinds(root / "data" / "raw", link_cache)
    c1, c2 = res["cache_raw_copy"], res["cache_raw_link"]
    print(f"  cache for data/raw: copy {c1['bytes'] / 1e6:.0f} MB ({c1['extra_bytes'] / 1e6:.0f} MB new on disk), "
          f"hardlink,symlink {c2['bytes'] / 1e6:.0f} MB ({c2['extra_bytes'] / 1e6:.0f} MB new on disk; photos "
          f"{res['link_kinds']}); cache after the stages {res['cache_total']['bytes'] / 1e6:.0f} MB in "
          f"{res['cache_total']['files']} files", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return res


def _fit(ns: list[int], ss: list[float]) -> tuple[float, float] | None:
    """Least squares seconds = a + b·n over the sizes: (fixed s, marginal s per image)."""
    if len(ns) < 2:
        return None
    mn, ms = sum(ns) / len(ns), sum(ss) / len(ss)
    var = sum((n - mn) ** 2 for n in ns)
    b = sum((n - mn) * (s - ms) for n, s in zip(ns, ss, strict=True)) / var if var else 0.0
    return ms - b * mn, b


def stages_report(results: list[dict], max_other: float) -> tuple[list[str], list[str], bool]:
    """Printed scaling table, README markdown rows and whether every target is met."""
    if len(results) < 2:
        return ["(one size only: no ratios)"], [], True
    small, large = results[0], results[-1]
    ns = [r["n"] for r in results]
    head = " ".join(f"{'@' + str(n):>9s}" for n in ns)
    lines = [f"  {'step':28s} ms/img {head}  ratio ≤{PER_IMAGE_TARGET:.2f}   fixed s  marg ms/img |"
             f" peak MiB {head}  ratio ±{MEMORY_TARGET:.0%}"]
    md = ["| step | " + " | ".join(f"N={n}: s (ms/img)" for n in ns)
          + " | per-image ratio (≤ 1.15) | peak MiB | memory ratio (±10%) |",
          "|---|" + "---|" * len(ns) + "---|---|---|"]
    ok_all = True
    for name in STEPS:
        per = [1000 * r["steps"][name]["s"] / r["steps"][name]["per"] for r in results]
        mem = [r["steps"][name]["peak_mib"] for r in results]
        ratio, mratio = per[-1] / per[0], mem[-1] / mem[0]
        ok_t, ok_m = ratio <= PER_IMAGE_TARGET, abs(mratio - 1) <= MEMORY_TARGET
        ok_all &= ok_t and ok_m
        fit = _fit([r["steps"][name]["per"] for r in results], [r["steps"][name]["s"] for r in results])
        fit_s = f"{fit[0]:9.1f} {1000 * fit[1]:12.3f}" if fit else ""
        busy = any(r["steps"][name]["other_cpu_s"] > max_other for r in results)
        lines.append(f"  {STEP_LABEL[name]:28s}        " + " ".join(f"{v:9.3f}" for v in per)
                     + f"  {ratio:5.2f} {'PASS' if ok_t else 'FAIL'} {fit_s} | "
                     + "         " + " ".join(f"{v:9.0f}" for v in mem)
                     + f"  {mratio:5.2f} {'PASS' if ok_m else 'FAIL'}" + ("  (BUSY at some N)" if busy else ""))
        unit = UNIT.get(name, "img")
        md.append(f"| {STEP_LABEL[name]}{' (per ' + unit + ')' if unit != 'img' else ''} | "
                  + " | ".join(f"{r['steps'][name]['s']:.1f} ({v:.2f})" for r, v in zip(results, per, strict=True))
                  + f" | {ratio:.2f} {'PASS' if ok_t else 'FAIL'} | "
                  + " / ".join(f"{v:.0f}" for v in mem) + f" | {mratio:.2f} {'PASS' if ok_m else 'FAIL'} |")
    for name in STEPS:  # the stage command alone (kfer and its pool workers), without DVC's hashing and caching
        cmd = [r["steps"][name].get("cmd_peak_mib", 0.0) for r in results]
        if cmd[0] > 0:
            ok_c = abs(cmd[-1] / cmd[0] - 1) <= MEMORY_TARGET
            lines.append(f"  {STEP_LABEL[name]:28s} kfer command alone, peak PSS MiB "
                         + " / ".join(f"{v:.0f}" for v in cmd) + f"  ratio {cmd[-1] / cmd[0]:.2f} "
                         + ("PASS" if ok_c else "FAIL"))
            md.append(f"| {STEP_LABEL[name]}: the kfer command alone |" + " |" * (len(ns) + 1) + " "
                      + " / ".join(f"{v:.0f}" for v in cmd)
                      + f" | {cmd[-1] / cmd[0]:.2f} {'PASS' if ok_c else 'FAIL'} |")
    lines.append(f"  (per image: per raw photo; split per cropped face; augment per train image. Sizes "
                 f"{small['n']}..{large['n']} photos, {small['persons']}..{large['persons']} persons; "
                 f"ratio = @{large['n']} / @{small['n']})")
    return lines, md, ok_all


def extrapolation(results: list[dict], cores: int) -> list[str]:
    """Hours for EXTRAPOLATE_N photos on EXTRAPOLATE_CORES cores, linear from the measured sizes."""
    n_x, c_x = EXTRAPOLATE_N, EXTRAPOLATE_CORES
    large = results[-1]
    how = ("fixed s + marginal s/img × images, both fitted over the N's" if len(results) > 1
           else f"s/img at N = {large['n']} × images")
    out = [f"EXTRAPOLATION (not a measurement) to {n_x:,} photos on {c_x} cores from N = "
           f"{', '.join(str(r['n']) for r in results)} on {cores} cores ({how}); the crop/augment commands' "
           f"per-image part × {cores} cores / {c_x} (their pools use every core), their DVC part and every other "
           f"step serial. Linear in N and in cores, no I/O limit"]

    def cost(name: str, key) -> tuple[float, float]:  # (fixed s, s per unit)
        xs = [r["steps"][name]["per"] for r in results]
        ys = [key(r["steps"][name]) for r in results]
        fit = _fit(xs, ys)
        return (fit[0], max(0.0, fit[1])) if fit else (0.0, ys[-1] / xs[-1])

    total = 0.0
    for name in STEPS:
        units = n_x * (large["train_fraction"] if name == "augment" else 1.0)
        if name in PARALLEL_STEPS and all(r["steps"][name]["cmd_s"] is not None for r in results):
            a_c, b_c = cost(name, lambda m: m["cmd_s"])
            a_d, b_d = cost(name, lambda m: m["s"] - m["cmd_s"])
            par, ser = a_c + b_c * cores * units / c_x, a_d + b_d * units
            note = f"command {par / 60:7.1f} min parallel + DVC {ser / 60:6.1f} min serial"
        else:
            a, b = cost(name, lambda m: m["s"])
            par, ser, note = 0.0, a + b * units, "serial"
        total += par + ser
        out.append(f"  {STEP_LABEL[name]:28s} {(par + ser) / 3600:6.2f} h  ({note}; {units:,.0f} "
                   f"{UNIT.get(name, 'img')})")
    out.append(f"  {'all steps':28s} {total / 3600:6.2f} h")
    return out


def stages_part(args, work: Path) -> dict:
    from kfer.config import load_params

    classes = [(c.name, c.ko or c.name) for c in load_params(REPO / "params.yaml").classes]
    w, h = args.wh
    per_person = len(classes) * args.per_class
    persons = math.ceil(max(args.sizes) / per_person)
    n_chunks = math.ceil(persons / args.chunk_persons)
    key = f"aihub-{w}x{h}-pc{args.per_class}-grain{args.grain:g}-seed{args.seed}-cp{args.chunk_persons}"
    pool = work / "photos" / key
    print(f"photos       : {per_person} per person ({len(classes)} classes × {args.per_class}), {w}x{h}, grain "
          f"{args.grain:g}; {persons} persons for N = {max(args.sizes)} in {n_chunks} chunk(s) of "
          f"{args.chunk_persons} persons; cache {pool} (file system {_fs_type(work)})", flush=True)
    chunks = generate_pool(pool, n_chunks, classes, args, (w, h))
    results = []
    for n in sorted(args.sizes):
        results.append(run_size(n, work / "projects" / f"n{n}", pool, chunks, args, len(classes)))
    return {"results": results}


# ------------------------------------------------------------------------------------------------------------
# log_input and startup parts: children of this script (python bench_scale.py --child PART CONFIG RESULT)
# ------------------------------------------------------------------------------------------------------------

class Phases:
    """Wall time and peak RSS of this process per named phase (a thread samples RSS every 20 ms)."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.out: list[dict] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    @contextlib.contextmanager
    def __call__(self, name: str, timed: bool = True):
        rss0 = self.peak = self.proc.memory_info().rss
        t0 = time.perf_counter()
        yield
        s = time.perf_counter() - t0
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.out.append({"phase": name, "s": s, "peak_mib": self.peak / 2**20, "delta_mib": (self.peak - rss0) / 2**20,
                         "timed": timed})


def synthetic_table(rows: int, seed: int, n_classes: int):
    """``rows`` rows shaped like the pipeline's tables: AI Hub-like PNG paths, a label, a person, a split."""
    import numpy as np
    import pandas as pd

    from kfer.config import load_params

    names = [c.name for c in load_params(REPO / "params.yaml").classes][:n_classes]
    rng = np.random.default_rng(seed)
    n_persons = max(3, rows // 300)
    person = rng.integers(0, n_persons, rows)
    label = rng.choice(len(names), rows, p=np.linspace(2, 1, len(names)) / np.linspace(2, 1, len(names)).sum())
    titles = pd.Series([f"{i:064x}" for i in range(n_persons)])
    split_of = pd.Series(rng.choice(["train", "val", "test"], n_persons, p=[0.7, 0.15, 0.15]))
    lab = pd.Series(np.array(names, dtype=object)[label])
    paths = ("data/cropped/" + lab + "/" + titles.iloc[person].reset_index(drop=True) + "_남_30_"
             + lab + "_20200701" + pd.Series(np.arange(rows) % 1_000_000).astype(str).str.zfill(6) + ".png")
    return pd.DataFrame({"path": paths, "label": lab, "group": titles.iloc[person].reset_index(drop=True),
                         "source": "", "split": split_of.iloc[person].reset_index(drop=True)})


def child_log_input(cfg: dict) -> dict:
    import mlflow

    from kfer import tracking
    from kfer.config import load_params
    from kfer.training import train

    ph = Phases()
    params = load_params(cfg["params"])
    with ph("build the table (not timed)", timed=False):
        df = synthetic_table(cfg["rows"], 1, len(params.classes))[["path", "label", "split"]]
    spent: dict[str, float] = {"from_pandas": 0.0, "log_input": 0.0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    mlflow.data.from_pandas = timed("from_pandas", mlflow.data.from_pandas)
    mlflow.log_input = timed("log_input", mlflow.log_input)
    with contextlib.ExitStack() as stack:
        with ph("tracked_run start (store, experiment, lineage tags)"):
            stack.enter_context(tracking.tracked_run(params, "bench-log-input", log_params=False))
        with ph(f"log_datasets, {len(df):,} rows (from_pandas + log_input)"):
            train.log_datasets(params, {"train": (df, params.paths.splits, "training")})
    db = params.path(params.paths.mlflow_db)
    return {"phases": ph.out, "spent": spent, "rows": len(df), "db_bytes": db.stat().st_size if db.exists() else 0}


def child_startup(cfg: dict) -> dict:
    from kfer.config import load_params
    from kfer.training import inputs as train

    ph = Phases()
    params = load_params(cfg["params"])
    image_dirs = tuple(str(params.path(p)) for p in (params.paths.cropped, params.paths.augmented))
    with ph("write splits.csv + augmented manifest (not timed)", timed=False):
        df = synthetic_table(cfg["rows"], 2, len(params.classes))
        params.path(params.paths.splits).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(params.path(params.paths.splits), index=False)
        man = df[["path", "label", "group"]].assign(original=df["path"], copy=0)[
            ["path", "original", "label", "group", "copy"]]
        man_path = params.path(params.paths.augmented) / "manifest.csv"
        man_path.parent.mkdir(parents=True, exist_ok=True)
        man.to_csv(man_path, index=False)
        del df, man
    touched: list[str] = []

    def audit(event: str, args) -> None:  # files opened or folders listed under the image folders
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, os.PathLike)):
            p = os.fspath(args[0])
            if isinstance(p, str) and p.startswith(image_dirs) and not p.endswith("manifest.csv"):
                touched.append(p)

    sys.addaudithook(audit)
    with ph("train_table (augmented manifest)"):
        train_df = train.train_table(params)
    with ph("split_table(val) (splits.csv)"):
        val_df = train.split_table(params, "val")
    with ph("class_weights"):
        train.class_weights(params, train_df)
    if cfg["tf"]:
        with ph("import tensorflow"):
            import tensorflow as tf

            tf.constant(0)  # the runtime is up
        with ph(f"make_dataset train ({len(train_df):,} rows, shuffled)"):
            train.make_dataset(params, train_df, training=True)
        with ph(f"make_dataset val ({len(val_df):,} rows)"):
            train.make_dataset(params, val_df, training=False)
    sizes = {"splits.csv": params.path(params.paths.splits).stat().st_size, "manifest.csv": man_path.stat().st_size}
    return {"phases": ph.out, "rows": len(train_df), "val_rows": len(val_df), "csv_bytes": sizes,
            "touched": len(touched), "touched_examples": touched[:3]}


def run_child(part: str, cfg_path: str, out_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
    res = child_log_input(cfg) if part == "log_input" else child_startup(cfg)
    Path(out_path).write_text(json.dumps(res), encoding="utf-8")


def table_part(part: str, args, work: Path) -> dict:
    """Run the log_input or startup child in a fresh project folder; print its phases."""
    root = work / part
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    write_params(root, {})
    cfg, out = root / "cfg.json", root / "result.json"
    cfg.write_text(json.dumps({"params": str(root / "params.yaml"), "rows": args.rows, "tf": not args.no_tf}),
                   encoding="utf-8")
    if args.wait_idle > 0:
        print(f"  wait-idle: {wait_idle(args.wait_idle)}", flush=True)
    m = run_step([sys.executable, str(Path(__file__).resolve()), "--child", part, str(cfg), str(out)], root,
                root / "child.log")
    res = json.loads(out.read_text(encoding="utf-8"))
    res["process"] = m
    what = {"log_input": "mlflow.log_input via kfer.train.log_datasets, SQLite store",
            "startup": "kfer train start-up (tables, class weights, tf.data), no training, no images"}[part]
    print(f"\n== {part}: {what}, {args.rows:,} rows ==")
    for p in res["phases"]:
        print(f"  {p['phase']:56s} {p['s']:8.2f} s   peak {p['peak_mib']:6.0f} MiB ({p['delta_mib']:+6.0f} MiB)"
              + ("" if p["timed"] else "   [set-up]"))
    timed = sum(p["s"] for p in res["phases"] if p["timed"])
    busy = " BUSY" if m["other_cpu_s"] > args.max_other else ""
    print(f"  {'timed phases, total':56s} {timed:8.2f} s   process peak {m['largest_mib']:.0f} MiB (ru_maxrss; "
          f"PSS of its tree {m['peak_mib']:.0f}); whole child {m['s']:.1f} s, other {m['other_cpu_s']:.1f} cpu-s{busy}")
    if part == "log_input":
        sp = res["spent"]
        print(f"  of which mlflow.data.from_pandas {sp['from_pandas']:.2f} s, mlflow.log_input {sp['log_input']:.2f} s;"
              f" store {res['db_bytes'] / 1e6:.1f} MB")
    else:
        print("  CSV sizes: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in res["csv_bytes"].items())
              + f"; image files opened or folders listed during start-up: {res['touched']}"
              + (f" e.g. {res['touched_examples']}  <-- FINDING" if res["touched"] else " (none: good)"))
    res["timed_s"] = timed
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------------------------------------

def _sizes(text: str) -> list[int]:
    out = sorted({int(v) for v in text.split(",") if v.strip()})
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError("expected positive integers, e.g. 1000,5000,20000")
    return out


def _parts(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in PARTS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"parts are {', '.join(PARTS)}; got {text!r}")
    return out



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", type=_parts, default=",".join(PARTS),
                    help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    ap.add_argument("--sizes", type=_sizes, default="1000,5000,20000",
                    help="stages: photo counts N, rounded up to whole persons (default 1000,5000,20000)")
    ap.add_argument("--size", dest="wh", type=wh, default="1440x1083", metavar="WxH",
                    help="stages: upright photo size (default 1440x1083, AI Hub's smallest; phones give 3088x2208)")
    ap.add_argument("--per-class", type=int, default=4, help="stages: photos per person and class (default 4)")
    ap.add_argument("--chunk-persons", type=int, default=12, help="stages: persons per generation task (default 12)")
    ap.add_argument("--grain", type=float, default=1.0,
                    help="stages: sensor-noise scale of the photos, i.e. their JPEG size (default 1)")
    ap.add_argument("--image-size", type=int, default=224, help="stages: crop.image_size (default 224, as AI Hub)")
    ap.add_argument("--seed", type=int, default=0, help="stages: generator seed (default 0)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="log_input, startup: table rows (default 1000000)")
    ap.add_argument("--no-tf", action="store_true", help="startup: skip the TensorFlow import and make_dataset")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="folder for the generated photos (kept, and reused by reruns), projects and logs; "
                         "default: a temporary folder, removed at the end unless --keep")
    ap.add_argument("--keep", action="store_true", help="keep the projects (and a temporary work folder)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each N and part wait up to S seconds for an idle machine (default 0: no wait)")
    ap.add_argument("--max-other", type=float, default=5.0, metavar="CPU_S",
                    help="flag a step BUSY when other processes used more CPU-seconds than this during it "
                         "(default 5)")
    ap.add_argument("--child", nargs=3, metavar=("PART", "CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_child(*args.child)
        return 0
    if args.per_class < 1 or args.chunk_persons < 1 or args.rows < 10:
        ap.error("--per-class and --chunk-persons must be at least 1, --rows at least 10")
    for tool in ("dvc", "kfer", "git"):
        if shutil.which(tool, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}") is None:
            print(f"bench_scale: `{tool}` not found (run from the project's virtual environment)", file=sys.stderr)
            return 2

    temp = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="kfer-bench-scale-")) if temp else args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cores = usable_cores()
    t_start = time.perf_counter()
    print("== scale benchmark: data stages + DVC over N photos, log_input and train start-up at "
          f"{args.rows:,} rows ==")
    for ln in machine_info():
        print(ln)
    print(f"work folder  : {work}{' (temporary)' if temp else ''}; parts {','.join(args.parts)}")
    stages = logi = start = None
    code = 0
    try:
        if "stages" in args.parts:
            stages = stages_part(args, work)
        if "log_input" in args.parts:
            logi = table_part("log_input", args, work)
        if "startup" in args.parts:
            start = table_part("startup", args, work)
    except StepError as exc:
        print(f"\nbench_scale: {exc}", file=sys.stderr)
        code = 1

    print(f"\n== summary ({time.perf_counter() - t_start:.0f} s in all) ==")
    if stages and stages["results"]:
        res = stages["results"]
        lines, md, ok = stages_report(res, args.max_other)
        print("\n".join(lines))
        print(f"  targets (per-image ratio ≤ {PER_IMAGE_TARGET}, peak memory ±{MEMORY_TARGET:.0%}): "
              f"{'all MET' if ok else 'NOT all met'}" if len(res) > 1 else "")
        print("\nmarkdown (README):\n")
        print("\n".join(md))
        print()
        print("\n".join(extrapolation(res, cores)))
    for name, r in (("log_input", logi), ("startup", start)):
        if r:
            peak = max(p["peak_mib"] for p in r["phases"])
            print(f"  {name:9s} at {r['rows']:,} rows: {r['timed_s']:.2f} s timed, peak {peak:.0f} MiB"
                  + (f" (from_pandas {r['spent']['from_pandas']:.2f} s, log_input {r['spent']['log_input']:.2f} s)"
                     if name == "log_input" else f"; image files touched: {r['touched']}"))
    remove_or_keep(work, not temp or args.keep, "\nwork folder kept: {folder}")
    return code


if __name__ == "__main__":
    sys.exit(main())
