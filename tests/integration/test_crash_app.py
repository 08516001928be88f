"""Crash and resume under the application-like workload (``profile="app"``).

The same kills as ``test_crash.py`` (SIGKILL of `apply` in every phase and inside the
cutover transaction, then `apply` again), while every kind of application client writes:
multi-row transactions at every isolation level, upserts, bulk statements, COPY, lock
holders idle in transaction, ``session_replication_role = replica`` writers. The final
table must equal the golden record; the only client errors allowed are retried
serialization failures and deadlocks between workload clients. Write waits are not
bounded here: the scenarios themselves hold locks on the table for seconds.

Kill moments are random but seeded (ORCHESTRATE_CRASH_SEED replays a run).
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from test_crash import END, Runs, _kill_inside_cutover, _not_cut_over, _seed, write_plan

from helpers import add_upsert_index, app_workload, assert_app_clean, run_cli
from orchestrator.lab.sample import create_orders


@pytest.fixture
def shop_app(conn: psycopg.Connection) -> psycopg.Connection:
    """orders (30k rows) with an outgoing foreign key and the app's (id, created_at) unique index."""
    create_orders(conn, "public.orders", rows=30_000, days=60, end=END, seed=23)
    conn.execute("CREATE TABLE public.customers (id bigint PRIMARY KEY)")
    conn.execute("INSERT INTO public.customers SELECT generate_series(1, 10000)")
    conn.execute("ALTER TABLE public.orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) "
                 "REFERENCES public.customers (id)")
    add_upsert_index(conn)
    return conn


def _assert_exact(wl, report, runs: Runs) -> None:
    try:
        assert_app_clean(wl, report, waits=False)
    except AssertionError as e:
        raise AssertionError(f"{e} {runs}") from e
    assert wl.compare().live_rows > 25_000


@pytest.mark.parametrize("capture_mode", ["sync", "async"])
def test_app_kill_inside_the_cutover_transaction_then_resume(shop_app: psycopg.Connection, dsn: str,
                                                             tmp_path: Path, capture_mode: str) -> None:
    conn = shop_app
    runs = Runs(dsn, tmp_path, _seed())
    plan = write_plan(tmp_path, capture_mode=capture_mode)
    code, out, err = run_cli("apply", str(plan), "--dsn", dsn, "--until", "verify")
    assert code == 0, err
    wl = app_workload(dsn, seed=runs.seed % 1000, hold_s=(0.5, 1.5))
    wl.setup()
    wl.start()
    try:
        time.sleep(1.0)  # every kind of client writes through the capture trigger first
        _kill_inside_cutover(conn, dsn, runs, tmp_path, capture_mode)
        runs.finish(plan)
        time.sleep(1.0)
    finally:
        report = wl.stop()
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    _assert_exact(wl, report, runs)
    assert wl.compare(table="public.orders_retired").ok, runs


@pytest.mark.slow  # the SIGKILL loop of test_crash.py again, under the app workload
def test_app_sigkill_in_every_phase_then_resume(shop_app: psycopg.Connection, dsn: str, tmp_path: Path,
                                                capture_mode: str) -> None:
    """Async: two backfill kills instead of three (the CI budget), as in test_crash."""
    conn = shop_app
    runs = Runs(dsn, tmp_path, _seed())
    rng = runs.rng
    plan = write_plan(tmp_path, capture_mode=capture_mode)
    wl = app_workload(dsn, seed=runs.seed % 1000, hold_s=(1.0, 2.0))
    wl.setup()
    wl.start()
    try:
        with psycopg.connect(dsn) as holder:  # prepare retries while customers is locked
            holder.execute("LOCK TABLE public.customers IN ROW EXCLUSIVE MODE")
            p = runs.spawn(plan)
            runs.wait_phase(conn, p, "prepare")
            runs.kill(conn, p, rng.uniform(0.3, 1.5), "prepare, retrying its transaction")
        assert conn.execute("SELECT to_regclass('public.orders_partitioned')").fetchone()[0] is None, runs
        with psycopg.connect(dsn) as holder:  # CREATE TRIGGER waits for writers
            holder.execute("LOCK TABLE public.orders IN ROW EXCLUSIVE MODE")
            p = runs.spawn(plan)
            runs.wait_phase(conn, p, "capture")
            runs.kill(conn, p, rng.uniform(0.2, 1.2), "capture, waiting for writers")
        for i in range(3 if capture_mode == "sync" else 2):
            p = runs.spawn(plan)
            runs.wait_phase(conn, p, "backfill")
            runs.kill(conn, p, rng.uniform(0.2, 1.5), f"backfill #{i + 1}")
        with psycopg.connect(dsn) as holder:
            p = runs.spawn(plan)
            runs.wait_phase(conn, p, "verify", timeout=180)
            holder.execute("SELECT 1 FROM orchestrate.ranges FOR UPDATE")
            runs.kill(conn, p, rng.uniform(0.2, 1.5), "verify")
        _not_cut_over(conn, runs)
        runs.wait_orphans(conn)
        _kill_inside_cutover(conn, dsn, runs, tmp_path, capture_mode)
        runs.finish(plan)
        time.sleep(1.0)
    finally:
        report = wl.stop()
    assert len([line for line in runs.log if "killed" in line]) >= (5 if capture_mode == "sync" else 4), runs
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    _assert_exact(wl, report, runs)
    print(runs, report.retries)
