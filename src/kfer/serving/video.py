"""``kfer predict`` on videos and camera streams: frames in, every face of the sampled frames with a stable id out.

A source is a video file (any container OpenCV's FFmpeg backend reads: see :data:`VIDEO_EXTENSIONS`), a camera
index (``0``) or a stream URL (``rtsp://…``, ``http://…``), all opened with ``cv2.VideoCapture``: a camera and a
file go through the very same loop (:func:`analyse_video`), which is how the camera path is tested.

Every ``every``-th frame (default :func:`default_every`: about :data:`SAMPLES_PER_SECOND` per second) goes through
the photo model's own path
(:meth:`kfer.serving.photo_model.PhotoEmotionModel.predict_bgr`: the pipeline's face detector and
crop, then the classifier). :class:`IoUTracker` gives each face an id that it keeps from one sampled frame to the
next while its boxes overlap. Outputs, per source, in the output folder:

* ``<name>.faces.csv``: one row per face per analysed frame, columns :func:`csv_columns` (``time_s`` = frame /
  fps);
* ``<name>.timeline.png``: each face's class probabilities over time, one panel per id
  (:func:`kfer.plots.plot_timeline`);
* with ``annotate_dir``: ``<name>.pred.mp4`` (MPEG-4 part 2, ``mp4v``: what the opencv-python wheels can write),
  *every* frame at the source's fps, with the boxes and labels of the latest analysed frame.

Both files are written atomically (:func:`kfer.files.atomic_file`); Ctrl-C stops the loop cleanly: what was
analysed is written, complete, and the summary says it stopped. A source whose frames are larger than the photo
model's ``crop.max_megapixels`` (as its container reports, else its first frame) is refused, as a photo would be
(``too_many_pixels``): one line, and the other sources are analysed.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kfer.data.faces import box_iou
from kfer.data.images import ImageError, check_pixels
from kfer.errors import UserError
from kfer.files import atomic_file, clean_stale_tmp, tmp_sibling

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")  # `kfer predict` treats these as videos
SAMPLES_PER_SECOND = 5.0  # default sampling: every round(fps / 5)-th frame
FALLBACK_FPS = 30.0  # when the container (or a camera) reports no frame rate
#: a face in a sampled frame continues the track whose last box it overlaps by at least this IoU (greedy, best
#: overlaps first); at 5 samples/s a face moving a quarter of its width between samples still overlaps ~0.6
IOU_THRESHOLD = 0.3
#: a track not matched for more than this many sampled frames in a row ends; a face found later gets a new id
MAX_MISSED = 3
CSV_SUFFIX = ".faces.csv"
TIMELINE_SUFFIX = ".timeline.png"
ANNOTATED_SUFFIX = ".pred.mp4"
ANNOTATED_FOURCC = "mp4v"
TIMELINE_MAX_TRACKS = 6  # panels in the timeline; the faces seen on the fewest frames are left out (said so)
WINDOW = "kfer predict (q or Esc: stop)"


class VideoError(UserError):
    """A video or stream that cannot be opened or read: one line ``Error: ...``, exit 2."""


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def default_every(fps: float) -> int:
    """Analyse every N-th frame: about :data:`SAMPLES_PER_SECOND` frames per second of video."""
    return max(1, round(fps / SAMPLES_PER_SECOND))


def parse_source(text: str) -> int | str:
    """``--camera`` value: an integer is a camera index, anything else a URL (or a file path) for OpenCV."""
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def source_name(source: int | str | os.PathLike) -> str:
    """Stem of the output files: the video's file stem, ``camera<index>``, or ``stream`` for a URL."""
    if isinstance(source, int):
        return f"camera{source}"
    text = str(source)
    return "stream" if "://" in text else Path(text).stem


class IoUTracker:
    """Greedy IoU tracking: each sampled frame's boxes are matched to the live tracks, best overlaps first, a
    pair counting when its IoU is at least ``iou_threshold``; an unmatched box starts a new track (ids 1, 2, …,
    never reused) and a track unmatched for more than ``max_missed`` updates in a row ends."""

    def __init__(self, iou_threshold: float = IOU_THRESHOLD, max_missed: int = MAX_MISSED) -> None:
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self._tracks: dict[int, tuple[tuple, int]] = {}  # id -> (last box, sampled frames missed since)
        self._next = 1

    @property
    def n_tracks(self) -> int:
        """Ids handed out so far."""
        return self._next - 1

    @property
    def live(self) -> list[int]:
        return sorted(self._tracks)

    def update(self, boxes) -> list[int]:
        """The track id of each box (same order)."""
        boxes = [tuple(b) for b in boxes]
        pairs = sorted(((-box_iou(tb, b), tid, j) for tid, (tb, _) in self._tracks.items()
                        for j, b in enumerate(boxes)))
        ids: list[int | None] = [None] * len(boxes)
        taken: set[int] = set()
        for neg_iou, tid, j in pairs:
            if -neg_iou < self.iou_threshold:
                break
            if tid not in taken and ids[j] is None:
                ids[j] = tid
                taken.add(tid)
        for tid, (box, missed) in list(self._tracks.items()):
            if tid not in taken:
                if missed + 1 > self.max_missed:
                    del self._tracks[tid]
                else:
                    self._tracks[tid] = (box, missed + 1)
        for j, box in enumerate(boxes):
            if ids[j] is None:
                ids[j] = self._next
                self._next += 1
            self._tracks[ids[j]] = (box, 0)
        return ids  # type: ignore[return-value]


def csv_columns(class_names: list[str]) -> list[str]:
    return ["frame", "time_s", "face_id", "x0", "y0", "x1", "y1", "label", "label_ko", "probability",
            *(f"p_{c}" for c in class_names)]


@dataclass
class VideoSummary:
    source: str
    fps: float  # the source's frame rate (FALLBACK_FPS when it reports none)
    every: int
    frames_read: int = 0
    frames_analysed: int = 0
    faces: int = 0  # face rows written (one per face per analysed frame)
    tracks: int = 0  # face ids handed out
    frames_without_face: int = 0  # analysed frames in which no face was found
    seconds: float = 0.0  # wall time of the loop (reading, detection, model, drawing, writing)
    interrupted: bool = False
    csv: str = ""
    timeline: str = ""
    annotated: str | None = None
    shown: bool = False  # frames were shown in a window
    error: str = ""  # the source was refused (too_many_pixels): nothing analysed, nothing written
    timeline_tracks: dict[int, dict[str, list]] = field(default_factory=dict, repr=False)

    @property
    def frames_per_s(self) -> float:
        return self.frames_read / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("timeline_tracks")
        out["video"] = out.pop("source")
        out["frames_per_s"] = round(self.frames_per_s, 2)
        return out

    def line(self) -> str:
        if self.error:
            return f"{self.source}: ERROR {self.error}"
        stop = " (stopped by Ctrl-C)" if self.interrupted else ""
        ann = f", annotated {self.annotated}" if self.annotated else ""
        return (f"{self.source}: {self.frames_read} frames read{stop}, {self.frames_analysed} analysed (every "
                f"{self.every}, {self.fps:g} fps), {self.faces} faces in {self.tracks} tracks, "
                f"{self.frames_without_face} analysed frames without a face, {self.frames_per_s:.1f} frames/s "
                f"-> {self.csv}, {self.timeline}{ann}")


def display_available() -> bool:
    """A window can be shown: DISPLAY or WAYLAND_DISPLAY is set (the OpenCV build may still lack a GUI: the
    loop then falls back to the CSV alone, see :func:`analyse_video`)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def open_capture(source: int | str | os.PathLike) -> cv2.VideoCapture:
    """``cv2.VideoCapture`` on a file, camera index or URL; :class:`VideoError` when OpenCV cannot open it."""
    if not log.isEnabledFor(logging.DEBUG):
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own stderr lines ("moov atom not found")
    if isinstance(source, int):
        cap = cv2.VideoCapture(source)
        what = f"camera {source}"
    else:
        text = str(source)
        if "://" not in text and not Path(text).is_file():
            raise VideoError(f"{text}: no such video file")
        cap = cv2.VideoCapture(text)
        what = text
    if not cap.isOpened():
        cap.release()
        if isinstance(source, int):
            raise VideoError(f"{what}: OpenCV cannot open it (no such camera, no permission, or an OpenCV build "
                             "without camera support)")
        raise VideoError(f"{what}: OpenCV cannot open it as a video (not a video, corrupt or unsupported; "
                         f"kfer reads {', '.join(VIDEO_EXTENSIONS)} files, camera indexes and stream URLs)")
    return cap


def _fps(cap: cv2.VideoCapture, what: str) -> float:
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    if not np.isfinite(fps) or fps <= 0 or fps > 1000:
        log.warning("%s reports no frame rate: time_s assumes %g fps", what, FALLBACK_FPS)
        return FALLBACK_FPS
    return fps


def _show(frame: np.ndarray) -> bool | None:
    """Show a frame; False when the user pressed q/Esc, None when this OpenCV cannot show windows."""
    try:
        cv2.imshow(WINDOW, frame)
        key = cv2.waitKey(1) & 0xFF
    except cv2.error as exc:
        log.warning("cannot show a window (%s): writing the CSV only", str(exc).strip().splitlines()[-1][:120])
        return None
    return key not in (ord("q"), 27)


def analyse_video(source: int | str | os.PathLike, model, out_dir: str | os.PathLike, every: int | None = None,
                  annotate_dir: str | os.PathLike | None = None, show: bool = False, name: str | None = None,
                  progress: bool = True, timeline: bool = True,
                  on_frame: Callable[[int, list[dict[str, Any]]], None] | None = None) -> VideoSummary:
    """Run ``model`` (a loaded :class:`kfer.serving.photo_model.PhotoEmotionModel`) on every ``every``-th
    frame of ``source``
    and write ``<name>.faces.csv``, ``<name>.timeline.png`` (``timeline``) into ``out_dir`` (and the annotated
    video into ``annotate_dir``); returns the summary. ``show``: annotated frames in a window (q/Esc stops).
    ``on_frame(frame_index, faces)`` is called after each analysed frame (faces carry ``face_id``).
    Raises :class:`VideoError` when the source cannot be opened or yields no frame, and
    :class:`~kfer.data.images.ImageError` (``too_many_pixels``) when its frames are larger than the model's
    ``crop.max_megapixels``: judged from the size the container reports before any frame is decoded (from the
    first frame when it reports none), and nothing is written."""
    from kfer.serving.predict import draw_faces

    cap = open_capture(source)
    what = str(source) if not isinstance(source, int) else f"camera {source}"
    name = name or source_name(source)
    try:
        max_megapixels = model.cropper.max_megapixels
        size = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        size_known = min(size) > 0
        if size_known:
            check_pixels(*size, max_megapixels)
        fps = _fps(cap, what)
        every = int(every) if every else default_every(fps)
        if every < 1:
            raise VideoError(f"--every must be at least 1, got {every}")
        summary = VideoSummary(what, fps, every)
        out_dir = Path(out_dir)
        csv_path = out_dir / f"{name}{CSV_SUFFIX}"
        summary.csv = str(csv_path)
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        writer = partial = annotated = None
        tracker = IoUTracker()
        classes = model.classes
        names = [c["name"] for c in classes]
        tracks = summary.timeline_tracks
        from tqdm import tqdm

        bar = tqdm(total=total if total > 0 else None, desc=name, unit="frame", mininterval=0.5,
                   dynamic_ncols=True, disable=not progress)
        start = time.perf_counter()
        shown_faces: list[dict[str, Any]] = []
        with atomic_file(csv_path) as fh:
            rows = csv.writer(fh)
            rows.writerow(csv_columns(names))
            try:
                while True:
                    i = summary.frames_read
                    sampled = i % every == 0
                    need_pixels = sampled or writer is not None or annotate_dir is not None or show
                    ok, frame = cap.read() if need_pixels else (cap.grab(), None)  # grab: no decode
                    if not ok:
                        break
                    if not size_known and frame is not None:  # the source did not say: its first frame does
                        check_pixels(frame.shape[1], frame.shape[0], max_megapixels)
                        size_known = True
                    summary.frames_read += 1
                    bar.update()
                    if sampled:
                        try:
                            faces = model.predict_bgr(frame)
                        except ImageError as exc:  # e.g. a frame smaller than a face crop: as a photo would
                            log.warning("%s frame %d: %s", what, i, exc)
                            faces = []
                        ids = tracker.update([f["box"] for f in faces])
                        t = i / fps
                        for f, tid in zip(faces, ids, strict=True):
                            f["face_id"] = tid
                            p = [f["probabilities"][c] for c in names]
                            rows.writerow([i, f"{t:.3f}", tid, *f["box"], f["label"], f["label_ko"],
                                           f"{f['probability']:.6f}", *(f"{v:.6f}" for v in p)])
                            track = tracks.setdefault(tid, {"t": [], "p": []})
                            track["t"].append(t)
                            track["p"].append(p)
                        summary.frames_analysed += 1
                        summary.faces += len(faces)
                        summary.frames_without_face += not faces
                        summary.tracks = tracker.n_tracks
                        shown_faces = faces
                        bar.set_postfix(faces=summary.faces, tracks=summary.tracks, refresh=False)
                    if annotate_dir is not None or show:
                        drawn = draw_faces(frame, shown_faces)
                        if annotate_dir is not None:
                            if writer is None:
                                annotated = Path(annotate_dir) / f"{name}{ANNOTATED_SUFFIX}"
                                writer, partial = _open_writer(annotated, fps, drawn)
                            writer.write(drawn)
                        if show:
                            state = _show(drawn)
                            if state is None:
                                show = False
                            elif not state:
                                break
                            else:
                                summary.shown = True
                    if sampled and on_frame is not None:
                        on_frame(i, shown_faces)
            except KeyboardInterrupt:
                summary.interrupted = True
            except BaseException:
                if writer is not None:
                    writer.release()
                    Path(partial).unlink(missing_ok=True)
                    writer = None
                raise
            finally:
                summary.seconds = time.perf_counter() - start
                bar.close()
                if summary.shown:
                    _close_windows()
            if writer is not None:
                writer.release()
                os.replace(partial, annotated)  # complete (up to a Ctrl-C): it takes the final name
                summary.annotated = str(annotated)
            if summary.frames_read == 0 and not summary.interrupted:
                raise VideoError(f"{what}: no frame could be read (empty, corrupt or unsupported video)")
    finally:
        cap.release()
    if timeline:
        from kfer.plots import class_label, plot_timeline

        summary.timeline = str(plot_timeline(
            {tid: (np.asarray(tr["t"]), np.asarray(tr["p"])) for tid, tr in tracks.items()},
            [class_label(c["name"], c.get("ko")) for c in classes], out_dir / f"{name}{TIMELINE_SUFFIX}",
            title=f"{name}: emotions over time (every {every} frames at {fps:g} fps)", step_s=every / fps,
            max_panels=TIMELINE_MAX_TRACKS))
    return summary


def _open_writer(path: Path, fps: float, frame: np.ndarray) -> tuple[cv2.VideoWriter, Path]:
    """A writer on a temporary sibling of ``path`` (:func:`kfer.files.tmp_sibling`: hidden, same extension, which
    picks the container), renamed into place when the loop ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path)  # a killed run's partial video
    partial = tmp_sibling(path)
    h, w = frame.shape[:2]
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*ANNOTATED_FOURCC), fps, (w, h))
    if not writer.isOpened():
        raise VideoError(f"{path}: OpenCV cannot write an {ANNOTATED_FOURCC} video here")
    return writer, partial


def _close_windows() -> None:
    try:
        cv2.destroyWindow(WINDOW)
        cv2.waitKey(1)
    except cv2.error:
        pass


def predict_videos(videos: list[Path], camera: str | None, model, out_dir: str | os.PathLike,
                   every: int | None = None, annotate_dir: str | os.PathLike | None = None,
                   show: bool | None = None):
    """``kfer predict``'s video part: each video file, then the camera (``--camera``: an index or a URL; a
    window when :func:`display_available`, unless ``show`` says otherwise). Yields one :class:`VideoSummary`
    per source; a Ctrl-C in a video stops there. Outputs of two videos with the same stem get ``-1``, ``-2``…"""
    from kfer.serving.predict import unique_name

    used: set[str] = set()
    for video in videos:
        summary = _analyse_or_refuse(video, model, out_dir, every, annotate_dir,
                                     name=unique_name(source_name(video), used, ""))
        yield summary
        if summary.interrupted:
            return
    if camera is not None:
        source = parse_source(camera)
        yield _analyse_or_refuse(source, model, out_dir, every, annotate_dir,
                                 name=unique_name(source_name(source), used, ""),
                                 show=display_available() if show is None else show)


def _analyse_or_refuse(source, model, *args, **kwargs) -> VideoSummary:
    """:func:`analyse_video`, or the summary of a refused source (its ``error`` set, logged in one line)."""
    try:
        return analyse_video(source, model, *args, **kwargs)
    except ImageError as exc:
        what = str(source) if not isinstance(source, int) else f"camera {source}"
        log.warning("%s: %s", what, exc)
        return VideoSummary(what, 0.0, 0, error=str(exc))


def check_videos(videos: list[Path]) -> None:
    """Fail early (:class:`VideoError`), before the model loads, on a video OpenCV cannot open."""
    for video in videos:
        open_capture(video).release()
