"""File helpers shared by the stages: atomic outputs, PNG I/O, worker pools, stable keys.

An interrupted stage must leave no half-written dataset: every output folder is built in a hidden temporary
sibling and renamed into place only when complete; every output file is written to a temporary file in the
same folder and ``os.replace``-d.

Outputs follow the process umask like any ``open``/``mkdir`` would (folders ``0o777 & ~umask``, files
``0o666 & ~umask``: 0755/0644 under umask 022), although ``tempfile`` creates its folders 0700 and files 0600,
so that teammates, a shared DVC cache or a web server can read them when the umask allows it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

TMP_MARK = ".tmp-"
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux >= 4.7: /proc/self/status).

    Elsewhere it is swapped out and back under a lock; the interim value is 077, never 0, so a file another thread
    creates in that instant is private rather than world-writable.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def output_mode(is_dir: bool, umask: int | None = None) -> int:
    """The permission bits a new output gets: ``0o777`` (folders) or ``0o666`` (files) minus the umask."""
    return (0o777 if is_dir else 0o666) & ~(current_umask() if umask is None else umask)


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
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))  # 0700: opened up below
    try:
        os.chmod(tmp, output_mode(is_dir=True))
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
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)  # 0600: opened up below
    try:
        try:
            os.fchmod(fd, output_mode(is_dir=False))
        finally:
            os.close(fd)
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


def read_table(path: str | os.PathLike, required: Iterable[str], what: str, hint: str,
               also: Iterable[str] | None = None):
    """A stage's CSV contract (manifest, splits) as strings, with clear errors naming the stage to run.

    ``hint`` is the command that makes the file, e.g. "kfer crop". With ``also``, only the ``required``
    columns and those of ``also`` that the file has are read (a 500k-row manifest then costs what its reader
    needs, not all its columns); without it, every column.
    """
    required = tuple(required)
    wanted = None if also is None else {*required, *also}.__contains__
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found: run `{hint}` first")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", usecols=wanted)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} is not a readable CSV ({exc}): re-run `{hint}`") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        has = list(pd.read_csv(path, nrows=0, encoding="utf-8").columns)
        raise ValueError(f"{what} {path} lacks column(s) {missing} (has {has}): re-run `{hint}`")
    return df


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write an image as PNG (deterministic bytes for the same pixels); works with non-ASCII paths.

    Not atomic by itself (use it inside :func:`atomic_dir`); a new file gets ``0o666 & ~umask`` as with ``open``.
    """
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
