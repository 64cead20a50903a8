"""A throwaway PostgreSQL server for tests: initdb into a temporary directory, `postgres` on loopback,
stopped and deleted afterwards, whatever happened. Nothing system-wide is created or changed.

PostgreSQL refuses to run as root, so under root both run as `nobody`, from a directory it owns."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def postgres_bin_dir() -> Path | None:
    """The directory holding initdb and postgres: on PATH, else Debian's /usr/lib/postgresql/*/bin."""
    on_path = [shutil.which(name) for name in ("initdb", "postgres")]
    if all(on_path):
        return Path(os.path.realpath(on_path[0])).parent  # type: ignore[arg-type]
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if all((Path(candidate) / name).is_file() for name in ("initdb", "postgres")):
            return Path(candidate)
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_unprivileged() -> dict[str, Any]:
    """Popen arguments that drop root to `nobody` (and its group only); nothing when not root."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


@contextmanager
def local_postgres(bin_dir: Path, database: str) -> Iterator[str]:
    """Yield the libpq URI of `database` on a fresh server (superuser `postgres`, trust auth on loopback
    only)."""
    import psycopg2

    drop = _as_unprivileged()
    # Under /tmp rather than pytest's tmp_path: that one is private to root, and `nobody` must enter.
    root = Path(tempfile.mkdtemp(prefix="towerline-pg-"))
    if drop:
        os.chown(root, drop["user"], drop["group"])
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    server = None
    try:
        made = subprocess.run([str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "postgres",
                               "--auth=trust", "-E", "UTF8", "--no-sync"], cwd=root, env=env, capture_output=True,
                              text=True, timeout=120, **drop)
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{made.stdout}{made.stderr}")
        port = free_port()
        log = (root / "postgres.log").open("wb")
        # fsync off: a test database need not survive a power cut.
        server = subprocess.Popen([str(bin_dir / "postgres"), "-D", str(root / "data"), "-h", "127.0.0.1",
                                   "-p", str(port), "-k", str(root), "-c", "fsync=off"],
                                  cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, **drop)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("postgres did not start:\n" + (root / "postgres.log").read_text()) from None
                time.sleep(0.2)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{database}"')
        connection.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(root, ignore_errors=True)
