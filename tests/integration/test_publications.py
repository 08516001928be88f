"""Publications keep delivering the table's changes to an existing subscriber (a real one,
on a second local server) through the cutover and a rollback after it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone

import psycopg
import pytest

from helpers import run_cli, wait_until
from orchestrator import runner
from orchestrator.lab.cluster import LocalCluster
from orchestrator.plan import parse_plan

NOW = datetime.now(timezone.utc)
DDL = "CREATE TABLE public.items (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, v text)"


@pytest.fixture(scope="module")
def subscriber(cluster: LocalCluster) -> Iterator[LocalCluster]:
    with LocalCluster(pg_bin=cluster.pg_bin, replica=False) as c:
        yield c


def rows(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT id, created_at, v FROM public.items ORDER BY id").fetchall()


def test_subscriber_keeps_receiving_through_cutover_and_rollback(conn, dsn, subscriber, tmp_path):
    """Without the mechanism, after the swap the publication lists the leaf partitions: the
    subscriber's apply worker stops with 'logical replication target relation
    public.items_p..." does not exist' and never catches up."""
    conn.execute(DDL)
    conn.execute("CREATE INDEX ON public.items (created_at)")
    conn.execute("INSERT INTO public.items SELECT g, %s::timestamptz - g * interval '3 hours', 'v' || g "
                 "FROM generate_series(1, 300) g", (NOW,))
    conn.execute("CREATE PUBLICATION sd_pub FOR TABLE public.items")
    dbname = conn.info.dbname
    subscriber.create_database(dbname)
    sub = psycopg.connect(subscriber.primary_dsn(dbname), autocommit=True)
    try:
        sub.execute(DDL)
        sub.execute(f"CREATE SUBSCRIPTION sd_sub CONNECTION '{dsn}' PUBLICATION sd_pub")
        wait_until(lambda: len(rows(sub)) == 300, timeout=60, message="initial sync")
        plan_file = tmp_path / "plan.yaml"
        plan_file.write_text(json.dumps({
            "table": "public.items", "partition_by": {"column": "created_at", "interval": "1 month", "premake": 1},
            "backfill": {"range": "1 month"},
            "cutover": {"lock_timeout": "200ms", "attempts": 50, "backoff_max": "300ms"}}))
        code, out, err = run_cli("plan", plan_file, "--dsn", dsn, "-o", "json")
        assert code == 0, err
        assert any("publish_via_partition_root is set to true" in w for w in json.loads(out)["warnings"])
        runner.apply(parse_plan(json.loads(plan_file.read_text())), dsn)
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.items'::regclass").fetchone()[0] == "p"

        def write(base: int) -> None:
            conn.execute("INSERT INTO public.items SELECT %s + g, now() - g * interval '1 day', 'new' "
                         "FROM generate_series(1, 20) g", (base,))
            conn.execute("UPDATE public.items SET v = 'upd' || %s WHERE id %% 7 = 0", (base,))
            conn.execute("DELETE FROM public.items WHERE id % 11 = 0 AND id < 300")

        write(1000)
        wait_until(lambda: rows(sub) == rows(conn), timeout=60, message="subscriber behind after cutover")
        code, _, err = run_cli("rollback", plan_file, "--dsn", dsn)
        assert code == 0, err
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.items'::regclass").fetchone()[0] == "r"
        write(2000)
        wait_until(lambda: rows(sub) == rows(conn), timeout=60, message="subscriber behind after rollback")
        assert conn.execute("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'sd_pub' "
                            "AND tablename = 'items'").fetchone()[0] == 1
    finally:
        sub.execute("DROP SUBSCRIPTION IF EXISTS sd_sub")
        sub.close()
        subscriber.drop_database(dbname)
