"""Temperature scaling and ECE: argmax kept, a known temperature recovered, ECE against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from kfer.serving import calibration


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_apply_temperature_is_softmax_of_scaled_logits_and_keeps_the_argmax():
    z = np.random.default_rng(0).normal(0, 3, (200, 6))
    p = softmax(z)
    np.testing.assert_array_equal(calibration.apply_temperature(p, 1.0), p)
    for t in (0.5, 2.0, 7.0):
        q = calibration.apply_temperature(p, t)
        np.testing.assert_allclose(q, softmax(z / t), atol=1e-9)
        np.testing.assert_array_equal(q.argmax(axis=1), p.argmax(axis=1))
    assert calibration.apply_temperature(p, 3.0).max(axis=1).mean() < p.max(axis=1).mean()  # T > 1 softens


def test_fit_recovers_the_temperature_of_an_overconfident_model():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 4, (6000, 5))
    true = softmax(z / 2.5)  # the world: labels drawn from softmax(z / 2.5)
    y = np.array([rng.choice(5, p=row) for row in true])
    p = softmax(z)  # the model: softmax(z), too sure of itself
    t = calibration.fit_temperature(p, y)
    assert t == pytest.approx(2.5, rel=0.08)
    before, after = calibration.reliability(p, y)["ece"], calibration.reliability(
        calibration.apply_temperature(p, t), y)["ece"]
    assert after < 0.03 < before
    assert calibration.nll(calibration.apply_temperature(p, t), y) < calibration.nll(p, y)
    with pytest.raises(ValueError, match="no faces"):
        calibration.fit_temperature(p[:0], y[:0])


def test_ece_and_bins_by_hand():
    # 4 faces: two at confidence 0.9 (one right), two at 0.6 (both right); 10 bins
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    r = calibration.reliability(p, y, bins=10)
    # bin (0.8, 0.9]: confidence 0.9, accuracy 0.5 -> |0.4|; bin (0.5, 0.6]: 0.6 vs 1.0 -> |0.4|
    assert r["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert r["n"] == 4 and sum(b["n"] for b in r["bins"]) == 4 and len(r["bins"]) == 10
    full = [b for b in r["bins"] if b["n"]]
    assert [(b["low"], b["n"], b["confidence"], b["accuracy"]) for b in full] == [
        (pytest.approx(0.5), 2, pytest.approx(0.6), 1.0), (pytest.approx(0.8), 2, pytest.approx(0.9), 0.5)]
    rep = calibration.report(p, y, 2.0)
    assert rep["ece_before"] == pytest.approx(r["ece"]) and rep["n"] == 4
    assert set(rep) == {"n", "ece_before", "ece_after", "nll_before", "nll_after", "bins_before", "bins_after"}
