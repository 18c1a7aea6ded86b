"""Behaviour checks: each change does what its name says, and the report counts kept answers and accuracy right
(a predictor whose answer depends on which half of the face is brighter, so a mirror turns every answer)."""

from __future__ import annotations

import numpy as np
import pytest

from kfer.files import write_png
from kfer.reporting import behaviour

S = 32


def ramp() -> np.ndarray:
    """A face darker on the left than on the right, mid-grey on average, with a bright spot on the right (edges a
    blur softens)."""
    face = np.tile(np.linspace(60, 190, S).round().astype(np.uint8), (S, 1))
    face[10:16, 20:26] = 230
    return face


def test_each_check_changes_the_face_as_named():
    face = ramp()
    got = {name: check(face) for name, check in behaviour.CHECKS.items()}
    for name, out in got.items():
        assert out.shape == face.shape and out.dtype == np.uint8, name
        assert not np.array_equal(out, face), f"{name} left the face as it was"
    assert np.array_equal(got["mirror"], face[:, ::-1])
    assert got["brighter"].mean() == pytest.approx(np.minimum(1.2 * face, 255).mean(), abs=0.5)  # clipped at 255
    assert got["darker"].mean() == pytest.approx(0.8 * face.mean(), abs=0.5)
    assert got["contrast_up"].std() == pytest.approx(1.2 * face.std(), rel=0.02)
    assert got["contrast_down"].std() == pytest.approx(0.8 * face.std(), rel=0.02)
    assert got["contrast_up"].mean() == pytest.approx(face.mean(), abs=0.5)  # contrast keeps the mean
    # rotation turns the columns' ramp: a column is no longer constant
    assert got["rotate_left"][:, S // 2].std() > 1 and got["rotate_right"][:, S // 2].std() > 1
    assert not np.array_equal(got["rotate_left"], got["rotate_right"])
    noisy = np.random.default_rng(0).integers(0, 256, (S, S), dtype=np.uint8)
    assert behaviour.CHECKS["blur"](noisy).std() < 0.8 * noisy.std()  # a blur smooths
    assert np.abs(got["jpeg30"].astype(int) - face).max() <= 40  # lossy, not another picture


def left_brighter(x: np.ndarray) -> np.ndarray:
    """Class 0 when the left half is brighter, else class 1 (as probabilities)."""
    left, right = x[:, :, : S // 2, 0].mean(axis=(1, 2)), x[:, :, S // 2 :, 0].mean(axis=(1, 2))
    p0 = (left > right).astype(np.float32)
    return np.stack([p0, 1 - p0], axis=1)


def test_report_counts_kept_answers_and_accuracy(tmp_path):
    faces = [ramp(), ramp()[:, ::-1], ramp(), ramp()[:, ::-1], ramp()]  # classes 1, 0, 1, 0, 1
    paths = []
    for i, face in enumerate(faces):
        paths.append(tmp_path / f"{i}.png")
        write_png(paths[-1], face)
    y_true = np.array([1, 0, 1, 1, 1])  # the 4th is labelled wrong: the model is right 4 of 5 times
    base = left_brighter(np.stack(faces)[..., None].astype(np.float32)).argmax(axis=1)  # the faces as they are
    report = behaviour.run_checks(left_brighter, paths, y_true, base, S, batch_size=2)  # batches of 2, 2 and 1
    assert report["n"] == 5 and report["accuracy"] == pytest.approx(0.8)
    mirror = report["checks"]["mirror"]
    assert mirror == {"same_prediction": 0.0, "accuracy": pytest.approx(0.2), "accuracy_change": pytest.approx(-0.6)}
    for name in ("brighter", "darker", "contrast_up", "contrast_down"):  # which half is brighter stays
        assert report["checks"][name]["same_prediction"] == 1.0, name
        assert report["checks"][name]["accuracy_change"] == pytest.approx(0.0), name
    flat = behaviour.flat(report)
    assert flat["behaviour_mirror_same"] == 0.0 and flat["behaviour_min_same"] == 0.0
    assert flat["behaviour_darker_accuracy"] == pytest.approx(0.8)
    line = behaviour.describe(flat)
    assert line.startswith("mirror 0.0% same (acc 0.200), brighter 100.0% same (acc 0.800)")
    assert behaviour.describe({"best_val_macro_f1": 0.5}) == ""  # a run without checks

    behaviour.write_files(report, tmp_path, "checks")
    assert (tmp_path / "behaviour.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "behaviour.csv").read_text(encoding="utf-8").splitlines()
    assert table[0] == "check,same_prediction,accuracy,accuracy_change" and len(table) == 1 + len(behaviour.CHECKS)


def test_a_wrong_sized_face_is_a_clear_error(tmp_path):
    write_png(tmp_path / "big.png", np.zeros((S * 2, S * 2), np.uint8))
    with pytest.raises(ValueError, match="big.png is 64x64, expected 32x32"):
        behaviour.run_checks(left_brighter, [tmp_path / "big.png"], np.array([0]), np.array([0]), S, batch_size=4)


def test_sample_is_seeded_and_sorted():
    assert behaviour.sample(5, 0, 1).tolist() == [0, 1, 2, 3, 4]
    assert behaviour.sample(5, 9, 1).tolist() == [0, 1, 2, 3, 4]
    a = behaviour.sample(1000, 50, 7)
    assert len(a) == 50 and a.tolist() == sorted(a.tolist()) and np.array_equal(a, behaviour.sample(1000, 50, 7))
    assert not np.array_equal(a, behaviour.sample(1000, 50, 8))
