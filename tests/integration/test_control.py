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
from pathlib import Path

import psycopg
import yaml
from helpers import apply_log, live, rows_copied, run_cli, start_apply, stop, wait_until

from orchestrator.sample import create_orders


def write_plan(tmp_path: Path, **sections) -> Path:
    plan = {"version": 1, "table": "public.orders", "partition_by": {"column": "created_at", "interval": "1 month"},
            **sections}
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
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
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
                      throttle={"backoff_max_s": 5})
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

        # Resume (a paused worker backs off up to 5 s, the resume wakes it at once), pause mid-run.
        cli_ok("resume", p, "--dsn", dsn)
        wait_until(lambda: rows_copied(conn) > 0, timeout=4, message="resume did not wake the workers")
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
