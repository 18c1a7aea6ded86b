"""Tests for the augment stage: Keras-equivalent geometry, determinism, noise, and the DVC stage end to end."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kfer.data import augment
from kfer.data.augment import (
    WarpParams,
    add_noise,
    augment_image,
    normal_table,
    rng_for,
    run_augment,
    sample_warp,
    standard_normal_field,
    warp,
)
from tests.helpers import AUGMENT_CLASSES, augment_cfg, augment_project

# Geometry-only config: noise disabled, flip off; ranges set per test.
NO_NOISE = {"noise_sigma": (0.0, 0.0), "horizontal_flip": False}


def smooth_image(h: int = 64, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 127.5 + 60 * np.sin(xx / 7.0) + 50 * np.cos(yy / 9.0 + xx / 13.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def blob_centroid(img: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid of the bright pixels."""
    ys, xs = np.nonzero(img > 127)
    assert len(xs), "marker vanished"
    return float(xs.mean()), float(ys.mean())


def keras_apply_affine_transform():
    """Keras' own apply_affine_transform (the function behind ImageDataGenerator.apply_transform), by its public
    name in TensorFlow's tf.keras."""
    import tensorflow as tf

    try:
        return tf.keras.preprocessing.image.apply_affine_transform
    except AttributeError:
        pytest.skip("this TensorFlow's tf.keras has no preprocessing.image.apply_affine_transform")


# --- randomness / determinism ------------------------------------------------------------------------------


def test_rng_for_is_deterministic_and_keyed():
    a = rng_for(42, "data/cropped/joy/a.png", 1).random(8)
    assert np.array_equal(a, rng_for(42, "data/cropped/joy/a.png", 1).random(8))
    assert not np.array_equal(a, rng_for(42, "data/cropped/joy/a.png", 2).random(8))
    assert not np.array_equal(a, rng_for(43, "data/cropped/joy/a.png", 1).random(8))
    assert not np.array_equal(a, rng_for(42, "data/cropped/joy/b.png", 1).random(8))


def test_augment_image_is_deterministic_per_copy():
    img, cfg = smooth_image(), augment_cfg()
    a = augment_image(img, rng_for(7, "k.png", 1), cfg)
    b = augment_image(img, rng_for(7, "k.png", 1), cfg)
    c = augment_image(img, rng_for(7, "k.png", 2), cfg)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


@pytest.mark.parametrize("shape", [(40, 40), (40, 40, 1)])
def test_strength_zero_is_identity(shape):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = augment_image(img, rng_for(1, "x", 1), augment_cfg(), strength=0.0)
    assert out.shape == img.shape and out.dtype == np.uint8 and out.tobytes() == img.tobytes()
    out_cfg = augment_image(img, rng_for(1, "x", 1), augment_cfg(strength=0.0))
    assert out_cfg.tobytes() == img.tobytes()


def test_strength_argument_overrides_cfg():
    img = smooth_image()
    cfg = augment_cfg(strength=0.0)
    assert augment_image(img, rng_for(1, "x", 1), cfg, strength=1.0).tobytes() != img.tobytes()
    same = augment_image(img, rng_for(1, "x", 1), augment_cfg(strength=1.0))
    assert augment_image(img, rng_for(1, "x", 1), cfg, strength=1.0).tobytes() == same.tobytes()


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_strength_is_rejected(bad):
    with pytest.raises(ValueError, match="strength"):
        augment_image(smooth_image(8, 8), rng_for(1, "x", 1), augment_cfg(), strength=bad)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 48),
    w=st.integers(1, 48),
    channel=st.booleans(),
    strength=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**32 - 1),
    fill_mode=st.sampled_from(["nearest", "reflect", "wrap", "constant"]),
)
def test_shape_and_dtype_preserved(h, w, channel, strength, seed, fill_mode):
    shape = (h, w, 1) if channel else (h, w)
    img = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    out = augment_image(img, np.random.default_rng(seed), augment_cfg(fill_mode=fill_mode), strength=strength)
    assert out.shape == img.shape and out.dtype == np.uint8


# --- geometry: units and equivalence with Keras -------------------------------------------------------------

KERAS_CASES = [
    {"theta": 23.0},
    {"theta": -90.0},
    {"tx": 5.3, "ty": -3.1},
    {"shear": 17.0},
    {"zx": 1.2, "zy": 0.85},
    {"theta": -31.0, "tx": 4.0, "ty": 2.0, "shear": 9.0, "zx": 1.1, "zy": 0.9},
]


@pytest.mark.filterwarnings("ignore:Please import `affine_transform`:DeprecationWarning")
@pytest.mark.parametrize("fill_mode", ["nearest", "reflect", "constant"])
@pytest.mark.parametrize("case", KERAS_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_warp_matches_keras_apply_affine_transform(case, fill_mode):
    apply_affine_transform = keras_apply_affine_transform()
    img = smooth_image()
    expected = apply_affine_transform(
        img[:, :, None].astype(np.float64),
        row_axis=0,
        col_axis=1,
        channel_axis=2,
        fill_mode=fill_mode,
        cval=0.0,
        order=1,
        **case,
    )[:, :, 0]
    ours = warp(img, WarpParams(**case), fill_mode)
    diff = np.abs(ours.astype(np.float64) - expected)
    assert diff[6:-6, 6:-6].mean() < 0.5  # interior: rounding and cv2's 1/32-pixel fixed point only
    # Borders included, except the outermost pixel: at exact multiples of 90 degrees, scipy's "constant" mode
    # decides on floating-point noise (63 + 1e-14) whether an edge sample lies outside the image.
    assert diff[1:-1, 1:-1].mean() < 2.0


def test_neutral_warp_is_the_identity():
    img = np.random.default_rng(3).integers(0, 256, (30, 50), dtype=np.uint8)
    for fill_mode in ("nearest", "reflect", "wrap", "constant"):
        assert warp(img, WarpParams(), fill_mode).tobytes() == img.tobytes(), fill_mode


def test_rotation_90_degrees_is_counter_clockwise_quarter_turn():
    img = np.zeros((64, 64), np.uint8)
    img[6:10, 30:34] = 255  # a marker above the centre
    out = warp(img, WarpParams(theta=90.0))
    assert np.array_equal(out, np.rot90(img))  # Keras: positive theta turns counter-clockwise
    x, y = blob_centroid(out)
    assert x < 16 and abs(y - 31.5) < 1  # the top marker is now on the left


def test_rotation_about_centre_of_non_square_image():
    img = np.random.default_rng(0).integers(0, 256, (20, 33), dtype=np.uint8)
    assert np.array_equal(warp(img, WarpParams(theta=180.0)), img[::-1, ::-1])


def test_sampled_rotation_is_in_degrees():
    """Through the sampled-parameters path: the marker moves by the drawn angle in degrees."""
    cfg = augment_cfg(rotation_deg=90.0, shift=0.0, shear_deg=0.0, zoom=0.0, **NO_NOISE)
    img = np.zeros((65, 65), np.uint8)
    img[8:13, 30:35] = 255  # marker centred at (32, 10), 22 px above the centre (32, 32)
    checked = 0
    for k in range(1, 40):
        rng = rng_for(0, "marker", k)
        theta = sample_warp(copy.deepcopy(rng), 65, 65, cfg, 1.0).theta
        assert -90.0 <= theta <= 90.0
        if abs(theta) < 45:
            continue
        out = augment_image(img, rng, cfg)
        t = np.deg2rad(theta)
        x, y = blob_centroid(out)
        assert abs(x - (32 - 22 * np.sin(t))) < 1.5 and abs(y - (32 - 22 * np.cos(t))) < 1.5, theta
        checked += 1
    assert checked >= 3


def test_sampled_ranges_scale_with_strength():
    cfg = augment_cfg(rotation_deg=40.0, shift=0.1, shear_deg=10.0, zoom=0.2)
    rng = np.random.default_rng(5)
    draws = [sample_warp(rng, 50, 80, cfg, 0.5) for _ in range(2000)]
    theta = np.array([d.theta for d in draws])
    tx, ty = np.array([d.tx for d in draws]), np.array([d.ty for d in draws])
    zx, zy = np.array([d.zx for d in draws]), np.array([d.zy for d in draws])
    assert np.abs(theta).max() <= 20 and np.abs(theta).max() > 19
    assert np.abs(tx).max() <= 0.05 * 80 and np.abs(tx).max() > 0.045 * 80  # x shift: fraction of the width
    assert np.abs(ty).max() <= 0.05 * 50 and np.abs(ty).max() > 0.045 * 50  # y shift: fraction of the height
    assert np.abs([d.shear for d in draws]).max() <= 5
    for z in (zx, zy):
        assert z.min() >= 0.9 and z.max() <= 1.1
    assert abs(np.corrcoef(zx, zy)[0, 1]) < 0.1  # zx and zy drawn independently
    flips = np.mean([d.flip for d in draws])
    assert 0.45 < flips < 0.55


def test_horizontal_flip_only_when_enabled():
    img = smooth_image(32, 40)
    geometry_off = dict(rotation_deg=0.0, shift=0.0, shear_deg=0.0, zoom=0.0, noise_sigma=(0.0, 0.0))
    outs = [augment_image(img, rng_for(0, "f", k), augment_cfg(**geometry_off)) for k in range(1, 30)]
    flipped = [o.tobytes() == img[:, ::-1].tobytes() for o in outs]
    same = [o.tobytes() == img.tobytes() for o in outs]
    assert all(f or s for f, s in zip(flipped, same, strict=True)) and any(flipped) and any(same)
    no_flip = augment_cfg(horizontal_flip=False, **{k: v for k, v in geometry_off.items()})
    assert all(augment_image(img, rng_for(0, "f", k), no_flip).tobytes() == img.tobytes() for k in range(1, 30))


# --- noise -------------------------------------------------------------------------------------------------


def test_noise_is_min_max_renormalized():
    img = (smooth_image() // 4 + 60).astype(np.uint8)  # low contrast: 60..123
    out = add_noise(img, 3.0, standard_normal_field(np.random.default_rng(0), img.shape))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    cfg = augment_cfg(rotation_deg=0.0, shift=0.0, shear_deg=0.0, zoom=0.0, horizontal_flip=False, noise_sigma=(4, 4))
    out = augment_image(img, rng_for(0, "n", 1), cfg)
    assert out.min() == 0 and out.max() == 255
    # the noise is small: after undoing the stretch the image is close to the input
    stretched = (img.astype(float) - img.min()) * 255.0 / (img.max() - img.min())
    assert np.abs(out - stretched).mean() < 25


def test_noise_field_is_a_quantized_standard_normal():
    z = normal_table().astype(np.float64)
    assert len(z) == 1 << 16 and np.all(np.diff(z) > 0) and np.allclose(z, -z[::-1], atol=1e-6)
    assert abs(z.mean()) < 1e-9 and abs((z**2).mean() - 1) < 1e-4 and abs((z**4).mean() - 3) < 2e-3
    field = standard_normal_field(np.random.default_rng(5), (224, 224))
    assert field.dtype == np.float32 and field.shape == (224, 224) and field.flags.writeable
    assert abs(field.mean()) < 0.02 and abs(field.std() - 1) < 0.02
    # the share within 1 and 2 sigma is the normal's (68.27%, 95.45%): a uniform or skewed field fails
    assert abs(np.mean(np.abs(field) < 1) - 0.6827) < 0.01 and abs(np.mean(np.abs(field) < 2) - 0.9545) < 0.005
    again = standard_normal_field(np.random.default_rng(5), (224, 224))
    assert again.tobytes() == field.tobytes()  # a pure function of the generator's state
    assert standard_normal_field(np.random.default_rng(6), (224, 224)).tobytes() != field.tobytes()


def test_zero_sigma_adds_no_noise_and_no_stretch():
    img = (smooth_image() // 4 + 60).astype(np.uint8)
    assert add_noise(img, 0.0, np.ones(img.shape)).tobytes() == img.tobytes()
    const = np.full((8, 8), 77, np.uint8)
    assert add_noise(const, 0.0, np.ones(const.shape)).tobytes() == const.tobytes()


def _reference_noise(img: np.ndarray, sigma: float, standard_normal: np.ndarray) -> np.ndarray:
    """The noise step in whole-array float32 expressions with temporaries: the bytes the stage is pinned to."""
    if sigma <= 0:
        return img
    x = img.astype(np.float32) + np.float32(sigma) * standard_normal.astype(np.float32)
    lo, hi = x.min(), x.max()
    if hi > lo:
        x = (x - lo) * (np.float32(255.0) / (hi - lo))
        assert x.dtype == np.float32
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@settings(max_examples=150, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), sigma=st.sampled_from([0.0, 1e-9, 0.7, 3.0, 250.0, 1e6]),
       kind=st.sampled_from(["random", "constant", "smooth"]), seed=st.integers(0, 2**16))
def test_in_place_noise_gives_the_reference_bytes(h, w, sigma, kind, seed):
    rng = np.random.default_rng(seed)
    img = {"random": lambda: rng.integers(0, 256, (h, w), dtype=np.uint8),
           "constant": lambda: np.full((h, w), int(rng.integers(0, 256)), np.uint8),
           "smooth": lambda: smooth_image(h, w)}[kind]()
    z = standard_normal_field(rng, (h, w))
    expected = _reference_noise(img, sigma, z)
    kept = z.copy()
    assert add_noise(img, sigma, z).tobytes() == expected.tobytes()
    assert np.array_equal(z, kept)  # overwrite=False leaves the field alone
    out = add_noise(img, sigma, z, overwrite=True)  # uses z as its work buffer
    assert out.dtype == np.uint8 and out.shape == img.shape and out.tobytes() == expected.tobytes()
    assert not np.shares_memory(out, z)


@pytest.mark.parametrize("fill_mode", ["nearest", "constant"])
def test_augment_image_is_the_warp_then_the_reference_noise(fill_mode):
    """augment_image = the draws in their documented order, warp, then the noise step as first written."""
    cfg = augment_cfg(fill_mode=fill_mode)
    img = smooth_image(56, 56)
    for k in range(1, 6):
        rng = rng_for(3, "faces/a.png", k)
        p = sample_warp(rng, 56, 56, cfg, 1.0)
        sigma = float(rng.uniform(*cfg.noise_sigma))
        expected = _reference_noise(warp(img, p, fill_mode), sigma, standard_normal_field(rng, (56, 56)))
        assert augment_image(img, rng_for(3, "faces/a.png", k), cfg).tobytes() == expected.tobytes()


# --- the stage ---------------------------------------------------------------------------------------------

def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_run_augment_end_to_end(tmp_path):
    params = augment_project(tmp_path, workers=1, copies=2)
    report = run_augment(params)
    out = tmp_path / "data" / "augmented"

    n_good = 3 * len(AUGMENT_CLASSES)  # three readable train images per class
    assert report["train_images"] == n_good + 2
    assert report["originals"] == n_good and report["augmented"] == 2 * n_good
    assert report["skipped"] == {"missing": 1, "unreadable": 1}
    assert report["per_class"] == {name: (9 if name in AUGMENT_CLASSES else 0) for name in params.class_names}
    assert report["strength"] == 1.0 and report["copies"] == 2
    assert json.loads(params.path(params.paths.augment_report).read_text(encoding="utf-8")) == report
    # the DVC metrics: headline numbers only
    assert json.loads(params.path(params.paths.augment_headline).read_text(encoding="utf-8")) == {
        "images": 3 * n_good, "skipped": 2}

    man = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(man.columns) == ["path", "original", "label", "group", "copy"]
    assert len(man) == 3 * n_good
    splits = pd.read_csv(tmp_path / "data" / "splits.csv", dtype=str)
    train_originals = set(splits.loc[splits.split == "train", "path"])
    assert set(man["original"]) <= train_originals  # val/test never augmented
    assert not any("val" in p or "test" in p for p in man["path"])
    for row in man.itertuples(index=False):
        assert (tmp_path / row.path).is_file() and ".tmp-" not in row.path
        stem = Path(row.original).stem
        if row.copy == "0":  # the original is referenced where the crop stage wrote it, not copied
            assert row.path == row.original
        else:
            assert row.path.startswith("data/augmented/train/" + row.label + "/")
            assert Path(row.path).name == f"{stem}__aug{row.copy}.png"
            aug = cv2.imread(str(tmp_path / row.path), cv2.IMREAD_UNCHANGED)
            src = cv2.imread(str(tmp_path / row.original), cv2.IMREAD_GRAYSCALE)
            assert aug.shape == src.shape and aug.dtype == np.uint8
            expected = augment_image(src, rng_for(params.seed, row.original, int(row.copy)), params.augment)
            assert np.array_equal(aug, expected)
    files_on_disk = {p.relative_to(tmp_path).as_posix() for p in out.rglob("*.png")}
    assert files_on_disk == set(man.loc[man["copy"] != "0", "path"])  # only the augmented copies are written
    assert not list(out.parent.glob(".augmented.tmp-*"))


def test_run_augment_identical_for_any_worker_count(tmp_path):
    one = augment_project(tmp_path / "one", workers=1)
    two = augment_project(tmp_path / "two", workers=2)
    r1, r2 = run_augment(one), run_augment(two)
    assert r1 == r2
    d1, d2 = tree_digest(tmp_path / "one" / "data" / "augmented"), tree_digest(tmp_path / "two" / "data" / "augmented")
    assert d1 == d2 and len(d1) == 1 + 2 * 9  # manifest + 2 augmented copies of 9 images


def test_run_augment_strength_zero_copies_are_originals(tmp_path):
    params = augment_project(tmp_path, copies=1, extra={"strength": 0.0})
    run_augment(params)
    man = pd.read_csv(tmp_path / "data" / "augmented" / "manifest.csv", dtype=str)
    for src, grp in man.groupby("original"):
        imgs = [cv2.imread(str(tmp_path / p), cv2.IMREAD_UNCHANGED) for p in grp["path"]]
        assert len(imgs) == 2 and np.array_equal(imgs[0], imgs[1]), src


def test_run_augment_exception_leaves_no_output(tmp_path, monkeypatch):
    params = augment_project(tmp_path, workers=1)
    out = tmp_path / "data" / "augmented"
    real, calls = augment.augment_image, {"n": 0}

    def fail_on_fifth(*args, **kwargs):  # a fault partway through (workers=1 runs in this process)
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(augment, "augment_image", fail_on_fifth)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_augment(params)
    assert calls["n"] == 5
    assert not out.exists()
    assert not list(out.parent.glob(".augmented.tmp-*"))
    assert not params.path(params.paths.augment_report).exists()
    assert not params.path(params.paths.augment_headline).exists()

    # A previous complete output survives a failed re-run untouched.
    monkeypatch.setattr(augment, "augment_image", real)
    run_augment(params)
    before = tree_digest(out)
    calls["n"] = 0
    monkeypatch.setattr(augment, "augment_image", fail_on_fifth)
    with pytest.raises(RuntimeError):
        run_augment(params)
    assert tree_digest(out) == before


def test_run_augment_missing_splits(tmp_path):
    params = augment_project(tmp_path)
    (tmp_path / "data" / "splits.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"splits\.csv.*split"):
        run_augment(params)


def test_run_augment_splits_lacking_columns(tmp_path):
    params = augment_project(tmp_path)
    pd.DataFrame({"path": ["a.png"], "label": ["joy"]}).to_csv(tmp_path / "data" / "splits.csv", index=False)
    with pytest.raises(ValueError, match=r"splits\.csv.*\['group', 'split'\]"):
        run_augment(params)


def test_module_does_not_import_tensorflow():
    import subprocess
    import sys

    code = "import sys, kfer.data.augment; sys.exit(1 if 'tensorflow' in sys.modules or 'keras' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_run_augment_keeps_apart_originals_of_one_name_and_class(tmp_path):
    """Two train crops of one class with the same file name (from two folders) get distinct copy names (the name plus
    a short hash of its path), each copy made from its own original; a name shared across classes needs no hash."""
    params = augment_project(tmp_path, copies=1)
    splits = pd.read_csv(tmp_path / "data" / "splits.csv", dtype=str)
    rng = np.random.default_rng(7)
    extra = []
    for rel, label in (("data/other/joy/p0_joy.png", "joy"), ("data/other/anger/p0_joy.png", "anger")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), cv2.GaussianBlur(rng.integers(0, 256, (24, 24), dtype=np.uint8), (5, 5), 0))
        extra.append({"path": rel, "label": label, "group": "person7", "split": "train"})
    pd.concat([splits, pd.DataFrame(extra)]).to_csv(tmp_path / "data" / "splits.csv", index=False)
    run_augment(params)

    man = pd.read_csv(tmp_path / "data" / "augmented" / "manifest.csv", dtype=str, keep_default_na=False)
    copies = man[man["copy"] == "1"].set_index("original")["path"]
    twins = [Path(copies[src]) for src in ("data/cropped/joy/p0_joy.png", "data/other/joy/p0_joy.png")]
    assert twins[0] != twins[1]
    assert all(p.parent.as_posix() == "data/augmented/train/joy" and p.name.startswith("p0_joy__") for p in twins)
    assert copies["data/other/anger/p0_joy.png"] == "data/augmented/train/anger/p0_joy__aug1.png"
    assert copies["data/cropped/joy/p1_joy.png"] == "data/augmented/train/joy/p1_joy__aug1.png"
    for src, path in copies.items():
        original = cv2.imread(str(tmp_path / src), cv2.IMREAD_GRAYSCALE)
        expected = augment_image(original, rng_for(params.seed, src, 1), params.augment)
        assert np.array_equal(cv2.imread(str(tmp_path / path), cv2.IMREAD_UNCHANGED), expected), src
