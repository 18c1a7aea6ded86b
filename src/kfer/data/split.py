"""The ``split`` stage: assign every cropped image to train/val/test, keeping each person in one split.

Algorithm
---------
:func:`assign_splits` is a seeded greedy assignment followed by a local search, written here rather than
taken from scikit-learn. ``StratifiedGroupKFold`` builds *k equal* folds: ratios such as 0.7/0.15/0.15 are
only reachable by merging 20 folds 14/3/3, arbitrary ratios (0.123, ...) not at all, a ratio of 0 has no
meaning, and its shuffling only reorders groups whose label distributions have equal spread. What we want
is easy to state directly:

* targets: for every split ``s`` with ratio ``r_s > 0`` and every label ``l`` with ``n_l`` images,
  ``t[s, l] = r_s * n_l``, and ``T[s] = r_s * N`` overall (ratios are normalized to sum to 1);
* cost: a Pearson chi-square between the achieved counts and the targets,
  ``J = sum_{s,l} (x[s,l] - t[s,l])**2 / t[s,l] + sum_s (X[s] - T[s])**2 / T[s]``. Dividing by the target
  makes it a *relative* error, so a 0.15 split and every rare class count as much as train and the
  common classes, and putting a big person into a small split is expensive.

1. Canonicalize: groups sorted by name, labels sorted; so input row order never matters.
2. Order: groups shuffled with ``np.random.default_rng(seed)``, then stably sorted by size, largest first
   (big groups are hard to place late; ties keep their seeded random order).
3. Greedy: each group goes to the non-zero split where adding it increases ``J`` least (ties: the first
   split in ``ratios`` order). Once the groups left are no more than the still-empty non-zero splits, they
   are forced into those, so every non-zero split gets at least one group whenever that is possible.
4. Local search: passes over the groups in the same order, moving a group to another split whenever that
   lowers ``J`` (never emptying a split) and, with at most ``SWAP_MAX_GROUPS`` groups, swapping it with the
   group in another split that lowers ``J`` most, until a pass changes nothing (at most ``MAX_PASSES``).
   Swaps matter with few persons (30 persons with uneven images per class: worst per-class deviation
   from the ratio drops from about 6 to about 3 points); with many groups single moves already balance
   to a fraction of a percent, and swaps would cost O(groups^2).

Everything is exact integer/float arithmetic in a fixed order, so the result is a pure function of the
multiset of (label, group) pairs, the ratios and the seed. With fewer groups than non-zero splits the
groups (largest first) fill the splits in ``ratios`` order (train, val, test) one each, and a warning is
logged; the later splits stay empty.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from kfer.catalog import SPLITS_COLUMNS, Catalog
from kfer.config import Params
from kfer.data.policy import OPINION_COLUMNS, hard_labels, low_agreement

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "label", "group", "status")
OUTPUT_COLUMNS = list(SPLITS_COLUMNS)
#: the crop manifest column holding the raw file's path since ``data.sources`` exists; a manifest with it
#: names the dataset in ``source``, one without it is older and its ``source`` column is the raw path
RAW_COLUMN = "raw"
MAX_PASSES = 20
SWAP_MAX_GROUPS = 1000  # pair swaps cost O(groups^2) per pass; above this, moves only
_EPS = 1e-9


# --- assignment ---------------------------------------------------------------------------------------
def _check_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    if not ratios:
        raise ValueError("ratios must name at least one split")
    out: dict[str, float] = {}
    for name, r in ratios.items():
        r = float(r)
        if not math.isfinite(r) or r < 0:
            raise ValueError(f"split ratio for {name!r} must be a finite number >= 0, got {r}")
        out[str(name)] = r
    total = sum(out.values())
    if total <= 0:
        raise ValueError(f"at least one split ratio must be > 0, got {dict(ratios)}")
    return {k: v / total for k, v in out.items()}


def assign_splits(
    labels: Sequence[str], groups: Sequence[str], ratios: dict[str, float], seed: int
) -> list[str]:
    """One split name (a key of ``ratios``) per item; every group lands in exactly one split.

    Splits get close to their ratio of the images overall and per label; see the module docstring.
    Deterministic for the same inputs and seed, and independent of the order of the items.
    """
    labels = [str(x) for x in labels]
    groups = [str(g) for g in groups]
    if len(labels) != len(groups):
        raise ValueError(f"labels and groups differ in length: {len(labels)} != {len(groups)}")
    norm = _check_ratios(ratios)
    if not labels:
        return []
    split_names = list(norm)
    active = [i for i, s in enumerate(split_names) if norm[s] > 0]  # indices into split_names

    # 1. canonical order: groups by name, labels by name
    group_names, g_idx = np.unique(np.array(groups, dtype=object), return_inverse=True)
    label_names, l_idx = np.unique(np.array(labels, dtype=object), return_inverse=True)
    n_groups, n_labels = len(group_names), len(label_names)
    counts = np.zeros((n_groups, n_labels), dtype=np.int64)
    np.add.at(counts, (g_idx, l_idx), 1)
    sizes = counts.sum(axis=1)

    # 2. seeded shuffle, then largest first (stable: ties keep the random order)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_groups)
    order = perm[np.argsort(-sizes[perm], kind="stable")]

    where = np.full(n_groups, -1, dtype=np.int64)  # index into `active`
    if n_groups < len(active):
        log.warning(
            "only %d group(s) for %d non-zero splits: one group each to %s; left empty: %s",
            n_groups,
            len(active),
            ", ".join(split_names[active[k]] for k in range(n_groups)),
            ", ".join(split_names[active[k]] for k in range(n_groups, len(active))),
        )
        for k, g in enumerate(order):
            where[g] = k
        return [split_names[active[where[g]]] for g in g_idx]

    # targets; the overall count is handled as one more "label" column, so J is one sum over (K, L+1)
    r = np.array([norm[split_names[i]] for i in active])  # (K,)
    cnt = np.concatenate([counts, sizes[:, None]], axis=1).astype(float)  # (G, L+1)
    t = r[:, None] * cnt.sum(axis=0)[None, :]  # (K, L+1), all > 0
    e = -t.copy()  # achieved minus target, per split and column
    n_in = np.zeros(len(active), dtype=np.int64)  # groups per split

    def place(g: int, k: int, sign: int = 1) -> None:
        e[k] += sign * cnt[g]
        n_in[k] += sign

    # 3. greedy: the split where adding the group raises J least
    for pos, g in enumerate(order):
        c = cnt[g]
        delta = ((2 * c * e + c * c) / t).sum(axis=1)
        empty = np.flatnonzero(n_in == 0)
        if len(empty) and n_groups - pos <= len(empty):
            k = int(empty[np.argmin(delta[empty])])
        else:
            k = int(np.argmin(delta))
        where[g] = k
        place(g, k)

    # 4. local search: moves of one group, then (for moderate sizes) swaps of two, while J drops
    if len(active) > 1:
        for _ in range(MAX_PASSES):
            changed = False
            for g in order:
                a = int(where[g])
                if n_in[a] <= 1:
                    continue
                c = cnt[g]
                gain = ((2 * c * e + c * c) / t).sum(axis=1) + ((-2 * c * e[a] + c * c) / t[a]).sum()
                gain[a] = 0.0
                b = int(np.argmin(gain))
                if gain[b] < -_EPS:
                    place(g, a, -1)
                    place(g, b)
                    where[g] = b
                    changed = True
            if n_groups <= SWAP_MAX_GROUPS:
                for g in order:
                    a = int(where[g])
                    d = cnt - cnt[g]  # (G, L+1): what a swap with each h brings into a
                    b = where  # each h's split
                    into_a = ((2 * d * e[a] + d * d) / t[a]).sum(axis=1)
                    out_of_b = ((-2 * d * e[b] + d * d) / t[b]).sum(axis=1)
                    gain = into_a + out_of_b
                    gain[b == a] = 0.0
                    h = int(np.argmin(gain))
                    if gain[h] < -_EPS:
                        bh = int(where[h])
                        place(g, a, -1)
                        place(h, bh, -1)
                        place(g, bh)
                        place(h, a)
                        where[g], where[h] = bh, a
                        changed = True
            if not changed:
                break

    return [split_names[active[where[g]]] for g in g_idx]


# --- checks -------------------------------------------------------------------------------------------
def split_warnings(
    labels: Sequence[str],
    groups: Sequence[str],
    splits: Sequence[str],
    min_groups: int,
    *,
    ratios: Mapping[str, float] | None = None,
    classes: Sequence[str] | None = None,
) -> list[str]:
    """Messages for every (class, split) whose number of distinct groups (persons) is below ``min_groups``.

    Splits checked: those with ratio > 0 when ``ratios`` is given (an empty one included), else those that
    occur in ``splits``. Classes checked: ``classes`` when given (plus any other label present), else the
    labels present.
    """
    if not (len(labels) == len(groups) == len(splits)):
        raise ValueError("labels, groups and splits must have the same length")
    if min_groups <= 0:
        return []
    if ratios is not None:
        split_names = [s for s, r in ratios.items() if r > 0]
    else:
        split_names = list(dict.fromkeys(sorted(map(str, splits))))
    present = sorted(set(map(str, labels)))
    class_names = list(classes) + [c for c in present if c not in set(classes)] if classes else present
    persons: dict[tuple[str, str], set[str]] = {}
    for lab, grp, spl in zip(labels, groups, splits, strict=True):
        persons.setdefault((str(lab), str(spl)), set()).add(str(grp))
    out = []
    for cls in class_names:
        for spl in split_names:
            n = len(persons.get((cls, spl), ()))
            if n < min_groups:
                out.append(f"class {cls!r} has {n} person(s) in {spl} (< {min_groups})")
    return out


# --- the label policy ----------------------------------------------------------------------------------
def apply_policy(params: Params, out: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, dict[str, int]]]:
    """The split table with ``label`` = the hard label of ``data.label_policy``, less (counted by reason and by
    the crop stage's label): rows without such a label (``no_label``, e.g. no uploader label under ``uploader``)
    and train rows below ``data.min_agreement`` (``low_agreement``; val and test keep every photo, so that
    policies are judged on the same faces). The persons' splits were drawn before, on the crop stage's label:
    every policy gets the same persons in each split."""
    cfg = params.data
    label = hard_labels(out, cfg.label_policy)
    no_label = (label == "").to_numpy()
    low = low_agreement(out, cfg.min_agreement) & (out["split"] == "train").to_numpy() & ~no_label
    dropped = {reason: dict(sorted(Counter(out["label"][mask]).items()))
               for reason, mask in (("no_label", no_label), ("low_agreement", low)) if mask.any()}
    for reason, per_class in dropped.items():
        log.warning("split: %d image(s) dropped (%s under data.label_policy %s, data.min_agreement %d): %s",
                    sum(per_class.values()), reason, cfg.label_policy, cfg.min_agreement, per_class)
    out = out.assign(label=label)[~(no_label | low)].reset_index(drop=True)
    return out, dropped


# --- the DVC stage ------------------------------------------------------------------------------------
def read_manifest(params: Params) -> pd.DataFrame:
    """The crop manifest's usable rows (status == "ok"), all columns as strings, sorted by path.

    Column ``source`` is the dataset name (``data.sources``; "" when not configured). A manifest without a
    ``raw`` column predates sources: its ``source`` column, if any, held the raw file path and becomes "".
    """
    cat = Catalog(params)
    path = cat.crop_manifest
    df = cat.read("crop_manifest", REQUIRED_COLUMNS, also=(RAW_COLUMN, "source", "groups", *OPINION_COLUMNS))
    if RAW_COLUMN not in df.columns or "source" not in df.columns:
        df = df.assign(source="")
    if "label_uploader" not in df.columns:  # a manifest from before the opinions: one label, no votes
        df = df.assign(label_uploader=df["label"], label_majority="", votes="", agreement="")
    if "groups" not in df.columns:  # a manifest from before the group fields: none
        df = df.assign(groups="")
    df = df[df["status"] == "ok"]
    if df.empty:
        raise ValueError(f"{path} has no rows with status 'ok': nothing to split")
    dup = df["path"][df["path"].duplicated()]
    if len(dup):
        raise ValueError(f"{path} lists {len(dup)} path(s) twice, e.g. {dup.iloc[0]!r}")
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def run_split(params: Params) -> dict[str, Any]:
    """Read the crop manifest, assign splits, write the splits CSV and the report; return the report."""
    df = read_manifest(params)
    ratios = params.split.ratios
    labels, groups = df["label"].tolist(), df["group"].tolist()
    # an image without a group is its own person (the "\x00" prefix keeps these apart from real names)
    keys = [g if g else f"\x00{p}" for g, p in zip(groups, df["path"], strict=True)]
    # sources with data.sources.<name>.split = train go to train whole, heldout ones to val and test; the others
    # share the ratios
    train_only = {name for name, src in params.data.sources.items() if src.split == "train"}
    fixed = df["source"].isin(train_only).to_numpy()
    if "train" not in ratios and fixed.any():
        raise ValueError(f"data.sources {sorted(train_only)} have split: train, but split has no train ratio")
    heldout_sources = {name for name, src in params.data.sources.items() if src.split == "heldout"}
    heldout = df["source"].isin(heldout_sources).to_numpy()
    held_ratios = {s: ratios[s] for s in ("val", "test") if ratios.get(s, 0) > 0}
    if heldout.any() and not held_ratios:
        raise ValueError(f"data.sources {sorted(heldout_sources)} have split: heldout, but split has no val or test "
                         "ratio")
    rest = np.flatnonzero(~fixed & ~heldout)
    splits = np.full(len(df), "train", dtype=object)
    splits[rest] = assign_splits([labels[i] for i in rest], [keys[i] for i in rest], ratios, params.seed)
    held = np.flatnonzero(heldout)
    if len(held):  # persons of a held-out source: val and test only, in the ratio split.val : split.test
        splits[held] = assign_splits([labels[i] for i in held], [keys[i] for i in held], held_ratios, params.seed)
    out = pd.DataFrame({"path": df["path"], "label": labels, "group": groups, "source": df["source"],
                        "split": splits, **{c: df[c] for c in OPINION_COLUMNS}, "groups": df["groups"]},
                       columns=OUTPUT_COLUMNS)
    out, dropped = apply_policy(params, out)
    Catalog(params).write("splits", out)
    labels, groups, splits = out["label"].tolist(), out["group"].tolist(), out["split"].to_numpy()
    keys = [g if g else f"\x00{p}" for g, p in zip(groups, out["path"], strict=True)]

    warnings = []
    n_ungrouped = groups.count("")
    if n_ungrouped:
        warnings.append(
            f"{n_ungrouped} image(s) have no group: each is treated as its own person, "
            "so one person's images may land in several splits (check params data.group)"
        )
    warnings += split_warnings(
        labels, keys, splits, params.split.min_groups_per_class, ratios=ratios, classes=params.class_names
    )
    for w in warnings:
        log.warning(w)

    known = params.class_names  # every class, in model order (0 when absent), then unexpected labels
    label_order = known + sorted(set(labels) - set(known))
    in_split = {s: out["split"] == s for s in ratios}
    report = {
        "seed": params.seed,
        "ratios": ratios,
        "counts": {s: int(in_split[s].sum()) for s in ratios},
        "per_class": {s: {c: int((in_split[s] & (out["label"] == c)).sum()) for c in label_order} for s in ratios},
        "groups": {s: len(set(k for k, m in zip(keys, in_split[s], strict=True) if m)) for s in ratios},
    }
    sources = sorted(set(out["source"]))
    if sources != [""]:  # only when data.sources is configured
        report["per_source"] = {
            s: {src: int((in_split[s] & (out["source"] == src)).sum()) for src in sources} for s in ratios
        }
    report.update(label_policy=params.data.label_policy, min_agreement=params.data.min_agreement, dropped=dropped)
    report["warnings"] = warnings
    Catalog(params).write_json("split_report", report)
    Catalog(params).write_json("split_headline",  # DVC metrics: images split, persons
               {"images": sum(report["counts"].values()), "persons": sum(report["groups"].values())})
    n = len(out)
    counts, persons = report["counts"], report["groups"]
    log.info(
        "split: %d images, %d persons -> %s; label policy %s, %d dropped; %d warning(s)",
        n,
        len(set(keys)),
        ", ".join(f"{s} {counts[s]} ({counts[s] / n:.1%}, {persons[s]} persons)" for s in ratios),
        params.data.label_policy, sum(sum(v.values()) for v in dropped.values()),
        len(warnings),
    )
    return report
