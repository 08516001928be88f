"""Crash and resume: `apply` is SIGKILLed in every phase (and inside the cutover
transaction), the database restarts mid-backfill; each time the next `apply` finishes
and the result equals the golden record of a workload that wrote all along.

Kill moments are random but seeded: set ORCHESTRATE_CRASH_SEED to replay a run; the seed
and the kill log are in every assertion message.
"""

from __future__ import annotations

import os
import random
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
START = (END - timedelta(days=61)).strftime("%Y-%m-01")


def write_plan(tmp_path: Path, name: str = "plan.yaml", capture_mode: str = "sync", **cutover) -> Path:
    plan = {
        "table": "public.orders",
        "partition_by": {"column": "created_at", "interval": "1 month", "premake": 2, "start": START},
        # ~8 s of backfill on a quiet machine: three kills at up to 1.5 s each land inside it.
        "backfill": {"range": "1 day", "batch_size": 150, "fixed_batch_size": True, "sleep_ratio": 1.0},
        "cutover": {"lock_timeout": "200ms", "attempts": 100, "backoff_max": "500ms", **cutover},
    }
    if capture_mode != "sync":
        plan["capture"] = {"mode": capture_mode}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.fixture
def shop(conn: psycopg.Connection) -> psycopg.Connection:
    """orders with an outgoing foreign key (to customers): prepare then locks customers briefly."""
    create_orders(conn, "public.orders", rows=30_000, days=60, end=END, seed=21)
    conn.execute("CREATE TABLE public.customers (id bigint PRIMARY KEY)")
    conn.execute("INSERT INTO public.customers SELECT generate_series(1, 10000)")
    conn.execute("ALTER TABLE public.orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) "
                 "REFERENCES public.customers (id)")
    return conn


class Runs:
    """Spawns `apply` processes, kills them, and keeps a log for assertion messages."""

    def __init__(self, dsn: str, tmp_path: Path, seed: int):
        self.dsn = dsn
        self.tmp_path = tmp_path
        self.seed = seed
        self.rng = random.Random(seed)
        self.log: list[str] = []
        self.n = 0

    def spawn(self, plan: Path) -> subprocess.Popen:
        self.n += 1
        err = open(self.tmp_path / f"apply-{self.n}.err", "w")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
        p = subprocess.Popen([sys.executable, "-m", "orchestrator", "apply", str(plan), "--dsn", self.dsn],
                             stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, cwd=str(REPO_ROOT),
                             env=env)
        p._err = err  # type: ignore[attr-defined]
        return p

    def stderr(self, p: subprocess.Popen) -> str:
        p._err.close()  # type: ignore[attr-defined]
        return Path(p._err.name).read_text()  # type: ignore[attr-defined]

    def state(self, conn: psycopg.Connection) -> tuple[str, str] | None:
        if conn.execute("SELECT to_regclass('orchestrate.migrations')").fetchone()[0] is None:
            return None
        return conn.execute("SELECT phase, status FROM orchestrate.migrations ORDER BY id DESC LIMIT 1").fetchone()

    def wait_phase(self, conn: psycopg.Connection, p: subprocess.Popen, phase: str, timeout: float = 90) -> None:
        wait_until(lambda: p.poll() is not None or (self.state(conn) or ("", ""))[0] == phase, timeout=timeout,
                   interval=0.01, message=f"apply never reached {phase} {self}")
        assert p.poll() is None, f"apply ended (exit {p.returncode}) before {phase}: {self.stderr(p)[-800:]} {self}"

    def kill(self, conn: psycopg.Connection, p: subprocess.Popen, delay: float, why: str) -> None:
        t0 = time.monotonic()
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
        at = self.state(conn)
        self.log.append(f"run {self.n} ({why}): killed after {time.monotonic() - t0:.2f}s in {at}"
                        if p.returncode == -signal.SIGKILL else f"run {self.n} ({why}): ended by itself, exit "
                        f"{p.returncode}, in {at}")
        self.stderr(p)

    def wait_orphans(self, conn: psycopg.Connection) -> None:
        """The killed client's server sessions end once they notice; wait for that."""
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'orchestrate:%%' "
            "AND datname = current_database()").fetchone()[0] == 0, timeout=60,
            message=f"orphaned orchestrate sessions stay {self}")

    def finish(self, plan: Path) -> None:
        code, out, err = run_cli("apply", str(plan), "--dsn", self.dsn)
        self.log.append(f"final apply: exit {code}")
        assert code == 0, f"{err[-2000:]} {self}"

    def __str__(self) -> str:
        return f"[seed {self.seed}; " + "; ".join(self.log) + "]"


def _seed() -> int:
    return int(os.environ.get("ORCHESTRATE_CRASH_SEED") or random.SystemRandom().randrange(1, 10**6))


def _not_cut_over(conn: psycopg.Connection, runs: Runs) -> None:
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "r", runs
    assert conn.execute("SELECT to_regclass('public.orders_retired')").fetchone()[0] is None, runs
    assert runs.state(conn)[1] == "running", runs
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass "
                        "AND tgname = 'orchestrate_capture'").fetchone()[0] == 1, runs


def _kill_inside_cutover(conn: psycopg.Connection, dsn: str, runs: Runs, tmp_path: Path,
                         capture_mode: str = "sync") -> None:
    """The cutover waits for ACCESS EXCLUSIVE (a long lock_timeout) behind a writer's lock: kill it there."""
    stuck = write_plan(tmp_path, "stuck.yaml", capture_mode, lock_timeout="60s", attempts=1)
    with psycopg.connect(dsn) as holder:
        holder.execute("LOCK TABLE public.orders IN ROW EXCLUSIVE MODE")
        p = runs.spawn(stuck)
        runs.wait_phase(conn, p, "cutover")
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'orchestrate:main' "
            "AND wait_event_type = 'Lock' AND query ILIKE 'LOCK TABLE%%'").fetchone()[0] == 1,
            timeout=30, message=f"the cutover never waited for its lock {runs}")
        runs.kill(conn, p, runs.rng.uniform(0.1, 1.0), "inside the cutover transaction")
        _not_cut_over(conn, runs)
        holder.rollback()  # the orphaned session gets the lock, then finds its client gone
    runs.wait_orphans(conn)
    _not_cut_over(conn, runs)


def _assert_exact(wl: Workload, report, runs: Runs, allow_errors: bool = False) -> None:
    if not allow_errors:
        assert report.errors == 0, f"{report.error_samples} {runs}"
    cmp = wl.compare()
    assert cmp.ok, f"{cmp} {runs}"
    assert cmp.live_rows > 25_000


def test_kill_inside_the_cutover_transaction_then_resume(shop: psycopg.Connection, dsn: str, tmp_path: Path,
                                                         capture_mode: str) -> None:
    conn = shop
    runs = Runs(dsn, tmp_path, _seed())
    plan = write_plan(tmp_path, capture_mode=capture_mode)
    code, out, err = run_cli("apply", str(plan), "--dsn", dsn, "--until", "verify")
    assert code == 0, err
    wl = Workload(dsn, "public.orders", "created_at", clients=4, seed=runs.seed)
    wl.setup()
    wl.start()
    try:
        _kill_inside_cutover(conn, dsn, runs, tmp_path, capture_mode)
        runs.finish(plan)
        time.sleep(0.5)
    finally:
        report = wl.stop()
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    _assert_exact(wl, report, runs)


@pytest.mark.slow
def test_sigkill_in_every_phase_under_load_then_resume(shop: psycopg.Connection, dsn: str, tmp_path: Path,
                                                       capture_mode: str) -> None:
    """Async capture: the same loop with two backfill kills instead of three (CI budget); the
    replay thread runs through every phase, so every kill also lands on it at a random point."""
    conn = shop
    runs = Runs(dsn, tmp_path, _seed())
    rng = runs.rng
    plan = write_plan(tmp_path, capture_mode=capture_mode)
    wl = Workload(dsn, "public.orders", "created_at", clients=4, seed=runs.seed)
    wl.setup()
    wl.start()
    try:
        # prepare: its transaction (twin, partitions, then the foreign key to customers, which
        # needs SHARE ROW EXCLUSIVE there) retries while a writer holds customers: kill it mid-way.
        with psycopg.connect(dsn) as holder:
            holder.execute("LOCK TABLE public.customers IN ROW EXCLUSIVE MODE")
            p = runs.spawn(plan)
            runs.wait_phase(conn, p, "prepare")
            runs.kill(conn, p, rng.uniform(0.3, 1.5), "prepare, retrying its transaction")
        assert conn.execute("SELECT to_regclass('public.orders_partitioned')").fetchone()[0] is None, runs
        # capture: CREATE TRIGGER waits for writers; a writer holds the table: kill it mid-retry.
        with psycopg.connect(dsn) as holder:
            holder.execute("LOCK TABLE public.orders IN ROW EXCLUSIVE MODE")
            p = runs.spawn(plan)
            runs.wait_phase(conn, p, "capture")
            runs.kill(conn, p, rng.uniform(0.2, 1.2), "capture, waiting for writers")
        # backfill: several kills at random moments.
        for i in range(3 if capture_mode == "sync" else 2):
            p = runs.spawn(plan)
            runs.wait_phase(conn, p, "backfill")
            runs.kill(conn, p, rng.uniform(0.2, 1.5), f"backfill #{i + 1}")
        copied = conn.execute("SELECT count(*) FILTER (WHERE state = 'copied'), count(*) FROM orchestrate.ranges"
                              ).fetchone()
        assert 0 < copied[0] < copied[1], f"the kills did not interrupt the backfill: {copied} {runs}"
        # verify: its bookkeeping waits for a row lock held here: kill it mid-phase.
        with psycopg.connect(dsn) as holder:
            p = runs.spawn(plan)
            runs.wait_phase(conn, p, "verify", timeout=180)
            holder.execute("SELECT 1 FROM orchestrate.ranges FOR UPDATE")
            runs.kill(conn, p, rng.uniform(0.2, 1.5), "verify")
        _not_cut_over(conn, runs)
        runs.wait_orphans(conn)
        _kill_inside_cutover(conn, dsn, runs, tmp_path, capture_mode)
        runs.finish(plan)
        time.sleep(0.5)
    finally:
        report = wl.stop()
    killed = [line for line in runs.log if "killed" in line]
    assert len(killed) >= (6 if capture_mode == "sync" else 5), runs
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    _assert_exact(wl, report, runs)
    print(runs)


@pytest.mark.slow
def test_database_restart_mid_backfill(cluster, shop: psycopg.Connection, dsn: str, tmp_path: Path,
                                       capture_mode: str) -> None:
    """apply reconnects and goes on, or exits 4 with one resumable line; the next apply finishes
    (async: the change log survives the restart and the replay resumes at its checkpoint)."""
    runs = Runs(dsn, tmp_path, _seed())
    plan = write_plan(tmp_path, capture_mode=capture_mode)
    wl = Workload(dsn, "public.orders", "created_at", clients=4, seed=runs.seed)
    wl.setup()
    wl.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as watch:
            p = runs.spawn(plan)
            runs.wait_phase(watch, p, "backfill")
            wait_until(lambda: watch.execute("SELECT count(*) FROM orchestrate.ranges WHERE state = 'copied'"
                                             ).fetchone()[0] >= 5, timeout=60, message=f"no progress {runs}")
        time.sleep(runs.rng.uniform(0.1, 1.0))
        try:
            cluster.restart_primary("fast")
        finally:
            wait_until(lambda: _accepts(dsn), timeout=60, interval=0.2, message="the primary did not come back")
        code = p.wait(timeout=300)
        err = runs.stderr(p)
        runs.log.append(f"apply across the restart: exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}")
        print(runs)
        if code != 0:
            assert code == 4, f"exit {code}: {err[-1500:]} {runs}"
            errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and "run apply again" in errors[0], err[-1500:]
            with psycopg.connect(dsn, autocommit=True) as c:
                assert c.execute("SELECT count(*) FROM orchestrate.ranges WHERE state = 'copied'").fetchone()[0] >= 5
            runs.finish(plan)
        time.sleep(1.0)
    finally:
        report = wl.stop()
    # Clients lose their connections in the restart (the workload reconnects): errors are expected,
    # but every committed write is in the golden record, in the same transaction.
    assert report.reconnects > 0, runs
    with psycopg.connect(dsn, autocommit=True) as c:
        assert c.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    _assert_exact(wl, report, runs, allow_errors=True)


def _accepts(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as c:
            c.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False
