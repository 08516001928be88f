"""Helpers shared by tests (import with ``from helpers import run_cli, wait_until``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 300,
    cwd: str | os.PathLike[str] | None = None,
) -> tuple[int, str, str]:
    """Run ``python -m orchestrator ARGS`` in a subprocess; return (exit code, stdout, stderr).

    ``env`` is added to the current environment (it does not replace it).
    """
    full_env = {**os.environ, **(env or {})}
    # Keep the child's output plain and unbuffered so tests can match it.
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env.setdefault("NO_COLOR", "1")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", *map(str, args)],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=str(cwd) if cwd is not None else str(REPO_ROOT),
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


def wait_until(
    predicate: Callable[[], T], timeout: float = 30, interval: float = 0.05, message: str = ""
) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout:g}s")
        time.sleep(interval)


# --- an `orchestrate apply` running in the background, watched like an operator would ---


def start_apply(tmp_path: Path, plan: Path, dsn: str, *args: str) -> subprocess.Popen:
    """`python -m orchestrator apply PLAN --dsn DSN ARGS` in the background, output to a log file."""
    log_path = tmp_path / f"apply-{time.monotonic_ns()}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "apply", str(plan), "--dsn", dsn, *args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env=env)
    proc.log_path = str(log_path)  # type: ignore[attr-defined]
    return proc


def apply_log(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text()  # type: ignore[attr-defined]


def stop(proc: subprocess.Popen) -> None:
    """Terminate (then kill) a background apply if it is still running."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def live(conn) -> dict:
    """facts.live of the newest migration (what status shows as `live`)."""
    if not conn.execute("SELECT to_regclass('orchestrate.migrations') IS NOT NULL").fetchone()[0]:
        return {}
    row = conn.execute("SELECT facts->'live' FROM orchestrate.migrations ORDER BY id DESC LIMIT 1").fetchone()
    return (row and row[0]) or {}


def rows_copied(conn) -> int:
    """Rows copied by the backfill so far (0 before the state schema exists)."""
    if not conn.execute("SELECT to_regclass('orchestrate.ranges') IS NOT NULL").fetchone()[0]:
        return 0
    return int(conn.execute("SELECT coalesce(sum(rows_copied), 0) FROM orchestrate.ranges").fetchone()[0])


# --- the application-like workload (orchestrator.lab.workload, profile="app") in end-to-end tests ---

#: Lock holders sit idle in transaction this long (seconds) with a few rows locked.
APP_HOLD_S = (3.0, 5.0)
#: The longest a simple writer may wait (ms). Simple writers write rows that no other
#: workload client holds for long (lock holders touch only their own rows, bulk
#: statements are short), so a wait of seconds is a wait behind the migration: a backfill
#: batch that met a held row and kept its share locks on the rows before it. With the
#: batch's short lock_timeout (below deadlock_timeout, 1 s) it gives way at once; without
#: it, writers wait out the rest of the hold (up to 5 s here). Half the shortest hold:
#: generous for a loaded 2-core CI machine, far below what a stalled batch costs.
APP_MAX_WAIT_MS = 1000 * APP_HOLD_S[0] / 2


def add_upsert_index(conn, table: str = "public.orders") -> None:
    """The unique index an application adds before partitioning: (id, created_at).

    It is the app workload's upsert conflict target, valid on both shapes of the table
    (after cutover the primary key is (id, created_at): ON CONFLICT (id) stops working).
    """
    conn.execute(f"CREATE UNIQUE INDEX orders_id_created_at ON {table} (id, created_at)")


def app_workload(dsn: str, seed: int, table: str = "public.orders", key: str = "created_at", **mix):
    """The app profile on the orders table, holders holding APP_HOLD_S unless ``mix`` says otherwise."""
    from orchestrator.lab.workload import AppMix, Workload

    return Workload(dsn, table, key, seed=seed, profile="app", app=AppMix(**{"hold_s": APP_HOLD_S, **mix}))


def backfill_met_a_holder(wl, report, conn) -> bool:
    """Did a backfill batch meet a row an idle-in-transaction holder locked?

    Seen from either side: the holder saw a backfill session wait for its locks, or the
    backfill recorded an event naming the holder's session (it names who held the lock).
    """
    if any(a.startswith("orchestrate:backfill") for a in report.kinds["holder"]["blocked"]):
        return True
    holders = [f"%'orchestrate-workload-{i}'%" for i, k in enumerate(wl.kinds) if k == "holder"]
    return conn.execute("SELECT count(*) FROM orchestrate.events WHERE message LIKE ANY (%s)",
                        (holders,)).fetchone()[0] > 0


def assert_app_clean(wl, report, table: str | None = None, backfill_met_holder=None, waits: bool = True) -> None:
    """Golden == table, no error but retried 40001/40P01/skew, every kind ran, no long waits.

    ``backfill_met_holder``: a connection; also require that a backfill batch met a held
    row (see backfill_met_a_holder), so that the wait bound proves something.
    A "skew" retry (orchestrator.lab.workload.skew_function) rolled back a statement whose
    live and golden halves changed different rows: it keeps the golden record exact and
    hides nothing, since a row the migration lost or resurrected stays in one table and
    not the other, which the comparison below finds.
    """
    from orchestrator.lab.workload import KINDS

    assert report.errors == 0, (report.error_codes, report.error_samples)
    assert set(report.retries) <= {"40001", "40P01", "skew"}, report.retries
    for kind in KINDS:
        if kind in wl.kinds:
            assert report.kinds[kind]["transactions"] > 0, (kind, report.kinds[kind])
    cmp = wl.compare(table=table)
    assert cmp.ok, str(cmp)
    if backfill_met_holder is not None:
        assert backfill_met_a_holder(wl, report, backfill_met_holder), report.kinds["holder"]
    if waits:
        for kind in ("simple", "replica_role"):
            if kind in wl.kinds:
                assert report.kinds[kind]["max_wait_ms"] < APP_MAX_WAIT_MS, (kind, report.kinds)


# --- async capture (orchestrator/changelog.py) ---


def drain(conn) -> int:
    """Replay the newest migration's change log to the end, as apply's replay thread would
    (async capture); returns the changes replayed. A no-op for sync capture."""
    if not conn.execute("SELECT to_regclass('orchestrate.migrations') IS NOT NULL").fetchone()[0]:
        return 0
    mid = conn.execute("SELECT max(id) FROM orchestrate.migrations").fetchone()[0]
    if not conn.execute("SELECT to_regprocedure(%s) IS NOT NULL", (f"orchestrate.replay_{mid}(integer)",)
                        ).fetchone()[0]:
        return 0
    total = 0
    while n := conn.execute(f"SELECT orchestrate.replay_{mid}(10000)").fetchone()[0]:
        total += n
    return total
