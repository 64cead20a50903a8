"""The registry flow against a tracking server set up as infra/compose.yaml sets it up: a real `mlflow
server` process on loopback, backed by a real PostgreSQL server (SQLite when no PostgreSQL binaries are
found), artifacts proxied into its own directory, the compose file's allowed Host headers. Train,
register and promote run as in tests/test_registry.py, with tracking.uri=http://127.0.0.1:PORT."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml
from local_postgres import free_port, local_postgres, postgres_bin_dir
from test_registry import MODEL, _exported, _promote

from serving.onnx_format import ONNX_FILE

COMPOSE = Path(__file__).resolve().parents[1] / "infra" / "compose.yaml"


@dataclass
class Backend:
    kind: str  # "postgresql" or "sqlite"
    uri: str
    query: Callable[[str], list[tuple]]


@pytest.fixture()
def backend(tmp_path: Path) -> Iterator[Backend]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        path = tmp_path / "server.db"

        def query_sqlite(sql: str) -> list[tuple]:
            with sqlite3.connect(path) as db:
                return list(db.execute(sql))

        yield Backend("sqlite", f"sqlite:///{path}", query_sqlite)
        return
    import psycopg2

    with local_postgres(bin_dir, "mlflow") as uri:
        def query_postgres(sql: str) -> list[tuple]:
            with psycopg2.connect(uri) as connection, connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall()

        # SQLAlchemy 2.1 takes a bare postgresql:// for psycopg 3: the driver is named, as in compose.yaml.
        yield Backend("postgresql", uri.replace("postgresql://", "postgresql+psycopg2://", 1), query_postgres)


def _compose_allowed_hosts() -> list[str]:
    command = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]["command"]
    (hosts,) = [item.partition("=")[2] for item in command if item.startswith("--allowed-hosts=")]
    return hosts.split(",")


def _status(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, allowed_hosts: list[str]) -> Iterator[str]:
    """`mlflow server` with compose's flags on a free loopback port; its whole process group is ended
    afterwards (it starts workers of its own)."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", backend_uri, "--serve-artifacts",
               "--artifacts-destination", str(artifacts),
               "--allowed-hosts", ",".join([*allowed_hosts, f"127.0.0.1:{port}"])]
    log = artifacts.parent / "mlflow-server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while _probe(f"{uri}/health") != 200:
            assert process.poll() is None, "mlflow server exited:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not come up:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        yield uri
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Workers outlive a parent that exits first; the group is ours alone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def _probe(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except OSError:
        return None


def test_train_register_promote_through_a_tracking_server_on_a_real_database(
        backend: Backend, tiny_overrides: list[str], tmp_path: Path) -> None:
    artifacts = tmp_path / "server-artifacts"
    with mlflow_server(backend.uri, artifacts, _compose_allowed_hosts()) as uri:
        # Clients on the compose network call it mlflow:5000; another Host header is refused (the
        # health endpoint is exempt from the check, the API is not).
        api = f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        assert _status(api, "mlflow:5000") == 200
        assert _status(api, "attacker.example:5000") == 403
        overrides = [o for o in tiny_overrides if not o.startswith("tracking.uri=")] + [f"tracking.uri={uri}"]
        client = mlflow.MlflowClient(uri)

        _exported(overrides, tmp_path, "onnx-cls", "cls")  # trains (zero-shot), indexes, exports: all register
        code, output = _promote(overrides, tmp_path, "promote-1")
        assert code == 0 and "no champion yet" in output, output
        _exported(overrides, tmp_path, "onnx-mean", "mean")
        code, output = _promote(overrides, tmp_path, "promote-2")
        assert code == 0 and "promoted to champion (was v1)" in output, output
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"

    # What the server stored is in the database itself, not in some file of the client's.
    versions = backend.query("SELECT name, version FROM model_versions")
    assert {(MODEL, 1), (MODEL, 2)} <= set(versions)
    assert {name for name, _ in versions} >= {"towerline-dual-encoder", "towerline-index"}
    assert backend.query(f"SELECT alias, version FROM registered_model_aliases WHERE name = '{MODEL}' "
                         "AND alias = 'champion'") == [("champion", 2)]
    # The ONNX encoders were uploaded through the server into its artifact destination.
    assert len(list(artifacts.rglob(ONNX_FILE))) == 2
    if postgres_bin_dir() is not None:
        assert backend.kind == "postgresql"
