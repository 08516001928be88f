"""Fixtures of the Citus tests: a coordinator and two workers, started lazily, once per session.

Only the tests in this directory use them, so the rest of the suite never starts Citus.
Every test here is marked ``citus`` (below): the PostgreSQL 18 pass of scripts/test.sh
deselects them (``-m "not slow and not citus"``): the Citus kit builds for the system
PostgreSQL 15 only. Where they run, a missing Citus is a FAILURE naming the fix, never a
skip: .ci/run builds it with ../shared/citus/build.sh first.

Fixtures:
  citus         session CitusCluster (coordinator + 2 workers)
  citus_db      (cluster, name) of a fresh database on all three nodes, extension created,
                workers registered on the coordinator; dropped after the test
  citus_dsn     the coordinator's DSN of that database
  citus_conn    autocommit connection to it
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from orchestrator.lab.citus_cluster import CITUS_MISSING, CitusCluster, citus_installed
from orchestrator.lab.cluster import find_pg_bin


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.citus)


@pytest.fixture(scope="session")
def citus() -> Iterator[CitusCluster]:
    if os.environ.get("ORCHESTRATE_TEST_PG", "").strip() in ("18", "embedded", "wheel"):
        pytest.fail("the Citus tests need the system PostgreSQL 15 (deselect them with -m 'not citus')")
    pg_bin = find_pg_bin("15")
    if not citus_installed(pg_bin):
        pytest.fail(CITUS_MISSING)
    with CitusCluster(pg_bin) as c:
        yield c


@pytest.fixture
def citus_db(citus: CitusCluster, request: pytest.FixtureRequest) -> Iterator[tuple[CitusCluster, str]]:
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:36]
    name = f"c_{stem}_{uuid.uuid4().hex[:10]}"
    citus.create_database(name, register_workers=not request.node.get_closest_marker("no_workers"))
    try:
        yield citus, name
    finally:
        citus.drop_database(name)


@pytest.fixture
def citus_dsn(citus_db: tuple[CitusCluster, str]) -> str:
    c, name = citus_db
    return c.dsn(name)


@pytest.fixture
def citus_conn(citus_dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(citus_dsn, autocommit=True) as conn:
        yield conn
