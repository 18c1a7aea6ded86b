"""Group fields (gender, age group, a per-person table's columns): read from AI Hub names, label records and a
groups table, normalized alike, `unknown` counted, carried through the crop manifest to splits.csv; a table
column that is not there is one clear error."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kfer.data.groups import age_group, decode, encode, gender
from kfer.data.readers import read_records
from kfer.errors import UserError
from kfer.files import write_png
from tests.helpers import shared_dir

HEX = "9ec608b7b30306a66b5b9e2008bcd634dc1cf7e832c9b412c539fac85e45a5b1"


def test_values_are_normalized_so_that_sources_read_alike():
    assert [gender(v) for v in ("남", "M", "male", "Man", "여", "f", "Female", "여성")] == ["male"] * 4 + ["female"] * 4
    assert [gender(v) for v in ("", None, "  ")] == ["unknown"] * 3
    assert gender("Other") == "other"  # kept (lowercased), not guessed
    assert [age_group(v) for v in (24, "24", "20", 20, "67", "60대", "30s", "18.5")] == [
        "20s", "20s", "20s", "20s", "60s", "60s", "30s", "10s"]
    assert [age_group(v) for v in ("", None, "adult", "-3", "200", "nan")] == ["unknown"] * 6
    fields = {"gender": "male", "age_group": "20s", "ethnicity": "East Asian"}
    assert decode(encode(fields)) == fields and decode("") == {} and encode({}) == ""


def _png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.full((40, 40), value, np.uint8))


def _table(path, columns, rows):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        w.writerows(rows)


def _project(tmp_path, make_params, table_rows, columns=None, extra_groups=None):
    """data/raw/aihub (AI Hub names, one photo named otherwise with a label record) and data/raw/tf (TFEID-like
    folders, performers.csv with P<nn> keys)."""
    raw = tmp_path / "data" / "raw"
    _png(raw / "aihub" / f"{HEX}_남_20_기쁨_20210101000001.png")
    _png(raw / "aihub" / f"{'b' * 64}_여_60_분노_도심_20210101000002-001-002.png")
    _png(raw / "aihub" / "renamed.png")  # no AI Hub name: label, gender and age from its record
    (raw / "aihub" / "labels.json").write_text(json.dumps(
        [{"filename": "renamed.png", "gender": "여", "age": 30, "faceExp_uploader": "슬픔"}], ensure_ascii=False),
        encoding="utf-8")
    for rel in ("happy/0101a.png", "happy/0202b.png", "angry/0103c.png", "angry/0904d.png"):
        _png(raw / "tf" / rel)
    _table(raw / "tf" / "performers.csv", ["subject", "gender", "age"], table_rows)
    groups = {"file": "performers.csv", "key": "subject", "key_pattern": r"^P(\d{2})$",
              "columns": columns or {"gender": "gender", "age_group": "age"}, **(extra_groups or {})}
    return make_params({"crop": {"detector": "none", "workers": 1, "image_size": 32}, "data": {"sources": {
        "aihub": {"layout": "aihub", "group": {"source": "none"}},  # renamed.png has no title to key on
        "tf": {"layout": "folders", "group": {"source": "regex", "pattern": r"^(\d{2})"}, "groups": groups},
    }}})


PERFORMERS = [("P01", "M", "24"), ("P02", "F", ""), ("P02", "M", "50"), ("bad", "F", "30"), ("P03", "F", "67")]


def test_fields_from_aihub_names_label_records_and_a_groups_table(tmp_path, make_params):
    res = read_records(_project(tmp_path, make_params, PERFORMERS))
    by = {r.rel: r for r in res.records}
    assert by["tf/performers.csv"].status == "label_file"
    fields = {rel: dict(r.groups) for rel, r in by.items() if r.status == "ok"}
    assert fields == {
        f"aihub/{HEX}_남_20_기쁨_20210101000001.png": {"gender": "male", "age_group": "20s"},
        f"aihub/{'b' * 64}_여_60_분노_도심_20210101000002-001-002.png": {"gender": "female", "age_group": "60s"},
        "aihub/renamed.png": {"gender": "female", "age_group": "30s"},  # the label record's
        "tf/happy/0101a.png": {"gender": "male", "age_group": "20s"},  # P01 -> 01 by key_pattern
        "tf/happy/0202b.png": {"gender": "female", "age_group": "unknown"},  # blank age; the first P02 row counts
        "tf/angry/0103c.png": {"gender": "male", "age_group": "20s"},
        "tf/angry/0904d.png": {"gender": "unknown", "age_group": "unknown"},  # performer 09 not in the table
    }
    assert res.label_counts["groups_person_missing"] == 1
    info = res.label_files["tf/performers.csv"]
    assert (info["records"], info["persons"], info["groups_row_bad_key"], info["groups_row_duplicate"]) == (5, 3, 1, 1)


def test_fields_go_through_the_crop_manifest_and_splits_csv_and_are_counted(tmp_path, make_params):
    from kfer.data.crop import run_crop
    from kfer.data.split import run_split

    params = _project(tmp_path, make_params, PERFORMERS)
    report = run_crop(params)
    assert report["groups"] == {"gender": {"female": 3, "male": 3, "unknown": 1},
                                "age_group": {"20s": 3, "30s": 1, "60s": 1, "unknown": 2}}
    assert report["label_json"]["groups_person_missing"] == 1
    manifest = pd.read_csv(params.path(params.paths.cropped) / "manifest.csv", dtype=str, keep_default_na=False)
    row = manifest[manifest["raw"].str.endswith("0101a.png")].iloc[0]
    assert row["groups"] == "gender=male;age_group=20s" and row["source"] == "tf"
    run_split(params)
    splits = pd.read_csv(params.path(params.paths.splits), dtype=str, keep_default_na=False)
    assert dict(zip(splits["path"], splits["groups"], strict=True)) == dict(
        zip(manifest["path"][manifest["status"] == "ok"], manifest["groups"][manifest["status"] == "ok"],
            strict=True))


def test_a_groups_column_the_table_lacks_is_one_clear_error(tmp_path, make_params):
    params = _project(tmp_path, make_params, PERFORMERS, columns={"gender": "gender", "age_group": "years"})
    with pytest.raises(UserError, match=r"performers.csv has no column 'years' \(data.sources.tf.groups.columns"
                                        r".age_group; it has \['subject', 'gender', 'age'\]\)"):
        read_records(params)

    from kfer.cli import main

    res = CliRunner().invoke(main, ["--params", str(params.root / "params.yaml"), "crop"])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in res.stderr, res.stderr
    assert "no column 'years'" in lines[0]


def test_groups_params_mistakes_name_the_key(tmp_path, make_params):
    with pytest.raises(UserError, match="key_pattern .* needs a capture group"):
        _project(tmp_path, make_params, PERFORMERS, extra_groups={"key_pattern": "^P"})
    with pytest.raises(UserError, match="source is reserved"):
        _project(tmp_path, make_params, PERFORMERS, columns={"source": "gender"})
    params = _project(tmp_path, make_params, PERFORMERS, extra_groups={"file": "people.csv"})
    with pytest.raises(UserError, match=r"data.sources.tf.groups.file 'people.csv'"):
        read_records(params)


@pytest.mark.realdata
def test_tfeid_performers_table_gives_every_face_a_gender_and_age_group(tmp_path, make_params):
    """The real-faces recipe's tfeid source: every labelled photo gets its performer's gender and age group from
    performers.csv (20 performers, 10 M / 10 F, 18-67 years)."""
    import yaml

    from tests.helpers import REPO

    src = shared_dir("tfeid_chen2013")
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "tfeid").symlink_to(src, target_is_directory=True)
    recipe = yaml.safe_load((REPO / "recipes" / "real-faces.yaml").read_text(encoding="utf-8"))
    params = make_params({"classes": recipe["classes"], "data": {
        "label_map": recipe["data"]["label_map"], "sources": {"tfeid": recipe["data"]["sources"]["tfeid"]}}})
    res = read_records(params)
    ok = [r for r in res.records if r.status == "ok"]
    assert len(ok) > 600 and res.label_counts["groups_person_missing"] == 0
    fields = [dict(r.groups) for r in ok]
    assert all(f["gender"] in ("male", "female") and f["age_group"] != "unknown" for f in fields)
    with open(src / "performers.csv", encoding="utf-8") as fh:
        table = {row["subject"][1:]: row for row in csv.DictReader(fh)}
    person_gender = {r.group: dict(r.groups)["gender"] for r in ok}
    assert Counter(person_gender.values()) == {"male": 10, "female": 10}
    for r in ok:
        row = table[r.group.removeprefix("tfeid/")]
        assert dict(r.groups) == {"gender": {"M": "male", "F": "female"}[row["gender"]],
                                  "age_group": f"{int(row['age']) // 10 * 10}s"}
    assert {dict(r.groups)["age_group"] for r in ok} <= {"10s", "20s", "30s", "40s", "50s", "60s"}
