"""The ``augment`` stage: Keras ImageDataGenerator-style augmentation of the train split, written to disk.

Only rows of ``splits.csv`` whose split is ``train`` are augmented; validation and test images are never
touched. For every train image the stage writes ``augment.copies`` augmented versions under
``<paths.augmented>/train/<label>/`` and a ``manifest.csv`` next to them that lists the training table: each
original (copy 0), referenced where the crop stage wrote it (``<paths.cropped>/…``, not copied: at AI Hub
scale a copy would duplicate every cropped face), and its augmented copies.

Every augmented image is a pure function of (source pixels, params.seed, source path, copy index, augment
params): each one draws from its own generator (:func:`rng_for`), so the output bytes are identical for any
worker count, run order or machine.

:func:`augment_image` is the single implementation of the augmentation; the tuning step calls it with a
different ``strength`` on the fly. Geometry follows ``keras``' ``apply_affine_transform`` (the function behind
``ImageDataGenerator``), implemented as one ``cv2.warpAffine`` call with bilinear interpolation.

This module must stay light: it is imported by spawned worker processes and must not import TensorFlow.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from kfer import files
from kfer.catalog import Catalog
from kfer.config import AugmentCfg, Params

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ("path", "label", "group", "split")
TRAIN_DIR = "train"

#: Keras fill_mode -> OpenCV border mode. scipy's "nearest" and "reflect" (half-sample mirror) are exactly
#: cv2's REPLICATE and REFLECT; "constant" is emulated in :func:`warp` to match scipy (cval, no edge blending);
#: "wrap" is the true periodic wrap (scipy's "grid-wrap"), not scipy's overlapping-edge "wrap".
BORDER_MODES = {
    "nearest": cv2.BORDER_REPLICATE,
    "reflect": cv2.BORDER_REFLECT,
    "wrap": cv2.BORDER_WRAP,
    "constant": cv2.BORDER_CONSTANT,
}

#: Smallest zoom factor drawn, so that a large strength (zoom·s >= 1) never gives a zero or negative scale.
MIN_ZOOM = 0.01


# --- randomness --------------------------------------------------------------------------------------------


def rng_for(seed: int, key: str, copy: int) -> np.random.Generator:
    """The generator for one augmented copy: a function of (seed, image key, copy index) only.

    ``key`` is the image's path as written in splits.csv (relative to the root), so the draw does not depend
    on the process, the worker count or where the repository is checked out.
    """
    return np.random.Generator(np.random.PCG64(files.stable_int("augment", int(seed), str(key), int(copy))))


# --- geometry ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarpParams:
    """One draw of the geometric transform, in Keras' ``apply_affine_transform`` units.

    theta: rotation in degrees (positive = counter-clockwise on screen);
    tx, ty: shift in pixels along x (columns) and y (rows); the content moves by (-tx, -ty);
    shear: shear angle in degrees; zx, zy: inverse-map scale along x and y (> 1 zooms out);
    flip: horizontal flip, applied after the warp (as Keras does).
    """

    theta: float = 0.0
    tx: float = 0.0
    ty: float = 0.0
    shear: float = 0.0
    zx: float = 1.0
    zy: float = 1.0
    flip: bool = False


def _affine_matrix(
    h: int,
    w: int,
    theta_deg: float = 0.0,
    tx: float = 0.0,
    ty: float = 0.0,
    shear_deg: float = 0.0,
    zx: float = 1.0,
    zy: float = 1.0,
) -> np.ndarray:
    """The 2x3 inverse map (output pixel (x, y) -> source pixel) for ``cv2.WARP_INVERSE_MAP``.

    Composed exactly as keras' ``apply_affine_transform``: ``rotation @ shift @ shear @ zoom`` in (x, y)
    coordinates, conjugated by a translation to the image centre. Keras builds the matrix in (x, y) and
    permutes it to scipy's (row, col) indexing; OpenCV already indexes (x, y), so the matrix is used as built.
    The centre is ((w-1)/2, (h-1)/2). Keras takes the x centre from the height and the y centre from the
    width, which is the same point for the square images this pipeline produces.
    """
    t = math.radians(theta_deg)
    rotation = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])
    shift = np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])
    sh = math.radians(shear_deg)
    shear = np.array([[1.0, -math.sin(sh), 0.0], [0.0, math.cos(sh), 0.0], [0.0, 0.0, 1.0]])
    zoom = np.array([[zx, 0.0, 0.0], [0.0, zy, 0.0], [0.0, 0.0, 1.0]])
    m = rotation @ shift @ shear @ zoom
    cx, cy = w / 2.0 - 0.5, h / 2.0 - 0.5
    offset = np.array([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
    reset = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    return (offset @ m @ reset)[:2]


def warp(img: np.ndarray, p: WarpParams, fill_mode: str = "nearest", cval: float = 0.0) -> np.ndarray:
    """Apply ``p`` to a 2-D image with one ``cv2.warpAffine`` (bilinear), then the optional flip."""
    if fill_mode not in BORDER_MODES:
        raise ValueError(f"unknown fill_mode {fill_mode!r}; expected one of {sorted(BORDER_MODES)}")
    h, w = img.shape[:2]
    m = _affine_matrix(h, w, p.theta, p.tx, p.ty, p.shear, p.zx, p.zy)
    constant = fill_mode == "constant"
    out = cv2.warpAffine(
        img,
        m,
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        # scipy's "constant" (Keras) does not blend cval into edge pixels: sample in replicate mode and put cval
        # exactly where the source point falls outside the image (below).
        borderMode=cv2.BORDER_REPLICATE if constant else BORDER_MODES[fill_mode],
    )
    if constant:
        ys, xs = np.mgrid[0:h, 0:w]
        sx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        sy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        eps = 1e-6
        outside = (sx < -eps) | (sx > w - 1 + eps) | (sy < -eps) | (sy > h - 1 + eps)
        out[outside] = np.uint8(np.clip(np.rint(cval), 0, 255))
    if p.flip:
        out = cv2.flip(out, 1)
    return out


def sample_warp(rng: np.random.Generator, h: int, w: int, cfg: AugmentCfg, s: float) -> WarpParams:
    """Draw the geometric parameters, every range scaled by ``s``.

    Order of draws (fixed): theta, tx, ty, shear, zx, zy, flip. Every draw is made even when its range is
    zero or the option is off, so one setting never shifts the random stream of the others.
    """
    theta = rng.uniform(-cfg.rotation_deg * s, cfg.rotation_deg * s)
    tx = rng.uniform(-cfg.shift * s, cfg.shift * s) * w
    ty = rng.uniform(-cfg.shift * s, cfg.shift * s) * h
    shear = rng.uniform(-cfg.shear_deg * s, cfg.shear_deg * s)
    lo, hi = max(1.0 - cfg.zoom * s, MIN_ZOOM), max(1.0 + cfg.zoom * s, MIN_ZOOM)
    zx, zy = rng.uniform(lo, hi, 2)
    flip = bool(rng.random() < 0.5) and cfg.horizontal_flip
    return WarpParams(float(theta), float(tx), float(ty), float(shear), float(zx), float(zy), flip)


# --- noise -------------------------------------------------------------------------------------------------

#: The gaussian noise is the standard normal quantized to this many equiprobable levels (16 random bits per
#: pixel through :func:`normal_table`): |z| <= 4.33, variance 0.99998, kurtosis 2.9991. Drawing the field
#: this way costs ~0.05 ms at 224 px against ~0.5 ms for ``Generator.standard_normal`` (float64 or float32
#: ziggurat): the field was two thirds of an augmentation (docs/performance.md, ``bench_train.py`` part d).
NOISE_LEVELS = 1 << 16


@functools.cache
def normal_table() -> np.ndarray:
    """float32 ``Φ⁻¹((i + 0.5) / NOISE_LEVELS)`` for i = 0 … NOISE_LEVELS - 1 (computed once per process)."""
    inv_cdf = statistics.NormalDist().inv_cdf
    table = np.array([inv_cdf((i + 0.5) / NOISE_LEVELS) for i in range(NOISE_LEVELS)], dtype=np.float32)
    table.flags.writeable = False
    return table


def standard_normal_field(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A fresh float32 array of ``shape`` of (quantized) N(0, 1) draws: each 64-bit output of ``rng``'s bit
    generator gives four 16-bit levels (little-endian order on every machine), looked up in :func:`normal_table`.
    A pure function of the generator's state. (``random_raw`` fills 100 KB in ~20 µs, ``Generator.bytes`` in ~57.)"""
    n = math.prod(shape)
    raw = rng.bit_generator.random_raw((n + 3) // 4)
    levels = raw.astype("<u8", copy=False).view("<u2")[:n].reshape(shape)
    return np.take(normal_table(), levels)


def add_noise(img: np.ndarray, sigma: float, standard_normal: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Add N(0, sigma) noise (0..255 units) in float32, min-max renormalize to [0, 255], round to uint8.

    ``sigma == 0`` returns the image unchanged (no renormalization). A constant result (max == min) cannot be
    stretched and is only rounded and clipped.

    ``overwrite=True`` lets the function use ``standard_normal`` (when it is float32, writeable and of the
    image's shape) as its work buffer, destroying it: every later step runs in place, with no H×W
    temporaries. Every step is the same IEEE float32 operation either way (``sigma·z`` then ``+ img``,
    ``(x - lo)`` then ``· 255/(hi - lo)``, round half to even), so the bytes do not depend on it. After the
    stretch every value is in [0, 255·(1 + 2⁻²⁴)²] (``x - lo >= 0`` exactly), which rounds into 0..255: only an
    unstretched (constant) result needs the clip.
    """
    if sigma <= 0:
        return img
    s = np.float32(sigma)
    if (overwrite and standard_normal.dtype == np.float32 and standard_normal.shape == img.shape
            and standard_normal.flags.writeable):
        x = np.multiply(standard_normal, s, out=standard_normal)
        np.add(x, img, out=x)  # == img.astype(float32) + sigma·z: the addition commutes exactly
    else:
        x = img.astype(np.float32) + s * np.asarray(standard_normal, dtype=np.float32)
    lo, hi = x.min(), x.max()
    if hi > lo:
        np.subtract(x, lo, out=x)
        np.multiply(x, np.float32(255.0) / (hi - lo), out=x)
        return np.rint(x, out=x).astype(np.uint8)
    np.rint(x, out=x)
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


# --- one image ---------------------------------------------------------------------------------------------


def augment_image(
    img: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentCfg,
    strength: float | None = None,
) -> np.ndarray:
    """One random augmentation of an 8-bit grayscale image (HxW or HxWx1; the same shape comes back).

    ``strength`` (s) overrides ``cfg.strength`` and scales every range: rotation ±rotation_deg·s degrees,
    shift ±shift·s of the side, shear ±shear_deg·s degrees, zoom in [1-zoom·s, 1+zoom·s] (Keras' inverse-map
    scale), horizontal flip with probability 0.5 (when s > 0 and enabled), then gaussian noise with
    sigma ~ U(noise_sigma)·s gray levels followed by min-max renormalization to [0, 255].
    s == 0 returns an unchanged copy without drawing anything.

    Random numbers are drawn in a fixed order (see :func:`sample_warp`, then sigma, then the HxW standard
    normal field), so the result is a pure function of (img, rng state, cfg, s).
    """
    s = cfg.strength if strength is None else float(strength)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"augment strength must be a finite number >= 0, got {s!r}")
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"augment_image expects a uint8 image, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        return augment_image(img[:, :, 0], rng, cfg, s)[:, :, None]
    if img.ndim != 2:
        raise ValueError(f"augment_image expects an HxW or HxWx1 grayscale image, got shape {img.shape}")
    if s == 0:
        return img.copy()

    h, w = img.shape
    p = sample_warp(rng, h, w, cfg, s)
    sigma = float(rng.uniform(cfg.noise_sigma[0], cfg.noise_sigma[1])) * s
    standard_normal = standard_normal_field(rng, (h, w))
    out = warp(np.ascontiguousarray(img), p, cfg.fill_mode)
    return add_noise(out, sigma, standard_normal, overwrite=True)  # the field is ours: its buffer is reused


class OnTheFlyAugment:
    """``fn(image_uint8, row, epoch)`` for :func:`kfer.training.inputs.make_dataset` over a table with ``path``
    (the cropped
    image, as in splits.csv) and ``copy`` columns: row ``i`` is the image itself (copy 0) or
    :func:`augment_image` with ``rng_for(seed, path, copy)`` at ``strength``, byte for byte what the stage writes
    for that strength. ``fresh`` (``train.fresh_augmentation``): in epoch ``e`` copy ``k`` is drawn as copy
    ``k + e · augment.copies``, so every epoch sees new augmentations; epoch 0 sees the stage's."""

    def __init__(self, params: Params, table: pd.DataFrame, strength: float, fresh: bool = False) -> None:
        self.cfg = params.augment
        self.seed = params.seed
        self.strength = float(strength)
        self.fresh = bool(fresh)
        self.paths = list(table["path"])
        self.copies = table["copy"].to_numpy(dtype=np.int64)

    def __call__(self, image: np.ndarray, index, epoch=0) -> np.ndarray:
        i = int(index)
        k = int(self.copies[i])
        if k == 0:
            return np.asarray(image, dtype=np.uint8)
        if self.fresh:
            k += int(epoch) * self.cfg.copies
        return augment_image(image, rng_for(self.seed, self.paths[i], k), self.cfg, self.strength)


# --- the stage ---------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(cfg: AugmentCfg, strength: float, seed: int) -> None:
    _WORKER.update(cfg=cfg, strength=strength, seed=seed)


def _augment_one(task: tuple[str, str, str, str]) -> tuple[str | None, list[tuple[int, str]]]:
    """Worker: read one train image and write its augmented copies into ``out_dir``.

    ``task`` is (source absolute path, key as in splits.csv, output folder, output stem). Returns
    (skip reason or None, [(copy index, file name or None for the original itself), ...]). Bad inputs are
    reported, never raised.
    """
    src, key, out_dir, stem = task
    cfg: AugmentCfg = _WORKER["cfg"]
    try:
        img = files.read_image_gray(src)
    except FileNotFoundError:
        return "missing", []
    except OSError:
        return "unreadable", []
    if img.size == 0:
        return "unreadable", []
    try:
        augmented = [
            augment_image(img, rng_for(_WORKER["seed"], key, k), cfg, _WORKER["strength"])
            for k in range(1, cfg.copies + 1)
        ]
    except cv2.error:
        return "augment_failed", []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[int, str | None]] = [(0, None)]  # the original: referenced, not copied
    for k, aug in enumerate(augmented, start=1):
        name = f"{stem}__aug{k}.png"
        files.write_png(out / name, aug)
        written.append((k, name))
    return None, written


def _read_splits(params: Params) -> pd.DataFrame:
    return Catalog(params).read("splits", SPLIT_COLUMNS, also=())


def _output_stems(rows: pd.DataFrame) -> list[str]:
    """File stems for the train rows: the source stem, plus a short hash where two sources share one."""
    stems = [PurePosixPath(p).stem for p in rows["path"]]
    seen = Counter(zip(rows["label"], stems, strict=True))
    return [
        f"{stem}__{files.short_hash(p)}" if seen[(label, stem)] > 1 else stem
        for p, label, stem in zip(rows["path"], rows["label"], stems, strict=True)
    ]


def run_augment(params: Params) -> dict:
    """DVC stage: augment the train split into ``paths.augmented``; return (and write) the report."""
    cfg = params.augment
    s = float(cfg.strength)
    df = _read_splits(params)
    train = df[df["split"] == TRAIN_DIR]
    n_train = len(train)

    skipped: Counter[str] = Counter()
    known = set(params.class_names)
    is_known = train["label"].isin(known)
    if (~is_known).any():
        skipped["unknown_label"] += int((~is_known).sum())
        log.warning(
            "augment: %d train row(s) with labels that are not classes skipped: %s",
            int((~is_known).sum()),
            sorted(set(train.loc[~is_known, "label"])),
        )
    dup = train["path"].duplicated()
    if dup.any():
        skipped["duplicate"] += int((dup & is_known).sum())
    train = train[is_known & ~dup].reset_index(drop=True)
    stems = _output_stems(train)

    target = Catalog(params).augmented
    workers = max(1, min(files.resolve_workers(cfg.workers), len(train)))
    chunksize = max(1, min(32, len(train) // (workers * 4)))
    per_class: Counter[str] = Counter()
    originals = augmented = 0

    with files.atomic_dir(target) as tmp:
        tasks = (  # made as the pool takes them
            (str(params.path(p)), p, str(tmp / TRAIN_DIR / label), stem)
            for p, label, stem in zip(train["path"], train["label"], stems, strict=True)
        )
        results = files.parallel_map(
            _augment_one,
            tasks,
            workers=workers,
            chunksize=chunksize,
            initializer=_init_worker,
            initargs=(cfg, s, params.seed),
            workers_param="augment.workers",
        )
        # manifest rows are written as results arrive (in input order), not collected: memory stays flat
        with contextlib.closing(results), Catalog(params).table_writer("augment_manifest", tmp) as out:
            progress = tqdm(results, total=len(train), desc="augment", unit="img", dynamic_ncols=True)
            for row, (reason, written) in zip(train.itertuples(index=False), progress, strict=True):
                if reason is not None:
                    skipped[reason] += 1
                    continue
                for copy, name in written:
                    path = row.path if name is None else params.rel(target / TRAIN_DIR / row.label / name)
                    out.writerow({"path": path, "original": row.path, "label": row.label, "group": row.group,
                                  "copy": copy})
                    per_class[row.label] += 1
                    if copy == 0:
                        originals += 1
                    else:
                        augmented += 1
        (tmp / TRAIN_DIR).mkdir(exist_ok=True)

    if skipped:
        log.warning("augment: skipped %d train image(s): %s", sum(skipped.values()), dict(sorted(skipped.items())))
    report = {
        "train_images": n_train,
        "originals": originals,
        "augmented": augmented,
        "skipped": dict(sorted(skipped.items())),
        "per_class": {name: per_class.get(name, 0) for name in params.class_names},
        "strength": s,
        "copies": cfg.copies,
    }
    Catalog(params).write_json("augment_report", report)
    Catalog(params).write_json("augment_headline",  # DVC metrics: train images written, skipped
                     {"images": originals + augmented, "skipped": sum(skipped.values())})
    log.info(
        "augment: %d train images -> %d originals + %d augmented (copies=%d, strength=%g), %d skipped -> %s",
        n_train,
        originals,
        augmented,
        cfg.copies,
        s,
        sum(skipped.values()),
        params.rel(target),
    )
    return report
