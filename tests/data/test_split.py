"""Tests for kfer.data.split: group-disjoint, stratified, deterministic splits and the DVC stage."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kfer.catalog import SPLITS_COLUMNS
from kfer.config import load_params
from kfer.data.split import assign_splits, run_split, split_warnings

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
R = {"train": 0.7, "val": 0.15, "test": 0.15}
CLASSES = ["joy", "embarrassment", "anger", "anxiety", "hurt", "sadness", "neutral"]


# --- strategies ---------------------------------------------------------------------------------------
@st.composite
def datasets(draw, max_groups: int = 25):
    """(labels, groups): random persons with random numbers of images and random labels."""
    names = draw(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=max_groups, unique=True))
    labels, groups = [], []
    for g in names:
        items = draw(st.lists(st.sampled_from(["joy", "hurt", "anger", "sadness"]), min_size=1, max_size=12))
        labels += items
        groups += [g] * len(items)
    return labels, groups


@st.composite
def ratio_dicts(draw):
    """Three ratios summing to 1, some possibly exactly 0."""
    raw = [draw(st.one_of(st.just(0.0), st.floats(0.01, 1.0))) for _ in range(3)]
    if sum(raw) == 0:
        raw[0] = 1.0
    total = sum(raw)
    return dict(zip(["train", "val", "test"], [x / total for x in raw], strict=True))


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _group_splits(groups, splits) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for g, s in zip(groups, splits, strict=True):
        out.setdefault(g, set()).add(s)
    return out


def _max_dev(labels, splits, ratios):
    """Largest |share - ratio| over splits overall, and over (split, label)."""
    labels, splits = np.asarray(labels), np.asarray(splits)
    overall = max(abs(float(np.mean(splits == s)) - r) for s, r in ratios.items())
    per_class = max(
        abs(float(np.mean(splits[labels == lab] == s)) - r)
        for s, r in ratios.items()
        for lab in np.unique(labels)
    )
    return overall, per_class


# --- assign_splits: properties ------------------------------------------------------------------------
@FAST
@given(datasets(), ratio_dicts(), st.integers(0, 2**32 - 1))
def test_groups_never_cross_splits_and_zero_ratio_is_empty(data, ratios, seed):
    labels, groups = data
    splits = assign_splits(labels, groups, ratios, seed)
    assert len(splits) == len(labels)
    assert set(splits) <= {s for s, r in ratios.items() if r > 0}
    assert all(len(s) == 1 for s in _group_splits(groups, splits).values())
    n_groups, active = len(set(groups)), [s for s, r in ratios.items() if r > 0]
    if n_groups >= len(active):  # every non-zero split gets someone when possible
        assert set(splits) == set(active)


@FAST
@given(datasets(), ratio_dicts(), st.integers(0, 2**32 - 1), st.data())
def test_deterministic_and_row_order_invariant(data, ratios, seed, draw):
    labels, groups = data
    first = assign_splits(labels, groups, ratios, seed)
    assert assign_splits(list(labels), list(groups), dict(ratios), seed) == first
    perm = draw.draw(st.permutations(range(len(labels))))
    permuted = assign_splits([labels[i] for i in perm], [groups[i] for i in perm], ratios, seed)
    assert permuted == [first[i] for i in perm]


@FAST
@given(datasets(), st.integers(0, 2**32 - 1))
def test_single_nonzero_split_takes_everything(data, seed):
    labels, groups = data
    assert set(assign_splits(labels, groups, {"train": 0.0, "val": 1.0, "test": 0.0}, seed)) == {"val"}


# --- assign_splits: quality on realistic data ---------------------------------------------------------
def _persons(n_persons, sizes):
    labels, groups = [], []
    for p in range(n_persons):
        for lab in CLASSES:
            k = sizes(p, lab)
            labels += [lab] * k
            groups += [f"person{p:03d}"] * k
    return labels, groups


def test_realistic_uniform_case_close_to_ratios():
    labels, groups = _persons(30, lambda p, lab: 5)  # 30 persons x 7 labels x 5 images
    for seed in range(5):
        splits = assign_splits(labels, groups, R, seed)
        overall, per_class = _max_dev(labels, splits, R)
        # 21/4.5/4.5 persons are targets; half a person is 1/60 of the data
        assert overall <= 1 / 60 + 1e-9 and per_class <= 1 / 60 + 1e-9
        assert Counter(splits)["train"] == 21 * 35


def test_realistic_uneven_case_close_to_ratios():
    worst = (0.0, 0.0)
    for seed in range(10):
        rng = np.random.default_rng(1000 + seed)
        table = rng.integers(2, 9, size=(30, len(CLASSES)))  # 2..8 images per person and label
        labels, groups = _persons(30, lambda p, lab: int(table[p, CLASSES.index(lab)]))
        splits = assign_splits(labels, groups, R, seed)
        overall, per_class = _max_dev(labels, splits, R)
        worst = (max(worst[0], overall), max(worst[1], per_class))
    assert worst[0] < 0.02, worst
    assert worst[1] < 0.04, worst


def test_many_groups_balance_tightly():
    rng = np.random.default_rng(7)
    labels = list(rng.choice(CLASSES, 6000))
    groups = [f"g{i}" for i in rng.integers(0, 400, 6000)]
    overall, per_class = _max_dev(labels, assign_splits(labels, groups, R, 3), R)
    assert overall < 0.005 and per_class < 0.01


def test_seed_changes_assignment():
    labels, groups = _persons(30, lambda p, lab: 5)
    results = {tuple(assign_splits(labels, groups, R, s)) for s in range(4)}
    assert len(results) > 1


def test_fewer_groups_than_splits_fill_in_order(caplog):
    with caplog.at_level(logging.WARNING, logger="kfer.data.split"):
        splits = assign_splits(["joy"] * 3 + ["hurt"] * 2, ["a", "a", "a", "b", "b"], R, 0)
    assert dict(zip(["a", "b"], [splits[0], splits[3]], strict=True)) == {"a": "train", "b": "val"}
    assert "only 2 group(s)" in caplog.text
    assert assign_splits(["joy"], ["x"], {"train": 0.0, "val": 0.5, "test": 0.5}, 1) == ["val"]


def test_empty_and_invalid_inputs():
    assert assign_splits([], [], R, 0) == []
    with pytest.raises(ValueError, match="length"):
        assign_splits(["joy"], [], R, 0)
    with pytest.raises(ValueError, match=">= 0"):
        assign_splits(["joy"], ["a"], {"train": 1.2, "val": -0.2}, 0)
    with pytest.raises(ValueError, match="> 0"):
        assign_splits(["joy"], ["a"], {"train": 0.0, "val": 0.0}, 0)


# --- split_warnings -----------------------------------------------------------------------------------
def test_split_warnings_flags_class_with_too_few_persons():
    labels = ["joy", "joy", "joy", "hurt", "hurt", "hurt"]
    groups = ["a", "b", "c", "a", "b", "b"]
    splits = ["train", "val", "val", "train", "val", "val"]
    msgs = split_warnings(labels, groups, splits, 2)
    assert msgs == [
        "class 'hurt' has 1 person(s) in train (< 2)",
        "class 'hurt' has 1 person(s) in val (< 2)",
        "class 'joy' has 1 person(s) in train (< 2)",
    ]
    assert split_warnings(labels, groups, splits, 0) == []
    assert split_warnings(labels, groups, splits, 1) == []
    # with ratios: ratio-0 splits are skipped, an empty non-zero split is reported
    msgs = split_warnings(labels, groups, splits, 1, ratios={"train": 0.5, "val": 0.0, "test": 0.5})
    assert msgs == ["class 'hurt' has 0 person(s) in test (< 1)", "class 'joy' has 0 person(s) in test (< 1)"]
    # with classes: a class with no image at all is reported too
    msgs = split_warnings(labels, groups, splits, 1, ratios={"train": 1.0}, classes=["sadness", "joy"])
    assert msgs == ["class 'sadness' has 0 person(s) in train (< 1)"]


# --- run_split ----------------------------------------------------------------------------------------
def _project(tmp_path: Path, rows: list[dict] | None):
    shutil.copy(REPO_PARAMS, tmp_path / "params.yaml")
    params = load_params(tmp_path / "params.yaml")
    if rows is not None:
        manifest = params.path(params.paths.cropped) / "manifest.csv"
        manifest.parent.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(manifest, index=False)
    return params


def _rows(rng: np.random.Generator) -> list[dict]:
    rows = []
    for p in range(12):
        for lab in CLASSES:
            for i in range(int(rng.integers(1, 4))):
                path = f"data/cropped/{lab}/p{p:02d}_{i}.png"
                group = f"NA{p}" if p else "NA"  # "NA" must stay a string, not a missing value
                rows.append({"path": path, "label": lab, "group": group, "status": "ok", "source": f"raw/{p}{i}"})
    for j in range(5):  # never split: not cropped
        rows.append({"path": "", "label": CLASSES[j], "group": f"bad{j}", "status": "no_face", "source": "x"})
    rng.shuffle(rows)
    return rows


def test_run_split_end_to_end(tmp_path, caplog):
    rows = _rows(np.random.default_rng(0))
    params = _project(tmp_path, rows)
    with caplog.at_level(logging.INFO, logger="kfer.data.split"):
        report = run_split(params)

    out_csv = tmp_path / "data" / "splits.csv"
    df = pd.read_csv(out_csv, dtype=str, keep_default_na=False)
    ok = [r for r in rows if r["status"] == "ok"]
    assert list(df.columns) == list(SPLITS_COLUMNS)
    assert (df["source"] == "").all()  # an old manifest (no `raw` column): its `source` is a raw path, not a name
    assert len(df) == len(ok) and df["path"].tolist() == sorted(r["path"] for r in ok)
    assert not df["group"].str.startswith("bad").any()
    assert "NA" in set(df["group"])
    assert df.groupby("group")["split"].nunique().max() == 1
    assert set(df["split"]) == {"train", "val", "test"}

    on_disk = json.loads(params.path(params.paths.split_report).read_text(encoding="utf-8"))
    assert on_disk == report
    # the DVC metrics: headline numbers only
    assert json.loads(params.path(params.paths.split_headline).read_text(encoding="utf-8")) == {
        "images": len(ok), "persons": 12}
    assert list(report) == ["seed", "ratios", "counts", "per_class", "groups", "label_policy", "min_agreement",
                            "dropped", "warnings"]
    assert report["dropped"] == {}
    assert report["seed"] == 42 and report["ratios"] == R
    assert report["counts"] == {s: int((df.split == s).sum()) for s in R}
    assert sum(report["counts"].values()) == len(ok)
    for s in R:
        assert report["per_class"][s] == {c: int(((df.split == s) & (df.label == c)).sum()) for c in CLASSES}
        assert report["groups"][s] == df.loc[df.split == s, "group"].nunique()
    assert sum(report["groups"].values()) == 12
    assert report["warnings"] == split_warnings(
        df.label.tolist(), df.group.tolist(), df.split.tolist(), 2, ratios=R, classes=CLASSES
    )
    for w in report["warnings"]:
        assert w in caplog.text
    assert "split: " in caplog.text and "12 persons" in caplog.text

    # rerun: identical bytes; row order of the manifest does not matter
    first = out_csv.read_bytes()
    rows.reverse()
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "cropped" / "manifest.csv", index=False)
    run_split(params)
    assert out_csv.read_bytes() == first
    assert not [p for p in out_csv.parent.iterdir() if ".tmp-" in p.name]


def test_run_split_carries_the_source(tmp_path):
    """Two datasets in one manifest (crop with data.sources): splits.csv and the report carry the source name."""
    rows = []
    for src, n_persons, classes in (("aihub", 10, CLASSES), ("fer2013", 8, CLASSES[:4])):
        for p in range(n_persons):
            for lab in classes:
                for i in range(2):
                    rows.append({"path": f"data/cropped/{lab}/{src}_{p:02d}_{i}.png", "source": src, "label": lab,
                                 "group": f"{src}/S{p:03d}", "status": "ok", "raw": f"data/raw/{src}/{p}_{i}.jpg"})
    rows.append({"path": "", "source": "fer2013", "label": "joy", "group": "fer2013/S999", "status": "no_face",
                 "raw": "data/raw/fer2013/bad.jpg"})
    rows.append({"path": "data/cropped/joy/odd.png", "source": "", "label": "joy", "group": "x/S1", "status": "ok",
                 "raw": "data/raw/odd.jpg"})  # a row without a source name keeps ""
    np.random.default_rng(3).shuffle(rows)
    params = _project(tmp_path, rows)
    report = run_split(params)

    df = pd.read_csv(tmp_path / "data" / "splits.csv", dtype=str, keep_default_na=False)
    assert list(df.columns) == list(SPLITS_COLUMNS)
    ok = {r["path"]: r for r in rows if r["status"] == "ok"}
    assert sorted(df["path"]) == sorted(ok) and df["path"].is_monotonic_increasing
    assert df["source"].tolist() == [ok[p]["source"] for p in df["path"]]
    assert df["group"].tolist() == [ok[p]["group"] for p in df["path"]]
    assert df.groupby("group")["split"].nunique().max() == 1  # no person crosses splits
    assert set(df["split"]) == {"train", "val", "test"}

    assert list(report) == ["seed", "ratios", "counts", "per_class", "groups", "per_source", "label_policy",
                            "min_agreement", "dropped", "warnings"]
    assert report["per_source"] == {
        s: {src: int(((df.split == s) & (df.source == src)).sum()) for src in ("", "aihub", "fer2013")} for s in R}
    assert sum(report["per_source"]["train"].values()) == report["counts"]["train"]

    # the split itself does not depend on the source column
    without = [{k: v for k, v in r.items() if k not in ("source", "raw")} for r in rows]
    (tmp_path / "data" / "cropped" / "manifest.csv").unlink()
    pd.DataFrame(without).to_csv(tmp_path / "data" / "cropped" / "manifest.csv", index=False)
    report2 = run_split(params)
    df2 = pd.read_csv(tmp_path / "data" / "splits.csv", dtype=str, keep_default_na=False)
    assert df2["split"].tolist() == df["split"].tolist() and (df2["source"] == "").all()
    assert "per_source" not in report2


def test_a_train_only_source_trains_whole_and_leaves_the_others_split_as_before(tmp_path):
    """data.sources.<name>.split = train (e.g. FER2013's Training split): all of it in train, never validated on; the
    other sources' assignment is the one they get without it."""
    rows = []
    for src, n_persons in (("sharp", 10), ("public", 6)):
        for p in range(n_persons):
            for lab in CLASSES:
                rows.append({"path": f"data/cropped/{lab}/{src}_{p:02d}.png", "source": src, "label": lab,
                             "group": f"{src}/S{p:03d}", "status": "ok", "raw": f"data/raw/{src}/{p}.jpg"})
    _project(tmp_path, rows)
    text = (tmp_path / "params.yaml").read_text(encoding="utf-8")
    assert "  sources: {}\n" in text
    (tmp_path / "params.yaml").write_text(text.replace(
        "  sources: {}\n", "  sources: {sharp: {layout: folders}, public: {layout: folders, split: train}}\n"),
        encoding="utf-8")
    report = run_split(load_params(tmp_path / "params.yaml"))
    df = pd.read_csv(tmp_path / "data" / "splits.csv", dtype=str, keep_default_na=False)
    assert (df.loc[df.source == "public", "split"] == "train").all()
    assert report["per_source"]["val"]["public"] == report["per_source"]["test"]["public"] == 0
    assert report["counts"]["train"] == int((df.split == "train").sum())

    (tmp_path / "alone").mkdir()
    alone = _project(tmp_path / "alone", [r for r in rows if r["source"] == "sharp"])
    run_split(alone)
    df_alone = pd.read_csv(tmp_path / "alone" / "data" / "splits.csv", dtype=str, keep_default_na=False)
    assert df.loc[df.source == "sharp", "split"].tolist() == df_alone["split"].tolist()
    assert set(df_alone["split"]) == {"train", "val", "test"}


def test_a_heldout_source_is_val_and_test_only_and_a_train_source_never_validates(tmp_path):
    """FER2013 as its authors split it: the Training faces (split: train) all train, the PublicTest faces
    (split: heldout, no person ids) go to val and test in the ratio split.val : split.test and never to train;
    a third source is split as it is alone."""
    rows = []
    for src, n_persons, per in (("ck", 10, 1), ("fer_train", 40, 1), ("fer_test", 300, 1)):
        for p in range(n_persons):
            for lab in CLASSES:
                for i in range(per):
                    rows.append({"path": f"data/cropped/{lab}/{src}_{p:03d}_{i}.png", "source": src, "label": lab,
                                 "group": "" if src.startswith("fer") else f"{src}/S{p:03d}", "status": "ok",
                                 "raw": f"data/raw/{src}/{p}_{i}.jpg"})
    _project(tmp_path, rows)
    text = (tmp_path / "params.yaml").read_text(encoding="utf-8")
    (tmp_path / "params.yaml").write_text(text.replace(
        "  sources: {}\n", "  sources: {ck: {layout: folders}, fer_train: {layout: folders, split: train},"
        " fer_test: {layout: folders, split: heldout}}\n"), encoding="utf-8")
    report = run_split(load_params(tmp_path / "params.yaml"))
    df = pd.read_csv(tmp_path / "data" / "splits.csv", dtype=str, keep_default_na=False)
    held = df[df.source == "fer_test"]
    assert (df.loc[df.source == "fer_train", "split"] == "train").all()
    assert "train" not in set(held["split"]) and len(held) == 300 * len(CLASSES)
    # split.val = split.test in _project's params: half each, per class as well
    counts = held["split"].value_counts()
    assert abs(counts["val"] - counts["test"]) <= len(CLASSES)
    for lab in CLASSES:
        per = held.loc[held.label == lab, "split"].value_counts()
        assert abs(per["val"] - per["test"]) <= 2, (lab, per.to_dict())
    assert report["per_source"]["train"]["fer_test"] == 0
    assert report["per_source"]["val"]["fer_test"] + report["per_source"]["test"]["fer_test"] == len(held)

    (tmp_path / "alone").mkdir()
    alone = _project(tmp_path / "alone", [r for r in rows if r["source"] == "ck"])
    run_split(alone)
    df_alone = pd.read_csv(tmp_path / "alone" / "data" / "splits.csv", dtype=str, keep_default_na=False)
    assert df.loc[df.source == "ck", "split"].tolist() == df_alone["split"].tolist()

    # without a val or test ratio there is nowhere to put it: one clear error
    text = (tmp_path / "params.yaml").read_text(encoding="utf-8")
    bad = (text.replace("  train: 0.7\n", "  train: 1.0\n").replace("  val: 0.15\n", "  val: 0.0\n")
           .replace("  test: 0.15\n", "  test: 0.0\n"))
    assert bad != text
    (tmp_path / "params.yaml").write_text(bad, encoding="utf-8")
    with pytest.raises(ValueError, match="split: heldout, but split has no val or test ratio"):
        run_split(load_params(tmp_path / "params.yaml"))


def test_run_split_warns_about_thin_classes(tmp_path, caplog):
    rows = [
        {"path": f"{lab}/{p}_{i}.png", "label": lab, "group": f"p{p}", "status": "ok"}
        for p in range(20)
        for lab in CLASSES
        for i in range(3)
        if lab != "hurt" or p == 0  # only one person shows hurt
    ]
    params = _project(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="kfer.data.split"):
        report = run_split(params)
    hurt = [w for w in report["warnings"] if "'hurt'" in w]
    home = next(s for s in R if report["per_class"][s]["hurt"])  # the one split holding person p0
    assert hurt == [f"class 'hurt' has {int(s == home)} person(s) in {s} (< 2)" for s in R]
    assert not [w for w in report["warnings"] if "'hurt'" not in w]
    assert all(w in caplog.text for w in hurt)


def test_run_split_rows_without_group_are_their_own_person(tmp_path):
    rows = [
        {"path": f"{lab}/{p}_{i}.png", "label": lab, "group": "" if p >= 6 else f"p{p}", "status": "ok"}
        for p in range(12)
        for lab in CLASSES
        for i in range(2)
    ]
    params = _project(tmp_path, rows)
    report = run_split(params)
    assert report["warnings"][0].startswith("84 image(s) have no group")
    df = pd.read_csv(tmp_path / "data" / "splits.csv", dtype=str, keep_default_na=False)
    assert (df["group"] == "").sum() == 84  # written as in the manifest
    assert df[df.group != ""].groupby("group")["split"].nunique().max() == 1
    assert sum(report["groups"].values()) == 6 + 84


def test_run_split_missing_manifest(tmp_path):
    params = _project(tmp_path, None)
    with pytest.raises(FileNotFoundError, match=r"manifest\.csv.*kfer crop"):
        run_split(params)
    assert not (tmp_path / "data" / "splits.csv").exists()


def test_run_split_bad_manifest(tmp_path):
    params = _project(tmp_path, [{"path": "a.png", "label": "joy", "status": "ok"}])
    with pytest.raises(ValueError, match="group"):
        run_split(params)
    manifest = tmp_path / "data" / "cropped" / "manifest.csv"
    manifest.write_text("path,label,group,status\na.png,joy,a,no_face\n")
    with pytest.raises(ValueError, match="no rows with status 'ok'"):
        run_split(params)
