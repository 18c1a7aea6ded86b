"""The one door: `kfer --help`, `--set` overrides, MLproject defaults kept equal to params.yaml."""

from __future__ import annotations

import re

import yaml
from click.testing import CliRunner

from kfer.cli import _parse_sets, main
from kfer.config import load_params

from .conftest import REPO

STAGES = {"crop", "split", "augment", "train", "evaluate", "register", "predict", "demo-data"}


def test_help_lists_every_stage():
    out = CliRunner().invoke(main, ["--help"]).output
    listed = set(re.findall(r"^  ([a-z-]+)\s", out, flags=re.M))
    assert STAGES <= listed, out
    for stage in STAGES:
        res = CliRunner().invoke(main, [stage, "--help"])
        assert res.exit_code == 0 and len(res.output) > 100, stage


def test_set_overrides_are_typed_and_validated(tmp_path):
    sets = _parse_sets(("train.epochs=3", "model.blocks=[1, 1]", "model.kernel_initializer=glorot_uniform",
                        "train.learning_rate=1e-4"))
    p = load_params(REPO / "params.yaml", overrides=sets)
    assert p.train.epochs == 3 and p.model.blocks == (1, 1) and p.train.learning_rate == 1e-4
    assert p.model.kernel_initializer == "glorot_uniform"
    res = CliRunner().invoke(main, ["--params", str(REPO / "params.yaml"), "--set", "model.kernel_initializer=zeros",
                                    "crop"])
    assert res.exit_code == 1 and "kernel_initializer" in res.output and "Traceback" not in res.output
    assert res.output.startswith("Error: invalid ")  # a user's mistake: a message, not a traceback
    res = CliRunner().invoke(main, ["--set", "no-equals-sign", "crop"])
    assert res.exit_code != 0 and "KEY=VALUE" in res.output


def test_mlproject_defaults_equal_params_yaml():
    project = yaml.safe_load((REPO / "MLproject").read_text(encoding="utf-8"))
    params = load_params(REPO / "params.yaml")
    checked = 0
    for entry in project["entry_points"].values():
        for name, spec in (entry.get("parameters") or {}).items():
            m = re.search(r"--set ([\w.]+)=\{" + name + r"\}", entry["command"])
            if not m:
                continue
            node = params
            for part in m.group(1).split("."):
                node = getattr(node, part)
            assert str(node) == str(spec["default"]) or float(node) == float(spec["default"]), m.group(1)
            checked += 1
    assert checked >= 7
