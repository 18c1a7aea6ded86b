"""kfer.files: outputs follow the umask (not tempfile's 0700/0600), and atomic outputs survive failures."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from kfer import files


@pytest.fixture
def umask():
    """Set the process umask for one test; the previous one is always restored."""
    old = os.umask(0o022)
    os.umask(old)

    def _set(value: int) -> None:
        os.umask(value)

    yield _set
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of root and everything under it, relative path -> mode."""
    return {p.relative_to(root.parent).as_posix(): stat.S_IMODE(p.lstat().st_mode)
            for p in [root, *sorted(root.rglob("*"))]}


def _check_tree(root: Path, dir_mode: int, file_mode: int) -> None:
    modes = _modes(root)
    for rel, mode in modes.items():
        p = root.parent / rel
        want = dir_mode if p.is_dir() else file_mode
        assert mode == want, f"{rel}: {oct(mode)} != {oct(want)}"
    assert any((root.parent / r).is_file() for r in modes) and any((root.parent / r).is_dir() for r in modes)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_current_umask_reads_without_changing(umask, mask):
    umask(mask)
    assert files.current_umask() == mask
    assert files.current_umask() == mask  # unchanged by reading it
    assert files.output_mode(True) == 0o777 & ~mask and files.output_mode(False) == 0o666 & ~mask


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"),
                         [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_atomic_outputs_follow_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    target = tmp_path / "out"
    with files.atomic_dir(target) as tmp:
        (tmp / "sub" / "deeper").mkdir(parents=True)
        files.write_png(tmp / "sub" / "a.png", np.zeros((4, 4), np.uint8))
        files.write_png(tmp / "sub" / "deeper" / "기쁨.png", np.full((4, 4), 7, np.uint8))
        with files.atomic_file(tmp / "manifest.csv") as fh:
            fh.write("path\n")
        files.write_json(tmp / "sub" / "report.json", {"n": 1})
    _check_tree(target, dir_mode, file_mode)

    # top-level files, binary and text, and a rewrite of an existing one
    files.write_json(tmp_path / "metrics" / "r.json", {"a": 1})
    files.write_json(tmp_path / "metrics" / "r.json", {"a": 2})
    with files.atomic_file(tmp_path / "model.bin", "wb") as fh:
        fh.write(b"\x00\x01")
    for name in ("metrics/r.json", "model.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == file_mode, name


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"),
                         [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_stage_outputs_follow_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    """Real stages: split (files) and augment (a folder of PNGs + manifest, written by worker code)."""
    from kfer.augment import run_augment
    from kfer.split import run_split

    from .test_augment import make_project

    params = make_project(tmp_path / "proj", workers=1, copies=1)
    umask(mask)
    run_augment(params)
    _check_tree(params.path(params.paths.augmented), dir_mode, file_mode)
    assert stat.S_IMODE(params.path(params.paths.augment_report).stat().st_mode) == file_mode

    cropped = params.path(params.paths.cropped)
    splits = params.path(params.paths.splits)
    rows = ["path,label,group,status"] + [
        f"{p.relative_to(params.root).as_posix()},{p.parent.name},person{i % 5},ok"
        for i, p in enumerate(sorted(cropped.rglob("p*.png")))
    ]
    (cropped / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    splits.unlink()
    run_split(params)
    for p in (splits, params.path(params.paths.split_report)):
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p


def test_failure_inside_atomic_dir_keeps_the_previous_output(tmp_path):
    target = tmp_path / "out"
    with files.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="boom"), files.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new", encoding="utf-8")
        (tmp / "b.txt").write_text("new", encoding="utf-8")
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert (target / "a.txt").read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left

    # the same for a file
    files.write_json(tmp_path / "r.json", {"v": "old"})
    with pytest.raises(KeyboardInterrupt), files.atomic_file(tmp_path / "r.json") as fh:
        fh.write('{"v": "half')
        raise KeyboardInterrupt
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == '{\n  "v": "old"\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.json"]
