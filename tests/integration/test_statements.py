"""Statements that will break after cutover, found in pg_stat_statements before they break:
`plan` names them, `apply` refuses until the plan acknowledges them, and the prediction is
checked against the real table after cutover."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import run_cli
from orchestrator.lab.cluster import LocalCluster

NOW = datetime.now(timezone.utc)
UPSERT = "INSERT INTO public.items (id, created_at, v) VALUES (%s, now(), 'x') ON CONFLICT (id) DO UPDATE SET v = 'y'"


@pytest.fixture(scope="module")
def stats_server(cluster: LocalCluster) -> Iterator[LocalCluster]:
    settings = {"shared_preload_libraries": "pg_stat_statements", "shared_buffers": "32MB"}
    with LocalCluster(pg_bin=cluster.pg_bin, replica=False, settings=settings) as c:
        yield c


def write_plan(tmp_path: Path, ack: list[str] | None = None) -> Path:
    d = {"table": "public.items", "partition_by": {"column": "created_at", "interval": "1 month", "premake": 1},
         "backfill": {"range": "1 month"},
         "cutover": {"lock_timeout": "200ms", "attempts": 50, "backoff_max": "300ms"}}
    if ack:
        d["acknowledge_statements"] = ack
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_on_conflict_pk_is_found_refused_then_acknowledged(stats_server, tmp_path):
    """Without the mechanism plan exits 0 and the application's upsert fails after cutover
    ('there is no unique or exclusion constraint matching the ON CONFLICT specification')."""
    name = f"t_stmts_{uuid.uuid4().hex[:8]}"
    dsn = stats_server.create_database(name)
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        conn.execute("CREATE EXTENSION pg_stat_statements")
        conn.execute("CREATE TABLE public.items (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, v text)")
        conn.execute("INSERT INTO public.items SELECT g, %s::timestamptz - g * interval '3 hours', 'v' "
                     "FROM generate_series(1, 200) g", (NOW,))
        for i in range(3):  # the application's statements
            conn.execute(UPSERT, (i + 1,))
            conn.execute("INSERT INTO public.items (id, created_at, v) VALUES (%s, now(), 'z') ON CONFLICT DO NOTHING",
                         (2000 + i,))
        qid = conn.execute("SELECT queryid::text FROM pg_stat_statements WHERE query LIKE '%ON CONFLICT (id) DO%'"
                           ).fetchone()[0]
        plan = write_plan(tmp_path)
        for verb in ("plan", "apply"):
            code, out, err = run_cli(verb, plan, "--dsn", dsn)
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert code == 3 and len(errors) == 1, (code, out, err)
            assert f"queryid {qid}" in errors[0] and "ON CONFLICT (id)" in errors[0]
            assert "1 statement(s)" in errors[0]  # the bare ON CONFLICT DO NOTHING keeps working
        assert conn.execute("SELECT to_regclass('public.items_partitioned')").fetchone()[0] is None
        plan = write_plan(tmp_path, ack=[qid])
        code, out, err = run_cli("apply", plan, "--dsn", dsn)
        assert code == 0, err
        # The prediction, checked on the real table.
        with pytest.raises(psycopg.errors.InvalidColumnReference, match="ON CONFLICT"):
            conn.execute(UPSERT, (1,))
        conn.execute("INSERT INTO public.items (id, created_at, v) VALUES (5000, now(), 'z') "
                     "ON CONFLICT (id, created_at) DO NOTHING")
    finally:
        conn.close()
        stats_server.drop_database(name)
