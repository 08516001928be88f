"""Writers with ``session_replication_role = replica`` are captured, before and after cutover.

Logical replication apply workers, ``pg_restore --disable-triggers`` and bulk loaders write
that way; ordinary (``ENABLE``) triggers do not fire for them. The capture and reverse
triggers are ``ENABLE ALWAYS``: such a writer's INSERT, UPDATE, key move, DELETE, COPY
and TRUNCATE reach the other table, checked right after the writes (not through verify).
The control sets the capture trigger back to a plain ``ENABLE``: the same writes go
missing from the twin.
"""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
import pytest

from helpers import drain
from orchestrator import runner
from orchestrator.lab.sample import create_orders
from orchestrator.plan import parse_plan

END = datetime(2026, 10, 20, 12, tzinfo=timezone.utc)
TABLE, TWIN, RETIRED = "public.orders", "public.orders_partitioned", "public.orders_retired"


def _diff(conn: psycopg.Connection, a: str, b: str) -> int:
    return conn.execute(
        f"SELECT count(*) FROM ((SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b}) UNION ALL "
        f"(SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a})) d").fetchone()[0]


def _replica_writes(dsn: str, tag: int) -> None:
    """One replication-role session: every kind of row write, COPY included."""
    with psycopg.connect(dsn, autocommit=True) as w:
        w.execute("SET session_replication_role = replica")
        ids = [r[0] for r in w.execute("SELECT id FROM orders ORDER BY id")]
        with w.transaction():
            w.execute("INSERT INTO orders (customer_id, amount, note, created_at) "
                      "VALUES (%s, 1, 'replica insert', timestamptz '2026-10-15 10:00+00')", (tag,))
            w.execute("UPDATE orders SET amount = amount + 7, note = NULL WHERE id = %s", (ids[3],))
            w.execute("UPDATE orders SET created_at = created_at - interval '40 days' WHERE id = %s", (ids[5],))
            w.execute("DELETE FROM orders WHERE id = %s", (ids[7],))
            w.execute("UPDATE orders SET status = 'paid' WHERE id = ANY(%s)", (ids[20:40],))
            w.execute("DELETE FROM orders WHERE id = ANY(%s)", (ids[50:60],))
        with w.cursor().copy("COPY orders (customer_id, amount, note, created_at) FROM STDIN") as cp:
            for i in range(25):
                cp.write_row((tag, i, f"copied {i}", datetime(2026, 10, 12, i % 24, tzinfo=timezone.utc)))


def _setup(conn: psycopg.Connection, dsn: str, capture_mode: str = "sync"):
    create_orders(conn, TABLE, rows=400, days=10, end=END, seed=9)
    plan = parse_plan({"table": TABLE, "partition_by": {"column": "created_at", "interval": "1 month"},
                       "backfill": {"batch_size": 50, "fixed_batch_size": True},
                       "capture": {"mode": capture_mode}})
    runner.apply(plan, dsn, until="capture")
    return plan


def test_replica_role_writers_are_captured_and_reverse_synced(dsn: str, conn: psycopg.Connection,
                                                              capture_mode: str) -> None:
    plan = _setup(conn, dsn, capture_mode)
    # (the column guard, orchestrate_capture_columns, never fires: WHEN (false))
    modes = dict(conn.execute("SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass "
                              "AND tgname LIKE 'orchestrate_%' AND tgname NOT LIKE '%columns'").fetchall())
    assert modes == {"orchestrate_capture": "A", "orchestrate_capture_truncate": "A"}, modes
    _replica_writes(dsn, 1)  # before the copy: rows not in the twin yet
    runner.apply(plan, dsn, until="backfill")
    assert _diff(conn, TABLE, TWIN) == 0
    _replica_writes(dsn, 2)  # after the copy: every change must reach the twin by the trigger
    if capture_mode == "async":
        assert drain(conn) > 0  # (apply's replay thread stopped with apply)
    assert _diff(conn, TABLE, TWIN) == 0
    runner.apply(plan, dsn)  # verify and cutover
    modes = dict(conn.execute("SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass "
                              "AND tgname LIKE 'orchestrate_%' AND tgname NOT LIKE '%columns'").fetchall())
    assert modes == {"orchestrate_reverse": "A", "orchestrate_reverse_truncate": "A"}, modes
    _replica_writes(dsn, 3)
    assert _diff(conn, TABLE, RETIRED) == 0
    with psycopg.connect(dsn, autocommit=True) as w:
        w.execute("SET session_replication_role = replica")
        w.execute("TRUNCATE orders")
    assert conn.execute(f"SELECT count(*) FROM {RETIRED}").fetchone()[0] == 0


@pytest.mark.parametrize("when", ["capture", "truncate"])
def test_control_plain_enable_misses_replica_writes(dsn: str, conn: psycopg.Connection, when: str) -> None:
    """The old trigger mode (``ENABLE``, fires only for origin sessions): writes are lost."""
    plan = _setup(conn, dsn)
    runner.apply(plan, dsn, until="backfill")
    conn.execute("ALTER TABLE orders ENABLE TRIGGER orchestrate_capture")
    conn.execute("ALTER TABLE orders ENABLE TRIGGER orchestrate_capture_truncate")
    if when == "capture":
        _replica_writes(dsn, 2)
    else:
        with psycopg.connect(dsn, autocommit=True) as w:
            w.execute("SET session_replication_role = replica")
            w.execute("TRUNCATE orders")
    assert _diff(conn, TABLE, TWIN) > 0


def test_subscription_apply_worker_is_captured_and_named(cluster, dsn: str, conn: psycopg.Connection) -> None:
    """A real logical replication subscription writes into the table (its apply worker runs
    as replica): its inserts, updates and deletes reach the twin; plan and status name the
    subscription and the publications that involve the table."""
    from helpers import wait_until

    pub_db = conn.info.dbname[:40] + "_pub"
    cluster.create_database(pub_db)
    sub_created = False
    try:
        with psycopg.connect(cluster.primary_dsn(pub_db), autocommit=True) as pub:
            create_orders(pub, TABLE, rows=400, days=10, end=END, seed=9)  # same rows as the subscriber's
            pub.execute("CREATE PUBLICATION upstream FOR TABLE public.orders")
            # Publisher and subscriber share the cluster: CREATE SUBSCRIPTION would wait for
            # its own transaction while creating the slot, so the slot is made beforehand.
            pub.execute("SELECT pg_create_logical_replication_slot('feed', 'pgoutput')")
        plan = _setup(conn, dsn)
        conn.execute("CREATE PUBLICATION downstream FOR TABLE public.orders")
        conn.execute("CREATE PUBLICATION everything FOR ALL TABLES")
        conn.execute(f"CREATE SUBSCRIPTION feed CONNECTION '{cluster.primary_dsn(pub_db)}' PUBLICATION upstream "
                     "WITH (copy_data = false, create_slot = false, slot_name = 'feed')")
        sub_created = True
        runner.apply(plan, dsn, until="backfill")
        with psycopg.connect(cluster.primary_dsn(pub_db), autocommit=True) as pub:
            ids = [r[0] for r in pub.execute("SELECT id FROM orders ORDER BY id")]
            pub.execute("UPDATE orders SET amount = amount + 3 WHERE id = ANY(%s)", (ids[:30],))
            pub.execute("DELETE FROM orders WHERE id = ANY(%s)", (ids[100:110],))
            pub.execute("INSERT INTO orders (id, customer_id, amount, created_at) "
                        "VALUES (100000, 1, 1, timestamptz '2026-10-14 00:00+00')")
        wait_until(lambda: conn.execute("SELECT count(*) FROM orders WHERE id = 100000").fetchone()[0] == 1,
                   timeout=60, message="the subscription never applied the publisher's writes")
        assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 391
        assert _diff(conn, TABLE, TWIN) == 0
        warnings = runner.make_plan(plan, dsn).data["warnings"]
        text = "\n".join(warnings)
        assert "subscription feed writes into public.orders" in text, warnings
        assert "publication downstream publishes public.orders" in text, warnings
        assert "publication everything is FOR ALL TABLES" in text, warnings
        status = runner.status(plan, dsn).data["warnings"]
        assert any(w.startswith("subscription feed ") for w in status), status
        from orchestrator.cli.report import status_text

        assert "warning    subscription feed writes into public.orders" in \
            status_text(runner.status(plan, dsn).data)
    finally:
        if sub_created:
            conn.execute("ALTER SUBSCRIPTION feed DISABLE")
            conn.execute("ALTER SUBSCRIPTION feed SET (slot_name = NONE)")
            conn.execute("DROP SUBSCRIPTION feed")
        with psycopg.connect(cluster.primary_dsn(pub_db), autocommit=True) as pub:
            wait_until(lambda: pub.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'feed' "
                                           "AND active").fetchone()[0] == 0, timeout=30)
            pub.execute("SELECT pg_drop_replication_slot('feed') FROM pg_replication_slots WHERE slot_name = 'feed'")
        cluster.drop_database(pub_db)
