"""Accuracy by group: Wilson intervals against known values, groups too small for a claim, `unknown` counted but
never the worst group, the largest gap, MLflow names, the files; and the evaluate stage end to end on a small
AI Hub-shaped project (gender and age group from the names, the headline keys)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kfer.reporting.groups import flat, group_report, headline, row_fields, table, wilson, write_files

# Keras' own model.save under numpy 2 (not kfer code)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

NAMES = ["a", "b", "c"]


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (8, 10, 0.4902, 0.9433),  # Wilson 1927; the textbook example (Newcombe 1998, Agresti & Coull 1998)
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
    (81, 263, 0.2553, 0.3662),  # Newcombe 1998, table I, example (vii): 81/263 -> 0.2553-0.3662
])
def test_wilson_interval_matches_published_values(k, n, low, high):
    lo, hi = wilson(k, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)
    assert wilson(0, 0) == (0.0, 1.0)


def _predictions(groups: dict[str, tuple[int, int]]):
    """(y_true, y_pred, values): per group value (n, correct), rows in that order; wrong rows predict the next class."""
    y_true, y_pred, values = [], [], []
    for value, (n, correct) in groups.items():
        t = np.arange(n) % len(NAMES)
        p = np.where(np.arange(n) < correct, t, (t + 1) % len(NAMES))
        y_true += t.tolist()
        y_pred += p.tolist()
        values += [value] * n
    return np.array(y_true), np.array(y_pred), values


def test_table_claims_gap_worst_and_unknown():
    y_true, y_pred, gender = _predictions({"male": (40, 30), "female": (35, 21), "unknown": (30, 3),
                                           "other": (4, 4)})
    age = ["20s"] * 60 + ["30s"] * 49  # 20s: the 40 male rows (30 right), 20 female (20 right); 30s: 8 of 49 right
    report = group_report(y_true, y_pred, {"gender": gender, "age_group": age}, NAMES, min_n=30)
    g = report["fields"]["gender"]["values"]
    assert list(g) == ["female", "male", "other", "unknown"]  # sorted, unknown last
    assert g["other"] == {"n": 4, "claim": False}  # too few: its count, no accuracy
    assert g["male"]["claim"] and g["male"]["n"] == 40 and g["male"]["accuracy"] == pytest.approx(0.75)
    assert (g["male"]["accuracy_low"], g["male"]["accuracy_high"]) == pytest.approx(wilson(30, 40))
    assert g["female"]["accuracy"] == pytest.approx(0.6)
    assert g["unknown"]["n"] == 30 and g["unknown"]["accuracy"] == pytest.approx(0.1)  # counted and scored ...
    gap = report["fields"]["gender"]["largest_gap"]
    assert gap == {"gap": pytest.approx(0.15), "best": "male", "worst": "female", "intervals_overlap": True}
    assert report["worst"]["value"] != "unknown"  # ... but never the worst group or an end of a gap
    assert report["worst"] == {"field": "age_group", "value": "30s", "accuracy": pytest.approx(8 / 49), "n": 49}
    age_gap = report["fields"]["age_group"]["largest_gap"]
    assert age_gap["gap"] == pytest.approx(50 / 60 - 8 / 49) and not age_gap["intervals_overlap"]
    assert report["largest_gap"] == {"field": "age_group", **age_gap}
    assert headline(report) == {"group_worst_accuracy": pytest.approx(8 / 49),
                                "group_largest_gap": pytest.approx(50 / 60 - 8 / 49)}

    # a field with one claimable group has no gap; with none, no worst either
    small = group_report(y_true[:40], y_pred[:40], {"gender": gender[:40]}, NAMES, min_n=50)
    assert small["worst"] is None and small["largest_gap"] is None and headline(small) == {}


def test_mlflow_names_csv_and_plot(tmp_path):
    y_true, y_pred, source = _predictions({"한국": (5, 4), "일본": (5, 2), "AI Hub": (6, 6)})
    report = group_report(y_true, y_pred, {"source": source, "gender": ["male"] * 8 + ["female"] * 8}, NAMES,
                          min_n=5)
    keys = flat(report)
    assert keys["test_accuracy_group_source_AI Hub"] == 1.0 and keys["test_accuracy_group_gender_male"] == 0.75
    hangul = sorted(k for k in keys if k.startswith("test_accuracy_group_source___"))
    assert len(hangul) == 2 and {keys[k] for k in hangul} == {0.8, 0.4}  # "__" + a hash of each name
    assert keys["test_group_worst_accuracy"] == 0.4 and keys["test_group_largest_gap"] == pytest.approx(0.6)
    assert "external_group_largest_gap" in flat(report, prefix="external")

    write_files(report, tmp_path, "title")
    csv = pd.read_csv(tmp_path / "per_group.csv", keep_default_na=False)
    assert list(csv.columns) == ["field", "value", "n", "claim", "accuracy", "accuracy_low", "accuracy_high",
                                 "macro_f1"]
    assert len(csv) == 5 and csv["n"].sum() == 32
    assert (tmp_path / "groups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(table(report)) == 5


def test_row_fields_from_source_and_groups_columns():
    rows = pd.DataFrame({"source": ["a", "a", "b"], "groups": ["gender=male;age_group=20s", "", "gender=female"]})
    assert row_fields(rows) == {"source": ["a", "a", "b"], "gender": ["male", "unknown", "female"],
                                "age_group": ["20s", "unknown", "unknown"]}
    assert row_fields(pd.DataFrame({"source": ["", ""], "groups": ["", ""]})) == {}  # nothing to group by


def test_evaluate_reports_groups_of_an_aihub_shaped_project(make_params, monkeypatch):
    """Demo photos (AI Hub names: 남/여, a decade) cut and split by the real stages, scored by a model whose answers
    are known: reports/eval.json has gender and age_group tables, the eval folder the CSV and plot, the DVC
    metrics the worst group and the largest gap, MLflow the per-group accuracies."""
    import mlflow

    from kfer import tracking
    from kfer.data.crop import run_crop
    from kfer.data.split import run_split
    from kfer.demo.photos import generate_demo
    from kfer.reporting.evaluate import run_evaluate
    from tests.helpers import INTENSITY_SIZE, save_intensity_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = make_params({"crop": {"image_size": INTENSITY_SIZE, "workers": 1},
                          "split": {"train": 0.4, "val": 0.2, "test": 0.4},
                          "train": {"experiment": "kfer-test"}, "evaluate": {"group_min_n": 3}})
    generate_demo(params.path(params.paths.raw), [(c.name, c.ko) for c in params.classes], n_persons=8,
                  per_class=1, seed=3)
    run_crop(params)
    run_split(params)
    splits = pd.read_csv(params.path(params.paths.splits), dtype=str, keep_default_na=False)
    assert splits["groups"].str.match(r"^gender=(male|female);age_group=\d+0s$").all()
    save_intensity_model(params)
    with tracking.tracked_run(params, "train", log_params=False) as run:
        pass
    params.path(params.paths.train_run).write_text(json.dumps({"run_id": run.info.run_id}), encoding="utf-8")

    result = run_evaluate(params)
    groups = result["groups"]
    assert list(groups["fields"]) == ["gender", "age_group"]  # no data.sources: no source field
    test = splits[splits["split"] == "test"]
    genders = test["groups"].str.extract(r"gender=(\w+)")[0].value_counts().to_dict()
    assert {v: m["n"] for v, m in groups["fields"]["gender"]["values"].items()} == genders
    assert sum(m["n"] for m in groups["fields"]["age_group"]["values"].values()) == len(test)
    written = json.loads(params.path(params.paths.eval_metrics).read_text(encoding="utf-8"))
    assert written["groups"] == json.loads(json.dumps(groups))
    head = json.loads(params.path(params.paths.eval_headline).read_text(encoding="utf-8"))
    assert set(head) == {"test_accuracy", "test_macro_f1", "group_worst_accuracy", "group_largest_gap"}
    assert head["group_worst_accuracy"] == groups["worst"]["accuracy"] <= result["test_accuracy"]
    eval_dir = params.path(params.paths.eval_dir)
    assert (eval_dir / "per_group.csv").exists() and (eval_dir / "groups.png").exists()
    logged = mlflow.MlflowClient(tracking.tracking_uri(params)).get_run(run.info.run_id).data.metrics
    claimed = {v: m for v, m in groups["fields"]["gender"]["values"].items() if m["claim"]}
    assert claimed and all(logged[f"test_accuracy_group_gender_{v}"] == pytest.approx(m["accuracy"])
                           for v, m in claimed.items())
    assert logged["test_group_largest_gap"] == pytest.approx(head["group_largest_gap"])
