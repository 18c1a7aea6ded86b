"""File helpers shared by the stages: atomic outputs, PNG I/O, worker pools, stable keys.

An interrupted stage must leave no half-written dataset: every output folder is built in a hidden temporary
sibling and renamed into place only when complete; every output file is written to a temporary file in the
same folder and ``os.replace``-d.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

TMP_MARK = ".tmp-"


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}{TMP_MARK}"


def clean_stale_tmp(target: Path) -> int:
    """Remove temporary siblings left by a killed run of the stage that writes ``target``."""
    target = Path(target)
    n = 0
    if target.parent.exists():
        for p in target.parent.glob(_tmp_prefix(target) + "*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``target`` whole, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(target)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f"{_tmp_prefix(target)}old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", **kw: Any) -> Iterator[Any]:
    """Open a temporary file next to ``target``; it becomes ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
    os.close(fd)
    try:
        if "b" not in mode:
            kw.setdefault("encoding", "utf-8")
            kw.setdefault("newline", "")
        with open(tmp, mode, **kw) as fh:
            yield fh
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(target: str | os.PathLike, obj: Any) -> None:
    with atomic_file(target) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, sort_keys=False)
        fh.write("\n")


def read_table(path: str | os.PathLike, required: Iterable[str], what: str, hint: str):
    """A stage's CSV contract (manifest, splits) as strings, with clear errors naming the stage to run.

    ``hint`` is the command that makes the file, e.g. "kfer crop".
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found: run `{hint}` first")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} is not a readable CSV ({exc}): re-run `{hint}`") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{what} {path} lacks column(s) {missing} (has {list(df.columns)}): re-run `{hint}`")
    return df


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write an image as PNG (deterministic bytes for the same pixels); works with non-ASCII paths."""
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    Path(path).write_bytes(buf.tobytes())


def read_image_gray(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit grayscale image (PNG written by the pipeline); works with non-ASCII paths."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise OSError(f"cannot decode image {path}")
    return img


def stable_int(*parts: object) -> int:
    """A 64-bit integer from the parts, identical across processes, runs and machines (unlike hash())."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def resolve_workers(workers: int) -> int:
    """0 means all cores this process may use."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def parallel_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    chunksize: int = 8,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> Iterator[Any]:
    """Ordered map over ``items``: in this process when ``workers`` is 1, else in a process pool.

    Results come back in input order, so outputs never depend on the worker count. Workers are started
    with the "spawn" method: the parent may already hold TensorFlow's threads, which fork does not copy safely.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)
