"""The sample table and the golden-record workload, against a real PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg

from helpers import wait_until
from orchestrator.lab.sample import create_orders
from orchestrator.lab.workload import KINDS, OPS, SKEW_MESSAGE, AppMix, Workload

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
    assert report.duration_s > 1.5  # it ran for about the time asked (no upper bound: a busy machine stops late)
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


def test_a_write_whose_golden_half_changes_other_rows_is_retried_not_hidden(dsn: str, conn: psycopg.Connection) -> None:
    """A row in the live table that the golden copy lacks (what a resurrecting migration
    leaves): the workload's delete and update of it raise its serialization failure (see
    skew_function) instead of quietly removing the evidence, and compare still sees it.
    On Citus the same check turns snapshot skew between coordinator and workers into a
    retry (tests/citus/test_citus_migration.py)."""
    create_orders(conn, "public.orders", rows=500)
    w = Workload(dsn, "public.orders", "created_at", clients=1, seed=2, profile="app",
                 app=AppMix(kinds=("bulk",)))
    w.setup()
    with psycopg.connect(dsn, autocommit=True) as c:
        w._prepare(c)
    st = w._sql
    ghost = conn.execute("INSERT INTO orders (customer_id, amount, created_at) VALUES (1, 2, now()) "
                         "RETURNING id").fetchone()[0]
    lo = conn.execute("SELECT extract(epoch FROM now() - interval '1 minute')").fetchone()[0]
    owner = conn.execute(f"SELECT {st.owner_of('o')} FROM orders o WHERE id = %s", (ghost,)).fetchone()[0]
    pk = [str(ghost)]
    for sql, params in ((st.delete, pk + pk), (st.updates["note"][0], [True] + pk + [None] + pk + pk),
                        (st.bulk_delete, [lo, lo + 120, [owner]])):
        with psycopg.connect(dsn) as c:
            try:
                c.execute(sql, params).fetchall()
            except psycopg.errors.SerializationFailure as e:
                assert e.diag.message_primary.startswith(SKEW_MESSAGE), e
            else:
                raise AssertionError(f"no skew raised by {sql[:60]}")
    assert conn.execute("SELECT count(*) FROM orders WHERE id = %s", (ghost,)).fetchone()[0] == 1
    cmp = w.compare()
    assert (cmp.missing, cmp.extra, cmp.differing) == (0, 1, 0), str(cmp)


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


# --- the application-like profile --------------------------------------------------------


def _run_until(w: Workload, done, timeout: float = 60.0, at_least: float = 2.0):
    """Run the started workload until ``done(clients)`` holds (at least ``at_least`` s), then stop it.

    Counts grow at the machine's pace: wait for them instead of guessing a duration.
    """
    t0 = time.monotonic()
    try:
        wait_until(lambda: time.monotonic() - t0 >= at_least and done(w._threads), timeout=timeout, interval=0.2,
                   message="the workload did not get there")
    finally:
        report = w.stop()
    return report


def _stmts(clients) -> dict:
    out: dict = {}
    for t in clients:
        for name in ("read", "insert", "update", "update_null", "move_key", "delete", "upsert", "upsert_new",
                     "range_update", "range_delete", "bulk_update", "bulk_delete", "copy"):
            out[name] = out.get(name, 0) + t.statements.get(name, 0)
    return out


def _app_orders(conn: psycopg.Connection, rows: int = 5_000) -> None:
    create_orders(conn, "public.orders", rows=rows, days=30)
    # The upsert's conflict target (the primary key plus the partition key, as after cutover).
    conn.execute("CREATE UNIQUE INDEX orders_id_created_at ON public.orders (id, created_at)")


def test_app_workload_is_exact_and_does_everything(dsn: str, conn: psycopg.Connection) -> None:
    _app_orders(conn)
    # A trigger that fires as triggers do by default (not ENABLE ALWAYS): it logs who wrote.
    conn.execute("""
        CREATE TABLE writers (app text);
        CREATE FUNCTION log_writer() RETURNS trigger LANGUAGE plpgsql AS
          $$BEGIN INSERT INTO writers VALUES (current_setting('application_name')); RETURN NULL; END$$;
        CREATE TRIGGER log_writer AFTER INSERT OR UPDATE OR DELETE ON public.orders
          FOR EACH ROW EXECUTE FUNCTION log_writer();
    """)
    w = Workload(dsn, "public.orders", "created_at", seed=4, profile="app", app=AppMix(hold_s=(0.3, 0.8)))
    assert w.clients == len(w.kinds) == 9 and set(w.kinds) == set(KINDS)
    w.setup()
    w.start()
    report = _run_until(w, lambda cs: all(_stmts(cs).values()) and all(t.transactions for t in cs))
    assert report.errors == 0, (report.error_codes, report.error_samples)
    assert set(report.retries) <= {"40001", "40P01", "skew"}
    for kind in KINDS:
        k = report.kinds[kind]
        assert k["transactions"] > 0 and k["rows"] > 0 and k["errors"] == 0, (kind, k)
    stmts = {}
    for k in report.kinds.values():
        stmts.update({n: stmts.get(n, 0) + v for n, v in k["statements"].items()})
    for name in ("read", "insert", "update", "update_null", "move_key", "delete", "upsert", "upsert_new",
                 "range_update", "range_delete", "bulk_update", "bulk_delete", "copy"):
        assert stmts.get(name, 0) > 0, (name, stmts)
    # Bulk statements and COPY batches write many rows per transaction.
    assert report.kinds["bulk"]["rows"] > 5 * report.kinds["bulk"]["transactions"]
    assert report.kinds["copy"]["rows"] >= 15 * report.kinds["copy"]["transactions"]
    assert report.ops["txn"] > 0 and report.ops["hold"] > 0
    assert report.writes == sum(v for o, v in report.ops.items() if o != "read")
    cmp = w.compare()
    assert cmp.ok, str(cmp)
    # The replica-role client's writes bypassed the ordinary trigger; everyone else's fired it.
    apps = dict(conn.execute("SELECT app, count(*) FROM writers GROUP BY app").fetchall())
    replica = f"orchestrate-workload-{w.kinds.index('replica_role')}"
    assert replica not in apps, apps
    for i, kind in enumerate(w.kinds):
        if kind != "replica_role":
            assert apps.get(f"orchestrate-workload-{i}", 0) > 0, (kind, apps)
    # The upsert really took its DO UPDATE path: the conflict target exists.
    assert w._sql.upsert_target == ["id", "created_at"] and "DO UPDATE" in w._sql.upsert


def test_app_upsert_without_a_key_index_does_nothing_on_conflict(dsn: str, conn: psycopg.Connection) -> None:
    create_orders(conn, "public.orders", rows=2_000, days=30)
    # Before cutover the primary key is (id) alone; without a unique index on (id, created_at)
    # the only upsert valid on both shapes is ON CONFLICT DO NOTHING.
    w = Workload(dsn, "public.orders", "created_at", seed=6, profile="app",
                 app=AppMix(kinds=("txn_rc", "txn_rr"), hold_s=(0.1, 0.2)))
    w.setup()
    report = w.run_for(2.0)
    assert report.errors == 0, report.error_samples
    assert w._sql.upsert_target is None and "ON CONFLICT DO NOTHING" in w._sql.upsert
    assert sum(k["statements"].get("upsert", 0) for k in report.kinds.values()) > 0
    cmp = w.compare()
    assert cmp.ok, str(cmp)


def test_app_retries_serialization_failures_and_deadlocks(dsn: str, conn: psycopg.Connection) -> None:
    _app_orders(conn, rows=2_000)
    # Six hot rows for six transaction clients, taken in both orders with pauses between
    # statements: REPEATABLE READ and SERIALIZABLE clients meet rows changed since their
    # snapshot (40001); clients wait for each other, and deadlock. Deadlocks are found
    # sooner than the default 1 s here, so that every kind commits often enough.
    conn.execute(f"ALTER DATABASE {conn.info.dbname} SET deadlock_timeout = '100ms'")
    w = Workload(dsn, "public.orders", "created_at", seed=8, profile="app",
                 app=AppMix(kinds=("txn_rc", "txn_rc", "txn_rr", "txn_rr", "txn_ser", "txn_ser"), hot_rows=6,
                            txn_pause_s=(0.01, 0.05), step_pause_s=(0.02, 0.08)))
    w.setup()
    w.start()

    def retried(cs) -> bool:
        by = {t.kind: t for t in cs}  # one client of each kind is enough
        return (by["txn_rr"].retries.get("40001", 0) and by["txn_ser"].retries.get("40001", 0)
                and any(t.retries.get("40P01", 0) for t in cs) and all(t.transactions for t in cs))

    report = _run_until(w, retried)
    assert report.errors == 0, (report.error_codes, report.error_samples)
    assert report.kinds["txn_rr"]["retries"].get("40001", 0) > 0, report.kinds
    assert report.kinds["txn_ser"]["retries"].get("40001", 0) > 0, report.kinds
    assert report.retries.get("40P01", 0) > 0, report.kinds  # between workload clients: retried
    assert report.retries == {
        code: sum(k["retries"].get(code, 0) for k in report.kinds.values()) for code in report.retries
    }
    for kind in ("txn_rc", "txn_rr", "txn_ser"):
        assert report.kinds[kind]["transactions"] > 0, report.kinds
    cmp = w.compare()
    assert cmp.ok, str(cmp)


def test_app_non_retryable_errors_are_failures_with_their_sqlstate(dsn: str, conn: psycopg.Connection) -> None:
    _app_orders(conn, rows=2_000)
    # Injected through a trigger: client 1 fails every update with 22023 (not retryable);
    # client 0 sees a serialization failure on a third of its updates (retried, not an error).
    conn.execute("""
        CREATE FUNCTION inject() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF current_setting('application_name') = 'orchestrate-workload-1' THEN
            RAISE EXCEPTION 'injected failure' USING ERRCODE = '22023';
          ELSIF current_setting('application_name') = 'orchestrate-workload-0' AND random() < 0.33 THEN
            RAISE EXCEPTION 'injected serialization failure' USING ERRCODE = '40001';
          END IF;
          RETURN NEW;
        END$$;
        CREATE TRIGGER inject BEFORE UPDATE ON public.orders FOR EACH ROW EXECUTE FUNCTION inject();
    """)
    w = Workload(dsn, "public.orders", "created_at", seed=10, profile="app",
                 app=AppMix(kinds=("txn_rc", "txn_rr"), hot_rows=200, txn_pause_s=(0.0, 0.01)))
    w.setup()
    w.start()
    report = _run_until(w, lambda cs: cs[0].transactions and cs[0].retries.get("40001", 0) and cs[1].nerrors)
    rc, rr = report.kinds["txn_rc"], report.kinds["txn_rr"]
    assert rc["errors"] == 0 and rc["retries"].get("40001", 0) > 0 and rc["transactions"] > 0, rc
    assert rr["errors"] > 0 and rr["error_codes"] == {"22023": rr["errors"]} and rr["transactions"] == 0, rr
    assert report.errors == rr["errors"] and report.error_codes == {"22023": rr["errors"]}
    assert "SQLSTATE 22023" in report.error_samples[0] and "injected failure" in report.error_samples[0]
    cmp = w.compare()  # failed transactions left nothing behind, in either table
    assert cmp.ok, str(cmp)


def test_app_deadlock_with_another_session_is_a_failure(dsn: str, conn: psycopg.Connection) -> None:
    _app_orders(conn, rows=2_000)
    # One READ COMMITTED client, two hot rows, taken A then B with a pause in between. A
    # session that is not the workload's (the migration, say) locks B, waits until the
    # client waits for B while holding A, then asks for A: a deadlock the client must not
    # retry as if it were its own business. The other session waits longest (its
    # deadlock_timeout is raised), so the client is the one the server aborts.
    w = Workload(dsn, "public.orders", "created_at", seed=12, profile="app",
                 app=AppMix(kinds=("txn_rc",), hot_rows=2, txn_pause_s=(0.05, 0.1), step_pause_s=(0.2, 0.3)))
    w.setup()
    w.start()
    try:
        hot = sorted(int(x) for x in w._threads[0].hot or wait_until(lambda: w._threads[0].hot, timeout=30))
        with psycopg.connect(dsn, application_name="not-the-workload") as other:
            other.execute("SET deadlock_timeout = '20s'")
            # A no-op update: it takes the row lock and changes nothing the golden copy misses.
            other.execute("UPDATE public.orders SET note = note WHERE id = %s", (hot[1],))
            client_pid = w._threads[0].pid
            wait_until(lambda: conn.execute("SELECT %s = ANY (pg_blocking_pids(%s))",
                                            (other.info.backend_pid, client_pid)).fetchone()[0], timeout=30)
            done = threading.Event()
            t = threading.Thread(target=lambda: (other.execute(
                "UPDATE public.orders SET note = note WHERE id = %s", (hot[0],)), done.set()))
            t.start()
            t.join(30)
            assert done.is_set(), "the other session never got its row: no deadlock was detected"
            # Stay connected until the client has named its partner.
            wait_until(lambda: w._threads[0].nerrors > 0, timeout=30)
            other.commit()
        time.sleep(0.5)
    finally:
        report = w.stop()
    k = report.kinds["txn_rc"]
    assert k["error_codes"].get("40P01", 0) >= 1, k
    assert any("deadlock with pid" in e and "not-the-workload" in e for e in report.error_samples), \
        report.error_samples
    assert k["transactions"] > 0  # it went on afterwards
    cmp = w.compare()
    assert cmp.ok, str(cmp)


def test_app_workload_on_awkward_table_is_exact(dsn: str, conn: psycopg.Connection) -> None:
    # Composite primary key with an identity ALWAYS column, a date key that is NULL at
    # times, stored generated and CHECKed columns, an enum, arrays, json: every client
    # kind still writes (COPY with explicit identity values), and the golden record holds.
    conn.execute(AWKWARD_DDL)
    w = Workload(dsn, '"Shop Data"."LineItems"', "Due Date", seed=14, profile="app", app=AppMix(hold_s=(0.3, 0.8)))
    w.setup()
    w.start()
    report = _run_until(w, lambda cs: all(t.transactions for t in cs))
    assert report.errors == 0, (report.error_codes, report.error_samples)
    for kind in KINDS:
        assert report.kinds[kind]["transactions"] > 0, (kind, report.kinds[kind])
    assert w._sql.upsert_target is None and "ON CONFLICT DO NOTHING" in w._sql.upsert
    cmp = w.compare()
    assert cmp.ok, str(cmp)
    assert conn.execute('SELECT count(*) FILTER (WHERE total IS DISTINCT FROM qty * price) '
                        'FROM "Shop Data"."LineItems"').fetchone()[0] == 0
