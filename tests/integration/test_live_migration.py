"""Full migrations of the sample orders table under a live write workload, and rollbacks.

The workload (4 clients, inserts / updates / NULLing updates / key moves / deletes /
reads, server-side prepared statements) mirrors every committed write into a golden
copy in the same transaction; after the run the live table must equal the golden copy
exactly and no client may have seen an error.

Each scenario also runs under the application-like workload (``profile="app"``: multi-row
transactions at every isolation level, upserts, bulk statements, COPY, idle-in-transaction
lock holders, ``session_replication_role = replica`` writers); there, retried
serialization failures and deadlocks between workload clients are allowed, nothing else.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import add_upsert_index, app_workload, assert_app_clean, run_cli
from orchestrator.lab.sample import create_orders
from orchestrator.lab.workload import AppMix, Workload

END = datetime.now(timezone.utc)
START = (END - timedelta(days=61)).strftime("%Y-%m-01")


def write_plan(tmp_path: Path, capture_mode: str = "sync", **backfill) -> Path:
    plan = {
        "table": "public.orders",
        # start: the workload writes keys 20 years off; those go to the default partition.
        "partition_by": {"column": "created_at", "interval": "1 month", "premake": 2, "start": START},
        # Small pinned batches with a pause after each: the backfill takes several seconds,
        # so the workload really runs through every phase.
        "backfill": {"range": "1 day", "batch_size": 250, "fixed_batch_size": True, "sleep_ratio": 0.5, **backfill},
        "cutover": {"lock_timeout": "300ms", "attempts": 50, "backoff_max": "1s"},
    }
    if capture_mode != "sync":
        plan["capture"] = {"mode": capture_mode}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def fingerprint(conn: psycopg.Connection, table: str = "public.orders") -> dict:
    """What the original table looks like in the catalog, and what the migration may leave."""
    q = lambda sql, *p: sorted(tuple(r) for r in conn.execute(sql, p).fetchall())  # noqa: E731
    return {
        "rel": q("SELECT oid, relkind, relowner, coalesce(relacl::text, ''), obj_description(oid, 'pg_class') "
                 "FROM pg_class WHERE oid = %s::regclass", table),
        "columns": q("SELECT attnum, attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute "
                     "WHERE attrelid = %s::regclass AND attnum > 0", table),
        "indexes": q("SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s::regclass", table),
        "constraints": q("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass",
                         table),
        "triggers": q("SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
                      table),
        "relations": q("SELECT c.relname, c.relkind FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace "
                       "AND c.relkind IN ('r', 'p', 'v', 'm')"),
        "functions": q("SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                       "WHERE n.nspname = 'orchestrate'"),
        "serial_sequence": q("SELECT pg_get_serial_sequence(%s, 'id')", table),
        "view": q("SELECT pg_get_viewdef('public.orders_daily'::regclass)"),
    }


@pytest.fixture
def orders(conn: psycopg.Connection) -> psycopg.Connection:
    create_orders(conn, "public.orders", rows=40_000, days=60, end=END, seed=11)
    return conn


@pytest.fixture
def orders_app(orders: psycopg.Connection) -> psycopg.Connection:
    add_upsert_index(orders)
    return orders


def _apply(plan: Path, dsn: str, *extra: str) -> None:
    code, out, err = run_cli("apply", str(plan), "--dsn", dsn, *extra)
    assert code == 0, f"apply {' '.join(extra)} exited {code}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"


def _assert_workload_clean(wl: Workload, report, table: str | None = None) -> None:
    assert report.errors == 0, report.error_samples
    assert report.writes > 200, report.ops
    cmp = wl.compare(table=table)
    assert cmp.ok, str(cmp)
    assert cmp.live_rows > 30_000


def test_migration_under_load_then_rollback_under_load(orders: psycopg.Connection, dsn: str, tmp_path: Path,
                                                       capture_mode: str) -> None:
    conn = orders
    plan = write_plan(tmp_path, capture_mode)
    oid = conn.execute("SELECT 'public.orders'::regclass::oid").fetchone()[0]
    wl = Workload(dsn, "public.orders", "created_at", clients=4, seed=5)
    wl.setup()
    wl.start()
    t0 = time.monotonic()
    try:
        _apply(plan, dsn)
        took = time.monotonic() - t0
        time.sleep(1.0)  # writes on the new table, mirrored to the retired one by the reverse trigger
    finally:
        report = wl.stop()
    assert took > 3, f"the migration took only {took:.1f}s: the workload did not overlap it"
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    _assert_workload_clean(wl, report)
    # Every phase ran while the workload wrote, and inserts went to the right partitions.
    assert conn.execute("SELECT count(*) FROM ONLY public.orders").fetchone()[0] == 0
    assert report.ops["move_key"] > 0 and report.ops["delete"] > 0 and report.ops["insert"] > 0
    # The retired table was kept exact too (what a rollback would bring back).
    assert wl.compare(table="public.orders_retired").ok

    # Rollback after cutover, while the workload keeps writing.
    wl.start()
    try:
        time.sleep(1.0)
        code, out, err = run_cli("rollback", str(plan), "--dsn", dsn)
        assert code == 0, err
        time.sleep(1.0)  # and writes go on against the restored heap table
    finally:
        report = wl.stop()
    _assert_workload_clean(wl, report)
    assert conn.execute("SELECT 'public.orders'::regclass::oid, relkind FROM pg_class "
                        "WHERE oid = 'public.orders'::regclass").fetchone() == (oid, "r")
    assert conn.execute("SELECT to_regclass('public.orders_retired'), to_regclass('public.orders_partitioned'), "
                        "to_regclass('public.orders_default')").fetchone() == (None, None, None)
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass "
                        "AND NOT tgisinternal").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = 'orchestrate'::regnamespace"
                        ).fetchone()[0] == 0
    # The view reads the heap table again.
    assert conn.execute("SELECT sum(orders) FROM orders_daily").fetchone()[0] == \
        conn.execute("SELECT count(*) FROM orders").fetchone()[0]


def test_app_workload_migration_then_rollback(orders_app: psycopg.Connection, dsn: str, tmp_path: Path,
                                              capture_mode: str) -> None:
    """The same migration and rollback after cutover under the application-like workload."""
    conn = orders_app
    plan = write_plan(tmp_path, capture_mode)
    oid = conn.execute("SELECT 'public.orders'::regclass::oid").fetchone()[0]
    wl = app_workload(dsn, seed=15)
    wl.setup()
    wl.start()
    t0 = time.monotonic()
    try:
        _apply(plan, dsn)
        took = time.monotonic() - t0
        time.sleep(1.0)
    finally:
        report = wl.stop()
    assert took > 3, f"the migration took only {took:.1f}s: the workload did not overlap it"
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    assert report.reconnects == 0
    assert_app_clean(wl, report, backfill_met_holder=conn)
    assert wl.compare(table="public.orders_retired").ok
    assert conn.execute("SELECT count(*) FROM ONLY public.orders").fetchone()[0] == 0

    wl.start()
    try:
        time.sleep(1.0)
        code, out, err = run_cli("rollback", str(plan), "--dsn", dsn)
        assert code == 0, err
        time.sleep(1.0)
    finally:
        report = wl.stop()
    assert report.reconnects == 0
    assert_app_clean(wl, report)
    assert conn.execute("SELECT 'public.orders'::regclass::oid, relkind FROM pg_class "
                        "WHERE oid = 'public.orders'::regclass").fetchone() == (oid, "r")
    assert conn.execute("SELECT to_regclass('public.orders_retired')").fetchone()[0] is None


@pytest.mark.parametrize(("phase", "profile"), [("prepare", "simple"), ("capture", "simple"),
                                                ("backfill", "simple"), ("verify", "simple"),
                                                ("capture", "app"), ("verify", "app")])
def test_rollback_after_phase_restores_the_original(orders: psycopg.Connection, dsn: str, tmp_path: Path,
                                                     phase: str, profile: str) -> None:
    conn = orders
    if profile == "app":
        add_upsert_index(conn)
    plan = write_plan(tmp_path, sleep_ratio=0, batch_size=5000)
    before = fingerprint(conn)
    if profile == "app":
        wl = Workload(dsn, "public.orders", "created_at", seed=9, profile="app", app=AppMix(hold_s=(0.5, 1.5)))
    else:
        wl = Workload(dsn, "public.orders", "created_at", clients=2, seed=9)
    wl.setup()
    _apply(plan, dsn, "--until", phase)
    assert conn.execute("SELECT to_regclass('public.orders_partitioned') IS NOT NULL").fetchone()[0]
    # Writes after the phase (through the capture trigger when it is installed) and during the rollback.
    wl.start()
    try:
        time.sleep(0.7)
        code, out, err = run_cli("rollback", str(plan), "--dsn", dsn)
        assert code == 0, f"rollback after {phase}: {err}"
        time.sleep(0.3)
    finally:
        report = wl.stop()
    assert report.errors == 0, (report.error_codes, report.error_samples)
    after = fingerprint(conn)
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    cmp = wl.compare()
    assert cmp.ok, str(cmp)
    code, out, err = run_cli("status", str(plan), "--dsn", dsn, "--output", "json")
    assert code == 0 and '"status": "rolled_back"' in out, out
