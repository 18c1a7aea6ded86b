"""Synthetic faces for the demo data, drawn with OpenCV: seeded persons (skin, hair, face shape, gender, age), the
seven expressions (brows, eyes, mouth), the face on its canvas and a photo background. No person, nothing
downloaded; the same seed gives the same pixels. :mod:`kfer.demo.photos` puts them into AI Hub-shaped photos."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import cv2
import numpy as np

AGES = (10, 20, 30, 40, 50, 60)
AGE_WEIGHTS = (0.08, 0.3, 0.27, 0.17, 0.12, 0.06)

# Canvas on which one face (with hair, neck and shoulders) is drawn before it is scaled into the photo.
# Face units: head centre at (0, 0), head half-height 100.
CANVAS_W, CANVAS_H = 400, 800  # canvas size, pixels
FACE_SCALE = 1.5  # pixels per face unit
HEAD_X, HEAD_Y = CANVAS_W / 2, 230.0  # head centre on the canvas, pixels
HEAD_HALF_HEIGHT = 100.0  # head half-height, face units
_R = int(HEAD_Y + 180 * FACE_SCALE)  # canvas rows that can hold the head and hair (masks are computed on these only)
_SHIFT = 4  # cv2 fixed-point bits for sub-pixel drawing
_AA = cv2.LINE_AA


# --------------------------------------------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expression:
    brow_y: float = 0.0  # brow height offset (negative = raised)
    brow_inner: float = 0.0  # inner end dy (negative = raised)
    brow_outer: float = 0.0  # outer end dy
    brow_arch: float = 2.0  # arch height
    brow_knit: float = 0.0  # hurt: inner end of one brow down, the other's up (asymmetric)
    eye_up: float = 7.0  # upper lid height at the middle
    eye_lo: float = 5.0  # lower lid depth at the middle (negative = lower lid pushed up: smiling crescent)
    eye_tilt: float = 0.0  # outer corner dy (positive = droopy)
    iris: float = 1.0  # iris size factor
    crease: float = 0.0  # heavy upper lid crease (droopy / tired), 0..1
    mouth: str = "line"  # line, grin, o, wavy, side
    mouth_curve: float = 0.0  # corners up (+) or down (-) for line mouths
    mouth_w: float = 1.0  # width factor
    mouth_open: float = 0.0
    blush: float = 0.0
    tear: bool = False
    forehead_lines: int = 0
    glabella_lines: bool = False


EXPRESSIONS: dict[str, Expression] = {
    "neutral": Expression(),
    "joy": Expression(
        brow_y=-4, brow_arch=6, eye_up=7.5, eye_lo=-2.5, mouth="grin", mouth_curve=8, mouth_w=1.25, mouth_open=20
    ),
    "embarrassment": Expression(
        brow_y=-16, brow_inner=-2, brow_arch=9, eye_up=11, eye_lo=8.5, iris=0.7, mouth="o", mouth_w=0.45,
        mouth_open=11, blush=1.0,
    ),
    "anger": Expression(
        brow_y=4, brow_inner=13, brow_outer=-8, brow_arch=-1, eye_up=3.5, eye_lo=3.0, eye_tilt=-3.0, mouth="line",
        mouth_curve=-4, mouth_w=0.85, glabella_lines=True,
    ),
    "anxiety": Expression(
        brow_y=-6, brow_inner=-14, brow_outer=5, brow_arch=1, eye_up=9, eye_lo=6.5, iris=0.85, mouth="wavy",
        mouth_w=1.0, forehead_lines=3,
    ),
    "hurt": Expression(
        brow_y=0, brow_knit=11, brow_arch=2, eye_up=3.0, eye_lo=4.5, crease=1.0, mouth="side", mouth_w=1.0, tear=True
    ),
    "sadness": Expression(
        brow_y=5, brow_inner=-5, brow_outer=13, brow_arch=3, eye_up=4.0, eye_lo=5.5, eye_tilt=4.0, crease=0.6,
        mouth="line", mouth_curve=-11, mouth_w=0.95,
    ),
}
_KO_TO_NAME = {"기쁨": "joy", "당황": "embarrassment", "분노": "anger", "불안": "anxiety", "상처": "hurt",
               "슬픔": "sadness", "중립": "neutral"}


def expression_key(name: str, ko: str | None) -> str:
    if name in EXPRESSIONS:
        return name
    if ko in _KO_TO_NAME:
        return _KO_TO_NAME[ko]
    raise ValueError(f"no synthetic expression for class {name!r} ({ko!r}); known: {sorted(EXPRESSIONS)}")


# --------------------------------------------------------------------------------------------------------------
# Persons
# --------------------------------------------------------------------------------------------------------------
_SKINS = ((172, 196, 236), (150, 182, 226), (132, 166, 212), (112, 146, 196), (190, 212, 242), (122, 152, 188))
_HAIRS = ((22, 22, 26), (28, 36, 52), (38, 56, 88), (58, 58, 64), (46, 76, 122), (150, 150, 156))
_HAIR_STYLES_M = ("short", "short", "side", "buzz", "bob")
_HAIR_STYLES_F = ("long", "long", "bob", "bun", "side")


@dataclass(frozen=True)
class Person:
    index: int
    title: str
    gender: str
    age: int
    ratio: float  # head width / height
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: str
    hairline: float
    hair_vol: float
    glasses: bool
    eye_dx: float
    eye_size: float
    brow_thick: float
    mouth_y: float
    mouth_w: float
    lip: tuple[float, float, float]
    iris_col: tuple[float, float, float]
    clothes: tuple[float, float, float]
    date0: int  # seconds since 2020-06-01 00:00


def make_person(seed: int, i: int) -> Person:
    rng = np.random.default_rng([seed, 1, i])
    gender = "남" if i % 2 == 0 else "여"
    age = int(rng.choice(AGES, p=AGE_WEIGHTS))
    skin = np.array(_SKINS[rng.integers(len(_SKINS))], float) + rng.normal(0, 6, 3)
    hair = _HAIRS[5] if age >= 60 and rng.random() < 0.6 else _HAIRS[rng.integers(5)]
    styles = _HAIR_STYLES_M if gender == "남" else _HAIR_STYLES_F
    clothes = cv2.cvtColor(
        np.uint8([[[rng.integers(0, 180), rng.integers(40, 200), rng.integers(50, 220)]]]), cv2.COLOR_HSV2BGR
    )[0, 0]
    lip = skin * np.array([0.62, 0.6, 0.82]) + rng.normal(0, 4, 3)
    return Person(
        index=i,
        title=hashlib.sha256(f"kfer-demo-person-{seed}-{i}".encode()).hexdigest(),
        gender=gender,
        age=age,
        ratio=float(rng.uniform(0.72, 0.86)),
        skin=tuple(float(v) for v in np.clip(skin, 60, 250)),
        hair=tuple(float(v) for v in hair),
        hair_style=str(styles[rng.integers(len(styles))]),
        hairline=float(rng.uniform(-58, -44)),
        hair_vol=float(rng.uniform(0.4, 1.8)),
        glasses=bool(rng.random() < 0.3),
        eye_dx=float(rng.uniform(29, 35)),
        eye_size=float(rng.uniform(0.9, 1.12)),
        brow_thick=float(rng.uniform(4.5, 7.0)) * (1.1 if gender == "남" else 0.9),
        mouth_y=float(rng.uniform(46, 54)),
        mouth_w=float(rng.uniform(22, 27)),
        lip=tuple(float(v) for v in np.clip(lip, 20, 240)),
        iris_col=tuple(float(v) for v in rng.uniform([15, 25, 35], [40, 55, 80])),
        clothes=tuple(float(v) for v in clothes),
        date0=int(rng.integers(0, 300 * 86400)),
    )


# --------------------------------------------------------------------------------------------------------------
# Drawing helpers (face units -> canvas pixels, fixed point)
# --------------------------------------------------------------------------------------------------------------
def _px(pts) -> np.ndarray:
    """Face-unit points (N, 2) -> int32 fixed-point canvas points for cv2 (shift=_SHIFT)."""
    p = np.asarray(pts, float).reshape(-1, 2)
    c = np.stack([HEAD_X + p[:, 0] * FACE_SCALE, HEAD_Y + p[:, 1] * FACE_SCALE], axis=1)
    return np.round(c * (1 << _SHIFT)).astype(np.int32)


def _pt(x: float, y: float) -> tuple[int, int]:
    q = _px([(x, y)])[0]
    return int(q[0]), int(q[1])


def _ax(a: float, b: float) -> tuple[int, int]:
    return int(round(a * FACE_SCALE * (1 << _SHIFT))), int(round(b * FACE_SCALE * (1 << _SHIFT)))


def _rad(r: float) -> int:
    """A radius in face units -> fixed-point canvas pixels."""
    return int(round(r * FACE_SCALE * (1 << _SHIFT)))


def _t(th: float) -> int:
    return max(1, int(round(th * FACE_SCALE)))


def _bez(p0, c, p1, n: int = 24) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, c, p1 = (np.asarray(v, float) for v in (p0, c, p1))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t**2 * p1


def _mid_bez(p0, mid_dy: float, p1, n: int = 24) -> np.ndarray:
    """Quadratic curve from p0 to p1 whose middle is ``mid_dy`` below the chord's middle."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    m = (p0 + p1) / 2
    return _bez(p0, (m[0], m[1] + 2 * mid_dy), p1, n)


def _poly(img, pts, col, th: float, closed: bool = False) -> None:
    cv2.polylines(img, [_px(pts)], closed, col, _t(th), _AA, _SHIFT)


def _fill(img, pts, col) -> None:
    cv2.fillPoly(img, [_px(pts)], col, _AA, _SHIFT)


def _shade(col, f: float) -> tuple[float, float, float]:
    return tuple(float(min(255.0, v * f)) for v in col)


_GRID: tuple[np.ndarray, np.ndarray] | None = None


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Face-unit coordinates of the pixel centres in the canvas' first _R rows."""
    global _GRID
    if _GRID is None:
        ys, xs = np.mgrid[0:_R, 0:CANVAS_W].astype(np.float32)
        _GRID = ((xs + 0.5 - HEAD_X) / FACE_SCALE, (ys + 0.5 - HEAD_Y) / FACE_SCALE)
    return _GRID


def _paint(img: np.ndarray, alpha: np.ndarray | None, mask: np.ndarray, src) -> None:
    """Set the canvas' first _R rows to ``src`` (a colour or an image) where ``mask``; alpha to 1 there."""
    m = mask.view(np.uint8)
    if not isinstance(src, np.ndarray) or src.ndim == 1:
        src = np.broadcast_to(np.asarray(src, np.float32), (_R, CANVAS_W, 3)).copy()
    cv2.copyTo(np.ascontiguousarray(src, dtype=np.float32), m, img[:_R])
    if alpha is not None:
        cv2.copyTo(np.ones((_R, CANVAS_W), np.float32), m, alpha[:_R])


def _blend(img: np.ndarray, src: np.ndarray, poly) -> None:
    """Copy ``src`` (same coordinates as ``img``) into ``img`` inside the polygon, with anti-aliased edges."""
    q = _px(poly)
    x0, y0 = np.maximum((q.min(0) >> _SHIFT) - 2, 0)
    x1, y1 = (q.max(0) >> _SHIFT) + 3
    x1, y1 = min(int(x1), src.shape[1]), min(int(y1), src.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.float32)
    cv2.fillPoly(mask, [q], 1.0, _AA, _SHIFT, offset=(-int(x0) << _SHIFT, -int(y0) << _SHIFT))
    m = mask[..., None]
    sub = img[y0:y1, x0:x1]
    sub[:] = sub * (1 - m) + src[y0:y1, x0:x1] * m


# --------------------------------------------------------------------------------------------------------------
# The face
# --------------------------------------------------------------------------------------------------------------
def _jit(rng: np.random.Generator, sd: float) -> float:
    return float(rng.normal(0.0, sd))


def draw_face(person: Person, expr: Expression, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Draw one face on the canvas. Returns (BGR float32 canvas, alpha float32 0..1, head half-width)."""
    X, Y = _grid()
    a = HEAD_HALF_HEIGHT * person.ratio * float(rng.uniform(0.98, 1.02))
    b = HEAD_HALF_HEIGHT
    img = np.zeros((CANVAS_H, CANVAS_W, 3), np.float32)
    alpha = np.zeros((CANVAS_H, CANVAS_W), np.float32)
    skin = person.skin
    hair = tuple(float(v) for v in np.clip(np.array(person.hair) + rng.normal(0, 3, 3), 0, 255))

    # Body, neck, ears.
    body = np.array([(-a * 2.3, 400), (-a * 2.2, 175), (-a * 1.2, 128), (a * 1.2, 128), (a * 2.2, 175),
                     (a * 2.3, 400)])
    _fill(img, body, person.clothes)
    _fill(alpha, body, 1.0)
    neck = np.array([(-a * 0.42, 40), (a * 0.42, 40), (a * 0.46, 140), (-a * 0.46, 140)])
    _fill(img, neck, _shade(skin, 0.86))
    _fill(alpha, neck, 1.0)
    collar = _mid_bez((-a * 0.62, 128), 18, (a * 0.62, 128))
    _poly(img, collar, _shade(person.clothes, 0.7), 4)

    # Back hair (behind the head).
    style = person.hair_style
    if style in ("long", "bob"):
        low = 150 if style == "long" else 42
        crown = (X / (a + 13)) ** 2 + ((Y + 6) / (b + 12)) ** 2 <= 1
        hang = (np.abs(X) <= a + 13 - 2 * np.maximum(Y - low + 14, 0)) & (Y >= -6) & (Y <= low)
        back = crown | hang
        _paint(img, alpha, back, hair)
    for s in (-1, 1):
        cv2.ellipse(img, _pt(s * a * 0.98, 2), _ax(9, 17), 0, 0, 360, _shade(skin, 0.92), -1, _AA, _SHIFT)
        cv2.ellipse(alpha, _pt(s * a * 0.98, 2), _ax(9, 17), 0, 0, 360, 1.0, -1, _AA, _SHIFT)

    # Head with soft shading towards the edge and a directional light.
    rr = (X / a) ** 2 + (Y / b) ** 2
    head = rr <= 1.0
    lx, ly = rng.normal(0, 0.35), rng.normal(-0.2, 0.2)
    shade = 1.0 - 0.16 * rr**2 + 0.12 * (lx * X / a + ly * Y / b)
    _paint(img, alpha, head, np.array(skin, np.float32) * shade[..., None])

    # Top hair: inside a cap ellipse and above the hairline (which comes down at the temples).
    if style == "buzz":
        h0, hs, cap = person.hairline - 8, -30, (a + 2, b + 3)
    else:
        h0, hs, cap = person.hairline, -8, (a + 6 * person.hair_vol, b + 9 * person.hair_vol)
    xn = np.clip(X / a, -1.3, 1.3)
    hl = h0 + (hs - h0) * xn**2
    if style == "side":
        hl = hl + 9 * np.clip(X / a, -1, 1) + 3
    top = ((X / cap[0]) ** 2 + ((Y + 6) / cap[1]) ** 2 <= 1) & (Y < hl)
    _paint(img, alpha, top, hair)
    if style == "bun":
        cv2.circle(img, _pt(0, -b - 8), _rad(24), hair, -1, _AA, _SHIFT)
        cv2.circle(alpha, _pt(0, -b - 8), _rad(24), 1.0, -1, _AA, _SHIFT)
    # A few strands for texture.
    hl_col = _shade(hair, 1.35) if sum(hair) < 400 else _shade(hair, 0.8)
    strands = img[:_R].copy()
    for _ in range(4):
        x0 = rng.uniform(-a * 0.7, a * 0.7)
        _poly(strands, _mid_bez((x0, -b + 4), rng.uniform(-4, 4), (x0 * 1.25, h0 + 4)), hl_col, 1.2)
    _paint(img, None, top, strands)  # strands only inside the hair

    # Feature placement: small per-image jitter plus a slight head turn (all features shift sideways).
    k = float(rng.uniform(0.85, 1.15))  # expression intensity
    turn = float(rng.uniform(-6, 6))
    ey = -12 + _jit(rng, 1.2)
    edx = person.eye_dx + _jit(rng, 0.8)
    es = person.eye_size
    neutral = EXPRESSIONS["neutral"]

    def kk(v: float, v0: float) -> float:
        return v0 + (v - v0) * k

    # Forehead / glabella lines (drawn before the brows).
    line_col = _shade(skin, 0.72)
    for j in range(expr.forehead_lines):
        yy = -62 + 7 * j + _jit(rng, 0.8)
        if yy < person.hairline + 3:
            continue
        _poly(img, _mid_bez((turn - 24, yy + 2), -2.5, (turn + 24, yy + 2)), line_col, 1.6)
    if expr.glabella_lines:
        for s in (-1, 1):
            _poly(img, [(turn + s * 4, -32), (turn + s * 5.5, -22)], line_col, 1.6)

    # Eyes.
    knit_side = 1 if rng.random() < 0.5 else -1
    up = kk(expr.eye_up, neutral.eye_up) * es + _jit(rng, 0.4)
    lo = kk(expr.eye_lo, neutral.eye_lo) * es + _jit(rng, 0.4)
    tilt = kk(expr.eye_tilt, 0.0) + _jit(rng, 0.4)
    gaze = (_jit(rng, 1.5), _jit(rng, 0.8) + (1.5 if expr.crease else 0.0))
    hw = 13.0 * es
    for s in (-1, 1):
        cx = turn + s * edx
        inner = (cx - s * hw, ey)
        outer = (cx + s * hw, ey + tilt)
        upper = _mid_bez(inner, -up, outer)
        lower = _mid_bez(inner, lo, outer)
        eye_poly = np.concatenate([upper, lower[::-1]])
        if up + lo > 0.8:
            eye = img[:_R].copy()
            _fill(eye, eye_poly, (236, 238, 240))
            r = 6.2 * es * expr.iris
            ic = (cx + gaze[0], ey + gaze[1] + tilt / 2)
            cv2.circle(eye, _pt(*ic), _rad(r), person.iris_col, -1, _AA, _SHIFT)
            cv2.circle(eye, _pt(*ic), _rad(r * 0.5), (10, 10, 12), -1, _AA, _SHIFT)
            cv2.circle(eye, _pt(ic[0] + r * 0.35, ic[1] - r * 0.35), _rad(r * 0.22), (245, 245, 245), -1, _AA,
                       _SHIFT)
            _blend(img, eye, eye_poly)
        lash = _shade(hair, 0.6)
        _poly(img, upper, lash, 2.6 if person.gender == "여" else 2.0)
        _poly(img, lower, _shade(skin, 0.7), 0.9)
        if expr.crease:
            _poly(img, _mid_bez((inner[0], inner[1] - 3), -up - 4.5, (outer[0], outer[1] - 1)), _shade(skin, 0.68),
                  1.4 * expr.crease)
        if expr.eye_lo < 0:  # smiling: cheeks push the lower lid up
            _poly(img, _mid_bez((inner[0], inner[1] + 5), 3, (outer[0], outer[1] + 5)), _shade(skin, 0.8), 1.2)

    # Brows.
    by = -35 + kk(expr.brow_y, 0) + _jit(rng, 1.0)
    bcol = _shade(hair, 0.85) if sum(hair) < 400 else (70, 70, 74)
    for s in (-1, 1):
        knit = expr.brow_knit * k * (1 if s == knit_side else -1)
        inner_dy = kk(expr.brow_inner, 0) + knit + _jit(rng, 1.0)
        outer_dy = kk(expr.brow_outer, 0) - 0.3 * knit + _jit(rng, 1.0)
        arch = kk(expr.brow_arch, neutral.brow_arch) + _jit(rng, 0.6)
        p_in = (turn + s * (edx - 17), by + inner_dy)
        p_out = (turn + s * (edx + 17), by + outer_dy)
        pts = _mid_bez(p_in, -arch, p_out)
        # Tapered brow: a band whose width shrinks towards the outer end.
        d = np.gradient(pts, axis=0)
        nrm = np.stack([-d[:, 1], d[:, 0]], 1) / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
        w = person.brow_thick * np.linspace(0.6, 0.35, len(pts))[:, None]
        _fill(img, np.concatenate([pts + nrm * w, (pts - nrm * w)[::-1]]), bcol)

    # Glasses.
    if person.glasses:
        gcol = (35, 35, 40)
        for s in (-1, 1):
            cx = turn + s * edx
            cv2.ellipse(img, _pt(cx, ey + 1), _ax(18, 14), 0, 0, 360, gcol, _t(1.6), _AA, _SHIFT)
            _poly(img, [(cx + s * 18, ey - 2), (s * a * 0.98, ey - 6)], gcol, 1.6)
        _poly(img, _mid_bez((turn - edx + 18, ey - 1), -3, (turn + edx - 18, ey - 1)), gcol, 1.6)

    # Nose.
    ncol = _shade(skin, 0.74)
    ny = 20 + _jit(rng, 0.8)
    cv2.ellipse(img, _pt(turn * 1.2, ny), _ax(8, 4.5), 0, 20, 160, ncol, _t(1.6), _AA, _SHIFT)
    for s in (-1, 1):
        cv2.ellipse(img, _pt(turn * 1.2 + s * 4.5, ny + 1.5), _ax(2.2, 1.4), 0, 0, 360, _shade(skin, 0.55), -1, _AA,
                    _SHIFT)
    _poly(img, _mid_bez((turn * 1.1 - 4, -6), 1.5, (turn * 1.2 - 6, ny - 3)), _shade(skin, 0.85), 1.2)

    # Blush.
    if expr.blush:
        bl = img[:_R].copy()
        for s in (-1, 1):
            cv2.ellipse(bl, _pt(turn + s * (edx + 6), 14), _ax(13, 7), 0, 0, 360, (120, 115, 235), -1, _AA, _SHIFT)
        bl = cv2.GaussianBlur(bl, (0, 0), 5)
        f = 0.55 * expr.blush
        _paint(img, None, head, img[:_R] * (1 - f) + bl * f)

    # Mouth.
    my = person.mouth_y + _jit(rng, 1.0)
    mw = person.mouth_w * kk(expr.mouth_w, 1.0) + _jit(rng, 0.8)
    mx = turn * 1.15 + _jit(rng, 0.6)
    lip = person.lip
    dark = (40, 30, 70)
    if expr.mouth == "line":
        c = kk(expr.mouth_curve, 0) + _jit(rng, 0.6)
        line = _mid_bez((mx - mw, my - c), c * 0.9, (mx + mw, my - c))
        _poly(img, line, lip, 3.4)
        _poly(img, _mid_bez((mx - mw * 0.45, my + 6 - 0.4 * c), 1.5, (mx + mw * 0.45, my + 6 - 0.4 * c)),
              _shade(skin, 0.85), 1.2)
    elif expr.mouth == "grin":
        c = kk(expr.mouth_curve, 0) + _jit(rng, 0.6)
        op = kk(expr.mouth_open, 0) + _jit(rng, 1.0)
        top = _mid_bez((mx - mw, my - c), c * 0.5, (mx + mw, my - c))
        bot = _mid_bez((mx - mw, my - c), c * 0.5 + op, (mx + mw, my - c))
        poly = np.concatenate([top, bot[::-1]])
        _fill(img, poly, dark)
        teeth = img[:_R].copy()
        _fill(teeth, np.concatenate([top, (top + (0, 6.5))[::-1]]), (232, 236, 240))
        _fill(teeth, [(mx - mw * 0.5, my + op * 0.9), (mx + mw * 0.5, my + op * 0.9), (mx + mw * 0.3, my + op * 0.5),
                      (mx - mw * 0.3, my + op * 0.5)], _shade(lip, 1.1))  # tongue
        _blend(img, teeth, poly)
        _poly(img, poly, lip, 2.4, closed=True)
    elif expr.mouth == "o":
        op = kk(expr.mouth_open, 0) + _jit(rng, 0.8)
        cv2.ellipse(img, _pt(mx, my + 2), _ax(mw, op), 0, 0, 360, dark, -1, _AA, _SHIFT)
        cv2.ellipse(img, _pt(mx, my + 2), _ax(mw, op), 0, 0, 360, lip, _t(3.0), _AA, _SHIFT)
    elif expr.mouth == "wavy":
        xs = np.linspace(-1, 1, 40)
        amp = 2.6 * k + _jit(rng, 0.3)
        ph = rng.uniform(-0.3, 0.3)
        line = np.stack([mx + xs * mw, my + amp * np.sin(xs * 2.5 * np.pi + ph) + 2 * xs**2], 1)
        _poly(img, line, lip, 3.0)
        # clenched: a short lower-lip line and tense chin
        _poly(img, _mid_bez((mx - mw * 0.4, my + 7), 1.0, (mx + mw * 0.4, my + 7)), _shade(skin, 0.8), 1.2)
    elif expr.mouth == "side":
        s = -knit_side  # pulled away from the knitted brow side
        p0 = (mx - s * mw * 0.6, my + 3)
        p1 = (mx + s * mw * 1.05, my - 4 * k)
        line = _bez(p0, (mx + s * mw * 0.2, my + 8), p1)
        _poly(img, line, lip, 3.4)
        _poly(img, [(p1[0] - s * 2, p1[1] - 3), (p1[0] + s * 3, p1[1] + 1)], _shade(skin, 0.72), 1.3)
    if expr.tear:
        s = knit_side
        tx, ty = turn + s * (edx + 2), ey + 12 + rng.uniform(0, 10)
        rt = 4.2
        drop = np.array([(tx, ty - 2.2 * rt)] + [(tx + rt * math.sin(t), ty + rt * math.cos(t)) for t in
                                                  np.linspace(-math.pi * 0.8, math.pi * 0.8, 16)])
        _poly(img, [(turn + s * (edx + 1), ey + 6), (tx, ty - 2 * rt)], (240, 225, 200), 1.6)
        _fill(img, drop, (252, 240, 215))
        _poly(img, drop, (150, 110, 80), 1.0, closed=True)
    return img, alpha, a


# --------------------------------------------------------------------------------------------------------------
# Backgrounds and the photo
# --------------------------------------------------------------------------------------------------------------
def random_colour(rng: np.random.Generator, lo: int = 40, hi: int = 230) -> np.ndarray:
    return rng.uniform(lo, hi, 3).astype(np.float32)


def background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = int(rng.integers(5))
    c0, c1 = random_colour(rng), random_colour(rng)
    if kind in (0, 3):  # linear gradient (+ shapes for 3)
        ang = rng.uniform(0, 2 * np.pi)
        t = (xs * np.cos(ang) + ys * np.sin(ang))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    elif kind == 1:  # radial gradient
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        t = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) / math.hypot(w, h)
        t = np.clip(t * rng.uniform(1.0, 2.0), 0, 1)
    elif kind == 2:  # smooth blotches
        low = rng.random((int(rng.integers(3, 7)), int(rng.integers(3, 7)))).astype(np.float32)
        t = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
        t = np.clip((t - t.min()) / max(float(t.max() - t.min()), 1e-6), 0, 1)
    else:  # room: wall and floor
        horizon = rng.uniform(0.55, 0.85) * h
        t = (ys > horizon).astype(np.float32) * 0.9 + 0.1 * ys / h
    bg = c0 * (1 - t[..., None]) + c1 * t[..., None]
    if kind == 4:  # a window or door
        x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.4)
        cv2.rectangle(bg, (int(x0), int(y0)), (int(x0 + rng.uniform(30, 90)), int(y0 + rng.uniform(50, 140))),
                      tuple(float(v) for v in random_colour(rng, 120, 250)), -1, _AA)
    if kind == 3 or rng.random() < 0.3:
        for _ in range(int(rng.integers(3, 9))):
            col = tuple(float(v) for v in random_colour(rng))
            if rng.random() < 0.5:
                p = rng.uniform(0, 1, 4) * (w, h, w, h)
                cv2.rectangle(bg, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), col, -1, _AA)
            else:
                cv2.circle(bg, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), int(rng.uniform(8, 60)), col, -1,
                           _AA)
        bg = cv2.GaussianBlur(bg, (0, 0), float(rng.uniform(1.5, 4.0)))  # out of focus
    return bg


def head_extent(a: float, angle: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The head outline's extent (min x, min y), (max x, max y) about the head centre, in photo pixels, once
    the canvas is scaled by ``scale`` and tilted by ``angle`` degrees (``a``: the head's half-width, face units)."""
    th = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    outline = np.stack([HEAD_X + a * FACE_SCALE * np.cos(th), HEAD_Y + HEAD_HALF_HEIGHT * FACE_SCALE * np.sin(th)], 1)
    rot = cv2.getRotationMatrix2D((0.0, 0.0), angle, scale)  # about the head centre, scale included
    rel = (outline - (HEAD_X, HEAD_Y)) @ rot[:, :2].T
    return rel.min(0), rel.max(0)


def place_head(rng: np.random.Generator, lo, hi, w: int, h: int, margin: float = 3.0) -> tuple[float, float]:
    """A random head centre that keeps the head's extent (``lo``, ``hi``) ``margin`` pixels inside w×h."""
    cx = rng.uniform(margin - lo[0], max(margin - lo[0], w - margin - hi[0]))
    cy = rng.uniform(margin - lo[1], max(margin - lo[1], h - margin - hi[1]))
    return cx, cy
