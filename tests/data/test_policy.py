"""Label policies (data.label_policy, min_agreement, soft targets), rater vote tables, and what split does with
them: the opinions every row keeps, the hard label of each policy, the same persons in each split."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest

from kfer.catalog import CROP_MANIFEST_COLUMNS
from kfer.data.policy import (
    AgreementTally,
    format_votes,
    hard_labels,
    low_agreement,
    majority_of,
    opinions,
    parse_votes,
    strict_majority,
    targets,
)
from kfer.data.readers import read_records
from kfer.data.split import run_split
from kfer.errors import UserError
from tests.helpers import shared_dir

CLASSES = ["joy", "anger", "sadness", "neutral"]


def _frame(rows):
    return pd.DataFrame(rows, columns=["label_uploader", "label_majority", "votes", "agreement"])


def test_votes_round_trip_and_counts_are_told_from_shares():
    assert format_votes({"anger": 1, "joy": 2, "sadness": 0}, shares=False) == "joy=2 anger=1"
    assert parse_votes("joy=2 anger=1") == ({"joy": 2.0, "anger": 1.0}, False)
    text = format_votes({"joy": 1.0}, shares=True)
    assert text == "joy=1.000" and parse_votes(text) == ({"joy": 1.0}, True)  # a share of 1 is not one vote
    with pytest.raises(ValueError, match="not <class>=<number>"):
        parse_votes("joy")


def test_majority_needs_a_unique_top_and_agreement_counts_annotators():
    assert majority_of({"joy": 2, "anger": 1}) == "joy"
    assert majority_of({"joy": 1, "anger": 1, "sadness": 1}) is None
    assert majority_of({"joy": 1, "anger": 1}) is None and majority_of({}) is None
    assert tuple(opinions("anger", {"joy": 2, "anger": 1}, shares=False).row().values()) == (
        "anger", "joy", "joy=2 anger=1", "2")
    assert opinions("joy", {}, shares=False).row() == {"label_uploader": "joy", "label_majority": "", "votes": "",
                                                       "agreement": ""}
    # rater shares: agreement is 3 x the top share of the class votes (TFEID's shares sum to about 1.1)
    ops = opinions("anxiety", {"anxiety": 0.14, "embarrassment": 0.70, "anger": 0.0}, shares=True)
    assert ops.majority == "embarrassment" and ops.agreement == "2.50"
    assert ops.votes == "embarrassment=0.700 anxiety=0.140"


def test_strict_majority_is_more_than_half_of_all_raters():
    """FER+'s test rule: a face counts when more than half of its raters name one class. Shares are of every rater
    (the ones who named no class too), so 0.5 is not enough; AI Hub's annotators: 2 of 3."""
    assert strict_majority("neutral=0.600 joy=0.300") == "neutral"
    assert strict_majority("neutral=0.500 joy=0.400") == ""  # half is not more than half
    assert strict_majority("neutral=0.400") == ""  # 0.6 voted unknown or not a face
    assert strict_majority("joy=2 anger=1") == "joy" and strict_majority("joy=1 anger=1 sadness=1") == ""
    assert strict_majority("") == ""
    # a vote for no class blocks the majority and weighs in the agreement, but is not in `votes`
    ops = opinions("joy", {"joy": 0.4, "\0unknown": 0.4, "anger": 0.2}, shares=True)
    assert (ops.majority, ops.votes, ops.agreement) == ("", "joy=0.400 anger=0.200", "1.20")


def test_hard_labels_and_low_agreement_by_policy():
    df = _frame([("joy", "anger", "anger=2 joy=1", "2"),  # annotators disagree with the uploader
                 ("sadness", "", "joy=1 anger=1 sadness=1", "1"),  # a tie: the uploader's
                 ("neutral", "", "", ""),  # no votes: the one label
                 ("", "joy", "joy=3", "3")])  # no uploader label
    assert hard_labels(df, "majority").tolist() == ["anger", "sadness", "neutral", "joy"]
    assert hard_labels(df, "soft").tolist() == ["anger", "sadness", "neutral", "joy"]
    assert hard_labels(df, "uploader").tolist() == ["joy", "sadness", "neutral", ""]
    with pytest.raises(ValueError, match="not one of"):
        hard_labels(df, "crowd")
    assert low_agreement(df, 0).tolist() == [False] * 4
    assert low_agreement(df, 2).tolist() == [False, True, False, False]  # no votes: nobody to disagree
    assert low_agreement(df, 3).tolist() == [True, True, False, False]


def test_soft_targets_are_the_vote_distribution_plus_the_uploader():
    df = _frame([("joy", "anger", "anger=2 joy=1", "2"),
                 ("neutral", "", "", ""),
                 ("sadness", "sadness", "sadness=0.700 hurt=0.200 anger=0.100", "2.10")])  # hurt: not a class
    one_hot = targets(df, "majority", CLASSES, 1.0)
    assert one_hot.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    soft = targets(df, "soft", CLASSES, 0.0)
    np.testing.assert_allclose(soft[0], [1 / 3, 2 / 3, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(soft[1], [0, 0, 0, 1])  # no votes: one-hot
    np.testing.assert_allclose(soft[2], [0, 0.125, 0.875, 0], rtol=1e-6)  # renormalized over the classes
    with_uploader = targets(df, "soft", CLASSES, 1.0)
    np.testing.assert_allclose(with_uploader[0], [2 / 4, 2 / 4, 0, 0], rtol=1e-6)  # a fourth vote for joy
    np.testing.assert_allclose(with_uploader[2], [0, 0.375 / 4, (2.625 + 1) / 4, 0], rtol=1e-6)  # shares as 3 votes
    assert soft.dtype == np.float32 and np.allclose(soft.sum(axis=1), 1)
    with pytest.raises(ValueError, match="not in params classes"):
        targets(df, "majority", CLASSES, 0.0, labels=["joy", "surprise", "joy"])


def test_agreement_tally_per_uploader_class():
    df = _frame([("joy", "joy", "joy=3", "3"), ("joy", "anger", "anger=2 joy=1", "2"), ("joy", "", "", ""),
                 ("anger", "", "joy=1 anger=1 sadness=1", "1")])
    rep = AgreementTally().add_frame(df).report(CLASSES)
    assert rep["agreement"] == {"1": 1, "2": 1, "3": 1, "none": 1}
    assert rep["per_class"]["joy"] == {"photos": 3, "with_votes": 2, "majority_is_uploader": 1,
                                       "majority_is_uploader_fraction": 0.5, "mean_agreement": 2.5}
    assert rep["per_class"]["anger"]["majority_is_uploader_fraction"] == 0.0
    assert rep["per_class"]["sadness"] == {"photos": 0, "with_votes": 0, "majority_is_uploader": 0,
                                           "majority_is_uploader_fraction": None, "mean_agreement": None}


# --- a rater-vote table beside folder-layout images (TFEID's manifest.csv) ------------------------------------

def _raw_with_table(raw, name: str, header: list[str], images, rows) -> None:
    """Placeholder files for ``images`` (the readers decode no pixels) and the table ``name`` of ``rows``."""
    for rel in images:
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(b"\x89PNG not decoded by the readers")
    with open(raw / name, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _votes_project(tmp_path, make_params, rows, extra=None):
    _raw_with_table(tmp_path / "data" / "raw", "manifest.csv",
                    ["file", "label", "vote_happy", "vote_angry", "vote_disgust", "vote_peace", "vote_top"],
                    [rel for rel, *_ in rows], [*((rel, rel.split("/")[0], *v) for rel, *v in rows), *(extra or ())])
    return make_params({"data": {"layout": "folders", "group": {"source": "regex", "pattern": r"^(\d{2})"},
                                 "votes": {"file": "manifest.csv", "key": "file", "prefix": "vote_"},
                                 "label_map": {"happy": "joy", "angry": "anger", "peace": "neutral"}}})


def test_votes_table_gives_rater_opinions_and_the_majority_label(tmp_path, make_params):
    rows = [("happy/01a.jpg", "0.97", "0.0", "0.0", "0.01", "happy"),
            ("angry/01b.jpg", "0.10", "0.30", "0.20", "0.20", "angry"),  # disgust is no class: not in `votes`
            ("angry/02c.jpg", "0.40", "0.40", "0.00", "0.00", "happy")]  # a tie between the class votes
    params = _votes_project(tmp_path, make_params, rows)
    (tmp_path / "data" / "raw" / "happy" / "03d.jpg").write_bytes(b"x")  # not in the table
    res = read_records(params)
    by = {r.rel: r for r in res.records}
    assert by["manifest.csv"].status == "label_file"
    happy = by["happy/01a.jpg"]
    assert (happy.label, happy.label_from, happy.opinions.uploader, happy.opinions.majority) == (
        "joy", "votes_majority", "joy", "joy")
    assert happy.opinions.votes == "joy=0.990 neutral=0.010"  # shares of every rater: the row is normalized
    angry = by["angry/01b.jpg"]
    # the disgust share still counts: 0.3 of 0.8 is the top; agreement 3 x 0.375
    assert (angry.label, angry.opinions.majority, angry.opinions.votes, angry.opinions.agreement) == (
        "anger", "anger", "anger=0.375 neutral=0.250 joy=0.125", "1.12")
    assert by["angry/02c.jpg"].label == "anger" and by["angry/02c.jpg"].opinions.majority == ""  # tie: the folder
    assert by["happy/03d.jpg"].opinions.votes == "" and res.label_counts["votes_missing"] == 1
    info = res.label_files["manifest.csv"]
    assert info["vote_columns"] == {"vote_angry": "anger", "vote_happy": "joy", "vote_peace": "neutral"}
    # disgust holds numbers: a vote for no class; vote_top holds names: no vote column at all
    assert info["vote_columns_no_class"] == ["vote_disgust"] and info["not_vote_columns"] == ["vote_top"]
    assert info["rows_used"] == 3


def test_a_face_whose_largest_share_is_no_class_is_dropped_by_reason(tmp_path, make_params):
    """FER+'s nf (not a face) and unknown, and a label the label map leaves out, must not vanish: a face whose
    largest share is one of them is skipped with its reason, never trained as its folder's label."""
    raw = tmp_path / "data" / "raw"
    rows = [("happy/a.png", "0.1", "0.0", "0.0", "0.0", "0.9"),  # not a face
            ("happy/b.png", "0.2", "0.0", "0.0", "0.6", "0.2"),  # unknown
            ("angry/c.png", "0.0", "0.3", "0.7", "0.0", "0.0"),  # disgust: no class here
            ("angry/d.png", "0.0", "0.4", "0.0", "0.0", "0.4"),  # a class ties the top: the tie rule, kept
            ("angry/e.png", "0.0", "0.4", "0.2", "0.2", "0.2"),  # a class on top: kept
            ("angry/f.png", "0.0", "0.0", "0.0", "0.5", "0.5")]  # nf ties unknown: still not a face
    _raw_with_table(raw, "votes.csv",
                    ["file", "vote_happy", "vote_angry", "vote_disgust", "vote_unknown", "vote_nf", "ferplus_name"],
                    [rel for rel, *_ in rows],
                    [*rows, ("gone/x.png", "1", "0", "0", "0", "0", ""), ("angry/e.png", "1", "0", "0", "0", "0", ""),
                     ("happy/a.png", "1", "0", "0", "0", "0", "")])
    params = make_params({"data": {"layout": "folders", "group": {"source": "none"},
                                   "votes": {"file": "votes.csv", "key": "file", "prefix": "vote_"},
                                   "label_map": {"happy": "joy", "angry": "anger"}}})
    res = read_records(params)
    by = {r.rel: r for r in res.records}
    assert [by[r].status for r, *_ in rows] == ["not_a_face", "no_class_votes", "no_class_votes", "ok", "ok",
                                               "not_a_face"]
    assert by["happy/a.png"].label is None and "nf 0.90" in by["happy/a.png"].detail
    assert "disgust 0.70" in by["angry/c.png"].detail
    assert (by["angry/d.png"].label, by["angry/d.png"].opinions.majority) == ("anger", "")  # vote_tie: uploader
    assert (by["angry/e.png"].label, by["angry/e.png"].opinions.votes) == ("anger", "anger=0.400")
    assert res.label_counts["votes_row_no_file"] == 1 and res.label_counts["votes_row_duplicate"] == 2
    info = res.label_files["votes.csv"]
    assert info["vote_columns_no_class"] == ["vote_disgust", "vote_nf", "vote_unknown"]
    assert (info["rows_used"], info["votes_row_no_file"], info["votes_row_duplicate"]) == (6, 1, 2)


def test_votes_table_mistakes_are_one_clear_error(tmp_path, make_params):
    params = _votes_project(tmp_path, make_params, [("happy/01a.jpg", "0.9", "0", "0", "0", "happy")])
    with pytest.raises(UserError, match="has no column 'name'"):
        read_records(params.updated({"data": {"votes": {"file": "manifest.csv", "key": "name", "prefix": "vote_"}}}))
    with pytest.raises(UserError, match="no column rating_<label>"):
        read_records(params.updated({"data": {"votes": {"file": "manifest.csv", "key": "file",
                                                        "prefix": "rating_"}}}))
    with pytest.raises(Exception, match="not a file"):
        read_records(params.updated({"data": {"votes": {"file": "votes.csv", "key": "file", "prefix": "vote_"}}}))


def test_votes_table_row_that_is_not_a_number_is_counted(tmp_path, make_params):
    params = _votes_project(tmp_path, make_params, [("happy/01a.jpg", "lots", "0", "0", "0", "happy"),
                                                    ("happy/01b.jpg", "-0.5", "0.9", "0", "0", "happy"),
                                                    ("happy/01c.jpg", "0", "0", "0", "0", "happy")])
    res = read_records(params)
    by = {r.rel: r for r in res.records}
    for rel in ("happy/01a.jpg", "happy/01b.jpg", "happy/01c.jpg"):  # kept with the folder label, no votes
        assert (by[rel].status, by[rel].label, by[rel].opinions.votes) == ("ok", "joy", "")
    assert res.label_counts["votes_not_numeric"] == 2 and res.label_counts["votes_empty"] == 1
    assert res.label_counts["votes_missing"] == 0  # counted once, by its reason


# --- split applies the policy ----------------------------------------------------------------------------------

def _manifest(params, n_persons=12):
    """A crop manifest in which every third photo's annotators name another class than the uploader."""
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_persons):
        for k, c in enumerate(CLASSES):
            for j in range(3):
                other = CLASSES[(k + 1) % len(CLASSES)]
                disputed = (p + j) % 3 == 0
                votes = {other: 2, c: 1} if disputed else ({c: 3} if rng.random() < 0.7 else {c: 2, other: 1})
                ops = opinions(c, votes, shares=False)
                rows.append({"path": f"data/cropped/{ops.majority}/{p:02d}_{c}_{j}.png", "raw": f"r/{p}_{c}_{j}",
                             "source": "", "label": ops.majority, "source_label": "", "label_from": "json_majority",
                             **ops.row(), "group": f"person{p:02d}", "status": "ok"})
    path = params.path(params.paths.cropped) / "manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).reindex(columns=CROP_MANIFEST_COLUMNS, fill_value="").to_csv(path, index=False)
    return pd.DataFrame(rows)


def _split(make_params, tmp_path, **data):
    params = make_params({"data": data})
    manifest = _manifest(params)
    report = run_split(params)
    return manifest, pd.read_csv(params.path(params.paths.splits), dtype=str, keep_default_na=False), report


def test_split_applies_the_policy_on_the_same_persons(tmp_path, make_params):
    manifest, majority, rep_m = _split(make_params, tmp_path, label_policy="majority")
    _, uploader, rep_u = _split(make_params, tmp_path, label_policy="uploader")
    _, soft, _ = _split(make_params, tmp_path, label_policy="soft")
    # the persons of each split do not depend on the policy
    for other in (uploader, soft):
        assert dict(zip(other["group"], other["split"], strict=True)) == dict(
            zip(majority["group"], majority["split"], strict=True))
    assert (majority["label"] == majority["label_majority"]).all()
    assert (uploader["label"] == uploader["label_uploader"]).all()
    assert (uploader["label"] != majority["label"]).sum() == len(manifest) // 3  # the disputed photos
    assert soft["label"].tolist() == majority["label"].tolist()
    assert rep_u["label_policy"] == "uploader" and rep_m["dropped"] == {}


def test_min_agreement_drops_train_photos_only_and_counts_them(tmp_path, make_params, caplog):
    _, everything, _ = _split(make_params, tmp_path, min_agreement=0)
    _, agreed, report = _split(make_params, tmp_path, min_agreement=3)
    low = everything["agreement"] != "3"
    train = everything["split"] == "train"
    assert set(agreed["path"]) == set(everything["path"][~(low & train)])  # val and test keep every photo
    assert sum(report["dropped"]["low_agreement"].values()) == int((low & train).sum()) > 0
    assert "dropped (low_agreement" in caplog.text
    assert json.loads((tmp_path / "reports" / "split.json").read_text(encoding="utf-8"))["min_agreement"] == 3


@pytest.mark.realdata
def test_ferplus_votes_on_real_fer2013_faces(tmp_path, make_params):
    """The real FER+ table (10 crowd votes per FER2013 face) read as data.votes beside real FER2013 files: the faces
    FER+ calls not a face, unknown or contempt are dropped by reason, a fear face ten raters call neutral trains as
    neutral under majority and keeps its original label as the uploader's; every other row of the table is counted
    as naming no file of this source."""

    fer = shared_dir("fer2013")
    table = fer / "ferplus_votes.csv"
    picked = {"train/angry/Training_10131352.png": "not_a_face", "train/angry/Training_13852029.png": "not_a_face",
              "train/fear/Training_44536177.png": "no_class_votes",  # unknown
              "train/angry/Training_17667401.png": "no_class_votes",  # contempt, no class here
              "train/fear/Training_10126156.png": "ok", "train/happy/Training_10019449.png": "ok"}
    raw = tmp_path / "data" / "raw"
    for rel in picked:
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).symlink_to(fer / rel)
    (raw / "ferplus_votes.csv").symlink_to(table)
    params = make_params({"data": {"layout": "folders", "group": {"source": "none"},
                                   "votes": {"file": "ferplus_votes.csv", "key": "file", "prefix": "vote_"}}})
    res = read_records(params)
    by = {r.rel: r for r in res.records}
    assert {rel: by[rel].status for rel in picked} == picked
    fear = by["train/fear/Training_10126156.png"]
    assert (fear.label, fear.opinions.uploader, fear.opinions.majority) == ("neutral", "anxiety", "neutral")
    assert strict_majority(fear.opinions.votes) == "neutral"
    with open(table, encoding="utf-8") as fh:
        rows = sum(1 for _ in fh) - 1
    assert res.label_counts["votes_row_no_file"] == rows - len(picked)
    info = res.label_files["ferplus_votes.csv"]
    assert info["vote_columns_no_class"] == ["vote_contempt", "vote_disgust", "vote_nf", "vote_unknown"]
