"""DELETE and TRUNCATE capture, checked directly: write, then compare both tables at once
(no verify in between), before and after cutover.

Each case is also run with the trigger removed (the control), where the same write leaves
the tables different: the comparison is able to see what the trigger does.
"""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
import pytest

from orchestrator import runner
from orchestrator.lab.sample import create_orders
from orchestrator.plan import parse_plan

END = datetime(2026, 10, 20, 12, tzinfo=timezone.utc)
TABLE, TWIN, RETIRED = "public.orders", "public.orders_partitioned", "public.orders_retired"

WRITES = {
    "delete one": "DELETE FROM orders WHERE id = (SELECT min(id) FROM orders)",
    "delete many": "DELETE FROM orders WHERE id % 7 = 0",
    "delete a moved row": "WITH m AS (UPDATE orders SET created_at = created_at - interval '40 days' "
                          "WHERE id = (SELECT max(id) FROM orders) RETURNING id) DELETE FROM orders WHERE id % 11 = 0",
    "truncate": "TRUNCATE orders",
}


def _diff(conn: psycopg.Connection, a: str, b: str) -> int:
    return conn.execute(
        f"SELECT count(*) FROM ((SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) UNION ALL "
        f"(SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a})) d").fetchone()[0]


def _migrated(conn: psycopg.Connection, dsn: str, until: str | None) -> None:
    create_orders(conn, TABLE, rows=500, days=10, end=END, seed=13)
    plan = parse_plan({"table": TABLE, "partition_by": {"column": "created_at", "interval": "1 month"},
                       "backfill": {"batch_size": 40, "fixed_batch_size": True}})
    runner.apply(plan, dsn, until=until)


@pytest.mark.parametrize("trigger", [True, False], ids=["captured", "control"])
@pytest.mark.parametrize("write", list(WRITES))
def test_delete_and_truncate_reach_the_twin(dsn: str, conn: psycopg.Connection, write: str, trigger: bool) -> None:
    _migrated(conn, dsn, "backfill")
    assert _diff(conn, TABLE, TWIN) == 0
    if not trigger:
        conn.execute("ALTER TABLE orders DISABLE TRIGGER orchestrate_capture")
        conn.execute("ALTER TABLE orders DISABLE TRIGGER orchestrate_capture_truncate")
    before = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    conn.execute(WRITES[write])
    assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] < before
    assert (_diff(conn, TABLE, TWIN) == 0) is trigger


@pytest.mark.parametrize("write", list(WRITES))
def test_delete_and_truncate_reach_the_retired_table(dsn: str, conn: psycopg.Connection, write: str) -> None:
    _migrated(conn, dsn, None)
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    before = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    conn.execute(WRITES[write])
    assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] < before
    assert _diff(conn, TABLE, RETIRED) == 0
