"""labels: AI Hub label files in every encoding seen, unreadable files, and boxes counted by what is wrong."""

from __future__ import annotations

import codecs
import json

import pytest

from kfer.data.labels import (
    LabelFileError,
    annotated_box,
    check_box,
    decode_label_text,
    load_label_json,
)

NAME = "9ec608b7b30306a66b5b9e2008bcd634dc1cf7e832c9b412c539fac85e45a5b1_남_20_기쁨_20210101000000.jpg"


def _annot(exp, box=(10, 20, 110, 140)):
    return {"faceExp": exp, "boxes": dict(zip(("minX", "minY", "maxX", "maxY"), box))}


def _records():
    return [{"filename": NAME, "gender": "남", "age": 20, "isProf": "일반인", "faceExp_uploader": "기쁨",
             "bg_uploader": "도심 환경", "annot_A": _annot("기쁨"), "annot_B": _annot("기쁨"),
             "annot_C": _annot("슬픔")}]


@pytest.mark.parametrize(("encoding", "expected"), [
    ("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"), ("cp949", "cp949"), ("euc-kr", "cp949"), ("utf-16", "utf-16"),
])
def test_label_files_in_every_encoding_read_the_same(tmp_path, encoding, expected):
    path = tmp_path / "img_emotion_training_data(기쁨).json"
    path.write_bytes(json.dumps(_records(), ensure_ascii=False).encode(encoding))
    if encoding in ("cp949", "euc-kr"):
        with pytest.raises(UnicodeDecodeError):
            path.read_bytes().decode("utf-8")  # really not UTF-8
    idx = load_label_json([path])
    rec = idx.records[NAME]
    assert rec.votes[0] == "기쁨" and rec.box == (10, 20, 110, 140)
    assert idx.files[str(path)] == {"encoding": expected, "records": 1}


def test_undecodable_or_broken_label_file_stops_with_its_name_unless_skipped(tmp_path):
    bad = tmp_path / "img_emotion_training_data(분노).json"
    bad.write_bytes(b"\x81\xff\xfe\x00garbage")  # no supported encoding
    broken = tmp_path / "b.json"
    broken.write_text('[{"filename": ', encoding="utf-8")
    for path, why in ((bad, "not UTF-8, UTF-8 with BOM, UTF-16 or CP949/EUC-KR"), (broken, "not valid JSON")):
        with pytest.raises(LabelFileError) as exc:
            load_label_json([path])
        assert str(path) in str(exc.value) and why in str(exc.value)
        assert "data.on_bad_label_file: skip" in str(exc.value)
    idx = load_label_json([bad, broken], on_bad="skip")
    assert idx.counts["bad_label_file"] == 2 and not idx.records
    assert "not valid JSON" in idx.files[str(broken)]["error"]


def test_decode_prefers_utf8_and_falls_back_to_cp949():
    assert decode_label_text("기쁨".encode()) == ("기쁨", "utf-8")
    assert decode_label_text("기쁨".encode("cp949")) == ("기쁨", "cp949")
    assert decode_label_text(codecs.BOM_UTF8 + "중립".encode()) == ("중립", "utf-8-sig")


def test_boxes_are_dropped_and_counted_by_reason():
    assert check_box({"minX": 5, "minY": 0, "maxX": 1, "maxY": 9}) == (None, "inverted")
    assert check_box({"minX": 0, "minY": 0, "maxX": 0, "maxY": 9}) == (None, "zero_area")
    assert check_box({"minX": "a", "minY": 0, "maxX": 1, "maxY": 1}) == (None, "not_numeric")
    assert check_box({"minX": 0, "minY": 0}) == (None, "missing")
    assert check_box(None) == (None, "missing")
    rec = {"annot_A": _annot("x", (10, 10, 100, 100)), "annot_B": _annot("x", (300, 10, 200, 100)),
           "annot_C": {"faceExp": "x"}}
    box, dropped = annotated_box(rec)
    assert box == (10, 10, 100, 100) and dropped == {"inverted": 1, "missing": 1}


def test_records_without_a_usable_box_say_why(tmp_path):
    recs = [
        {"filename": "a.jpg", "annot_A": {"faceExp": "기쁨"}},  # no boxes at all
        {"filename": "b.jpg", "annot_A": _annot("기쁨", (50, 50, 10, 10)), "annot_B": _annot("기쁨", (50, 50, 10, 10))},
        {"filename": "c.jpg", "faceExp_uploader": "분노", "annot_A": _annot("기쁨"), "annot_B": _annot("슬픔"),
         "annot_C": _annot("중립")},  # three-way tie: uploader
    ]
    path = tmp_path / "l.json"
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    idx = load_label_json([path])
    assert idx.records["a.jpg"].box is None and idx.records["a.jpg"].box_issue == "missing"
    assert idx.records["b.jpg"].box_issue == "inverted"
    assert idx.records["c.jpg"].uploader == "분노" and idx.records["c.jpg"].votes == ("기쁨", "슬픔", "중립")
    assert idx.counts["annotator_box_inverted"] == 2 and idx.counts["annotator_box_missing"] == 1
