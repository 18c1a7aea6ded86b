#!/usr/bin/env python
"""The serving runtime: does the ONNX export predict what the Keras model predicts, and how fast is each?

For each case (a kfer project folder: ``models/model.keras`` and ``data/splits.csv``, the crops it names under the
folder) the served Keras classifier (flip TTA included when it has it) is exported to ONNX exactly as ``kfer train``
exports it (:func:`kfer.serving.export.export_onnx`, into a temporary folder: the project is only read), then:

* **equality** — every face of the ``--split`` (default test) through both, 64 at a time: how many faces get the
  same argmax and the largest probability difference (``kfer train`` refuses an export above
  ``train.onnx_tolerance``, 1e-4);
* **speed** — the same batches of those faces (``--batches 1,64``) through Keras ``predict_on_batch`` (what the
  photo model ran before) and ONNX Runtime (:class:`kfer.serving.runtime.OnnxClassifier`, intra-op threads = usable
  cores), alternating for ``--rounds`` rounds of ``--seconds`` each; medians of images/s and the ratio ONNX/Keras.
  Each round also reports the CPU seconds other processes used meanwhile: on a shared machine trust the ratio
  (both sides see the same load) more than the absolute numbers;
* **start-up** — in a fresh process each (``--startup-rounds``, alternating): seconds to import the runtime, load
  the model and classify one face, and the process' peak RSS: what a server or ``kfer predict`` pays per start.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_serving.py [--case NAME=PROJECT_DIR ...] [--split test] [--batches 1,64]
                                                 [--rounds 4] [--seconds 3] [--startup-rounds 3]
                                                 [--max-faces N]

Default case: ``demo=.`` (this repository, after ``dvc repro train``). Exit status 1 when an export disagrees
(argmax, or a difference over ``--tolerance``), 2 when a case's files are absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, Segment, alternating, ints, machine_info, median  # noqa: E402


def read_faces(root: Path, splits: Path, split: str, channels: int, limit: int | None):
    """The split's crops as ``uint8 (N, S, S, C)`` (gray, or RGB as ``make_dataset`` decodes them)."""
    import cv2
    import numpy as np
    import pandas as pd

    table = pd.read_csv(splits)
    paths = table.loc[table["split"] == split, "path"].tolist()[:limit]
    faces = []
    for p in paths:
        if channels == 1:
            img = cv2.imread(str(root / p), cv2.IMREAD_GRAYSCALE)[..., None]
        else:
            img = cv2.cvtColor(cv2.imread(str(root / p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        faces.append(img)
    return np.stack(faces) if faces else np.zeros((0, 1, 1, channels), np.uint8)


def speed(name: str, fn, x, seconds: float) -> dict:
    """Calls of ``fn(x)`` for about ``seconds`` (after one warm-up call): images/s and CPU seconds."""
    fn(x)
    calls = 0
    with Segment() as seg:
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            fn(x)
            calls += 1
    return {"name": name, "ips": calls * len(x) / seg.wall, "ms": 1000 * seg.wall / calls, "own": seg.own,
            "other": seg.other, "wall": seg.wall}


STARTUP = r"""
import os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
t0 = time.perf_counter()
import numpy as np
kind, path, shape = sys.argv[1], sys.argv[2], tuple(int(v) for v in sys.argv[3].split(","))
x = np.full((1, *shape), 128, np.float32)
if kind == "keras":
    import keras
    import kfer.serving.layers
    model = keras.saving.load_model(path, compile=False)
    model.predict_on_batch(x)
else:
    from kfer.serving.runtime import OnnxClassifier
    OnnxClassifier(path).predict(x)
hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))  # this exec's own peak (ru_maxrss
print(time.perf_counter() - t0, int(hwm.split()[1]) / 1024,                     # keeps the forking parent's)
      int(any(m.split(".")[0] == "tensorflow" for m in sys.modules)))
"""


def startup(kind: str, path: Path, shape) -> tuple[float, float, bool]:
    """A fresh process: import, load, one face. (seconds, peak RSS MB, tensorflow imported)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", STARTUP, kind, str(path), ",".join(map(str, shape))],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), out[2] == "1"


def run_case(name: str, root: Path, args) -> bool:
    import keras
    import numpy as np

    import kfer.serving.layers  # noqa: F401 - registers the flip-TTA layer
    from kfer.serving.export import compare, export_onnx
    from kfer.serving.runtime import OnnxClassifier, runtime_threads

    model_path, splits = root / "models" / "model.keras", root / "data" / "splits.csv"
    for f in (model_path, splits):
        if not f.is_file():
            print(f"{name}: {f} is absent (run `dvc repro train` there, or name another --case)", file=sys.stderr)
            sys.exit(2)
    model = keras.saving.load_model(model_path, compile=False)
    shape = model.input_shape[1:]
    print(f"\n== {name}: {model_path} ({model.name}, input {shape}, {model.output_shape[-1]} classes)")
    with tempfile.TemporaryDirectory(prefix="kfer-bench-serving-") as tmp:
        t0 = time.perf_counter()
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx")
        print(f"export       : {time.perf_counter() - t0:.1f} s, {onnx_path.stat().st_size / 1e6:.1f} MB "
              f"(.keras {model_path.stat().st_size / 1e6:.1f} MB)")
        runtime = OnnxClassifier(onnx_path)
        faces = read_faces(root, splits, args.split, shape[-1], args.max_faces)
        agreement = compare(model, runtime, faces)
        ok = agreement.ok(args.tolerance)
        print(f"equality     : {args.split} split, {agreement.describe()} "
              f"-> {'PASS' if ok else 'FAIL'} (tolerance {args.tolerance:g})")
        paths = {"keras": model_path, "onnx": onnx_path}
        times = {k: [] for k in paths}
        for _, order in alternating(paths, args.startup_rounds):
            for k in order:
                times[k].append(startup(k, paths[k], shape))
        for k, rows in times.items():
            print(f"start-up {k:<5}: import + load + 1 face {median(r[0] for r in rows):.2f} s, peak RSS "
                  f"{median(r[1] for r in rows):.0f} MB, tensorflow imported: {rows[0][2]} "
                  f"(median of {len(rows)} fresh processes)")
        if len(faces) == 0:
            return ok
        x_all = faces.astype(np.float32)
        print(f"speed        : ONNX Runtime intra-op threads {runtime_threads()}; Keras/TensorFlow default threads")
        for b in args.batches:
            x = np.resize(x_all, (b, *x_all.shape[1:]))  # the first b faces, repeated when the split has fewer
            contenders = {"keras": lambda v: model.predict_on_batch(v), "onnx": runtime.predict}
            rows = {k: [] for k in contenders}
            for r, order in alternating(contenders, args.rounds):
                for k in order:
                    res = speed(k, contenders[k], x, args.seconds)
                    rows[k].append(res)
                    print(f"  batch {b:>3} round {r + 1} {k:<5}: {res['ips']:8.1f} img/s  {res['ms']:8.2f} ms/call  "
                          f"own CPU {res['own']:5.1f} s  others' CPU {res['other']:5.1f} s in {res['wall']:.1f} s")
            k_ips, o_ips = median(r["ips"] for r in rows["keras"]), median(r["ips"] for r in rows["onnx"])
            print(f"  batch {b:>3} median: keras {k_ips:.1f} img/s, onnx {o_ips:.1f} img/s -> "
                  f"ONNX/Keras {o_ips / k_ips:.2f}x")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", default=None, metavar="NAME=DIR",
                    help="a kfer project folder with models/model.keras and data/splits.csv (repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batches", type=ints, default=[1, 64])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--startup-rounds", type=int, default=3)
    ap.add_argument("--max-faces", type=int, default=None, help="at most this many faces of the split")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args(argv)
    cases = [c.split("=", 1) for c in (args.case or [f"demo={REPO}"])]
    for line in machine_info():
        print(line)
    ok = True
    for name, folder in cases:
        ok &= run_case(name, Path(folder).resolve(), args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
