"""Report figures: confusion matrix, training curves and an image grid, with Korean labels.

Every figure is a :class:`matplotlib.figure.Figure` drawn by the Agg canvas: no pyplot, so no global figure
state and no GUI backend, whatever ``MPLBACKEND`` says. Fonts are chosen by :func:`korean_font` and applied
with ``matplotlib.rc_context`` around building and saving each figure, so the process-wide rcParams are
never changed.

Hangul font, in order of preference:

1. NanumGothic shipped inside the ``koreanize-matplotlib`` package (found with ``importlib`` *without*
   importing the package, whose import rewrites the global rcParams);
2. a Hangul font already known to matplotlib (NanumGothic, Noto Sans CJK KR, Malgun Gothic, AppleGothic...).

DejaVu Sans comes first in the family list (Latin, digits, arrows) with the Hangul font as matplotlib's
per-glyph fallback for Korean. When no Hangul font
exists, :func:`class_label` drops the Korean part (one warning), so labels never render as missing-glyph boxes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import font_manager, ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

FALLBACK_FAMILY = "DejaVu Sans"  # matplotlib's bundled font: Latin, arrows, math symbols
KOREAN_FAMILIES = (
    "NanumGothic", "NanumBarunGothic", "Noto Sans CJK KR", "Noto Sans KR", "Noto Sans CJK JP",
    "Source Han Sans KR", "Malgun Gothic", "AppleGothic", "Apple SD Gothic Neo", "UnDotum", "Baekmuk Gulim",
)
_PACKAGED_FONT = ("koreanize_matplotlib", "fonts", "NanumGothic.ttf")  # + Bold/ExtraBold/Light beside it
DPI = 120


# --- fonts -------------------------------------------------------------------------------------------
def _packaged_font_file() -> Path | None:
    """NanumGothic.ttf inside koreanize-matplotlib, located without importing the package."""
    try:
        spec = importlib.util.find_spec(_PACKAGED_FONT[0])
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc, *_PACKAGED_FONT[1:])
        if p.is_file():
            return p
    return None


@functools.cache
def korean_font() -> str | None:
    """The family name of a font with Hangul glyphs (registered with matplotlib), or None (warned once)."""
    packaged = _packaged_font_file()
    if packaged is not None:
        try:
            for f in sorted(packaged.parent.glob("*.ttf")):  # all weights, so bold text stays Hangul-capable
                font_manager.fontManager.addfont(str(f))
            return font_manager.FontProperties(fname=str(packaged)).get_name()
        except (OSError, RuntimeError, ValueError) as exc:  # corrupt file: fall through to system fonts
            log.debug("cannot load %s: %s", packaged, exc)
    known = {f.name for f in font_manager.fontManager.ttflist}
    for family in KOREAN_FAMILIES:
        if family in known:
            return family
    log.warning(
        "no font with Hangul glyphs found (pip install koreanize-matplotlib, or install NanumGothic / "
        "Noto Sans CJK): figures show English class names only"
    )
    return None


def has_hangul_font() -> bool:
    return korean_font() is not None


def class_label(name: str, ko: str | None = None) -> str:
    """Display label of a class: "joy 기쁨", or "joy" when there is no Korean name or no Hangul font."""
    return f"{name} {ko}" if ko and has_hangul_font() else name


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """rcParams for one figure: DejaVu Sans first, the Hangul font as per-glyph fallback.

    NanumGothic's own arrow (U+2192) renders as a tiny chevron, and DejaVu has no Hangul; in this order
    Latin, digits and symbols come from DejaVu and each Hangul syllable from the Korean font.
    """
    family = [f for f in (FALLBACK_FAMILY, korean_font()) if f]
    with matplotlib.rc_context({
        "font.family": family,  # explicit families (not "sans-serif"): matplotlib falls back per glyph
        "axes.unicode_minus": False,  # Nanum fonts lack U+2212 MINUS SIGN
        "savefig.dpi": DPI,
    }):
        yield


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas: rendering never touches pyplot or the GUI backend
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    from kfer.files import atomic_file  # a figure appears whole or not at all

    path = Path(path)
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", facecolor="white")
    return path


# --- figures -----------------------------------------------------------------------------------------
def plot_confusion(
    cm_normalized: np.ndarray,
    class_labels: Sequence[str],
    path: str | os.PathLike,
    title: str = "Confusion matrix",
) -> Path:
    """Row-normalized confusion matrix (rows: actual, columns: predicted) with the value in every cell.

    Rows that are all NaN (a class absent from the data) are drawn grey with "–" in the cells.
    """
    cm = np.asarray(cm_normalized, dtype=float)
    n = len(class_labels)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {n} class labels")
    side = max(5.0, 1.0 + 0.85 * n)
    with _style():
        fig = _new_figure(side + 1.2, side)
        ax = fig.add_subplot()
        masked = np.ma.masked_invalid(cm)
        cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#dddddd")
        im = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of actual class")
        fontsize = 10 if n <= 10 else max(5, 10 - (n - 10) // 3)
        for i in range(n):
            for j in range(n):
                v = cm[i, j]
                text = "–" if not np.isfinite(v) else f"{v:.2f}"
                color = "white" if np.isfinite(v) and v > 0.5 else "black"
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize,
                        fontweight="bold" if i == j else "normal")
        ax.set_xticks(range(n), labels=list(class_labels), rotation=40, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), labels=list(class_labels))
        ax.set_xlabel("Predicted 예측" if has_hangul_font() else "Predicted")
        ax.set_ylabel("Actual 실제" if has_hangul_font() else "Actual")
        ax.set_title(title)
        return _save(fig, path)


_HISTORY_PANELS = (
    ("Loss", ("loss", "val_loss"), False),
    ("Accuracy / macro-F1", ("accuracy", "val_accuracy", "macro_f1", "val_macro_f1"), False),
    ("Learning rate", ("lr", "learning_rate"), True),  # Keras 3 logs "learning_rate"
)


def plot_history(history, path: str | os.PathLike, title: str = "Training history") -> Path:
    """Training curves from a per-epoch table (columns epoch, loss, val_loss, accuracy, val_accuracy,
    macro_f1, val_macro_f1, lr or learning_rate; missing columns and empty panels are skipped): loss,
    accuracy/F1 and learning-rate panels side by side."""
    df = history
    x = df["epoch"].to_numpy() if "epoch" in df.columns else np.arange(1, len(df) + 1)
    panels = [(t, [c for c in cols if c in df.columns and df[c].notna().any()], logy)
              for t, cols, logy in _HISTORY_PANELS]
    panels = [p for p in panels if p[1]]
    with _style():
        fig = _new_figure(5.0 * max(1, len(panels)), 4.0)
        if not panels or len(df) == 0:
            ax = fig.add_subplot()
            ax.axis("off")
            ax.text(0.5, 0.5, "no training history", ha="center", va="center", fontsize=14)
        axes = fig.subplots(1, len(panels), squeeze=False)[0] if panels and len(df) else []
        for ax, (panel_title, cols, logy) in zip(axes, panels, strict=False):
            for c in cols:
                y = df[c].to_numpy(dtype=float)
                ax.plot(x, y, marker="o", markersize=3, linestyle="--" if c.startswith("val_") else "-",
                        label=c)
            values = df[cols].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            if logy and finite.size and finite.min() > 0 and finite.max() / finite.min() >= 10:
                ax.set_yscale("log")
                # plain-text ticks: the default "10^{-4}" mathtext needs U+2212, which Hangul fonts lack
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.0e}"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            elif logy:
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.1e}"))
            ax.set_title(panel_title)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        return _save(fig, path)


def image_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    path: str | os.PathLike,
    cols: int = 8,
    title: str | None = None,
    empty_text: str = "no images",
) -> Path:
    """Grayscale images in a grid, each with its caption (may contain Hangul and newlines)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    n = len(images)
    cols = max(1, min(cols, n)) if n else 1
    rows = max(1, math.ceil(n / cols))
    with _style():
        width = max(2.1 * cols, 0.12 * len(title or "")) if n else 5.0  # room for the title
        fig = _new_figure(width, 2.5 * rows + (0.4 if title else 0.0) if n else 2.0)
        if n == 0:
            ax = fig.add_subplot()
            ax.axis("off")
            ax.text(0.5, 0.5, empty_text, ha="center", va="center", fontsize=13)
        else:
            axes = fig.subplots(rows, cols, squeeze=False).ravel()
            for ax in axes:
                ax.axis("off")
            for ax, img, cap in zip(axes, images, captions, strict=False):
                img = np.asarray(img)
                if img.ndim == 3 and img.shape[-1] == 1:
                    img = img[..., 0]
                ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_title(cap, fontsize=8)
        if title:
            fig.suptitle(title)
        return _save(fig, path)


def plot_groups(report: dict, path: str | os.PathLike, title: str = "Accuracy by group") -> Path:
    """One panel per group field of a group table (:mod:`kfer.reporting.groups`): each group's accuracy as a dot
    with its 95% interval as a bar, labelled with its count; groups too small for a claim are listed grey with
    their count and no dot."""
    fields = list(report["fields"].items())
    sizes = [max(1, len(entry["values"])) for _, entry in fields]
    with _style():
        fig = _new_figure(7.0, 0.8 + sum(0.38 * n + 0.7 for n in sizes))
        axes = fig.subplots(len(fields), 1, squeeze=False, height_ratios=[n + 1.5 for n in sizes]).ravel()
        for ax, (field, entry) in zip(axes, fields, strict=True):
            values = list(entry["values"].items())
            ys = np.arange(len(values))[::-1]
            for y, (value, m) in zip(ys, values, strict=True):
                if m["claim"]:
                    acc = m["accuracy"]
                    ax.errorbar(acc, y, xerr=[[acc - m["accuracy_low"]], [m["accuracy_high"] - acc]], fmt="o",
                                color="#1f77b4", ecolor="#1f77b4", capsize=3)
                    ax.text(1.02, y, f"{acc:.2f}", va="center", fontsize=8, transform=ax.get_yaxis_transform())
                else:
                    ax.text(0.02, y, "too few faces: no claim", va="center", color="#888888", fontsize=8,
                            transform=ax.get_yaxis_transform())
            ax.set_yticks(ys, labels=[f"{v} (n={m['n']})" for v, m in values])
            for label, (_, m) in zip(ax.get_yticklabels(), values, strict=True):
                if not m["claim"]:
                    label.set_color("#888888")
            ax.set_xlim(0.0, 1.0)
            ax.set_ylim(-0.7, len(values) - 0.3)
            ax.grid(axis="x", alpha=0.3)
            gap = entry.get("largest_gap")
            ax.set_title(f"{field}" + (f": largest gap {gap['gap']:.2f} ({gap['best']} vs {gap['worst']}"
                                       f"{', intervals overlap' if gap['intervals_overlap'] else ''})"
                                       if gap else ""), fontsize=10, loc="left")
        axes[-1].set_xlabel(f"accuracy, {report.get('interval', 'wilson 95%')} interval")
        fig.suptitle(title)
        return _save(fig, path)


def plot_reliability(calibration: dict, path: str | os.PathLike) -> Path:
    """Reliability diagrams (:mod:`kfer.serving.calibration`): per split, the accuracy of each confidence bin
    against its mean confidence, before and after temperature scaling, the diagonal being perfect calibration."""
    splits = list(calibration["splits"].items())
    with _style():
        fig = _new_figure(4.2 * len(splits), 4.4)
        axes = fig.subplots(1, len(splits), squeeze=False).ravel()
        for ax, (name, rep) in zip(axes, splits, strict=True):
            ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1)
            for key, colour, label in (("before", "#d62728", "as trained"), ("after", "#1f77b4", "calibrated")):
                bins = [b for b in rep[f"bins_{key}"] if b["n"]]
                ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color=colour,
                        markersize=4, label=f"{label}: ECE {rep[f'ece_{key}']:.3f}")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence (top probability)")
            ax.set_ylabel("accuracy")
            ax.set_title(f"{name} (n={rep['n']})", fontsize=10)
            ax.legend(loc="upper left", fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle(f"Reliability, temperature {calibration['temperature']:.2f}")
        return _save(fig, path)


def plot_behaviour(report: dict, path: str | os.PathLike, title: str = "Behaviour checks") -> Path:
    """Per behaviour check (:mod:`kfer.reporting.behaviour`): the share of faces whose answer stayed the same, and
    the accuracy under the change beside the accuracy on the faces as they are (a dashed line)."""
    names = list(report["checks"])
    ys = np.arange(len(names))[::-1]
    with _style():
        fig = _new_figure(8.0, 1.2 + 0.35 * len(names))
        same_ax, acc_ax = fig.subplots(1, 2, sharey=True)
        same = [report["checks"][n]["same_prediction"] for n in names]
        acc = [report["checks"][n]["accuracy"] for n in names]
        same_ax.barh(ys, same, color="#1f77b4")
        acc_ax.barh(ys, acc, color="#ff7f0e")
        acc_ax.axvline(report["accuracy"], color="#333333", linestyle="--", linewidth=1)
        for ax, values, heading in ((same_ax, same, "answer unchanged"),
                                    (acc_ax, acc, f"accuracy (unchanged faces: {report['accuracy']:.3f})")):
            for y, v in zip(ys, values, strict=True):
                ax.text(min(v, 0.9) + 0.01, y, f"{v:.3f}", va="center", fontsize=8)
            ax.set_xlim(0.0, 1.0)
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(heading, fontsize=10, loc="left")
        same_ax.set_yticks(ys, labels=names)
        fig.suptitle(title)
        return _save(fig, path)


def plot_timeline(
    tracks: dict[int, tuple[np.ndarray, np.ndarray]],
    class_labels: Sequence[str],
    path: str | os.PathLike,
    title: str = "Emotions over time",
    step_s: float | None = None,
    max_panels: int = 6,
) -> Path:
    """Each tracked face's class probabilities over time (a video, :mod:`kfer.serving.video`): one panel per face id,
    one line per class (``class_labels``, e.g. "joy 기쁨"), the shared legend once.

    ``tracks``: id -> (times in s ``(n,)``, probabilities ``(n, n_classes)``). Lines break where a face was
    not seen for more than 1.5 ``step_s`` (the sampling interval). At most ``max_panels`` faces are drawn, those
    seen on the most frames; the title says how many were left out.
    """
    order = sorted(tracks, key=lambda k: (-len(tracks[k][0]), k))
    shown = sorted(order[:max_panels])
    omitted = len(order) - len(shown)
    colors = matplotlib.colormaps["tab10"].colors
    with _style():
        fig = _new_figure(9.0, 1.0 + 1.9 * max(1, len(shown)))
        if not shown:
            ax = fig.add_subplot()
            ax.axis("off")
            ax.text(0.5, 0.5, "no face found", ha="center", va="center", fontsize=14)
        axes = fig.subplots(len(shown), 1, squeeze=False, sharex=True)[:, 0] if shown else []
        for ax, tid in zip(axes, shown, strict=True):
            t, p = (np.asarray(a, dtype=float) for a in tracks[tid])
            p = p.reshape(len(t), -1)
            if step_s and len(t) > 1:  # NaN rows in the gaps: matplotlib breaks the lines there
                gap = np.flatnonzero(np.diff(t) > 1.5 * step_s) + 1
                t = np.insert(t, gap, np.nan)
                p = np.insert(p, gap, np.nan, axis=0)
            for k, label in enumerate(class_labels):
                ax.plot(t, p[:, k], color=colors[k % len(colors)], linewidth=1.4, marker="o", markersize=2,
                        label=label)
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel("p")
            ax.set_title(f"face #{tid} ({np.isfinite(t).sum()} frames)", fontsize=10, loc="left")
            ax.grid(True, alpha=0.3)
        if shown:
            axes[-1].set_xlabel("time (s)")
            handles, labels = axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(class_labels)), fontsize=8)
        fig.suptitle(title + (f" — {omitted} more face(s) not shown" if omitted else ""))
        return _save(fig, path)
