"""File helpers shared by the stages: atomic outputs, PNG I/O, worker pools, stable keys.

An interrupted stage must leave no half-written dataset: every output folder is built in a hidden temporary
sibling and renamed into place only when complete; every output file is written to a temporary file in the
same folder and ``os.replace``-d.

Outputs follow the process umask like any ``open``/``mkdir`` would (folders ``0o777 & ~umask``, files
``0o666 & ~umask``: 0755/0644 under umask 022), although ``tempfile`` creates its folders 0700 and files 0600,
so that teammates, a shared DVC cache or a web server can read them when the umask allows it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kfer.errors import WorkerDiedError

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


def tmp_sibling(target: str | os.PathLike) -> Path:
    """A temporary name next to ``target`` that keeps its extension (for writers that pick the format by it, as
    ``cv2.VideoWriter``), in the pattern :func:`clean_stale_tmp` removes: ``.<name>.tmp-<pid><suffix>``."""
    target = Path(target)
    return target.parent / f"{_tmp_prefix(target)}{os.getpid()}{target.suffix}"


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


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write an image as PNG (deterministic bytes for the same pixels); works with non-ASCII paths.

    Not atomic by itself (use it inside :func:`atomic_dir`); a new file gets ``0o666 & ~umask`` as with ``open``.
    """
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"PNG encoding failed for {path}")
    Path(path).write_bytes(buf.tobytes())


def write_image(path: str | os.PathLike, img: np.ndarray, encode_params: Iterable[int] = ()) -> Path:
    """Encode ``img`` (BGR or gray uint8) in the format of the path's extension (``.png``, ``.jpg``…) and write it
    atomically (:func:`atomic_file`); non-ASCII paths work. Returns the path."""
    out = Path(path)
    ok, buf = cv2.imencode(out.suffix, img, list(encode_params))
    if not ok:
        raise OSError(f"cannot encode the image for {out}")
    with atomic_file(out, "wb") as fh:
        fh.write(buf.tobytes())
    return out


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


def _run_chunk(fn: Callable[[Any], Any], chunk: list) -> list:
    return [fn(item) for item in chunk]


def _dead_worker(procs: dict) -> str:
    """How the first worker that died ended, as words ("" when unknown), from the pool's process objects."""
    codes = [p.exitcode for p in procs.values() if p.exitcode not in (None, 0)]
    # the pool SIGTERMs the survivors when one dies: prefer any other end
    code = next((c for c in codes if c != -signal.SIGTERM), codes[0] if codes else None)
    if code is None:
        return ""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f" (killed by {name}{', e.g. by the OOM killer' if -code == signal.SIGKILL else ''})"
    return f" (exit status {code})"


def parallel_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    chunksize: int = 8,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    workers_param: str | None = None,
) -> Iterator[Any]:
    """Ordered map over ``items``: in this process when ``workers`` is 1, else in a process pool.

    Results come back in input order, so outputs never depend on the worker count. Workers are started
    with the "spawn" method: the parent may already hold TensorFlow's threads, which fork does not copy safely.
    Items are handed out ``chunksize`` at a time with at most ``4 * workers`` chunks in flight, so ``items`` is
    consumed as the pool needs it and memory stays flat however many there are. A worker that dies (the OOM
    killer's SIGKILL, a crash in native code) raises :class:`WorkerDiedError` naming ``workers_param`` (the
    params key to lower, e.g. ``"crop.workers"``), never hangs; an exception in ``fn`` is re-raised as is.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    chunksize = max(1, int(chunksize))
    window = 4 * workers
    chunks = iter(lambda it=iter(items): list(itertools.islice(it, chunksize)), [])
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                               initargs=initargs)
    procs: dict = {}  # pid -> Process, kept to tell how a dead worker ended (the pool forgets them)
    pending: collections.deque = collections.deque()
    done = False
    try:
        for chunk in chunks:
            pending.append(pool.submit(_run_chunk, fn, chunk))
            procs.update(getattr(pool, "_processes", None) or {})
            if len(pending) >= window:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
        done = True
    except BrokenProcessPool as exc:
        time.sleep(0.1)  # let the dead worker's exit status be collected
        lower = (f"lower {workers_param} (now {workers} processes)" if workers_param
                 else f"use fewer than {workers} worker processes")
        raise WorkerDiedError(
            f"a worker process died{_dead_worker(procs)} and the stage stopped: {lower} so that the workers fit "
            "in memory, or free memory"
        ) from exc
    finally:
        for fut in pending:
            fut.cancel()
        if done:
            pool.shutdown(wait=True)
        else:  # an error, or the caller stopped early: do not wait for the chunks in flight
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                p.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
