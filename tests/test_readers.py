"""Readers: AI Hub file names (both forms, NFD), label JSON voting and boxes, class folders, group keys."""

from __future__ import annotations

import csv
import json
import unicodedata
from collections import Counter

import pytest

from kfer.readers import (
    detect_layout,
    load_label_json,
    median_box,
    parse_aihub_name,
    parse_box,
    read_records,
    vote_label,
)

from .conftest import shared_dir

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


def test_vote_majority_wins_over_uploader():
    rec = {"faceExp_uploader": "중립", "annot_A": _annot("기쁨"), "annot_B": _annot("기쁨"), "annot_C": _annot("슬픔")}
    assert vote_label(rec)[0] == "기쁨"


def test_vote_three_way_tie_policy():
    rec = {"faceExp_uploader": "분노", "annot_A": _annot("기쁨"), "annot_B": _annot("중립"), "annot_C": _annot("슬픔")}
    assert vote_label(rec, "uploader")[0] == "분노"
    assert vote_label(rec, "skip")[0] is None


def test_vote_two_annotators_disagreeing_is_a_tie_and_no_annotator_uses_uploader():
    rec = {"faceExp_uploader": "분노", "annot_A": _annot("기쁨"), "annot_B": _annot("중립")}
    assert vote_label(rec)[0] == "분노"
    assert vote_label({"faceExp_uploader": "당황"})[0] == "당황"
    assert vote_label({"annot_A": _annot("기쁨")})[0] == "기쁨"


def test_vote_normalizes_nfd_labels():
    rec = {"annot_A": _annot(unicodedata.normalize("NFD", "기쁨")), "annot_B": _annot("기쁨")}
    assert vote_label(rec)[0] == "기쁨"


def test_boxes_median_and_bad_boxes():
    rec = {"annot_A": _annot("x", (10, 10, 100, 100)), "annot_B": _annot("x", (12, 14, 104, 90)),
           "annot_C": _annot("x", (0, 0, 0, 0))}  # degenerate C ignored
    assert median_box(rec) == (11, 12, 102, 95)
    assert parse_box({"minX": "a", "minY": 0, "maxX": 1, "maxY": 1}) is None
    assert parse_box({"minX": 5, "minY": 0, "maxX": 1, "maxY": 1}) is None
    assert parse_box(None) is None
    assert median_box({"annot_A": {"faceExp": "x"}}) is None


def test_load_label_json_counts_bad_input(tmp_path):
    good = [{"filename": SHORT, "annot_A": _annot("분노"), "annot_B": _annot("분노"), "annot_C": _annot("슬픔")},
            {"no_filename": 1}, "not a record"]
    (tmp_path / "a.json").write_text(json.dumps(good, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "b.json").write_text("{broken", encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"data": [{"filename": LONG}]}, ensure_ascii=False), encoding="utf-8")
    idx = load_label_json(sorted(tmp_path.glob("*.json")))
    assert set(idx.records) == {SHORT, LONG}
    assert idx.records[SHORT].label == "분노" and idx.records[SHORT].box == (10, 20, 110, 140)
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
    assert res.by_status() == Counter({"ok": 3, "unknown_label": 1, "not_an_image": 1})
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
