"""SYNTHETIC demo videos: the demo's faces (:mod:`kfer.demo.photos`) moving over a still scene, for the tests and the
benchmark of ``kfer predict`` on videos (:mod:`kfer.serving.video`). No person, nothing downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kfer.demo import faces as drawing


@dataclass(frozen=True)
class MovingFace:
    """A synthetic face in a demo video: it shows on frames ``first`` … ``last - 1``, its head centre moving in a
    straight line from ``start`` to ``end`` (pixels); ``head_height`` in pixels."""

    person: int
    expression: str  # a key of EXPRESSIONS (joy, anger, ...)
    start: tuple[float, float]
    end: tuple[float, float]
    first: int
    last: int
    head_height: float = 90.0


def face_sprite(person: int, expression: str, head_height: float, seed: int = 0):
    """One synthetic face scaled so that its head is ``head_height`` pixels tall: (BGR float32, alpha float32,
    head centre (x, y) in the sprite's pixels)."""
    rng = np.random.default_rng([seed, 9, person])
    face, alpha, _ = drawing.draw_face(drawing.make_person(seed, person), drawing.EXPRESSIONS[expression], rng)
    scale = head_height / (2 * drawing.HEAD_HALF_HEIGHT * drawing.FACE_SCALE)
    sw, sh = max(1, round(drawing.CANVAS_W * scale)), max(1, round(drawing.CANVAS_H * scale))
    return (cv2.resize(face, (sw, sh), interpolation=cv2.INTER_AREA),
            cv2.resize(alpha, (sw, sh), interpolation=cv2.INTER_AREA),
            (drawing.HEAD_X * sw / drawing.CANVAS_W, drawing.HEAD_Y * sh / drawing.CANVAS_H))


def _paste(img: np.ndarray, sprite, cx: float, cy: float) -> None:
    face, alpha, (ox, oy) = sprite
    x0, y0 = int(round(cx - ox)), int(round(cy - oy))
    h, w = alpha.shape
    X0, Y0, X1, Y1 = max(0, x0), max(0, y0), min(img.shape[1], x0 + w), min(img.shape[0], y0 + h)
    if X1 <= X0 or Y1 <= Y0:
        return
    a = alpha[Y0 - y0:Y1 - y0, X0 - x0:X1 - x0, None]
    img[Y0:Y1, X0:X1] = img[Y0:Y1, X0:X1] * (1 - a) + face[Y0 - y0:Y1 - y0, X0 - x0:X1 - x0] * a


def write_demo_video(path: str | Path, faces: list[MovingFace], n_frames: int, fps: float = 10.0,
                     size: tuple[int, int] = (320, 240), seed: int = 0, fourcc: str = "mp4v") -> dict:
    """Write a SYNTHETIC video (``cv2.VideoWriter``, ``fourcc``) of ``faces`` moving over a still gradient with a
    little sensor noise per frame. Returns ``{"frames", "fps", "size", "faces_per_frame"}`` (how many faces each
    frame shows). The same arguments give the same frames."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), (w, h))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {fourcc} video to {path}")
    rng = np.random.default_rng([seed, 10])
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xs / max(1, w - 1) * 0.6 + ys / max(1, h - 1) * 0.4)[..., None]
    c0, c1 = drawing.random_colour(rng, 90, 200), drawing.random_colour(rng, 90, 200)
    scene = c0 * (1 - t) + c1 * t
    sprites = [face_sprite(f.person, f.expression, f.head_height, seed) for f in faces]
    shown = []
    try:
        for i in range(n_frames):
            img = scene.copy()
            n = 0
            for f, sprite in zip(faces, sprites, strict=True):
                if f.first <= i < f.last:
                    u = (i - f.first) / max(1, f.last - 1 - f.first)
                    _paste(img, sprite, f.start[0] + u * (f.end[0] - f.start[0]),
                           f.start[1] + u * (f.end[1] - f.start[1]))
                    n += 1
            img += rng.standard_normal(img.shape, dtype=np.float32) * 1.5
            writer.write(np.clip(np.round(img), 0, 255).astype(np.uint8))
            shown.append(n)
    finally:
        writer.release()
    return {"frames": n_frames, "fps": float(fps), "size": (w, h), "faces_per_frame": shown}
