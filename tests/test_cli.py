"""The one door: `kfer --help`, `--set` overrides, MLproject defaults kept equal to params.yaml."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kfer.cli import main, merged_overrides, parse_sets
from kfer.config import load_params
from tests.helpers import REPO, subprocess_env

STAGES = {"crop", "split", "augment", "train", "evaluate", "register", "predict", "demo-data"}


def test_help_lists_every_stage():
    out = CliRunner().invoke(main, ["--help"]).output
    listed = set(re.findall(r"^  ([a-z-]+)\s", out, flags=re.M))
    assert STAGES <= listed, out
    for stage in STAGES:
        res = CliRunner().invoke(main, [stage, "--help"])
        assert res.exit_code == 0 and len(res.output) > 100, stage


def test_set_overrides_are_typed_and_validated(tmp_path):
    sets = parse_sets(("train.epochs=3", "model.blocks=[1, 1]", "model.kernel_initializer=glorot_uniform",
                        "train.learning_rate=1e-4"))
    p = load_params(REPO / "params.yaml", overrides=sets)
    assert p.train.epochs == 3 and p.model.blocks == (1, 1) and p.train.learning_rate == 1e-4
    assert p.model.kernel_initializer == "glorot_uniform"
    res = CliRunner().invoke(main, ["--params", str(REPO / "params.yaml"), "--set", "model.kernel_initializer=zeros",
                                    "crop"])
    assert res.exit_code == 2 and "kernel_initializer" in res.output and "Traceback" not in res.output
    assert res.output.startswith("Error: invalid ")  # a user's mistake: a message, not a traceback
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(main, ["--set", "no-equals-sign", "crop"])
    assert res.exit_code != 0 and "KEY=VALUE" in res.output


def test_merge_layers_a_params_file_over_params_yaml_before_set(tmp_path):
    """`kfer --merge FILE`: a file in params.yaml's layout deep-merged over it (lists replaced, maps key by key,
    null unmaps a label of a dropped class), in order, then --set; validated as params.yaml is. The real-faces recipe
    is such a file."""
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(yaml.safe_dump({
        "classes": [{"name": "joy", "ko": "기쁨"}, {"name": "neutral", "ko": "중립"}],
        "data": {"label_map": {k: None for k in ("당황", "분노", "불안", "상처", "슬픔", "surprise", "angry", "fear",
                                                 "sad")} | {"smile": "joy"}},
        "train": {"epochs": 3, "batch_size": 8}}, allow_unicode=True), encoding="utf-8")
    second.write_text("train: {epochs: 4}\n", encoding="utf-8")
    over = merged_overrides((str(first), str(second)), ("train.epochs=5",))
    assert over["train"] == {"epochs": 5, "batch_size": 8}
    p = load_params(REPO / "params.yaml", overrides=over)
    assert p.class_names == ["joy", "neutral"] and (p.train.epochs, p.train.batch_size) == (5, 8)
    assert p.map_label("smile") == "joy" and p.map_label("happy") == "joy" and p.map_label("상처") is None
    assert p.model.blocks == load_params(REPO / "params.yaml").model.blocks  # what no layer sets stays

    recipe = load_params(REPO / "params.yaml", overrides=merged_overrides((str(REPO / "recipes/real-faces.yaml"),), ()))
    assert "hurt" not in recipe.class_names and len(recipe.classes) == 6 and recipe.map_label("상처") is None
    assert {k: s.split for k, s in recipe.data.sources.items()} == {
        "fer2013": "heldout", "fer2013_train": "train", "ckplus": "auto", "tfeid": "auto", "muxspace": "auto"}
    assert (recipe.data.label_policy, recipe.data.soft_uploader_weight) == ("soft", 0.0)  # FER+'s distribution
    assert recipe.data.sources["fer2013"].votes.file == "ferplus_votes.csv"

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {kernel_initializer: zeros}\n", encoding="utf-8")
    res = CliRunner().invoke(main, ["--params", str(REPO / "params.yaml"), "--merge", str(bad), "crop"])
    assert res.exit_code == 2 and "kernel_initializer" in _one_error_line(res.stderr)
    bad.write_text("- train\n", encoding="utf-8")
    res = CliRunner().invoke(main, ["--merge", str(bad), "crop"])
    assert res.exit_code == 2 and "expected a mapping" in res.output


def test_mlproject_defaults_equal_params_yaml():
    project = yaml.safe_load((REPO / "MLproject").read_text(encoding="utf-8"))
    params = load_params(REPO / "params.yaml")
    checked = 0
    for entry in project["entry_points"].values():
        for name, spec in (entry.get("parameters") or {}).items():
            m = re.search(r"(?:--set|-S) ([\w.]+)=\{" + name + r"\}", entry["command"])
            if not m:
                continue
            node = params
            for part in m.group(1).split("."):
                node = getattr(node, part)
            if node is None:  # YAML's null, as dvc exp run -S reads it
                assert spec["default"] == "null", m.group(1)
            else:
                assert str(node) == str(spec["default"]) or float(node) == float(spec["default"]), m.group(1)
            checked += 1
    assert checked >= 7


# --- a user's mistake is one line naming the key or file, exit status 2, no traceback (kfer -v shows it) --------

def _repo_params(**edits) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for dotted, value in edits.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for k in parents:
            node = node[k]
        if value is _DROP:
            del node[leaf]
        else:
            node[leaf] = value
    return raw


_DROP = object()
_GOOD = (REPO / "params.yaml").read_text(encoding="utf-8")
PARAMS_MISTAKES = {
    "unknown key": (_repo_params(**{"crop.imagesize": 64}),
                    "unknown key crop.imagesize (did you mean crop.image_size?)"),
    "unknown top-level key": (_repo_params(seeds=1), "unknown key seeds (did you mean seed?)"),
    "wrong type": (_repo_params(**{"crop.image_size": "big"}),
                   "crop.image_size: input should be a valid integer, unable to parse string as an integer "
                   "(got 'big')"),
    "not a choice": (_repo_params(**{"model.kernel_initializer": "zeros"}),
                     "model.kernel_initializer: input should be 'he_normal', 'glorot_uniform', 'he_uniform' or "
                     "'lecun_normal' (got 'zeros')"),
    "a rule": (_repo_params(**{"split.train": 0.9}), "split ratios must sum to 1, got 1.2"),
    "missing key": (_repo_params(**{"paths.raw": _DROP}), "missing key paths.raw"),
    "bad regex": (_repo_params(**{"data.group": {"source": "regex", "pattern": "(["}}),
                  "data.group.pattern '([' is not a valid regular expression: unterminated character set at "
                  "position 1"),
    "regex without group": (_repo_params(**{"data.sources": {"fer": {"group": {"source": "regex",
                                                                                "pattern": "x"}}}}),
                            "data.sources.fer.group.pattern 'x' needs a capture group"),
    "several": (_repo_params(**{"crop.imagesize": 64, "train.epochs": 0}),
                "unknown key crop.imagesize (did you mean crop.image_size?); train.epochs: input should be greater "
                "than or equal to 1 (got 0)"),
    "retired key": (_repo_params(**{"train.pretrain_epochs": 2}),
                    "train.pretrain_epochs is no longer a setting: the pretraining phase was removed, and "
                    "train.init_from replaces it (train a model on the large source, then start from its weights; "
                    "see docs/data.md)"),
    "retired choice": (_repo_params(**{"data.sources": {"fer": {"split": "pretrain"}}}),
                       "data.sources.fer.split: pretrain is no longer a choice: the pretraining phase was removed, "
                       "and train.init_from replaces it"),
    "YAML syntax": (_GOOD.replace("seed: 42", "seed: [42", 1),
                    "line 8, column 1: invalid YAML: expected ',' or ']', but got '?' (while parsing a flow sequence "
                    "that starts at line 5, column 7)"),
    "YAML tab": ("seed: 1\n\tclasses: []\n", "line 2, column 1: invalid YAML: found character '\\t' that "
                                               "cannot start any token"),
    "not a mapping": ("- seed\n", "the file must be a mapping of keys (seed:, paths:, ...), not a list"),
}


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("kind", list(PARAMS_MISTAKES))
def test_a_params_mistake_is_one_line_naming_the_key(tmp_path, kind):
    content, expected = PARAMS_MISTAKES[kind]
    path = tmp_path / "params.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, allow_unicode=True),
                    encoding="utf-8")
    res = CliRunner().invoke(main, ["--params", str(path), "crop"])
    assert res.exit_code == 2, res.output
    line = _one_error_line(res.stderr)
    assert expected in line and str(path) in line, line


def test_a_missing_params_file_and_a_bad_override_are_one_line(tmp_path):
    res = CliRunner().invoke(main, ["--params", str(tmp_path / "nope.yaml"), "split"])
    assert res.exit_code == 2
    assert _one_error_line(res.stderr) == (f"Error: {tmp_path / 'nope.yaml'} not found: run kfer from the repository "
                                           "root or pass --params")
    res = CliRunner().invoke(main, ["--params", str(REPO / "params.yaml"), "--set", "crop.imagesize=3", "split"])
    assert res.exit_code == 2
    assert "unknown key crop.imagesize (did you mean crop.image_size?)" in _one_error_line(res.stderr)


def test_verbose_shows_the_traceback(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(_GOOD.replace("seed: 42", "seed: [42", 1), encoding="utf-8")
    res = CliRunner().invoke(main, ["-v", "--params", str(path), "crop"])
    assert res.exit_code == 2
    assert "Traceback (most recent call last)" in res.stderr and "yaml.parser.ParserError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"Error: {path} line 8, column 1: invalid YAML")


def _kfer(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kfer.cli", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def test_the_real_cli_prints_one_line_and_exits_2(tmp_path):
    (tmp_path / "params.yaml").write_text(_GOOD.replace("  image_size:", "  imagesize:", 1), encoding="utf-8")
    proc = _kfer(tmp_path, "crop")
    assert proc.returncode == 2, proc.stderr
    assert _one_error_line(proc.stderr) == ("Error: invalid params.yaml: unknown key crop.imagesize (did you mean "
                                            "crop.image_size?)")


@pytest.mark.parametrize("stage, missing, maker", [
    ("crop", "data/raw", "`dvc pull data.dvc`"),
    ("split", "data/cropped/manifest.csv", "`dvc repro crop` (or `kfer crop`)"),
    ("augment", "data/splits.csv", "`dvc repro split` (or `kfer split`)"),
    ("evaluate", "models/model.keras", "`kfer train` (dvc repro train)"),
])
def test_an_earlier_stage_not_run_is_one_line_naming_the_file_and_the_stage(tmp_path, stage, missing, maker):
    (tmp_path / "params.yaml").write_text(_GOOD, encoding="utf-8")
    proc = _kfer(tmp_path, stage)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line("\n".join(ln for ln in proc.stderr.splitlines() if ln.startswith(("Error", "Trace"))))
    assert f"{tmp_path / missing} not found: run {maker}" in line, line


def test_train_before_augment_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(_GOOD, encoding="utf-8")
    res = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "train"])
    assert res.exit_code == 2, res.output
    line = _one_error_line("\n".join(ln for ln in res.stderr.splitlines() if ln.startswith(("Error", "Trace"))))
    assert line == (f"Error: augmented manifest {tmp_path / 'data/augmented/manifest.csv'} not found: run "
                    "`dvc repro augment` (or `kfer augment`) first")


def test_train_on_an_augmented_manifest_with_source_is_one_line(tmp_path):
    """The augmented manifest's `original` column (the cropped original's path) was named `source` before: such a
    manifest is one line naming the stage to re-run."""
    (tmp_path / "params.yaml").write_text(_GOOD, encoding="utf-8")
    manifest = tmp_path / "data" / "augmented" / "manifest.csv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("path,source,label,group,copy\ndata/cropped/joy/a.png,data/cropped/joy/a.png,joy,p1,0\n",
                        encoding="utf-8")
    res = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "train"])
    assert res.exit_code == 2, res.output
    line = _one_error_line("\n".join(ln for ln in res.stderr.splitlines() if ln.startswith(("Error", "Trace"))))
    assert line == (f"Error: augmented manifest {manifest} lacks column(s) ['original'] (has ['path', 'source', "
                    "'label', 'group', 'copy']): re-run `dvc repro augment` (or `kfer augment`)")
