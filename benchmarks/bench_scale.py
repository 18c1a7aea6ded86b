#!/usr/bin/env python
"""Scale benchmark: do the data stages and DVC cost the same per image at 1k, 5k and 20k AI Hub-shaped photos,
with flat memory? And what do ``mlflow.log_input`` and ``kfer train``'s start-up cost at 1M table rows?

``stages``: per N of ``--sizes`` a fresh git + DVC project (the repository's dvc.yaml, .dvcignore, src/;
``crop.image_size`` = ``--image-size``), the photos in ``data/raw``. Timed as subprocesses: ``dvc add data/raw``
(DVC's default cache type: a copy on ext4), ``dvc repro -s crop / split / augment``, ``dvc status``, then
``dvc add`` again into an empty cache with ``cache.type hardlink,symlink`` and the hash cache removed. Per step:
wall s, s per image (per raw photo; per face for split; per train image for augment), how long the ``kfer``
command lived, peak summed PSS of the process tree (psutil every 0.1 s; RSS sum and ru_maxrss beside it), CPU of
the tree and of *other* processes (above ``--max-other`` the step is flagged BUSY). Then per step the ratio
largest N / smallest N of the per-image cost (target ≤ 1.15) and of peak memory (target ±10%) as a markdown
table, a linear fit (fixed s + marginal s/img: a fixed start-up makes small N look dearer per image), and an
EXTRAPOLATION to 500k photos on 16 cores (crop/augment commands' marginal core-seconds spread over 16 cores, all
else serial; linear, no I/O limit: a guide, not a measurement). Photos (``--size``, ``--per-class`` per person
and class, ``--grain``) come from :func:`kfer.demo.aihub.generate_aihub_photos`, untimed, once for the largest N
in chunks of 12 persons on all cores, cached in ``--work-dir``; each N hardlinks the first persons' photos and
gets label JSON listing exactly those. Each crop report must skip nothing and match every label record.

``log_input``: ``kfer.training.train.log_datasets`` (``from_pandas`` + ``mlflow.log_input``) of a ``--rows``-row
table in ``tracked_run`` into a fresh SQLite store, in a child process: seconds apart, peak memory.

``startup``: ``kfer train``'s start-up at ``--rows`` rows without training or images (``train_table``,
``split_table``, ``class_weights``, the TensorFlow import, ``make_dataset``), each with its peak memory, in a
child; an audit hook counts files opened under the image folders (should be 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    REPO, StepError, child_env, ints, machine_info, measure, remove_or_keep, run_quiet, usable_cores, wait_idle, wh,
    write_params)

PARTS = ("stages", "log_input", "startup")
CHUNK_PERSONS = 12  # persons per generation task
PER_IMAGE_TARGET, MEMORY_TARGET = 1.15, 0.10  # largest N / smallest N: per-image cost ≤ 1.15, peak memory ±10%
EXTRAPOLATE_N, EXTRAPOLATE_CORES = 500_000, 16
PARALLEL_STEPS = ("crop", "augment")  # their commands use a pool on every core
STEP_LABEL = {"add_copy": "dvc add data/raw (copy)", "crop": "dvc repro -s crop", "split": "dvc repro -s split",
              "augment": "dvc repro -s augment", "status": "dvc status", "add_link": "dvc add data/raw (hardlink)"}
UNIT = {"split": "face", "augment": "train img"}


def run_step(cmd: list[str], cwd: Path, log_path: Path) -> dict:
    return measure(cmd, cwd, log_path, env=child_env(), period=0.1, pss=True, watch="kfer", check=True)


# --- photos: generated once in chunks of persons (parallel, cached), the first persons per N -------------------

def _gen_chunk(task: dict) -> int:
    """Pool task: one chunk of persons -> ``<pool>/chunk-NNNN/`` and its index JSON beside it."""
    import kfer.demo.aihub as demo_aihub

    demo_aihub.tqdm = lambda it, **_kw: it  # no progress bar per worker
    out = Path(task["pool"]) / f"chunk-{task['chunk']:04d}"
    summary = demo_aihub.generate_aihub_photos(
        out, task["classes"], n_persons=CHUNK_PERSONS, per_class=task["per_class"], size=tuple(task["size"]),
        seed=task["seed"] * 10_000 + task["chunk"], grain=task["grain"])
    photos: dict[str, list[str]] = {}
    for name, rel in summary["paths"].items():  # person by person
        photos.setdefault(name.split("_", 1)[0], []).append(rel)
    index = {"persons": list(photos), "photos": photos, "label_files": summary["label_files"],
             "label_encoding": summary["label_encoding"]}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out.with_suffix(".json"))  # the chunk is done once its index exists
    return summary["images"]


def generate_pool(pool: Path, n_chunks: int, classes, args) -> list[dict]:
    """Chunks 0..n_chunks-1, the missing ones generated on all cores; returns their indexes."""
    import multiprocessing as mp

    pool.mkdir(parents=True, exist_ok=True)
    missing = [c for c in range(n_chunks) if not (pool / f"chunk-{c:04d}.json").exists()]
    if missing:
        tasks = [{"pool": str(pool), "chunk": c, "classes": classes, "per_class": args.per_class, "size": args.wh,
                  "seed": args.seed, "grain": args.grain} for c in missing]
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(min(len(missing), usable_cores())) as p:
            n = sum(p.imap_unordered(_gen_chunk, tasks))
        print(f"generated    : {n} photos in {len(missing)} chunk(s) in {time.perf_counter() - t0:.0f} s "
              "(not timed)", flush=True)
    return [json.loads((pool / f"chunk-{c:04d}.json").read_text(encoding="utf-8")) for c in range(n_chunks)]


def build_raw(pool: Path, chunks: list[dict], n_persons: int, dest: Path) -> dict:
    """``dest`` = the first ``n_persons`` persons' photos (hardlinks, else copies) and label JSON listing them."""
    chosen = [(c, t) for c, idx in enumerate(chunks) for t in idx["persons"]][:n_persons]
    names: set[str] = set()
    size = 0
    for c, title in chosen:
        for rel in chunks[c]["photos"][title]:
            src, dst = pool / f"chunk-{c:04d}" / rel, dest / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            size += dst.stat().st_size
            names.add(Path(rel).name)
    labels: dict[str, tuple[str, list]] = {}
    for c in sorted({c for c, _ in chosen}):
        enc = chunks[c]["label_encoding"]
        for rel in chunks[c]["label_files"]:
            recs = json.loads((pool / f"chunk-{c:04d}" / rel).read_bytes().decode(enc))
            labels.setdefault(rel, (enc, []))[1].extend(r for r in recs if r["filename"] in names)
    for rel, (enc, recs) in labels.items():
        if recs:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes((json.dumps(recs, ensure_ascii=False, indent=1) + "\n").encode(enc))
    return {"photos": len(names), "persons": len(chosen), "bytes": size}


# --- the stages part ------------------------------------------------------------------------------------------

def _inodes(folder: Path) -> set[tuple[int, int]]:
    out = set()
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            st = p.stat()  # follows DVC's symbolic links to the file they point to
            out.add((st.st_dev, st.st_ino))
    return out


def cache_mb(cache: Path, raw: Path) -> str:
    """The cache's MB, and how many of them are not the same file as one in ``raw`` (new on disk)."""
    shared = _inodes(raw)
    total = extra = 0
    for p in cache.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            total += st.st_size
            extra += st.st_size if (st.st_dev, st.st_ino) not in shared else 0
    return f"{total / 1e6:.0f} MB ({extra / 1e6:.0f} MB new on disk)"


def run_size(n: int, root: Path, pool: Path, chunks: list[dict], args, n_classes: int) -> dict:
    """One N: project, raw folder, the timed steps and the crop report's check."""
    shutil.rmtree(root, ignore_errors=True)
    write_params(root, {"crop": {"image_size": args.image_size, "workers": 0}, "augment": {"workers": 0}},
                 files=("dvc.yaml", ".dvcignore", "src", "models/init"), dvc=True)
    raw = build_raw(pool, chunks, math.ceil(n / (n_classes * args.per_class)), root / "data" / "raw")
    logs = root.parents[1] / "logs"
    logs.mkdir(exist_ok=True)
    print(f"\n== N = {n}: {raw['photos']} photos of {raw['persons']} persons ({raw['bytes'] / 1e6:.0f} MB) ==",
          flush=True)
    if args.wait_idle > 0:
        print(f"  wait-idle: {wait_idle(args.wait_idle)}", flush=True)
    res: dict = {"n": raw["photos"], "steps": {}}

    def step(name: str, cmd: list[str], per: int) -> None:
        log = logs / f"n{n}-{name}.log"
        m = res["steps"][name] = {**run_step(cmd, root, log), "per": per}
        if name in ("crop", "split", "augment") and f"Running stage '{name}'" not in log.read_text(errors="replace"):
            raise StepError(f"`{' '.join(cmd)}` did not run the stage (see {log})")
        cmd_s = f"cmd {m['cmd_s']:.1f} s" if m["cmd_s"] is not None else ""
        print(f"  {STEP_LABEL[name]:28s} {m['s']:8.2f} s {cmd_s:12s} {1000 * m['s'] / per:8.3f} ms/"
              f"{UNIT.get(name, 'img')}; peak PSS {m['pss_mib']:5.0f} MiB (kfer {m['cmd_pss_mib']:.0f}, RSS sum "
              f"{m['rss_mib']:.0f}, largest {m['largest_mib']:.0f}); cpu {m['cpu_s']:.1f} s, other "
              f"{m['other_cpu_s']:.1f}{' BUSY' if m['other_cpu_s'] > args.max_other else ''}", flush=True)

    cache, raw_dir = root / ".dvc" / "cache", root / "data" / "raw"
    step("add_copy", ["dvc", "add", "data/raw"], raw["photos"])
    copy_mb = cache_mb(cache, raw_dir)
    step("crop", ["dvc", "repro", "-s", "crop"], raw["photos"])
    crop = json.loads((root / "reports" / "crop.json").read_text(encoding="utf-8"))
    unmatched = (crop.get("label_json") or {}).get("label_records_unmatched", 0)
    clean = not crop["skipped"] and not unmatched and crop["total"] == raw["photos"]
    print(f"  crop report: ok {crop['ok']}/{crop['total']}, skipped {crop['skipped'] or 'nothing'}, label records "
          f"unmatched {unmatched}{'' if clean else '  <-- NOT CLEAN'}", flush=True)
    step("split", ["dvc", "repro", "-s", "split"], max(1, crop["ok"]))
    train = json.loads((root / "reports" / "split.json").read_text(encoding="utf-8"))["counts"].get("train", 0)
    step("augment", ["dvc", "repro", "-s", "augment"], max(1, train))
    res["train_fraction"] = train / max(1, crop["ok"])
    step("status", ["dvc", "status"], raw["photos"])
    # the raw photos again, into an empty cache with links allowed and the hash cache cleared
    (root / "data" / "raw.dvc").unlink()
    shutil.rmtree(root / ".dvc" / "site", ignore_errors=True)
    link_cache = root / ".dvc" / "cache-link"
    run_quiet(["dvc", "config", "cache.dir", str(link_cache)], root)
    run_quiet(["dvc", "config", "cache.type", "hardlink,symlink"], root)
    step("add_link", ["dvc", "add", "data/raw"], raw["photos"])
    print(f"  cache for data/raw: copy {copy_mb}, hardlink,symlink {cache_mb(link_cache, raw_dir)}; "
          f"cache after the stages {cache_mb(cache, raw_dir)}", flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return res


def _fit(ns: list[int], ss: list[float]) -> tuple[float, float] | None:
    """Least squares seconds = a + b·n: (fixed s, marginal s per image); None for one N."""
    if len(ns) < 2:
        return None
    mn, ms = sum(ns) / len(ns), sum(ss) / len(ss)
    var = sum((n - mn) ** 2 for n in ns)
    b = sum((n - mn) * (s - ms) for n, s in zip(ns, ss, strict=True)) / var if var else 0.0
    return ms - b * mn, b


def stages_report(results: list[dict], max_other: float) -> list[str]:
    """A markdown table over N: seconds (ms per image), the ratios with PASS/FAIL, the fit; the targets' verdict."""
    ns = [r["n"] for r in results]
    lines = ["| step | " + " | ".join(f"N={n}: s (ms/img)" for n in ns) + f" | per-image ratio (≤ {PER_IMAGE_TARGET})"
             f" | fixed s + marginal ms/img | peak MiB | memory ratio (±{MEMORY_TARGET:.0%}) |",
             "|---|" + "---|" * len(ns) + "---|---|---|---|"]
    ok_all = True
    for name, label in STEP_LABEL.items():
        st = [r["steps"][name] for r in results]
        per = [1000 * m["s"] / m["per"] for m in st]
        fit = _fit([m["per"] for m in st], [m["s"] for m in st])
        for what, mem in (("", [m["pss_mib"] for m in st]), (": the kfer command alone",
                                                              [m["cmd_pss_mib"] for m in st])):
            if not mem[0]:
                continue
            ratio, mratio = per[-1] / per[0], mem[-1] / mem[0]
            ok_t, ok_m = ratio <= PER_IMAGE_TARGET, abs(mratio - 1) <= MEMORY_TARGET
            ok_all &= bool(what) or (ok_m and ok_t)
            unit = f" (per {UNIT[name]})" if name in UNIT and not what else ""
            busy = " BUSY" if any(m["other_cpu_s"] > max_other for m in st) else ""
            fit_s = f"{fit[0]:.1f} + {1000 * fit[1]:.3f}" if fit else ""
            cells = ([""] * (len(ns) + 2) if what else [f"{m['s']:.1f} ({v:.2f})" for m, v in zip(st, per, strict=True)]
                     + [f"{ratio:.2f} {'PASS' if ok_t else 'FAIL'}", fit_s])
            cells += [" / ".join(f"{v:.0f}" for v in mem), f"{mratio:.2f} {'PASS' if ok_m else 'FAIL'}"]
            lines.append(f"| {label}{what}{unit}{busy} | " + " | ".join(cells) + " |")
    lines.append(f"\ntargets (per-image ratio ≤ {PER_IMAGE_TARGET}, peak memory ±{MEMORY_TARGET:.0%}, "
                 f"@{ns[-1]} / @{ns[0]}): {'all MET' if ok_all else 'NOT all met'}")
    return lines


def extrapolation(results: list[dict], cores: int) -> list[str]:
    """Hours for EXTRAPOLATE_N photos on EXTRAPOLATE_CORES cores, linear from the measured sizes."""
    n_x, c_x = EXTRAPOLATE_N, EXTRAPOLATE_CORES
    out = [f"EXTRAPOLATION (not a measurement) to {n_x:,} photos on {c_x} cores from N = "
           f"{', '.join(str(r['n']) for r in results)} on {cores} cores: crop/augment commands' marginal part × "
           f"{cores} / {c_x} cores, everything else serial; linear, no I/O limit"]

    def cost(name: str, key) -> tuple[float, float]:  # (fixed s, s per unit); one N: its s per unit
        xs, ys = [r["steps"][name]["per"] for r in results], [key(r["steps"][name]) for r in results]
        fit = _fit(xs, ys)
        return (fit[0], max(0.0, fit[1])) if fit else (0.0, ys[-1] / xs[-1])

    total = 0.0
    for name, label in STEP_LABEL.items():
        units = n_x * (results[-1]["train_fraction"] if name == "augment" else 1.0)
        if name in PARALLEL_STEPS and all(r["steps"][name]["cmd_s"] is not None for r in results):
            (a_c, b_c), (a_d, b_d) = cost(name, lambda m: m["cmd_s"]), cost(name, lambda m: m["s"] - m["cmd_s"])
            par, ser = a_c + b_c * cores * units / c_x, a_d + b_d * units
        else:
            a, b = cost(name, lambda m: m["s"])
            par, ser = 0.0, a + b * units
        total += par + ser
        out.append(f"  {label:28s} {(par + ser) / 3600:6.2f} h ({par / 3600:.2f} h parallel)")
    out.append(f"  {'all steps':28s} {total / 3600:6.2f} h")
    return out


def stages_part(args, work: Path) -> list[dict]:
    from kfer.config import load_params

    classes = [(c.name, c.ko or c.name) for c in load_params(REPO / "params.yaml").classes]
    persons = math.ceil(max(args.sizes) / (len(classes) * args.per_class))
    w, h = args.wh
    pool = work / "photos" / f"aihub-{w}x{h}-pc{args.per_class}-grain{args.grain:g}-seed{args.seed}-cp{CHUNK_PERSONS}"
    print(f"photos       : {w}x{h}, grain {args.grain:g}, {args.per_class} per person and class; {persons} persons "
          f"for N = {max(args.sizes)}; cache {pool}", flush=True)
    chunks = generate_pool(pool, math.ceil(persons / CHUNK_PERSONS), classes, args)
    return [run_size(n, work / "projects" / f"n{n}", pool, chunks, args, len(classes)) for n in args.sizes]


# --- log_input and startup: children of this script (--child PART CONFIG RESULT) -------------------------------

class Phases:
    """Wall time per named phase, and this process' memory high-water mark (ru_maxrss) at its end and its growth."""

    def __init__(self):
        self.out: list[dict] = []

    @contextlib.contextmanager
    def __call__(self, name: str, timed: bool = True):
        peak0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
        yield
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.out.append({"phase": name, "s": time.perf_counter() - t0, "peak_mib": peak / 1024,
                         "delta_mib": (peak - peak0) / 1024, "timed": timed})


def synthetic_table(rows: int, seed: int, n_classes: int):
    """``rows`` rows shaped like the pipeline's tables: AI Hub-like PNG paths, a label, a person, a split."""
    import numpy as np
    import pandas as pd

    from kfer.config import load_params

    names = [c.name for c in load_params(REPO / "params.yaml").classes][:n_classes]
    rng = np.random.default_rng(seed)
    n_persons = max(3, rows // 300)
    person = rng.integers(0, n_persons, rows)
    weights = np.linspace(2, 1, len(names))
    lab = pd.Series(np.array(names, dtype=object)[rng.choice(len(names), rows, p=weights / weights.sum())])
    group = pd.Series([f"{i:064x}" for i in range(n_persons)]).iloc[person].reset_index(drop=True)
    split_of = pd.Series(rng.choice(["train", "val", "test"], n_persons, p=[0.7, 0.15, 0.15]))
    paths = ("data/cropped/" + lab + "/" + group + "_남_30_" + lab + "_20200701"
             + pd.Series(np.arange(rows) % 1_000_000).astype(str).str.zfill(6) + ".png")
    return pd.DataFrame({"path": paths, "label": lab, "group": group, "source": "",
                         "split": split_of.iloc[person].reset_index(drop=True)})


def child_log_input(cfg: dict) -> dict:
    import mlflow

    from kfer import tracking
    from kfer.config import load_params
    from kfer.training import train

    ph, params = Phases(), load_params(cfg["params"])
    with ph("build the table", timed=False):
        df = synthetic_table(cfg["rows"], 1, len(params.classes))[["path", "label", "split"]]
    spent = {"from_pandas": 0.0, "log_input": 0.0}

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
        with ph(f"log_datasets, {len(df):,} rows"):
            train.log_datasets(params, {"train": (df, params.paths.splits, "training")})
    db = params.path(params.paths.mlflow_db)
    return {"phases": ph.out, "rows": len(df), "note": f"from_pandas {spent['from_pandas']:.2f} s, log_input "
            f"{spent['log_input']:.2f} s; store {db.stat().st_size / 1e6 if db.exists() else 0:.1f} MB"}


def child_startup(cfg: dict) -> dict:
    from kfer.config import load_params
    from kfer.training import inputs as train

    ph, params = Phases(), load_params(cfg["params"])
    image_dirs = tuple(str(params.path(p)) for p in (params.paths.cropped, params.paths.augmented))
    with ph("write splits.csv + augmented manifest", timed=False):
        df = synthetic_table(cfg["rows"], 2, len(params.classes))
        params.path(params.paths.splits).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(params.path(params.paths.splits), index=False)
        man_path = params.path(params.paths.augmented) / "manifest.csv"
        man_path.parent.mkdir(parents=True, exist_ok=True)
        df.assign(original=df["path"], copy=0)[["path", "original", "label", "group", "copy"]].to_csv(man_path,
                                                                                                    index=False)
        del df
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

            tf.constant(0)
        with ph(f"make_dataset train ({len(train_df):,} rows, shuffled)"):
            train.make_dataset(params, train_df, training=True)
        with ph(f"make_dataset val ({len(val_df):,} rows)"):
            train.make_dataset(params, val_df, training=False)
    return {"phases": ph.out, "rows": len(train_df), "note": f"image files opened or folders listed: {len(touched)}"
            + (f", e.g. {touched[:3]}  <-- FINDING" if touched else " (none: good)")}


def table_part(part: str, args, work: Path) -> dict:
    """Run the log_input or startup child in a fresh project folder; print its phases."""
    root = work / part
    shutil.rmtree(root, ignore_errors=True)
    write_params(root, {})
    cfg, out = root / "cfg.json", root / "result.json"
    cfg.write_text(json.dumps({"params": str(root / "params.yaml"), "rows": args.rows, "tf": not args.no_tf}))
    if args.wait_idle > 0:
        print(f"  wait-idle: {wait_idle(args.wait_idle)}", flush=True)
    m = run_step([sys.executable, str(Path(__file__).resolve()), "--child", part, str(cfg), str(out)], root,
                 root / "child.log")
    res = json.loads(out.read_text(encoding="utf-8"))
    print(f"\n== {part}, {args.rows:,} rows ==")
    for p in res["phases"]:
        print(f"  {p['phase']:56s} {p['s']:8.2f} s   peak {p['peak_mib']:6.0f} MiB ({p['delta_mib']:+6.0f} MiB)"
              + ("" if p["timed"] else "   [set-up, not timed]"))
    res["timed_s"] = sum(p["s"] for p in res["phases"] if p["timed"])
    res["peak_mib"] = max(p["peak_mib"] for p in res["phases"])
    print(f"  {'timed phases':56s} {res['timed_s']:8.2f} s   process peak {m['largest_mib']:.0f} MiB; other "
          f"{m['other_cpu_s']:.1f} cpu-s{' BUSY' if m['other_cpu_s'] > args.max_other else ''}; {res['note']}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", type=lambda t: t.split(","), default=list(PARTS), help="of stages,log_input,startup")
    ap.add_argument("--sizes", type=ints, default="1000,5000,20000", help="stages: photo counts N (rounded up to "
                    "whole persons)")
    ap.add_argument("--size", dest="wh", type=wh, default="1440x1083", metavar="WxH",
                    help="stages: upright photo size (default AI Hub's smallest)")
    ap.add_argument("--per-class", type=int, default=4, help="stages: photos per person and class")
    ap.add_argument("--grain", type=float, default=1.0, help="stages: photos' sensor noise, i.e. JPEG size")
    ap.add_argument("--image-size", type=int, default=224, help="stages: crop.image_size")
    ap.add_argument("--seed", type=int, default=0, help="stages: generator seed")
    ap.add_argument("--rows", type=int, default=1_000_000, help="log_input, startup: table rows")
    ap.add_argument("--no-tf", action="store_true", help="startup: skip the TensorFlow import and make_dataset")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="folder for the photos (kept, reused by reruns), projects and logs (default: temporary)")
    ap.add_argument("--keep", action="store_true", help="keep the projects (and a temporary work folder)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each N and part wait up to S s for an idle machine")
    ap.add_argument("--max-other", type=float, default=5.0, metavar="CPU_S",
                    help="flag a step BUSY when other processes used more CPU-s during it (default 5)")
    ap.add_argument("--child", nargs=3, metavar=("PART", "CONFIG", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        part, cfg, out = args.child
        res = (child_log_input if part == "log_input" else child_startup)(json.loads(Path(cfg).read_text()))
        Path(out).write_text(json.dumps(res), encoding="utf-8")
        return 0
    if set(args.parts) - set(PARTS) or not args.sizes or min(args.sizes) < 1 or args.per_class < 1 or args.rows < 10:
        ap.error(f"--parts of {','.join(PARTS)}; --sizes and --per-class at least 1, --rows at least 10")
    args.sizes = sorted(set(args.sizes))
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    for tool in ("dvc", "kfer", "git"):
        if shutil.which(tool, path=path) is None:
            print(f"bench_scale: `{tool}` not found (run from the project's virtual environment)", file=sys.stderr)
            return 2

    temp = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="kfer-bench-scale-")) if temp else args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print("== scale benchmark: data stages + DVC over N photos, log_input and train start-up ==")
    print("\n".join(machine_info()))
    print(f"work folder  : {work}{' (temporary)' if temp else ''}; parts {','.join(args.parts)}")
    stages, tables, code = [], {}, 0
    try:
        if "stages" in args.parts:
            stages = stages_part(args, work)
        for part in ("log_input", "startup"):
            if part in args.parts:
                tables[part] = table_part(part, args, work)
    except StepError as exc:
        print(f"\nbench_scale: {exc}", file=sys.stderr)
        code = 1

    print(f"\n== summary ({time.perf_counter() - t_start:.0f} s in all) ==")
    if len(stages) > 1:
        print("\n".join(stages_report(stages, args.max_other)) + "\n")
    if stages:
        print("\n".join(extrapolation(stages, usable_cores())))
    for name, r in tables.items():
        print(f"  {name:9s} at {r['rows']:,} rows: {r['timed_s']:.2f} s timed, peak {r['peak_mib']:.0f} MiB; "
              f"{r['note']}")
    remove_or_keep(work, not temp or args.keep, "\nwork folder kept: {folder}")
    return code


if __name__ == "__main__":
    sys.exit(main())
