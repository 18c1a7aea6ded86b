"""Fixtures of the training tests: a PostgreSQL server for the tune storage test.

The server needs its binaries (initdb, pg_ctl, postgres: Debian ``apt-get install postgresql``, macOS ``brew install
postgresql``) and the psycopg driver (a kfer dependency: ``./setup.sh``); a test that asks for it skips with a message
otherwise. The server refuses to run as root, so under root it runs as the ``postgres`` user (made by the Debian
package).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import free_port

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
            port = free_port()
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
