"""The model card: generated from the stages' reports, each known limit fired by its rule and silent without it."""

from __future__ import annotations

import copy
import json

from kfer.reporting import card

CROP = {"layout": "aihub", "total": 120, "ok": 112, "skipped": {"no_face": 6, "too_many_pixels": 2}}
SPLIT = {"seed": 42, "label_policy": "majority", "min_agreement": 2, "dropped": 3,
         "counts": {"train": 80, "val": 16, "test": 16}, "groups": {"train": 20, "val": 4, "test": 4},
         "per_class": {"train": {"joy": 40, "anger": 40}, "val": {"joy": 8, "anger": 8},
                       "test": {"joy": 8, "anger": 8}}}
TRAIN = {"best_epoch": 7, "epochs_run": 9, "train_images": 160, "train_seconds": 42.0, "val_images": 16,
         "best_val_accuracy": 0.75, "best_val_macro_f1": 0.7}
GROUPS = {"fields": {"gender": {"values": {
    "female": {"n": 40, "claim": True, "accuracy": 0.9, "accuracy_low": 0.77, "accuracy_high": 0.96, "macro_f1": 0.9},
    "male": {"n": 40, "claim": True, "accuracy": 0.7, "accuracy_low": 0.55, "accuracy_high": 0.82, "macro_f1": 0.7},
    "unknown": {"n": 3, "claim": False}}, "largest_gap": {"gap": 0.2, "best": "female", "worst": "male",
                                                         "intervals_overlap": False}},
    "age_group": {"values": {"60s": {"n": 5, "claim": False}}, "largest_gap": None}},
    "worst": {"field": "gender", "value": "male", "accuracy": 0.7, "n": 40},
    "largest_gap": {"field": "gender", "gap": 0.2, "best": "female", "worst": "male", "intervals_overlap": False}}
EVAL = {"test_accuracy": 0.8, "test_macro_f1": 0.79, "test_images": 16,
        "per_class": {"joy": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 8},
                      "anger": {"precision": 0.7, "recall": 0.8, "f1": 0.75, "support": 40}},
        "photo_accuracy": 0.7, "photo_macro_f1": 0.68, "photo_images": 16, "photo_missed": 2,
        "opinions": {"per_class": {"joy": {"with_votes": 8, "majority_is_uploader": 6},
                                   "anger": {"with_votes": 8, "majority_is_uploader": 2}}},
        "groups": GROUPS,
        "behaviour": {"n": 16, "accuracy": 0.8, "checks": {
            "mirror": {"same_prediction": 1.0, "accuracy": 0.8, "accuracy_change": 0.0},
            "blur": {"same_prediction": 0.75, "accuracy": 0.6, "accuracy_change": -0.2}}}}


def reports():
    return copy.deepcopy({"crop": CROP, "split": SPLIT, "train": TRAIN, "eval": EVAL})


def test_card_sections_and_every_limit_rule(make_params):
    params = make_params({"data": {"label_policy": "majority"}})
    text = card.build_card(params, reports(), run_id="abc123")
    assert text.startswith(f"# Model card: {params.train.registered_model} (MLflow run abc123)\n")
    for heading in ("## Model", "## Data", "## Scores", "## Accuracy by group", "## Calibration",
                    "## Behaviour checks", "## Known limits"):
        assert f"\n{heading}\n" in text, heading
    assert "skipped by reason: no_face 6, too_many_pixels 2" in text
    assert "| test | 16 | 4 |" in text  # faces and persons per split
    assert "| test (crop path) | 16 | 0.800 | 0.790 |" in text
    assert "| gender | male | 40 | 0.700 [0.550, 0.820] | 0.700 |" in text
    assert "| age_group | 60s | 5 | too few faces: no claim | – |" in text
    assert "| blur | 75.0% | 0.600 | -0.200 |" in text
    limits = text.split("## Known limits\n", 1)[1]
    expected = ["Classes with fewer than 30 test faces, whose scores are rough: joy (8).",
                "The test split holds 4 persons",
                "Groups too small for a claim (under 30 test faces): age_group=60s (5).",
                "Accuracy differs by 0.200 between female and male (gender).",
                "Under `blur` 25.0% of the answers change (accuracy -0.200).",
                "for only 50% of the 16 test faces with votes",
                "On whole photos (finding the face itself) accuracy is 0.700, below the 0.800",
                "Probabilities are not calibrated"]
    for line in expected:
        assert line in limits, line
    assert "mirror" not in limits and "unknown" not in limits  # a kept check and the unknown group are no limit


def test_no_rule_fires_on_a_clean_model(make_params):
    params = make_params()
    r = reports()
    r["split"]["groups"]["test"] = 40
    ev = r["eval"]
    ev["per_class"]["joy"]["support"] = 40
    ev["photo_accuracy"] = 0.79
    ev["opinions"]["per_class"]["anger"]["majority_is_uploader"] = 8
    ev["groups"]["fields"]["age_group"]["values"]["60s"] = {"n": 30, "claim": True, "accuracy": 0.8,
                                                         "accuracy_low": 0.6, "accuracy_high": 0.9, "macro_f1": 0.8}
    ev["groups"]["largest_gap"]["gap"] = 0.04
    ev["behaviour"]["checks"]["blur"] = {"same_prediction": 0.95, "accuracy": 0.78, "accuracy_change": -0.02}
    ev["calibration"] = {"temperature": 1.5, "splits": {"val": {"n": 16, "ece_before": 0.12, "ece_after": 0.03}}}
    text = card.build_card(params, r)
    assert text.split("## Known limits\n", 1)[1].strip() == "None found by the card's rules."
    assert "Temperature 1.500, fitted on val" in text and "| val | 16 | 0.120 | 0.030 |" in text


def test_card_before_evaluation_says_what_is_missing(make_params):
    params = make_params()
    text = card.build_card(params, {"train": TRAIN})
    assert "No crop or split report: the data are not described." in text
    assert "| val (model selection) | 16 | 0.750 | 0.700 |" in text
    assert "Not evaluated on the test split yet (`kfer evaluate`)." in text
    assert "Not checked (`kfer evaluate`)." in text


def test_read_reports_takes_the_files_that_exist(make_params):
    params = make_params()
    path = params.path(params.paths.train_metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TRAIN), encoding="utf-8")
    assert card.read_reports(params) == {"train": TRAIN}
