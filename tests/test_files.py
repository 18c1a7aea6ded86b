"""kfer.files: outputs follow the umask (not tempfile's 0700/0600), and atomic outputs survive failures."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from kfer import errors, files
from tests.helpers import augment_project, write_params


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
    from kfer.data.augment import run_augment
    from kfer.data.split import run_split

    params = augment_project(tmp_path / "proj", workers=1, copies=1)
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


# --- parallel_map: ordered, chunked, lazy; a dead worker fails the stage instead of hanging ----------------------

_TAG = None


def _init_tag(tag):
    global _TAG
    _TAG = tag


def _tagged(x):
    return x, _TAG, os.getpid()


def _fail_on_5(x):
    if x == 5:
        raise KeyError("item 5")
    return x


def test_parallel_map_keeps_order_chunks_and_initializer():
    out = list(files.parallel_map(_tagged, range(103), workers=2, chunksize=4, initializer=_init_tag,
                                  initargs=("t",)))
    assert [x for x, _, _ in out] == list(range(103)) and {t for _, t, _ in out} == {"t"}
    for start in range(0, 103, 4):  # each chunk of 4 consecutive items ran in one worker
        assert len({pid for _, _, pid in out[start:start + 4]}) == 1
    assert os.getpid() not in {pid for _, _, pid in out}
    serial = list(files.parallel_map(_tagged, range(5), workers=1, initializer=_init_tag, initargs=("s",)))
    assert [(x, t) for x, t, _ in serial] == [(i, "s") for i in range(5)]


def test_parallel_map_is_lazy_reraises_and_stops_early():
    import itertools

    results = files.parallel_map(abs, itertools.count(), workers=2, chunksize=8)  # an endless input
    assert [next(results) for _ in range(20)] == list(range(20))
    results.close()  # the caller stops early: the pool goes away, nothing hangs
    with pytest.raises(KeyError, match="item 5"):
        list(files.parallel_map(_fail_on_5, range(50), workers=2, chunksize=2))


_KILLED_WORKER = """
import os, signal, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kfer import errors, files
import victim

if __name__ == "__main__":
    t0 = time.monotonic()
    got = []
    try:
        for x in files.parallel_map(victim.die_on_37, range(10_000), workers=2, chunksize=4,
                                    workers_param="crop.workers"):
            got.append(x)
    except errors.WorkerDiedError as exc:
        assert got == list(range(len(got))), got  # what came back before is in order
        print(f"{time.monotonic() - t0:.1f}s {exc}")
        sys.exit(0)
    sys.exit("no error")
"""


def test_a_worker_killed_by_sigkill_fails_the_stage_instead_of_hanging(tmp_path):
    import subprocess
    import sys

    (tmp_path / "victim.py").write_text(
        "import os, signal\n\ndef die_on_37(x):\n    if x == 37:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return x\n", encoding="utf-8")
    (tmp_path / "main.py").write_text(_KILLED_WORKER, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(tmp_path / "main.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds, _, message = proc.stdout.strip().partition("s ")
    assert float(seconds) < 30, proc.stdout  # multiprocessing.Pool.imap waited forever here
    assert "a worker process died (killed by SIGKILL, e.g. by the OOM killer)" in message
    assert "lower crop.workers (now 2 processes)" in message and "\n" not in message


def test_a_dead_worker_is_one_line_from_the_cli(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from kfer import cli
    from kfer.data import crop

    message = ("a worker process died (killed by SIGKILL, e.g. by the OOM killer) and the stage stopped: lower "
               "crop.workers (now 2 processes) so that the workers fit in memory, or free memory")

    def dying_crop(params):
        raise errors.WorkerDiedError(message)

    monkeypatch.setattr(crop, "run_crop", dying_crop)
    write_params(tmp_path)
    res = CliRunner().invoke(cli.main, ["--params", str(tmp_path / "params.yaml"), "crop"])
    assert res.exit_code == 1, res.output  # the stage failed (not a mistake in the params: those exit 2)
    assert res.stderr.strip().splitlines() == [f"Error: {message}"]


def test_tmp_sibling_keeps_the_extension_and_is_cleaned_as_stale(tmp_path):
    from kfer.files import clean_stale_tmp, tmp_sibling

    target = tmp_path / "clip.pred.mp4"
    partial = tmp_sibling(target)
    assert partial.parent == tmp_path and partial.suffix == ".mp4" and partial.name.startswith(".clip.pred.mp4.tmp-")
    partial.write_bytes(b"half a video")
    assert clean_stale_tmp(target) == 1 and not partial.exists()
