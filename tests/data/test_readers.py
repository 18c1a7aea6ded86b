"""Readers: AI Hub file names (both forms, NFD), label JSON voting and boxes, class folders, group keys."""

from __future__ import annotations

import csv
import json
import unicodedata
from collections import Counter

import pytest

from kfer.config import load_params
from kfer.data.labels import annotated_box, check_box, load_label_json
from kfer.data.readers import detect_layout, parse_aihub_name, read_records
from tests.helpers import REPO, shared_dir

HEX = "9ec608b7b30306a66b5b9e2008bcd634dc1cf7e832c9b412c539fac85e45a5b1"
SHORT = f"{HEX}_남_60_분노_20130314100000-002-000.jpg"
LONG = f"{HEX}_남_20_기쁨_교통&이동수단(엘리베이터 포함)_20210125160548-002-004.jpg"


def test_parse_short_form():
    n = parse_aihub_name(SHORT)
    assert (n.title, n.gender, n.age, n.emotion, n.place, n.date) == (
        HEX, "남", 60, "분노", None, "20130314100000-002-000")


def test_parse_long_form_with_place():
    n = parse_aihub_name("some/folder/" + LONG)
    assert n.emotion == "기쁨"
    assert n.place == "교통&이동수단(엘리베이터 포함)"
    assert n.date == "20210125160548-002-004"
    assert n.age == 20 and n.title == HEX


def test_parse_nfd_is_normalized():
    nfd = unicodedata.normalize("NFD", LONG)
    assert nfd != LONG  # Hangul really decomposes
    n = parse_aihub_name(nfd)
    assert n.emotion == "기쁨" and unicodedata.is_normalized("NFC", n.place)


@pytest.mark.parametrize("name", ["photo.jpg", "a_b_c.jpg", f"{HEX}_남_xx_기쁨_20210125160548.jpg", "0101a02.jpg"])
def test_parse_rejects_other_names(name):
    assert parse_aihub_name(name) is None


def _annot(exp, box=(10, 20, 110, 140)):
    return {"faceExp": exp, "boxes": dict(zip(("minX", "minY", "maxX", "maxY"), box))}


def _vote(rec, tie="uploader", name=f"{HEX}_남_30_중립_20210125160548.jpg"):
    """(label, label_from, opinions, counts) of one JSON record, as the reader resolves it."""
    from collections import Counter

    from kfer.data.labels import LabelRecord, annotator_votes
    from kfer.data.readers import json_label

    votes, missing = annotator_votes(rec)
    uploader = rec.get("faceExp_uploader")
    counts = Counter()
    lab = LabelRecord(name, None, votes, missing, uploader)
    _, label, how, ops = json_label(load_params(REPO / "params.yaml"), {}, lab, parse_aihub_name(name), tie, counts)
    return label, how, ops, counts


def test_vote_majority_wins_over_uploader():
    rec = {"faceExp_uploader": "중립", "annot_A": _annot("기쁨"), "annot_B": _annot("기쁨"), "annot_C": _annot("슬픔")}
    label, how, ops, _ = _vote(rec)
    assert (label, how) == ("joy", "json_majority")
    assert (ops.uploader, ops.majority, ops.votes, ops.agreement) == ("neutral", "joy", "joy=2 sadness=1", "2")


def test_vote_three_way_tie_policy():
    rec = {"faceExp_uploader": "분노", "annot_A": _annot("기쁨"), "annot_B": _annot("중립"), "annot_C": _annot("슬픔")}
    assert _vote(rec)[:2] == ("anger", "json_uploader")
    label, how, ops, _ = _vote(rec, "skip")
    assert (label, how, ops.majority, ops.agreement) == (None, "tie", "", "1")


def test_vote_two_annotators_disagreeing_is_a_tie_and_no_annotator_uses_uploader():
    rec = {"faceExp_uploader": "분노", "annot_A": _annot("기쁨"), "annot_B": _annot("중립")}
    assert _vote(rec)[:2] == ("anger", "json_uploader")
    label, how, ops, counts = _vote({"faceExp_uploader": "당황"})
    assert (label, how, ops.votes) == ("embarrassment", "json_uploader", "")
    assert counts["no_usable_annotator"] == 1 and counts["annotator_no_label"] == 3
    assert _vote({"annot_A": _annot("기쁨")})[0] == "joy"


def test_vote_normalizes_nfd_labels():
    rec = {"annot_A": _annot(unicodedata.normalize("NFD", "기쁨")), "annot_B": _annot("기쁨")}
    assert _vote(rec)[0] == "joy"


def test_bad_annotator_and_uploader_fields_fall_back_by_rule_and_are_counted():
    # an annotator label that is no class: counted, it votes (it can block a majority) but is not in `votes`
    rec = {"faceExp_uploader": "기쁨", "annot_A": _annot("놀람"), "annot_B": _annot("분노"), "annot_C": _annot("분노")}
    label, how, ops, counts = _vote(rec)
    assert (label, ops.votes, ops.agreement) == ("anger", "anger=2", "2") and counts["annotator_unknown_label"] == 1
    rec = {"faceExp_uploader": "기쁨", "annot_A": _annot("놀람"), "annot_B": _annot("분노")}
    assert _vote(rec)[:2] == ("joy", "json_uploader")  # a tie: data.vote_tie
    # when it is the majority, the photo has a label outside the class list: unknown_label, as ever
    rec = {"faceExp_uploader": "기쁨", "annot_A": _annot("놀람"), "annot_B": _annot("놀람"), "annot_C": _annot("기쁨")}
    label, how, ops, counts = _vote(rec)
    assert label is None and how == "json_majority" and (ops.majority, ops.votes) == ("", "joy=1")
    # an empty or absent faceExp too
    rec = {"faceExp_uploader": "기쁨", "annot_A": {"faceExp": ""}, "annot_B": _annot("슬픔")}
    label, how, ops, counts = _vote(rec)
    assert (label, ops.votes) == ("sadness", "sadness=1") and counts["annotator_no_label"] == 2
    # uploader missing or unknown: the file name's emotion (중립) is the uploader's label
    for uploader, key in ((None, "uploader_missing"), ("놀람", "uploader_unknown_label")):
        rec = {"annot_A": _annot("기쁨"), "annot_B": _annot("기쁨"), "annot_C": _annot("기쁨")}
        if uploader:
            rec["faceExp_uploader"] = uploader
        label, how, ops, counts = _vote(rec)
        assert (label, ops.uploader) == ("joy", "neutral")
        assert counts[key] == 1 and counts["uploader_from_file_name"] == 1
    # nothing usable anywhere: no label, and the reason is the unknown label
    rec = {"faceExp_uploader": "놀람", "annot_A": _annot("놀람")}
    label, how, ops, counts = _vote(rec, name="photo.jpg")
    assert label is None and counts["annotator_unknown_label"] == 1


def test_boxes_median_and_bad_boxes():
    rec = {"annot_A": _annot("x", (10, 10, 100, 100)), "annot_B": _annot("x", (12, 14, 104, 90)),
           "annot_C": _annot("x", (0, 0, 0, 0))}  # degenerate C ignored
    assert annotated_box(rec)[0] == (11, 12, 102, 95)
    assert check_box({"minX": "a", "minY": 0, "maxX": 1, "maxY": 1})[0] is None
    assert check_box({"minX": 5, "minY": 0, "maxX": 1, "maxY": 1})[0] is None
    assert check_box(None)[0] is None
    assert annotated_box({"annot_A": {"faceExp": "x"}})[0] is None


def test_load_label_json_counts_bad_input(tmp_path):
    good = [{"filename": SHORT, "annot_A": _annot("분노"), "annot_B": _annot("분노"), "annot_C": _annot("슬픔")},
            {"no_filename": 1}, "not a record"]
    (tmp_path / "a.json").write_text(json.dumps(good, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "b.json").write_text("{broken", encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"data": [{"filename": LONG}]}, ensure_ascii=False), encoding="utf-8")
    idx = load_label_json(sorted(tmp_path.glob("*.json")), on_bad="skip")
    assert set(idx.records) == {SHORT, LONG}
    assert idx.records[SHORT].votes == ("분노", "분노", "슬픔") and idx.records[SHORT].box == (10, 20, 110, 140)
    assert idx.counts["bad_label_record"] == 2 and idx.counts["bad_label_file"] == 1


def _touch(path, data=b"\xff\xd8fake\xff\xd9"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_read_records_aihub_layout(tmp_path, make_params):
    raw = tmp_path / "data" / "raw"
    t2 = "a" * 64
    names = [
        SHORT,                                            # labelled by JSON (majority 슬픔, overrides name)
        LONG,                                             # no JSON record: label from file name
        unicodedata.normalize("NFD", f"{t2}_여_30_중립_20210101000000.jpg"),  # NFD on disk
        f"{t2}_여_30_놀람_20210101000001.jpg",             # unknown label, counted
    ]
    for n in names:
        _touch(raw / "img" / n)
    _touch(raw / "notes.txt", b"hello")
    labels = [{"filename": SHORT, "faceExp_uploader": "분노",
               "annot_A": _annot("슬픔"), "annot_B": _annot("슬픔"), "annot_C": _annot("분노")},
              {"filename": "missing.jpg", "annot_A": _annot("기쁨")}]
    (raw / "labels").mkdir()
    (raw / "labels" / "l.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")

    params = make_params()
    res = read_records(params)
    assert res.layout == "aihub"
    by = {r.rel.split("/")[-1]: r for r in res.records}
    assert by[SHORT].label == "sadness" and by[SHORT].box == (10, 20, 110, 140) and by[SHORT].group == HEX
    assert by[LONG].label == "joy" and by[LONG].box is None
    nfc_name = f"{t2}_여_30_중립_20210101000000.jpg"
    assert by[nfc_name].label == "neutral" and by[nfc_name].group == t2
    assert by[f"{t2}_여_30_놀람_20210101000001.jpg"].status == "unknown_label"
    assert by["notes.txt"].status == "not_an_image"
    assert res.by_status() == Counter({"ok": 3, "unknown_label": 1, "not_an_image": 1, "label_file": 1})
    assert res.label_counts["label_records_unmatched"] == 1


def test_read_records_folders_with_regex_group(tmp_path, make_params):
    raw = tmp_path / "data" / "raw"
    for rel in ["happy/0101b01.jpg", "happy/0202b01.jpg", "angry/0101d01.jpg", "contempt/0101x.jpg", "loose.jpg",
                "sad/zz.jpg"]:
        _touch(raw / rel)
    params = make_params({"data": {"group": {"source": "regex", "pattern": r"^(\d{2})"}}})
    res = read_records(params)
    assert res.layout == "folders"
    st = {r.rel: (r.label, r.group, r.status) for r in res.records}
    assert st["happy/0101b01.jpg"] == ("joy", "01", "ok")
    assert st["happy/0202b01.jpg"] == ("joy", "02", "ok")
    assert st["angry/0101d01.jpg"] == ("anger", "01", "ok")
    assert st["contempt/0101x.jpg"][2] == "unknown_label"
    assert st["loose.jpg"][2] == "no_label"
    assert st["sad/zz.jpg"][2] == "no_group"


def test_missing_raw_folder_is_a_clear_error(tmp_path, make_params):
    with pytest.raises(FileNotFoundError, match="dvc pull"):
        read_records(make_params())


def test_detect_layout(tmp_path):
    assert detect_layout([tmp_path / SHORT]) == "aihub"
    assert detect_layout([tmp_path / "happy" / "x.png"]) == "folders"


@pytest.mark.realdata
def test_aihub_named_copy_parses_to_right_labels_and_persons(make_params):
    src = shared_dir("aihub_style_tfeid")
    params = make_params({"paths": {"raw": str(src)}})
    res = read_records(params)
    assert res.layout == "aihub"
    with open(src / "manifest.csv", encoding="utf-8") as fh:
        truth = {row["file"]: row for row in csv.DictReader(fh)}
    ok = [r for r in res.records if r.status == "ok"]
    assert len(ok) == len(truth) == 119
    expected_label = {"happy": "joy", "angry": "anger", "sad": "sadness", "neutral": "neutral",
                      "surprise": "embarrassment", "fear": "anxiety"}
    person_of_group: dict[str, str] = {}
    for r in ok:
        row = truth[r.rel]
        assert r.source_label == row["emotion_ko"]
        assert r.label == expected_label[row["label"]]
        assert person_of_group.setdefault(r.group, row["subject"]) == row["subject"]
    assert len(person_of_group) == len({row["subject"] for row in truth.values()})


def test_every_path_has_one_record_broken_links_and_pipes_included(tmp_path, make_params):
    import os

    raw = tmp_path / "data" / "raw"
    happy = raw / "set1" / "happy"
    _touch(happy / "a.jpg")
    (happy / "gone.jpg").symlink_to(happy / "deleted.jpg")
    os.mkfifo(happy / "pipe.jpg")
    (happy / "loop").symlink_to(raw, target_is_directory=True)  # a cycle: not followed
    (raw / "set2").symlink_to(raw / "set1", target_is_directory=True)  # followed (DVC symlink cache)
    res = read_records(make_params({"data": {"group": {"source": "none"}}}))
    st = {r.rel: (r.status, r.detail) for r in res.records}
    for s in ("set1", "set2"):
        assert st[f"{s}/happy/a.jpg"][0] == "ok"
        assert st[f"{s}/happy/gone.jpg"][0] == "broken_link" and "deleted.jpg" in st[f"{s}/happy/gone.jpg"][1]
        assert st[f"{s}/happy/pipe.jpg"][0] == "not_a_file"
        assert st[f"{s}/happy/loop"][0] == "link_cycle"
    assert len(res.records) == len(st) == 8


def test_an_empty_raw_folder_is_a_clear_error(tmp_path, make_params):
    from kfer.errors import UserError

    (tmp_path / "data" / "raw" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="is empty"):
        read_records(make_params())


AIHUB_TREE = [
    "Training/[원천]EMOIMG_기쁨_TRAIN_01/{t}_남_20_기쁨_20210101000001.jpg",
    "Training/[원천]EMOIMG_기쁨_TRAIN_01/{t}_남_20_기쁨_도심 환경_20210101000002-001-002.jpg",
    "Validation/[원천]EMOIMG_분노_VALID_01/{u}_여_30_분노_20210101000003.jpg",
]


def test_aihub_download_layout_with_brackets_and_cp949_labels(tmp_path, make_params):
    raw = tmp_path / "data" / "raw"
    t, u = "a" * 64, "b" * 64
    for rel in AIHUB_TREE:
        _touch(raw / rel.format(t=t, u=u))
    recs = {
        "Training/[라벨]EMOIMG_기쁨_TRAIN/img_emotion_training_data(기쁨).json":
            [{"filename": AIHUB_TREE[0].format(t=t, u=u).split("/")[-1], "faceExp_uploader": "기쁨",
              "annot_A": _annot("기쁨"), "annot_B": _annot("기쁨"), "annot_C": _annot("당황")}],
        "Validation/[라벨]EMOIMG_분노_VALID/img_emotion_validation_data(분노).json":
            [{"filename": AIHUB_TREE[2].format(t=t, u=u).split("/")[-1], "faceExp_uploader": "분노",
              "annot_A": _annot("슬픔"), "annot_B": _annot("슬픔"), "annot_C": _annot("분노")}],
    }
    for rel, data in recs.items():
        (raw / rel).parent.mkdir(parents=True)
        (raw / rel).write_bytes(json.dumps(data, ensure_ascii=False).encode("cp949"))
    res = read_records(make_params())
    assert res.layout == "aihub"
    by = {r.rel: r for r in res.records}
    first, second, third = (by[r.format(t=t, u=u)] for r in AIHUB_TREE)
    assert (first.label, first.label_from, first.box) == ("joy", "json_majority", (10, 20, 110, 140))
    assert (second.label, second.label_from, second.box) == ("joy", "filename", None)
    assert (third.label, third.group) == ("sadness", u)  # annotators' majority over the folder's 분노
    assert {k: v["encoding"] for k, v in res.label_files.items()} == dict.fromkeys(recs, "cp949")
    assert sum(r.status == "label_file" for r in res.records) == 2


def test_sources_read_each_folder_its_own_way_and_namespace_persons(tmp_path, make_params):
    raw = tmp_path / "data" / "raw"
    _touch(raw / "aihub" / f"{HEX}_남_60_분노_20130314100000-002-000.jpg")
    _touch(raw / "ck" / "happy" / "S001_001_01.png")
    _touch(raw / "ck2" / "happy" / "S001_002_01.png")
    _touch(raw / "stray.jpg")
    params = make_params({"data": {"sources": {
        "aihub": {"layout": "aihub"},
        "ck": {"layout": "folders", "detector": "none", "group": {"source": "regex", "pattern": r"^(S\d+)_"}},
        "ck2": {"layout": "folders", "label_map": {"happy": "neutral"},
                "group": {"source": "regex", "pattern": r"^(S\d+)_"}},
    }}})
    res = read_records(params)
    by = {r.rel: r for r in res.records}
    assert res.layout == "sources" and res.layouts == {"aihub": "aihub", "ck": "folders", "ck2": "folders"}
    a = by[f"aihub/{HEX}_남_60_분노_20130314100000-002-000.jpg"]
    assert (a.source, a.group, a.label, a.detector) == ("aihub", f"aihub/{HEX}", "anger", None)
    ck, ck2 = by["ck/happy/S001_001_01.png"], by["ck2/happy/S001_002_01.png"]
    assert (ck.group, ck.label, ck.detector) == ("ck/S001", "joy", "none")
    assert (ck2.group, ck2.label) == ("ck2/S001", "neutral")  # the same "S001", another person
    assert by["stray.jpg"].status == "no_source"


def test_a_missing_source_folder_or_overlapping_sources_are_clear_errors(tmp_path, make_params):
    from kfer.errors import UserError

    _touch(tmp_path / "data" / "raw" / "a" / "x.jpg")
    with pytest.raises(UserError, match="'fer'.*not a folder"):
        read_records(make_params({"data": {"sources": {"fer": {}}}}))
    with pytest.raises(UserError, match="must not overlap"):
        make_params({"data": {"sources": {"a": {}, "a/b": {}}}})
