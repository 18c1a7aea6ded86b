"""Calibrated probabilities: temperature scaling (Guo et al., ICML 2017, "On calibration of modern neural
networks") and the expected calibration error. numpy only: the served model applies it without TensorFlow.

The model's output is a probability vector ``p`` (a softmax, or the mean of two under flip TTA); scaling works on
its logarithm, ``p_T ∝ p^(1/T)`` (for a plain softmax exactly ``softmax(logits / T)``). One scalar ``T > 0``:
the order of the classes, and so the argmax and the accuracy, never changes. ``T`` is fitted on the val split by
the train stage (the T of least negative log-likelihood, a golden-section search on log T over [0.05, 20]) and goes
into the served model's config; ``T = 1`` leaves the probabilities as they are.

ECE: the faces in ``bins`` equal-width bins of their top probability; the mean over bins, weighted by their share
of faces, of |accuracy − mean top probability| in the bin.
"""

from __future__ import annotations

import math

import numpy as np

T_RANGE = (0.05, 20.0)
BINS = 15
EPS = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``probs`` (N, C) rescaled by ``temperature``: rows ∝ probs^(1/T), float64; T = 1 returns them as they are."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or p.size == 0:
        return p
    z = np.log(np.clip(p, EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes ``y`` (class indices)."""
    p = np.asarray(probs, dtype=np.float64)[np.arange(len(y)), y]
    return float(-np.log(np.clip(p, EPS, 1.0)).mean())


def fit_temperature(probs: np.ndarray, y: np.ndarray, iterations: int = 60) -> float:
    """The temperature in :data:`T_RANGE` that minimizes the NLL of ``probs`` scaled by it against ``y``
    (golden-section search on log T: the NLL is convex in 1/T). Raises on an empty set."""
    if len(y) == 0:
        raise ValueError("no faces to fit a temperature on")
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2

    def loss(log_t: float) -> float:
        return nll(apply_temperature(probs, math.exp(log_t)), y)

    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return float(math.exp((lo + hi) / 2))


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> dict:
    """``{"ece", "n", "bins": [{"low", "high", "n", "confidence", "accuracy"}]}`` of ``probs`` against ``y``
    (empty bins listed with n 0)."""
    p = np.asarray(probs, dtype=np.float64)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    right = pred == np.asarray(y)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    out, ece = [], 0.0
    for k in range(bins):
        m = which == k
        n = int(m.sum())
        c = float(conf[m].mean()) if n else None
        a = float(right[m].mean()) if n else None
        if n:
            ece += n / len(conf) * abs(a - c)
        out.append({"low": float(edges[k]), "high": float(edges[k + 1]), "n": n, "confidence": c, "accuracy": a})
    return {"ece": float(ece), "n": int(len(conf)), "bins": out}


def report(probs: np.ndarray, y: np.ndarray, temperature: float) -> dict:
    """Before and after: ``{"n", "ece_before", "ece_after", "nll_before", "nll_after", "bins_before",
    "bins_after"}``."""
    after = apply_temperature(probs, temperature)
    before_r, after_r = reliability(probs, y), reliability(after, y)
    return {"n": before_r["n"], "ece_before": before_r["ece"], "ece_after": after_r["ece"],
            "nll_before": nll(probs, y), "nll_after": nll(after, y),
            "bins_before": before_r["bins"], "bins_after": after_r["bins"]}
