"""Harder crashes, each under the golden-record workload, each followed by `apply` again.

- The server itself dies (``pg_ctl stop -m immediate``: no shutdown checkpoint, WAL not
  flushed past what was fsynced) in the middle of the backfill, whose batches commit with
  ``synchronous_commit = off``: the last acknowledged batches may be lost, but always
  together with their checkpoints, since each commits in the same transaction. fsync is on,
  as in production. After the restart `apply` resumes and the result is exact.
- `apply` is SIGKILLed right after the two renames inside the cutover transaction (held
  there by the test-only ``ORCHESTRATE_TEST_HOLD=cutover-renamed``): the transaction rolls
  back whole, nothing is half-swapped, and the next `apply` cuts over exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import REPO_ROOT, run_cli, wait_until
from orchestrator.lab.sample import create_orders
from orchestrator.lab.workload import Workload

END = datetime.now(timezone.utc)
START = (END - timedelta(days=41)).strftime("%Y-%m-01")


def _plan(tmp_path: Path, capture_mode: str = "sync") -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "capture": {"mode": capture_mode},
        "table": "public.orders",
        "partition_by": {"column": "created_at", "interval": "1 month", "premake": 2, "start": START},
        "backfill": {"range": "1 day", "batch_size": 150, "fixed_batch_size": True, "sleep_ratio": 0.5,
                     "synchronous_commit": False},
        "cutover": {"lock_timeout": "200ms", "attempts": 100, "backoff_max": "500ms"},
    }))
    return path


def _spawn(plan: Path, dsn: str, tmp_path: Path, env: dict | None = None) -> subprocess.Popen:
    err = open(tmp_path / f"apply-{time.monotonic_ns()}.err", "w")  # noqa: SIM115 - closed by _stderr
    p = subprocess.Popen([sys.executable, "-m", "orchestrator", "apply", str(plan), "--dsn", dsn],
                         stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, cwd=str(REPO_ROOT),
                         env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", **(env or {})})
    p._err = err  # type: ignore[attr-defined]
    return p


def _stderr(p: subprocess.Popen) -> str:
    p._err.flush()  # type: ignore[attr-defined]
    return Path(p._err.name).read_text()  # type: ignore[attr-defined]


def _accepts(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as c:
            c.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _finish(plan: Path, dsn: str) -> None:
    code, _, err = run_cli("apply", str(plan), "--dsn", dsn)
    assert code == 0, err[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("capture_mode", ["sync", "async"])
def test_immediate_server_stop_mid_backfill_with_async_commit(cluster, conn: psycopg.Connection, dsn: str,
                                                              tmp_path: Path, capture_mode: str) -> None:
    # The test cluster runs with fsync (and full_page_writes) off for speed; a crash test
    # needs them as in production. Set for the server (SIGHUP settings), reset afterwards.
    for setting in ("fsync", "full_page_writes"):
        conn.execute(f"ALTER SYSTEM SET {setting} = on")
    conn.execute("SELECT pg_reload_conf()")
    try:
        wait_until(lambda: conn.execute("SHOW fsync").fetchone()[0] == "on", timeout=10)
        _crash_mid_backfill(cluster, conn, dsn, tmp_path, capture_mode)
    finally:
        with psycopg.connect(dsn, autocommit=True) as c:
            for setting in ("fsync", "full_page_writes"):
                c.execute(f"ALTER SYSTEM RESET {setting}")
            c.execute("SELECT pg_reload_conf()")


def _crash_mid_backfill(cluster, conn: psycopg.Connection, dsn: str, tmp_path: Path, capture_mode: str) -> None:
    create_orders(conn, "public.orders", rows=20_000, days=40, end=END, seed=31)
    plan = _plan(tmp_path, capture_mode)
    wl = Workload(dsn, "public.orders", "created_at", clients=3, seed=31)
    wl.setup()
    wl.start()
    try:
        p = _spawn(plan, dsn, tmp_path)
        def copied() -> int:
            if conn.execute("SELECT to_regclass('orchestrate.ranges')").fetchone()[0] is None:
                return 0
            return conn.execute("SELECT count(*) FROM orchestrate.ranges WHERE state = 'copied'").fetchone()[0]

        wait_until(lambda: p.poll() is not None or copied() >= 5, timeout=120,
                   message="the backfill made no progress")
        assert p.poll() is None, _stderr(p)[-1500:]
        assert conn.execute("SHOW fsync").fetchone()[0] == "on"
        cluster.stop_primary("immediate")
        cluster.start_primary()
        wait_until(lambda: _accepts(dsn), timeout=60, interval=0.2, message="the primary did not come back")
        code = p.wait(timeout=300)
        assert code in (0, 4), f"exit {code}: {_stderr(p)[-1500:]}"
        if code == 4:
            errors = [ln for ln in _stderr(p).splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and "run apply again" in errors[0], _stderr(p)[-1500:]
        _finish(plan, dsn)
        time.sleep(0.5)
    finally:
        report = wl.stop()
    assert report.reconnects > 0  # the clients really lost the server
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
        assert c.execute("SELECT status FROM orchestrate.migrations ORDER BY id DESC LIMIT 1").fetchone()[0] == \
            "cut_over"
    cmp = wl.compare()
    assert cmp.ok, str(cmp)
    assert cmp.live_rows > 15_000


@pytest.mark.parametrize("capture_mode", ["sync", "async"])
def test_kill_apply_after_the_renames_inside_the_cutover(conn: psycopg.Connection, dsn: str,
                                                         tmp_path: Path, capture_mode: str) -> None:
    create_orders(conn, "public.orders", rows=8_000, days=40, end=END, seed=32)
    plan = _plan(tmp_path, capture_mode)
    code, _, err = run_cli("apply", str(plan), "--dsn", dsn, "--until", "verify")
    assert code == 0, err
    wl = Workload(dsn, "public.orders", "created_at", clients=3, seed=32)
    wl.setup()
    wl.start()
    try:
        p = _spawn(plan, dsn, tmp_path, {"ORCHESTRATE_TEST_HOLD": "cutover-renamed"})
        wait_until(lambda: p.poll() is not None or "test hold at cutover-renamed" in _stderr(p), timeout=120,
                   message="apply never reached the point after the renames")
        assert p.poll() is None, _stderr(p)[-1500:]
        # Inside the open transaction both renames are done; nobody else sees them.
        holder = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.application_name = "
            "'orchestrate:main' AND l.relation = 'public.orders'::regclass AND l.mode = 'AccessExclusiveLock' "
            "AND l.granted").fetchone()[0]
        assert holder == 1
        p.send_signal(signal.SIGKILL)
        p.wait()
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'orchestrate:%%' "
            "AND datname = current_database()").fetchone()[0] == 0, timeout=60,
            message="the killed apply's sessions stay")
        # Rolled back whole: the heap table under its name, the twin under its own, capture on.
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "r"
        assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders_partitioned'::regclass"
                            ).fetchone()[0] == "p"
        assert conn.execute("SELECT to_regclass('public.orders_retired')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass "
                            "AND tgname = 'orchestrate_capture'").fetchone()[0] == 1
        assert conn.execute("SELECT status FROM orchestrate.migrations ORDER BY id DESC LIMIT 1").fetchone()[0] == \
            "running"
        time.sleep(0.5)  # the writers go on against the heap table, captured
        _finish(plan, dsn)
        time.sleep(0.5)
    finally:
        report = wl.stop()
    assert report.errors == 0, report.error_samples
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    cmp = wl.compare()
    assert cmp.ok, str(cmp)
