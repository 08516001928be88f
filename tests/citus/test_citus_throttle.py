"""The throttler also watches the Citus workers: a replication slot on a worker that holds
more WAL than throttle.max_slot_retained_bytes holds the backfill, named in status."""

from __future__ import annotations

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
