"""Distributed mode is steered and refused exactly as one node is: pause / set / resume reach a
running apply and status shows it; plan refuses a worker without wal_level = logical; and
`orchestrate bench --distributed` measures both paths in one run."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import yaml
from test_citus_migration import assert_spread, make_orders, status, write_plan
from test_citus_plan import refused

from helpers import apply_log, live, rows_copied, run_cli, start_apply, stop, wait_until


def cli_ok(*args: str) -> str:
    rc, out, err = run_cli(*args)
    assert rc == 0, out + err
    return out


def test_pause_set_resume_reach_a_distributed_apply(citus_conn, citus_dsn, tmp_path):
    make_orders(citus_conn, rows=6_000)
    plan = write_plan(tmp_path, batch_size=100, sleep_ratio=4.0)
    data = yaml.safe_load(plan.read_text())
    data["throttle"] = {"backoff_max_s": 60}
    plan.write_text(yaml.safe_dump(data))
    p = str(plan)
    proc = start_apply(tmp_path, plan, citus_dsn)
    try:
        wait_until(lambda: rows_copied(citus_conn) > 0 or proc.poll() is not None, timeout=120,
                   message="the distributed backfill copied nothing")
        assert proc.poll() is None, apply_log(proc)
        cli_ok("pause", p, "--dsn", citus_dsn)
        wait_until(lambda: live(citus_conn).get("throttle_reason") == "paused by operator", timeout=30)
        time.sleep(0.5)
        held = rows_copied(citus_conn)
        time.sleep(2.0)
        assert rows_copied(citus_conn) == held, "the distributed backfill kept copying while paused"
        st = status(plan, citus_dsn)
        assert st["live"]["paused"] is True and st["controls"]["paused"] is True
        assert 0 < st["ranges"]["rows_copied"] < 6_000
        # While paused the capture trigger keeps writing into the distributed twin.
        citus_conn.execute("INSERT INTO public.orders (customer_id, amount, note) VALUES (99, 1, 'while paused')")
        assert citus_conn.execute("SELECT count(*) FROM public.orders_partitioned WHERE note = 'while paused'"
                                  ).fetchone()[0] == 1
        cli_ok("set", p, "batch_size=2000", "workers=2", "--dsn", citus_dsn)
        wait_until(lambda: live(citus_conn).get("batch_size") == 2000, timeout=30)
        cli_ok("resume", p, "--dsn", citus_dsn)
        assert proc.wait(300) == 0, apply_log(proc)
    finally:
        stop(proc)
    log = apply_log(proc)
    assert "control: paused off -> on" in log and "control: paused on -> off" in log, log
    st = status(plan, citus_dsn)
    assert st["status"] == "cut_over" and st["live"]["active"] is False
    assert st["ranges"]["verified"] == st["ranges"]["total"]
    assert_spread(citus_conn)


@contextmanager
def worker_restarted_with(cluster, index: int, setting: str, value: str) -> Iterator[int]:
    """Worker ``index`` restarted with ``setting = value`` (its port), then restarted as it was."""
    worker = cluster.workers[index]
    with psycopg.connect(worker.primary_dsn(), autocommit=True) as w:
        w.execute(f"ALTER SYSTEM SET {setting} = '{value}'")
    try:
        worker.restart_primary()
        yield cluster.worker_ports()[index]
    finally:
        with psycopg.connect(worker.primary_dsn(), autocommit=True) as w:
            w.execute(f"ALTER SYSTEM RESET {setting}")
        worker.restart_primary()


def worker_setting(cluster, index: int, setting: str) -> str:
    with psycopg.connect(cluster.workers[index].primary_dsn(), autocommit=True) as w:
        return w.execute(f"SHOW {setting}").fetchone()[0]


def test_plan_refuses_a_worker_without_logical_wal(citus_db, citus_conn, citus_dsn, tmp_path):
    cluster, _ = citus_db
    make_orders(citus_conn, rows=200)
    with worker_restarted_with(cluster, 1, "wal_level", "replica") as port:
        refused(citus_conn, citus_dsn, write_plan(tmp_path), f"wal_level is replica on the worker 127.0.0.1:{port}")
    assert worker_setting(cluster, 1, "wal_level") == "logical"


def test_plan_refuses_a_worker_with_fewer_prepared_transactions_than_writers(citus_db, citus_conn, citus_dsn,
                                                                           tmp_path):
    """The capture prepares every writing transaction on its worker: a worker that allows fewer
    prepared transactions than the coordinator has sessions would fail application writes."""
    cluster, _ = citus_db
    make_orders(citus_conn, rows=200)
    with worker_restarted_with(cluster, 0, "max_prepared_transactions", "10") as port:
        refused(citus_conn, citus_dsn, write_plan(tmp_path),
                f"max_prepared_transactions is 10 on the worker 127.0.0.1:{port}, below the coordinator's "
                "max_connections (300)")
    assert worker_setting(cluster, 0, "max_prepared_transactions") == "600"


def test_bench_distributed_measures_both_paths(tmp_path):
    rc, out, err = run_cli("bench", "--distributed", "--rows", "5000", "--output-dir", str(tmp_path), timeout=600)
    assert rc == 0, out + err
    res = json.loads((tmp_path / "benchmarks-distributed.json").read_text())
    for mode in ("one_step", "two_step"):
        r = res[mode]
        assert r["distributed"] is True, r
        assert r["writes"] > 0 and r["wall_s"] > 0 and r["longest_write_ms"] > 0, r
    assert res["one_step"]["errors"] == 0, res["one_step"]
    assert res["two_step"]["second_step"].startswith("create_distributed_table"), res["two_step"]
    assert "one step (distribute:)" in out and "two steps" in out
    md = (tmp_path / "benchmarks-distributed.md").read_text()
    assert "| one step (distribute:) |" in md and "| two steps" in md and "5,000" in md
