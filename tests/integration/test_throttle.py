"""Throttling against the real cluster: replica lag (heartbeat), fail closed, slots, old
transactions, the operator's query and flag file, adaptive batch sizes.

The session cluster's replica is shared: every test that pauses replay resumes it in a
``finally``. Applies run in subprocesses (``python -m orchestrator apply``) and are watched
through the live figures they write (``facts.live``, shown by ``status --output json``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import apply_log, live, rows_copied, run_cli, start_apply, stop, wait_until
from orchestrator.db import OWN_PIDS
from orchestrator.errors import ThrottleAbort
from orchestrator.lab.sample import create_orders
from orchestrator.plan import Throttle
from orchestrator.throttle import Throttler

# A backfill of a few seconds: small pinned batches with a pause after each one.
SLOW_BACKFILL = {"range": "1 day", "batch_size": 500, "fixed_batch_size": True, "sleep_ratio": 3}


def write_plan(tmp_path: Path, table: str = "public.orders", name: str = "plan.yaml", **sections) -> Path:
    plan = {"version": 1, "table": table, "partition_by": {"column": "created_at", "interval": "1 month"},
            **sections}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(plan))
    return path


def status_json(plan: Path, dsn: str) -> dict:
    code, out, err = run_cli("status", str(plan), "--dsn", dsn, "--output", "json")
    assert code == 0, err
    return json.loads(out)


def assert_stalled(conn: psycopg.Connection, seconds: float = 1.5) -> None:
    time.sleep(0.5)  # a batch already under way may finish
    before = rows_copied(conn)
    time.sleep(seconds)
    assert rows_copied(conn) == before, "the backfill kept copying while throttled"


def throttle_events(conn: psycopg.Connection, prefix: str) -> int:
    return conn.execute("SELECT count(*) FROM orchestrate.events WHERE kind = 'throttle' AND message LIKE %s",
                        (prefix + "%",)).fetchone()[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resume_and_finish(cluster, plan: Path, dsn: str, proc) -> None:
    """Replay caught up again; bigger batches (fewer pauses after them) finish the run quickly."""
    cluster.resume_replay()
    code, _, err = run_cli("set", str(plan), "batch_size=5000", "--dsn", dsn)
    assert code == 0, err
    assert proc.wait(120) == 0, apply_log(proc)


def test_replica_lag_stops_the_backfill_and_caught_up_replay_lets_it_finish(cluster, dsn, replica_dsn, conn, tmp_path):
    create_orders(conn, rows=20_000, days=5)
    plan = write_plan(tmp_path, backfill={**SLOW_BACKFILL, "batch_size": 200, "sleep_ratio": 8},
                      throttle={"max_replica_lag_s": 1.0, "resume_replica_lag_s": 0.7, "backoff_max_s": 0.5})
    cluster.wait_replica_caught_up()
    proc = None
    try:
        # 1. A replica already behind when apply starts: no batch runs at all.
        cluster.pause_replay()
        conn.execute("SELECT pg_switch_wal(), txid_current()")  # WAL the replica receives, not replays
        time.sleep(1.5)
        proc = start_apply(tmp_path, plan, dsn, "--until", "backfill", "--replica-dsn", replica_dsn)
        wait_until(lambda: live(conn).get("throttled") or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, apply_log(proc)
        data = status_json(plan, dsn)
        assert data["live"]["throttled"] is True
        assert data["live"]["throttle_reason"].startswith("replica lag "), data["live"]
        assert data["live"]["lag_s"] > 1.0
        assert_stalled(conn, 1.0)
        assert rows_copied(conn) == 0
        cluster.resume_replay()
        # 2. Replay caught up: the backfill runs; stopping replay again stops it mid-way.
        wait_until(lambda: rows_copied(conn) > 0, timeout=30, message="did not resume after replay caught up")
        cluster.pause_replay()
        wait_until(lambda: throttle_events(conn, "throttled: replica lag") == 2 or proc.poll() is not None,
                   timeout=15)
        assert proc.poll() is None, apply_log(proc)
        assert_stalled(conn)
        assert 0 < rows_copied(conn) < 20_000
        wait_until(lambda: live(conn).get("throttled"), timeout=10)
        data = status_json(plan, dsn)
        assert "replica lag" in data["live"]["throttle_reason"], data["live"]
        assert data["phases"]["backfill"]["state"] == "running"
        resume_and_finish(cluster, plan, dsn, proc)
    finally:
        cluster.resume_replay()
        if proc is not None:
            stop(proc)
    data = status_json(plan, dsn)
    assert data["phases"]["backfill"]["state"] == "done"
    assert data["ranges"]["rows_copied"] == 20_000
    assert data["live"]["active"] is False and data["live"]["throttled"] is False
    events = conn.execute("SELECT message FROM orchestrate.events WHERE kind = 'throttle' ORDER BY id").fetchall()
    messages = [m for (m,) in events]
    assert sum(m.startswith("throttled: replica lag") for m in messages) == 2, messages
    assert all("the capture trigger still runs: no write is lost" in m for m in messages if m.startswith("throttled"))
    assert sum(m.startswith("resumed") for m in messages) == 2, messages
    log = apply_log(proc)
    assert "backfill throttled: replica lag" in log and "backfill resumes" in log


def test_unreachable_replica_fails_closed(dsn, conn, tmp_path):
    create_orders(conn, rows=5_000, days=3)
    plan = write_plan(tmp_path, backfill=SLOW_BACKFILL, throttle={"backoff_max_s": 0.5})
    port = closed_port()
    bad = f"postgresql://postgres@127.0.0.1:{port}/nowhere?connect_timeout=2"
    proc = start_apply(tmp_path, plan, dsn, "--until", "backfill", "--replica-dsn", bad)
    try:
        wait_until(lambda: live(conn).get("throttled") or proc.poll() is not None, timeout=60,
                   message="an unreachable replica did not throttle")
        assert proc.poll() is None, apply_log(proc)
        data = status_json(plan, dsn)
        reason = data["live"]["throttle_reason"]
        assert reason.startswith(f"replica 127.0.0.1:{port}/nowhere unreachable: "), reason
        assert_stalled(conn, 1.0)
        assert rows_copied(conn) == 0  # throttled before the very first batch
        assert data["phases"]["backfill"]["state"] == "running"
    finally:
        stop(proc)


def test_flag_file_and_operator_query_hold_the_backfill(dsn, conn, tmp_path):
    create_orders(conn, rows=5_000, days=3)
    conn.execute("CREATE TABLE public.gate (closed boolean NOT NULL)")
    conn.execute("INSERT INTO public.gate VALUES (true)")
    flag = tmp_path / "hold-backfill"
    flag.touch()
    plan = write_plan(tmp_path, throttle={"flag_file": str(flag), "query": "SELECT closed FROM public.gate",
                                          "backoff_max_s": 0.5})
    proc = start_apply(tmp_path, plan, dsn, "--until", "backfill")
    try:
        wait_until(lambda: live(conn).get("throttled") or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, apply_log(proc)
        reason = status_json(plan, dsn)["live"]["throttle_reason"]
        assert f"flag file {flag} exists" in reason and "throttle query returned true" in reason, reason
        flag.unlink()
        wait_until(lambda: live(conn).get("throttle_reason") == "throttle query returned true", timeout=15)
        assert_stalled(conn, 1.0)
        assert rows_copied(conn) == 0
        conn.execute("UPDATE public.gate SET closed = false")
        assert proc.wait(60) == 0, apply_log(proc)
    finally:
        stop(proc)
    assert rows_copied(conn) == 5_000
    assert conn.execute("SELECT closed FROM public.gate").fetchone()[0] is False  # merely observed


def test_throttler_hysteresis_and_critical_lag_on_a_paused_replica(cluster, dsn, replica_dsn, conn):
    conn.execute("CREATE SCHEMA IF NOT EXISTS orchestrate")
    conn.execute("CREATE TABLE orchestrate.heartbeat (id int PRIMARY KEY, ts timestamptz NOT NULL)")
    cluster.wait_replica_caught_up()
    settings = Throttle(max_replica_lag_s=1.0, resume_replica_lag_s=0.8, critical_replica_lag_s=2.5,
                        replicas=[replica_dsn], backoff_max_s=0.2)
    t = Throttler(settings, dsn, check_interval_s=0.1).start()
    try:
        wait_until(lambda: not t.check().throttled, timeout=10)
        assert t.state.lag_s is not None and t.state.lag_s < 1.0
        cluster.pause_replay()
        st = wait_until(lambda: t.check().throttled and t.state, timeout=10)
        assert st.reason.startswith("replica lag ") and "> 1s" in st.reason, st.reason
        assert st.holds_replay == st.reason  # a load signal: async capture's replay waits too
        assert st.critical is None
        stop = threading.Event()
        started = time.monotonic()
        with pytest.raises(ThrottleAbort, match="critical threshold 2.5s"):
            t.wait(stop)  # waits (throttled) until the lag passes the critical threshold
        assert time.monotonic() - started > 0.3
        cluster.resume_replay()
        wait_until(lambda: not t.check().throttled, timeout=10, message="lag did not come back below resume")
        t.wait(stop)  # returns at once
    finally:
        cluster.resume_replay()
        t.stop()


def test_throttler_slot_retention_and_old_transactions(dsn, conn):
    slot = f"t_throttle_{os.getpid()}"
    try:
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
        retained = conn.execute("SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn))::bigint "
                                "FROM pg_replication_slots").fetchone()[0]
        settings = Throttle(max_slot_retained_bytes=retained + 2_000_000, max_xact_age_s=1.0, backoff_max_s=0.2)
        t = Throttler(settings, dsn, check_interval_s=0.05)  # no heartbeat thread: nothing to start
        assert not t.check(force=True).throttled, t.state.reason
        # ~5 MB of WAL that nothing consumes: our slot (never read) holds it back.
        conn.execute("CREATE TABLE public.filler AS SELECT g, md5(g::text) AS m FROM generate_series(1, 60000) g")
        st = t.check(force=True)
        assert st.throttled and st.reason.startswith(f"slot {slot} retains "), st.reason
        assert st.holds_replay == st.reason
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        assert not t.check(force=True).throttled, t.state.reason

        ours = psycopg.connect(dsn, application_name="orchestrate:other-run")
        OWN_PIDS.add(ours.info.backend_pid)  # ours by backend pid: the name alone proves nothing
        app = psycopg.connect(dsn, application_name="reporting")
        try:
            ours.execute("SELECT 1")  # a transaction stays open (not autocommit)
            app.execute("SELECT 1")
            time.sleep(1.3)
            st = t.check(force=True)
            assert st.throttled and "(reporting) open for" in st.reason and "> 1s" in st.reason, st.reason
            assert st.holds_replay is None  # holding the replay would not end another session's transaction
            app.commit()
            assert not t.check(force=True).throttled, t.state.reason  # ours does not count
        finally:
            ours.close()
            app.close()
        t.stop()
    finally:
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                     (slot,))



def test_throttler_xmin_horizon(dsn, conn):
    t = Throttler(Throttle(max_xmin_age=25, backoff_max_s=0.2), dsn, check_interval_s=0.05)
    report = psycopg.connect(dsn, application_name="report", autocommit=True)
    try:
        assert not t.check(force=True).throttled, t.state.reason
        report.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        report.execute("SELECT count(*) FROM pg_class")  # its snapshot now holds vacuum's horizon back
        for _ in range(40):
            conn.execute("SELECT txid_current()")  # each one a new transaction id
        st = t.check(force=True)
        assert st.throttled, st
        assert st.reason.startswith("oldest xmin is ") and f"(pid {report.info.backend_pid} (report)) > 25" in \
            st.reason, st.reason
        assert st.holds_replay is None
        report.execute("ROLLBACK")
        assert not t.check(force=True).throttled, t.state.reason
    finally:
        report.close()
        t.stop()


def test_throttler_active_sessions_hold_backfill_and_replay(dsn, conn):
    """The server's load as gh-ost's max-load: sessions running a statement, ours excluded."""
    t = Throttler(Throttle(max_active_sessions=2, backoff_max_s=0.2), dsn, check_interval_s=0.05)
    busy = [psycopg.connect(dsn, application_name=f"app-{i}", autocommit=True) for i in range(4)]
    ours = psycopg.connect(dsn, application_name="orchestrate:other-run", autocommit=True)
    our_pid = ours.info.backend_pid
    OWN_PIDS.add(our_pid)  # ours by backend pid
    threads = []
    try:
        assert not t.check(force=True).throttled, t.state.reason

        def sleep_in(c: psycopg.Connection, seconds: float) -> None:
            c.execute("SELECT pg_sleep(%s)", (seconds,))

        # Ours and two of the application's: not more than 2 of theirs.
        threads = [threading.Thread(target=sleep_in, args=(c, 4.0)) for c in (ours, *busy[:2])]
        for th in threads:
            th.start()
        wait_until(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                        "AND query LIKE 'SELECT pg_sleep%%'").fetchone()[0] == 3, timeout=10)
        assert not t.check(force=True).throttled, t.state.reason  # ours does not count
        threads += [threading.Thread(target=sleep_in, args=(c, 3.0)) for c in busy[2:]]
        for th in threads[3:]:
            th.start()
        st = wait_until(lambda: t.check(force=True).throttled and t.state, timeout=10)
        assert st.reason == "4 sessions running a statement > 2", st.reason
        assert st.holds_replay == st.reason  # a load signal: async capture's replay waits too
        for th in threads:
            th.join()
        assert not t.check(force=True).throttled, t.state.reason
    finally:
        for th in threads:
            th.join()
        for c in (*busy, ours):
            c.close()
        OWN_PIDS.discard(our_pid)
        t.stop()


WIDE_PAYLOAD = "(SELECT string_agg(md5(random()::text || g.g || k), '') FROM generate_series(1, 250) AS k)"


def test_adaptive_batch_size_follows_row_width(dsn, conn, tmp_path):
    # Same target duration, same start: 8 kB rows (incompressible, TOASTed) against near-empty ones.
    for table, rows, payload in (("narrow", 40_000, "''"), ("wide", 3_000, WIDE_PAYLOAD)):
        conn.execute(f"CREATE TABLE public.{table} (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, "
                     "payload text NOT NULL)")
        conn.execute(f"INSERT INTO public.{table} SELECT g, timestamptz '2025-01-01' + g * interval '1 second', "
                     f"{payload} FROM generate_series(1, %s) AS g", (rows,))
    sizes = {}
    for table, rows in (("narrow", 40_000), ("wide", 3_000)):
        plan = write_plan(tmp_path, f"public.{table}", f"{table}.yaml",
                          backfill={"range": "1 month", "batch_size": 2000, "min_batch_size": 20,
                                    "max_batch_size": 200_000, "target_batch_seconds": 0.1})
        code, out, err = run_cli("apply", str(plan), "--dsn", dsn, "--until", "backfill")
        assert code == 0, err
        data = status_json(plan, dsn)
        sizes[table] = data["live"]["batch_size"]
        assert data["live"]["batch_pinned"] is False
        assert data["ranges"]["rows_copied"] == rows
    assert sizes["narrow"] > 2000 > sizes["wide"], sizes
    assert sizes["narrow"] > 4 * sizes["wide"], sizes


def test_without_replica_dsns_pg_stat_replication_lag_throttles(cluster, dsn, conn, tmp_path):
    # No --replica-dsn: the primary's pg_stat_replication.replay_lag is the signal. The
    # heartbeat keeps writing WAL, so a standby whose replay is stuck shows a growing lag.
    create_orders(conn, rows=20_000, days=5)
    plan = write_plan(tmp_path, backfill={**SLOW_BACKFILL, "batch_size": 200, "sleep_ratio": 8},
                      throttle={"max_replica_lag_s": 1.0, "backoff_max_s": 0.5})
    cluster.wait_replica_caught_up()
    proc = start_apply(tmp_path, plan, dsn, "--until", "backfill")
    try:
        wait_until(lambda: rows_copied(conn) > 0 or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, apply_log(proc)
        cluster.pause_replay()
        wait_until(lambda: live(conn).get("throttled") or proc.poll() is not None, timeout=30,
                   message="a stuck standby did not throttle through pg_stat_replication")
        assert proc.poll() is None, apply_log(proc)
        data = status_json(plan, dsn)["live"]
        assert data["throttle_reason"].startswith("replica lag ") and "(pg_stat_replication)" in \
            data["throttle_reason"], data
        assert data["lag_s"] > 1.0 and data["lag_bytes"] > 0, data
        assert_stalled(conn)
        assert 0 < rows_copied(conn) < 20_000
        resume_and_finish(cluster, plan, dsn, proc)
    finally:
        cluster.resume_replay()
        stop(proc)
    assert rows_copied(conn) == 20_000
    assert "(pg_stat_replication)" in apply_log(proc) and "backfill resumes" in apply_log(proc)


def test_critical_replica_lag_stops_apply_with_exit_9_and_apply_resumes(cluster, dsn, replica_dsn, conn, tmp_path):
    create_orders(conn, rows=20_000, days=5)
    plan = write_plan(tmp_path, backfill={**SLOW_BACKFILL, "batch_size": 200, "sleep_ratio": 8},
                      throttle={"max_replica_lag_s": 1.0, "critical_replica_lag_s": 3.0, "backoff_max_s": 0.5})
    cluster.wait_replica_caught_up()
    proc = start_apply(tmp_path, plan, dsn, "--until", "backfill", "--replica-dsn", replica_dsn)
    try:
        wait_until(lambda: rows_copied(conn) > 0 or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, apply_log(proc)
        cluster.pause_replay()
        code = proc.wait(60)
        copied = rows_copied(conn)
    finally:
        cluster.resume_replay()
        stop(proc)
    log = apply_log(proc)
    assert code == 9, log
    error_lines = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "passed the critical threshold 3s" in error_lines[0], log
    assert "run apply again to resume" in error_lines[0]
    assert "Traceback" not in log
    assert 0 < copied < 20_000
    data = status_json(plan, dsn)
    assert data["phases"]["backfill"]["state"] in ("running", "failed"), data["phases"]
    assert "critical threshold" in (data["error"] or ""), data
    assert throttle_events(conn, "critical: replica lag") == 1
    # Replay caught up: apply again goes on from the checkpoints and finishes.
    cluster.wait_replica_caught_up()
    code, out, err = run_cli("apply", str(plan), "--dsn", dsn, "--until", "backfill", "--replica-dsn", replica_dsn,
                             timeout=300)
    assert code == 0, err
    assert rows_copied(conn) == 20_000
    assert status_json(plan, dsn)["phases"]["backfill"]["state"] == "done"
