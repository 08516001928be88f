"""The sample table and the golden-record workload, against a real PostgreSQL."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import psycopg

from orchestrator.sample import create_orders
from orchestrator.workload import OPS, Workload

AWKWARD_DDL = """
CREATE SCHEMA "Shop Data";
CREATE TYPE "Shop Data"."Mood" AS ENUM ('happy', 'sad', 'it''s complicated');
CREATE TABLE "Shop Data"."LineItems" (
    tenant_id int NOT NULL,
    id bigint GENERATED ALWAYS AS IDENTITY,
    doomed text,
    "Due Date" date,
    mood "Shop Data"."Mood" NOT NULL DEFAULT 'happy',
    qty int NOT NULL CHECK (qty BETWEEN 1 AND 100),
    price numeric(10,3) NOT NULL,
    total numeric GENERATED ALWAYS AS (qty * price) STORED,
    label varchar(20),
    code char(4) NOT NULL CHECK (code ~ '^[A-Z]{4}$'),
    tags text[],
    blob bytea,
    attrs jsonb,
    raw json,
    seen_at timestamp,
    PRIMARY KEY (tenant_id, id)
);
ALTER TABLE "Shop Data"."LineItems" DROP COLUMN doomed;
INSERT INTO "Shop Data"."LineItems"
    (tenant_id, "Due Date", mood, qty, price, label, code, tags, blob, attrs, raw, seen_at)
SELECT 1 + g % 7,
       CASE WHEN g % 50 = 0 THEN NULL ELSE date '2024-01-01' + (g % 366) END,
       (enum_range(NULL::"Shop Data"."Mood"))[1 + g % 3],
       1 + g % 100,
       (g % 1000) / 7.0,
       CASE WHEN g % 3 = 0 THEN NULL ELSE 'l' || g END,
       chr(65 + g % 26) || 'BCD',
       ARRAY['a', 'b"c', 'd''e', 'é'],
       decode(md5(g::text), 'hex'),
       jsonb_build_object('g', g, 'q', 'it''s "x"'),
       json_build_object('g', g),
       timestamp '2024-01-01' + g * interval '1 hour'
FROM generate_series(1, 3000) AS g;
"""


def _assert_clean(report, allow_zero: tuple[str, ...] = ()) -> None:
    assert report.errors == 0, report.error_samples
    assert report.reconnects == 0
    for op in OPS:
        if op not in allow_zero:
            assert report.ops[op] > 0, (op, report.ops)
    assert report.writes == sum(report.ops[o] for o in OPS if o != "read")
    assert report.latency_ms["p50"] <= report.latency_ms["p99"] <= report.latency_ms["max"]
    assert report.max_latency_at is not None
    assert report.as_dict()["max_latency_at"]


def test_create_orders_builds_table_indexes_view_and_grant(conn: psycopg.Connection) -> None:
    end = datetime(2025, 6, 30, 12, tzinfo=timezone.utc)
    create_orders(conn, "public.orders", rows=5_000, days=90, end=end, seed=7)

    count, lo, hi, ids = conn.execute(
        "SELECT count(*), min(created_at), max(created_at), max(id) FROM orders"
    ).fetchone()
    assert count == 5_000 and ids == 5_000
    assert end - timedelta(days=90) <= lo < hi <= end
    # The serial continues after the loaded rows.
    conn.execute("INSERT INTO orders (customer_id, amount) VALUES (1, 1)")
    assert conn.execute("SELECT max(id) FROM orders").fetchone()[0] == 5_001

    statuses = {r[0] for r in conn.execute("SELECT DISTINCT status FROM orders")}
    assert statuses == {"new", "paid", "shipped", "cancelled", "refunded"}
    notes = conn.execute(
        "SELECT count(*) FILTER (WHERE note IS NULL), count(*) FILTER (WHERE note LIKE '%''%'),"
        " count(*) FILTER (WHERE strpos(note, chr(92)) > 0), count(*) FILTER (WHERE note ~ '[^\\x01-\\x7f]'),"
        " count(*) FILTER (WHERE payload IS NULL) FROM orders"
    ).fetchone()
    assert all(n > 0 for n in notes), notes

    indexes = {
        r[0]
        for r in conn.execute(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = 'public.orders'::regclass"
        )
    }
    assert any("(id)" in d and "UNIQUE" in d for d in indexes)
    assert any(d.endswith("(created_at)") for d in indexes)
    assert any(d.endswith("(customer_id)") for d in indexes)
    assert any("(status)" in d for d in indexes)
    assert any("(customer_id, created_at)" in d for d in indexes)

    assert conn.execute("SELECT sum(orders) FROM orders_daily").fetchone()[0] == 5_001
    assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'reporting'").fetchone() == (False,)
    assert conn.execute(
        "SELECT has_table_privilege('reporting', 'public.orders', 'SELECT'),"
        " has_table_privilege('reporting', 'public.orders_daily', 'SELECT'),"
        " obj_description('public.orders'::regclass, 'pg_class') IS NOT NULL,"
        " (SELECT reltuples > 0 FROM pg_class WHERE oid = 'public.orders'::regclass)"
    ).fetchone() == (True, True, True, True)

    # Same seed and end: same data. Wide rows: a ~1 KB column.
    create_orders(conn, '"Other Schema".orders', rows=5_000, days=90, end=end, seed=7, width="wide")
    assert conn.execute(
        'SELECT count(*) FROM (SELECT id, customer_id, status, amount, note, created_at FROM orders'
        ' WHERE id <= 5000 EXCEPT SELECT id, customer_id, status, amount, note, created_at'
        ' FROM "Other Schema".orders) x'
    ).fetchone()[0] == 0
    assert conn.execute('SELECT min(length(details)) FROM "Other Schema".orders').fetchone()[0] >= 1000


def test_workload_on_orders_is_clean(dsn: str, conn: psycopg.Connection) -> None:
    create_orders(conn, "public.orders", rows=5_000)
    before = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    w = Workload(dsn, "public.orders", "created_at", clients=4, seed=3)
    w.setup()
    assert w.compare().ok
    report = w.run_for(2.0)
    _assert_clean(report)
    assert 1.5 < report.duration_s < 10
    cmp = w.compare()
    assert cmp.ok, str(cmp)
    assert cmp.live_rows == cmp.golden_rows != before
    # Some writes landed far outside the data range (a default partition's business).
    far = conn.execute(
        "SELECT count(*) FROM orders WHERE created_at > now() + interval '5 years'"
        " OR created_at < now() - interval '5 years'"
    ).fetchone()[0]
    assert far > 0


def test_workload_on_awkward_table_is_clean(dsn: str, conn: psycopg.Connection) -> None:
    conn.execute(AWKWARD_DDL)
    w = Workload(dsn, '"Shop Data"."LineItems"', "Due Date", clients=4, seed=5)
    with w:
        time.sleep(2.0)
    report = w.report
    assert report is not None
    _assert_clean(report)
    cmp = w.compare()
    assert cmp.ok, str(cmp)
    # The golden copy holds the generated column's values and no dropped column.
    gcols = [
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            (str(w.golden),),
        )
    ]
    assert "total" in gcols and not any("dropped" in c or c == "doomed" for c in gcols)
    nulls, bad_total, new_rows = conn.execute(
        'SELECT count(*) FILTER (WHERE "Due Date" IS NULL),'
        " count(*) FILTER (WHERE total IS DISTINCT FROM qty * price),"
        ' count(*) FILTER (WHERE id > 3000) FROM "Shop Data"."LineItems"'
    ).fetchone()
    assert nulls > 0 and bad_total == 0 and new_rows > 0


def test_compare_reports_tampering(dsn: str, conn: psycopg.Connection) -> None:
    create_orders(conn, "public.orders", rows=2_000)
    w = Workload(dsn, "public.orders", "created_at", clients=2, seed=9)
    w.setup()
    _assert_clean(w.run_for(1.0), allow_zero=("read",))
    assert w.compare().ok
    victim = conn.execute("SELECT min(id) FROM orders").fetchone()[0]
    conn.execute("UPDATE orders SET note = coalesce(note, '') || ' tampered' WHERE id = %s", (victim,))
    cmp = w.compare()
    assert not cmp.ok
    assert (cmp.missing, cmp.extra, cmp.differing) == (0, 0, 1)
    assert cmp.differing_sample == [str(victim)]

    gone = conn.execute("SELECT max(id) FROM orders").fetchone()[0]
    conn.execute("DELETE FROM orders WHERE id = %s", (gone,))
    conn.execute("INSERT INTO orders (customer_id, amount) VALUES (42, 1.5)")
    extra = conn.execute("SELECT max(id) FROM orders").fetchone()[0]
    cmp = w.compare()
    assert (cmp.missing, cmp.extra, cmp.differing) == (1, 1, 1)
    assert cmp.missing_sample == [str(gone)] and cmp.extra_sample == [str(extra)]
    assert cmp.live_rows == cmp.golden_rows


def test_prepared_statements_survive_a_rename_swap(dsn: str, conn: psycopg.Connection) -> None:
    create_orders(conn, "public.orders", rows=5_000)
    w = Workload(dsn, "public.orders", "created_at", clients=4, seed=11)
    w.setup()
    w.start()
    try:
        time.sleep(0.8)
        # A cutover in miniature: copy under an exclusive lock, then swap the names.
        with psycopg.connect(dsn) as swap:
            swap.execute("SET lock_timeout = '5s'")
            swap.execute("LOCK TABLE public.orders IN ACCESS EXCLUSIVE MODE")
            swap.execute("CREATE TABLE public.orders_new (LIKE public.orders INCLUDING ALL)")
            swap.execute("INSERT INTO public.orders_new SELECT * FROM public.orders")
            swap.execute("ALTER TABLE public.orders RENAME TO orders_old")
            swap.execute("ALTER TABLE public.orders_new RENAME TO orders")
            swap.commit()
        swapped_oid = conn.execute("SELECT 'public.orders'::regclass::oid").fetchone()[0]
        time.sleep(1.2)
    finally:
        report = w.stop()
    _assert_clean(report)
    assert conn.execute("SELECT 'public.orders'::regclass::oid").fetchone()[0] == swapped_oid
    cmp = w.compare()
    assert cmp.ok, str(cmp)
    # The writes after the swap went to the new table, not the retired one.
    retired = w.compare(table="public.orders_old")
    assert not retired.ok and retired.live_rows > 0
