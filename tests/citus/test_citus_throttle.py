"""The throttler also watches the Citus workers: a replication slot on a worker that holds
more WAL than throttle.max_slot_retained_bytes holds the backfill, named in status."""

from __future__ import annotations

import time

import psycopg
import yaml
from test_citus_migration import make_orders, write_plan

from helpers import apply_log, live, rows_copied, run_cli, start_apply, stop, wait_until


def test_a_slot_on_a_worker_holds_the_backfill(citus_db, citus_conn, citus_dsn, tmp_path):
    cluster, name = citus_db
    make_orders(citus_conn, rows=2_000)
    plan = write_plan(tmp_path, sleep_ratio=0)
    data = yaml.safe_load(plan.read_text())
    data["throttle"] = {"max_slot_retained_bytes": 1_000_000, "backoff_max_s": 0.5}
    plan.write_text(yaml.safe_dump(data))
    with psycopg.connect(cluster.worker_dsns(name)[1], autocommit=True) as worker:
        worker.execute("SELECT pg_create_physical_replication_slot('orchestrate_test_held', true)")
        worker.execute("CREATE TABLE ballast AS SELECT g FROM generate_series(1, 200000) g")  # > 1 MB of WAL
        proc = start_apply(tmp_path, plan, citus_dsn)
        try:
            wait_until(lambda: "orchestrate_test_held" in (live(citus_conn).get("throttle_reason") or "")
                       or proc.poll() is not None, timeout=120, message="the worker's slot did not throttle")
            assert proc.poll() is None, apply_log(proc)
            reason = live(citus_conn)["throttle_reason"]
            assert f"worker 127.0.0.1:{cluster.worker_ports()[1]}" in reason, reason
            assert rows_copied(citus_conn) == 0
            worker.execute("SELECT pg_drop_replication_slot('orchestrate_test_held')")
            proc.wait(240)
        finally:
            stop(proc)
    assert proc.returncode == 0, apply_log(proc)
    rc, out, err = run_cli("status", str(plan), "--dsn", citus_dsn)
    assert rc == 0 and "cut_over" in out, out + err


def test_a_lagging_worker_standby_holds_the_backfill(tmp_path):
    """A worker's own streaming standby that stops replaying holds the backfill (the same lag
    gate as one node's standby: throttle.max_replica_lag_s), named in status; once it replays
    again the migration finishes. Its own cluster: each worker has a standby here."""
    import threading

    from orchestrator.lab.citus_cluster import CitusCluster

    with CitusCluster(worker_replicas=True) as cluster:
        dsn = cluster.create_database("lag")
        worker = cluster.workers[1]
        with psycopg.connect(dsn, autocommit=True) as conn:
            make_orders(conn, rows=2_000)
            plan = write_plan(tmp_path, sleep_ratio=0)
            data = yaml.safe_load(plan.read_text())
            data["throttle"] = {"max_replica_lag_s": 1, "backoff_max_s": 0.5}
            plan.write_text(yaml.safe_dump(data))
            stop_wal = threading.Event()

            def wal_on_the_worker() -> None:  # the worker's own writes, which its standby stops replaying
                with psycopg.connect(worker.primary_dsn("lag"), autocommit=True) as w:
                    w.execute("CREATE TABLE ballast (g int)")
                    while not stop_wal.is_set():
                        w.execute("INSERT INTO ballast SELECT generate_series(1, 100)")
                        time.sleep(0.05)

            worker.pause_replay()
            writer = threading.Thread(target=wal_on_the_worker, daemon=True)
            writer.start()
            proc = start_apply(tmp_path, plan, dsn)
            try:
                port = cluster.worker_ports()[1]
                wait_until(lambda: f"on worker 127.0.0.1:{port}'s standby" in (live(conn).get("throttle_reason") or "")
                           or proc.poll() is not None, timeout=120,
                           message="the worker's lagging standby did not throttle")
                assert proc.poll() is None, apply_log(proc)
                assert rows_copied(conn) == 0
                worker.resume_replay()
                assert proc.wait(240) == 0, apply_log(proc)
            finally:
                stop_wal.set()
                stop(proc)
                writer.join(10)
            rc, out, err = run_cli("status", str(plan), "--dsn", dsn)
            assert rc == 0 and "cut_over" in out, out + err
