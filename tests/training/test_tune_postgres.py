"""`kfer tune --workers 2` on a real PostgreSQL server (started here, on 127.0.0.1, in a temporary folder).

Needs the server binaries (initdb, pg_ctl, postgres: Debian ``apt-get install postgresql``, macOS ``brew install
postgresql``) and the psycopg driver (a kfer dependency: ``./setup.sh``); skips with a message otherwise. The
server refuses to run as root, so under root it runs as the ``postgres`` user (made by the Debian package).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from kfer.training.tune.study import RUN_ID_ATTR, STUDY_TAG, TRIAL_TAG, WORKER_ATTR
from tests.helpers import subprocess_env
from tests.training.test_tune import _runs, base_project, project  # noqa: F401 - the tune tests' fixtures and helpers

SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
INSTALL_HINT = ("install the PostgreSQL server: `apt-get install postgresql` (Debian/Ubuntu; binaries in "
                "/usr/lib/postgresql/<version>/bin) or `brew install postgresql` (macOS)")


def _server_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: Debian's newest /usr/lib/postgresql/<v>/bin, else PATH."""
    def version(p: Path) -> tuple:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in SERVER_TOOLS):
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url(tmp_path):
    """A fresh PostgreSQL server and an empty database ``optuna``; its URL (with a password). Stopped at teardown
    (``pg_ctl stop -m immediate``), even when the test fails."""
    bindir = _server_bin()
    if bindir is None:
        pytest.skip(f"PostgreSQL server binaries ({', '.join(SERVER_TOOLS)}) not found in /usr/lib/postgresql/*/bin "
                    f"or on PATH: {INSTALL_HINT}")
    psycopg = pytest.importorskip("psycopg", reason="the psycopg driver is missing: run ./setup.sh "
                                                    "(or pip install 'psycopg[binary]')")
    run_as: dict = {}
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as "
                        f"(the Debian package creates it): {INSTALL_HINT}")
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        # pytest's temporary folders are private to root (mode 700): the server gets its own folder in /tmp
        base = Path(tempfile.mkdtemp(prefix="kfer-pg-"))
        os.chown(base, pw.pw_uid, pw.pw_gid)
    else:
        base = tmp_path / "pg"
        base.mkdir()
    data, log_file, pwfile = base / "data", base / "server.log", base / "pwfile"
    password = "kfer-test-secret"
    pwfile.write_text(password + "\n", encoding="utf-8")
    if run_as:
        os.chown(pwfile, run_as["user"], run_as["group"])
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}

    def pg(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(bindir / args[0]), *args[1:]], env=env, cwd=base, capture_output=True,
                              text=True, timeout=timeout, check=check, **run_as)

    started = False
    try:
        pg("initdb", "-D", str(data), "-U", "kfer", "--pwfile", str(pwfile), "--auth=scram-sha-256",
           "--encoding=UTF8", "--no-locale", "--no-sync")
        for _ in range(3):  # the port is free when chosen; another process could take it before the server does
            port = _free_port()
            opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories='' -c fsync=off"
            proc = pg("pg_ctl", "-D", str(data), "-l", str(log_file), "-o", opts, "-w", "-t", "60", "start",
                      check=False)
            if proc.returncode == 0:
                started = True
                break
        if not started:
            log_text = log_file.read_text(errors="replace") if log_file.exists() else ""
            pytest.fail(f"PostgreSQL did not start:\n{proc.stdout}{proc.stderr}\n{log_text[-3000:]}")
        with psycopg.connect(host="127.0.0.1", port=port, user="kfer", password=password, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE optuna")
        yield f"postgresql://kfer:{password}@127.0.0.1:{port}/optuna"
    finally:
        if started:
            pg("pg_ctl", "-D", str(data), "stop", "-m", "immediate", "-w", "-t", "60", check=False)
        if run_as:
            with contextlib.suppress(OSError):
                shutil.rmtree(base)


@pytest.mark.slow
def test_two_workers_share_a_study_in_postgresql(project, postgres_url):
    params = project()
    budget = 4
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "kfer.cli", "--set", "tune.epochs=1", "tune", "--storage",
                             postgres_url, "--workers", "2", "--trials", str(budget)],
                            cwd=params.root, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-5000:]
    seconds = time.monotonic() - t0
    summary = json.loads(params.path(params.paths.tune_summary).read_text(encoding="utf-8"))
    assert summary["storage"].startswith("postgresql://") and "kfer-test-secret" not in summary["storage"]
    assert not params.path(params.paths.optuna_db).exists()  # nothing went to the default SQLite storage

    study = optuna.load_study(study_name=summary["study_name"], storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))) and len(set(numbers)) == len(trials)  # distinct
    left = [(t.number, t.state.name) for t in trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert left == []  # none RUNNING (lost) or FAIL
    # the budget, or one more: two workers may both start the last trial in the same instant (see trials.work)
    assert budget <= len(trials) <= budget + 1, numbers
    assert summary["n_complete"] + summary["n_pruned"] == len(trials) and summary["n_running"] == 0
    workers = {t.user_attrs[WORKER_ATTR] for t in trials}
    assert len(workers) == 2 and str(proc.pid) not in {w.split(":")[1] for w in workers}  # the two spawned workers
    assert all(len(t.intermediate_values) == 1 for t in trials)  # --set tune.epochs=1 reached the workers

    _, parents, children = _runs(params)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags[STUDY_TAG] == study.study_name
    assert parent.data.tags["optuna.storage"] == summary["storage"]
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in children) == sorted(numbers)
    assert {r.info.run_id for r in children} == {t.user_attrs[RUN_ID_ATTR] for t in trials}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in children)
    print(f"kfer tune --workers 2 on PostgreSQL: {len(trials)} trials in {seconds:.1f} s")
