"""Steering a running apply from another terminal: pause, resume, set; live figures; metrics.

The apply runs in a subprocess; the commands run as separate CLI processes, like an
operator's second terminal; the test watches status JSON and the state schema.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import (
    add_upsert_index,
    app_workload,
    apply_log,
    assert_app_clean,
    live,
    rows_copied,
    run_cli,
    start_apply,
    stop,
    wait_until,
)
from orchestrator.lab.sample import create_orders
from orchestrator.lab.workload import Workload


def write_plan(tmp_path: Path, **sections) -> Path:
    plan = {"version": 1, "table": "public.orders", "partition_by": {"column": "created_at", "interval": "1 month"}}
    plan.update(sections)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def events(conn: psycopg.Connection, kind: str, prefix: str) -> int:
    return conn.execute("SELECT count(*) FROM orchestrate.events WHERE kind = %s AND message LIKE %s",
                        (kind, prefix + "%")).fetchone()[0]


def status_json(plan: Path, dsn: str) -> dict:
    code, out, err = run_cli("status", str(plan), "--dsn", dsn, "--output", "json")
    assert code == 0, err
    return json.loads(out)


def cli_ok(*args: str) -> str:
    code, out, err = run_cli(*args)
    assert code == 0, err
    return out


def assert_stalled(conn: psycopg.Connection, seconds: float = 1.5) -> None:
    time.sleep(0.5)
    before = rows_copied(conn)
    time.sleep(seconds)
    assert rows_copied(conn) == before, "the backfill kept copying while paused"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r'(\w+)\{table="public\.orders"\} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_pause_set_resume_reach_a_running_apply(dsn, conn, tmp_path):
    create_orders(conn, rows=20_000, days=4)
    plan = write_plan(tmp_path, backfill={"range": "1 day", "batch_size": 1000, "min_batch_size": 50,
                                          "sleep_ratio": 8},
                      throttle={"backoff_max_s": 60})
    p = str(plan)
    # Given before apply starts: held from the first batch; workers read at the backfill's start.
    assert "applies when apply starts" in cli_ok("pause", p, "--dsn", dsn)
    cli_ok("set", p, "workers=2", "--dsn", dsn)
    port = free_port()
    proc = start_apply(tmp_path, plan, dsn, "--until", "backfill", "--metrics-port", str(port))
    try:
        wait_until(lambda: live(conn).get("throttled") or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, apply_log(proc)
        data = status_json(plan, dsn)
        assert data["live"]["throttle_reason"] == "paused by operator"
        assert data["live"]["paused"] is True and data["live"]["workers"] == 2
        assert data["controls"] == {"paused": True, "workers": 2}
        assert_stalled(conn, 1.0)
        assert rows_copied(conn) == 0
        m = scrape(port)
        assert m["orchestrate_throttled"] == 1 and m["orchestrate_paused"] == 1
        assert m["orchestrate_rows_copied_total"] == 0

        # Pin the batch size of the running apply.
        assert "picks it up" in cli_ok("set", p, "batch_size=200", "--dsn", dsn)
        wait_until(lambda: live(conn).get("batch_size") == 200, timeout=10)
        assert live(conn)["batch_pinned"] is True
        assert scrape(port)["orchestrate_batch_size"] == 200

        # Resume, pause mid-run. A paused worker backs off up to a minute (backoff_max_s): the
        # resume must wake it at once, so rows move well before a backoff could have ended. The
        # limit is generous for a busy machine and still far below the backoff.
        cli_ok("resume", p, "--dsn", dsn)
        wait_until(lambda: rows_copied(conn) > 0, timeout=20, message="resume did not wake the workers")
        cli_ok("pause", p, "--dsn", dsn)
        wait_until(lambda: events(conn, "throttle", "throttled: paused by operator") == 2, timeout=10)
        assert_stalled(conn)
        done = rows_copied(conn)
        assert 0 < done < 20_000
        per_batch = conn.execute("SELECT max(rows_copied::float / batches) FROM orchestrate.ranges "
                                 "WHERE batches > 0").fetchone()[0]
        assert per_batch <= 200  # every batch ran at the pinned size
        wait_until(lambda: live(conn).get("paused") is True and live(conn).get("rows") == done, timeout=10)

        cli_ok("set", p, "batch_size=5000", "--dsn", dsn)
        cli_ok("resume", p, "--dsn", dsn)
        assert proc.wait(90) == 0, apply_log(proc)
    finally:
        stop(proc)
    data = status_json(plan, dsn)
    assert data["ranges"]["rows_copied"] == 20_000
    assert data["live"]["active"] is False and data["live"]["paused"] is False
    assert data["live"]["rows"] == 20_000 and data["live"]["ranges_done"] == data["live"]["ranges_total"]
    log = apply_log(proc)
    assert re.search(r"control: batch_size \d+ -> 200", log), log
    assert "control: batch_size 200 -> 5000" in log
    assert "control: paused on -> off" in log and "control: paused off -> on" in log
    assert events(conn, "control", "control: batch_size") == 2


def test_set_rejects_bad_input_with_one_line(dsn, conn, tmp_path):
    create_orders(conn, rows=100, days=2)
    plan = str(write_plan(tmp_path))
    cases = [
        (("foo=1",), "error: unknown setting 'foo': use one of batch_size, max_replica_lag_s"),
        (("batch_size=abc",), "error: batch_size must be an integer from 1 to 10000000 (or auto), got 'abc'"),
        (("workers=33",), "error: workers must be an integer from 1 to 32"),
        (("batch_size",), "error: expected key=value, got 'batch_size'"),
        (("max_replica_lag_s=1", "resume_replica_lag_s=2"), "error: resume_replica_lag_s (2) must not exceed"),
        (("resume_replica_lag_s=20",), "error: resume_replica_lag_s (20) must not exceed max_replica_lag_s (10)"),
        ((), "error: nothing to set"),
    ]
    for args, expected in cases:
        code, out, err = run_cli("set", plan, *args, "--dsn", dsn)
        assert code == 2, (args, code, err)
        assert out == "" and err.startswith(expected) and err.count("\n") == 1, (args, err)
    code, out, err = run_cli("set", plan, "batch_size=auto", "max_replica_lag_s=2.5", "--dsn", dsn, "-o", "json")
    assert code == 0, err
    assert json.loads(out)["controls"] == {"batch_size": None, "max_replica_lag_s": 2.5}


def backfill_sessions(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name LIKE 'orchestrate:backfill-%'").fetchone()[0]


@pytest.mark.parametrize("profile", ["simple", "app"])
def test_workers_grow_and_shrink_in_a_running_backfill_under_writes(dsn, conn, tmp_path, profile):
    end = datetime.now(timezone.utc)
    create_orders(conn, rows=30_000, days=30, end=end, seed=3)
    if profile == "app":
        add_upsert_index(conn)
    # The workload writes keys 20 years off: partitions start at the data, the default takes those.
    start = (end - timedelta(days=31)).strftime("%Y-%m-01")
    # Small pinned batches with a long pause after each: one worker takes half a minute or more
    # even on a quiet machine (with 100-row batches and sleep_ratio 3 a quiet machine finished
    # the whole backfill in 5 s, before the test could pause it); batch_size=5000 at the end.
    plan = write_plan(tmp_path, partition_by={"column": "created_at", "interval": "1 month", "start": start},
                      backfill={"range": "1 day", "batch_size": 25, "fixed_batch_size": True,
                                "sleep_ratio": 10, "workers": 1})
    p = str(plan)
    if profile == "app":  # every kind of application client, lock holders included
        wl = app_workload(dsn, seed=21)
    else:
        wl = Workload(dsn, "public.orders", "created_at", clients=2, seed=21)
    wl.setup()
    wl.start()
    proc = None
    try:
        proc = start_apply(tmp_path, plan, dsn, "--until", "verify")
        wait_until(lambda: rows_copied(conn) > 0 or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, apply_log(proc)
        # Waited for, not sampled: the live figures are written every 2 s (generous limits for a
        # busy machine; a backfill of one worker takes minutes, so none of them can pass by luck).
        wait_until(lambda: backfill_sessions(conn) == 1 and live(conn).get("workers") == 1, timeout=60,
                   message="the backfill did not start with one worker")

        cli_ok("set", p, "workers=3", "--dsn", dsn)
        wait_until(lambda: backfill_sessions(conn) == 3, timeout=60, message="the backfill did not grow to 3")
        wait_until(lambda: live(conn).get("workers") == 3, timeout=60)
        # The new workers took ranges of their own. Watched, not sampled once: a one-day range
        # of small batches is 'copying' only while its batches run, and on a fast machine three
        # workers can all be between ranges at any single instant.
        wait_until(lambda: conn.execute("SELECT count(*) FROM orchestrate.ranges WHERE state = 'copying'")
                   .fetchone()[0] >= 2, timeout=30, interval=0.02, message="the new workers took no ranges")

        # Shrink while paused: workers asleep in their backoff leave too, handing their
        # half-copied ranges (from the committed cursor) to the one that stays.
        cli_ok("pause", p, "--dsn", dsn)
        cli_ok("set", p, "workers=1", "--dsn", dsn)
        wait_until(lambda: backfill_sessions(conn) == 1, timeout=60, message="the backfill did not shrink to 1")
        wait_until(lambda: live(conn).get("workers") == 1, timeout=60)
        # And grow again while paused: the new workers wait with the others, then all finish.
        cli_ok("set", p, "workers=4", "batch_size=5000", "--dsn", dsn)
        wait_until(lambda: backfill_sessions(conn) == 4, timeout=60, message="the backfill did not grow to 4")
        assert_stalled(conn, 1.0)
        cli_ok("resume", p, "--dsn", dsn)
        assert proc.wait(180) == 0, apply_log(proc)  # verify passed: the twin equals the table
    finally:
        report = wl.stop()
        if proc is not None:
            stop(proc)
    if profile == "app":
        assert_app_clean(wl, report)
    assert report.errors == 0, report.error_samples
    cmp = wl.compare()
    assert cmp.ok, str(cmp)
    data = status_json(plan, dsn)
    assert data["phases"]["verify"]["state"] == "done" and data["ranges"]["mismatched"] == 0
    assert data["ranges"]["copied"] == data["ranges"]["total"]
    log = apply_log(proc)
    assert "backfill: 3 worker(s), was 1" in log and "backfill: 1 worker(s), was 3" in log, log
    assert "backfill: 4 worker(s), was 1" in log, log
    assert events(conn, "control", "backfill workers 1 -> 3") == 1


def test_a_worker_taken_away_hands_over_its_range_at_its_cursor(dsn, conn, tmp_path):
    # Two one-month ranges of 3,000 rows, 100-row batches, two workers; no other writes, so
    # an uninterrupted range takes rows/100 (+1) batches. A worker taken away mid-range
    # must hand over its committed cursor: restarting the range would cost its batches again.
    create_orders(conn, rows=6_000, days=59, end=datetime(2025, 3, 1, tzinfo=timezone.utc), seed=4)
    plan = write_plan(tmp_path, partition_by={"column": "created_at", "interval": "1 month", "start": "2025-01-01",
                                              "premake": 0},
                      backfill={"range": "1 month", "batch_size": 100, "fixed_batch_size": True, "sleep_ratio": 20,
                                "workers": 2})
    p = str(plan)
    proc = start_apply(tmp_path, plan, dsn, "--until", "backfill")
    try:
        def both_midway() -> bool:
            if proc.poll() is not None:
                return True
            return rows_copied(conn) > 0 and conn.execute(
                "SELECT count(*) FROM orchestrate.ranges WHERE state = 'copying' AND batches >= 3").fetchone()[0] == 2

        wait_until(both_midway, timeout=60)
        assert proc.poll() is None, apply_log(proc)
        cli_ok("pause", p, "--dsn", dsn)
        cli_ok("set", p, "workers=1", "--dsn", dsn)
        wait_until(lambda: backfill_sessions(conn) == 1, timeout=60, message="the backfill did not shrink to 1")
        midway = conn.execute("SELECT count(*) FROM orchestrate.ranges WHERE state = 'copying'").fetchone()[0]
        assert midway == 2  # both ranges half copied: one of them changed hands
        cli_ok("resume", p, "--dsn", dsn)
        assert proc.wait(120) == 0, apply_log(proc)
    finally:
        stop(proc)
    ranges = conn.execute("SELECT label, rows_copied, batches FROM orchestrate.ranges WHERE rows_copied > 0"
                          ).fetchall()
    assert sum(r[1] for r in ranges) == 6_000, ranges
    for label, n, batches in ranges:
        assert batches <= n // 100 + 1, (label, n, batches)  # no batch was done twice


def test_throttle_signals_changed_while_apply_runs(dsn, conn, tmp_path):
    create_orders(conn, rows=20_000, days=4)
    plan = write_plan(tmp_path, backfill={"range": "1 day", "batch_size": 200, "fixed_batch_size": True,
                                          "sleep_ratio": 8},
                      throttle={"backoff_max_s": 0.5})
    p = str(plan)
    app = psycopg.connect(dsn, application_name="reporting")
    proc = start_apply(tmp_path, plan, dsn, "--until", "backfill")
    try:
        wait_until(lambda: rows_copied(conn) > 0 or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, apply_log(proc)
        app.execute("SELECT 1")  # an application transaction stays open
        time.sleep(1.0)
        cli_ok("set", p, "max_xact_age_s=0.5", "--dsn", dsn)
        wait_until(lambda: "(reporting) open for" in (live(conn).get("throttle_reason") or ""), timeout=10,
                   message="a new max_xact_age_s did not reach the running apply")
        assert_stalled(conn, 1.0)
        cli_ok("set", p, "max_xact_age_s=off", "query=SELECT true", "--dsn", dsn)
        wait_until(lambda: live(conn).get("throttle_reason") == "throttle query returned true", timeout=10)
        assert_stalled(conn, 1.0)
        cli_ok("set", p, "query=default", "batch_size=5000", "--dsn", dsn)  # the plan has none
        assert proc.wait(90) == 0, apply_log(proc)
    finally:
        app.close()
        stop(proc)
    assert rows_copied(conn) == 20_000
    log = apply_log(proc)
    for line in ("control: max_xact_age_s off -> 0.5", "control: max_xact_age_s 0.5 -> off",
                 "control: query off -> SELECT true", "control: query SELECT true -> default"):
        assert line in log, log
    assert status_json(plan, dsn)["controls"]["query"] is None
