"""A backfill that yields to the application's row locks, reproduced with real sessions.

An application session (the holder) updates the last row of a range and stays idle in
transaction. The backfill's batch locks the range's rows FOR SHARE in order and reaches
the held row. Meanwhile a second application writer updates rows the batch had locked
before it reached the held row; later the holder touches one of those rows too, then
commits.

- ours: every batch runs under a lock_timeout below deadlock_timeout; the batch that
  meets the held row rolls back (releasing its share locks), backs off, retries with a
  smaller window, and says why, naming the holder's pid, in an event and in the live
  status. The second writer never waits long, the holder is never a deadlock victim, the
  backfill finishes after the holder commits, and the twin equals the table.
- control (batch lock_timeout 0, the old behaviour): the second writer waits as long as
  the holder holds its lock, and the holder's transaction is aborted as the deadlock
  victim (40P01) when it touches a row the waiting batch has locked.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from helpers import live, wait_until
from orchestrator import runner
from orchestrator.phases import backfill
from orchestrator.plan import parse_plan

HOLD_S = 3.0  # how long the holder keeps its lock after the second writer started
ROWS = 300
HELD = ROWS  # the last row of the range in every order a scan may take
TOUCHED_BY_HOLDER = 200


def _setup(conn: psycopg.Connection, dsn: str):
    conn.execute("CREATE TABLE public.items (id bigint PRIMARY KEY, at timestamptz NOT NULL, v int NOT NULL, "
                 "note text)")
    conn.execute("INSERT INTO public.items SELECT g, timestamptz '2026-10-10 00:00+00' + g * interval '1 minute', "
                 "0, NULL FROM generate_series(1, %s) g", (ROWS,))
    plan = parse_plan({"table": "public.items", "partition_by": {"column": "at", "interval": "1 month"},
                       "backfill": {"range": "1 day", "batch_size": 5000, "fixed_batch_size": True}})
    runner.apply(plan, dsn, until="capture")
    return plan


def _diff(conn: psycopg.Connection) -> int:
    return conn.execute(
        "SELECT count(*) FROM ((SELECT * FROM items EXCEPT ALL SELECT * FROM items_partitioned) UNION ALL "
        "(SELECT * FROM items_partitioned EXCEPT ALL SELECT * FROM items)) d").fetchone()[0]


def _scenario(conn: psycopg.Connection, dsn: str, *, mechanism: bool) -> dict:
    plan = _setup(conn, dsn)
    out: dict = {"waits": [], "backfill_error": None, "holder_error": None}
    holder = psycopg.connect(dsn)
    holder.execute("UPDATE items SET note = 'held' WHERE id = %s", (HELD,))  # idle in transaction from here
    out["holder_pid"] = holder.info.backend_pid

    def run_backfill() -> None:
        try:
            runner.apply(plan, dsn, until="backfill")
        except BaseException as e:  # noqa: BLE001 - asserted below
            out["backfill_error"] = e

    bf = threading.Thread(target=run_backfill, daemon=True)
    bf.start()
    try:
        # The batch has reached the held row: it yielded (ours) or it waits on it (control).
        if mechanism:
            wait_until(lambda: conn.execute("SELECT to_regclass('orchestrate.events') IS NOT NULL AND EXISTS "
                                            "(SELECT 1 FROM orchestrate.events WHERE kind = 'yield')").fetchone()[0],
                       timeout=60, message="the backfill never yielded")
        else:
            wait_until(lambda: conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'orchestrate:backfill-%%' "
                "AND %s = ANY (pg_blocking_pids(pid))", (out["holder_pid"],)).fetchone()[0] == 1,
                timeout=60, message="the backfill never waited for the held row")

        stop = threading.Event()

        def second_writer() -> None:
            with psycopg.connect(dsn, autocommit=True) as w:
                i = 1
                while not stop.is_set() and i < TOUCHED_BY_HOLDER:
                    t0 = time.monotonic()
                    w.execute("UPDATE items SET v = v + 1 WHERE id = %s", (i,))
                    out["waits"].append(time.monotonic() - t0)
                    i += 1
                    time.sleep(0.02)

        writer = threading.Thread(target=second_writer, daemon=True)
        writer.start()
        time.sleep(HOLD_S)
        if mechanism:
            out["live_reason"] = wait_until(lambda: live(conn).get("throttle_reason"), timeout=15,
                                            message="the live status never said why the backfill waits")
        # The holder now touches a row the batch locks before it reaches the held one.
        try:
            holder.execute("UPDATE items SET v = v + 100 WHERE id = %s", (TOUCHED_BY_HOLDER,))
            holder.commit()
        except psycopg.errors.DeadlockDetected as e:
            out["holder_error"] = e
            holder.rollback()
        stop.set()
        writer.join(timeout=60)
        assert not writer.is_alive(), "the second writer never finished"
        bf.join(timeout=120)
        assert not bf.is_alive(), "the backfill did not finish after the holder ended"
    finally:
        holder.close()
    return out


def test_backfill_yields_to_an_idle_row_lock_holder(dsn: str, conn: psycopg.Connection) -> None:
    out = _scenario(conn, dsn, mechanism=True)
    assert out["backfill_error"] is None, out["backfill_error"]
    assert out["holder_error"] is None, f"the holder was aborted: {out['holder_error']}"
    assert out["waits"], "the second writer wrote nothing"
    assert max(out["waits"]) < HOLD_S / 3, f"the second writer waited {max(out['waits']):.2f} s behind the backfill"
    assert _diff(conn) == 0
    assert conn.execute("SELECT v, note FROM items WHERE id = %s", (TOUCHED_BY_HOLDER,)).fetchone() == (100, None)
    assert conn.execute("SELECT note FROM items WHERE id = %s", (HELD,)).fetchone()[0] == "held"
    # Why it waited, naming the holder: in the events and in the live status.
    pid = out["holder_pid"]
    msgs = [r[0] for r in conn.execute("SELECT message FROM orchestrate.events WHERE kind = 'yield' ORDER BY id")]
    assert f"row lock held by pid {pid}, idle in transaction for " in msgs[0], msgs
    assert f"pid {pid}, idle in transaction" in out["live_reason"], out["live_reason"]
    batches = conn.execute("SELECT sum(batches) FROM orchestrate.ranges").fetchone()[0]
    assert batches >= 2, batches  # a window shrank to end before the held row, then the rest after it


def test_control_without_lock_timeout_blocks_writers_and_kills_the_holder(dsn: str, conn: psycopg.Connection,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The old behaviour (batch lock_timeout 0): the interleaving really is the bug."""
    monkeypatch.setattr(backfill, "batch_lock_timeout_ms", lambda conn, plan_s: 0)
    out = _scenario(conn, dsn, mechanism=False)
    assert isinstance(out["holder_error"], psycopg.errors.DeadlockDetected), out["holder_error"]
    assert out["waits"] and max(out["waits"]) >= HOLD_S * 0.8, out["waits"][:3]
    assert out["backfill_error"] is None, out["backfill_error"]
    assert _diff(conn) == 0


def test_repair_yields_too(dsn: str, conn: psycopg.Connection) -> None:
    """`apply --recopy`: the repair's FOR SHARE over the whole range times out on the held
    row, rolls back, says why, and succeeds once the holder commits."""
    plan = _setup(conn, dsn)
    runner.apply(plan, dsn, until="verify")
    conn.execute("DELETE FROM items_partitioned WHERE id = 5")  # a divergence the repair will fix
    holder = psycopg.connect(dsn)
    holder.execute("UPDATE items SET note = 'held' WHERE id = %s", (HELD,))
    err: list = []

    def recopy() -> None:
        try:
            runner.apply(plan, dsn, until="backfill", recopy=("2026-10-10",))
        except BaseException as e:  # noqa: BLE001 - asserted below
            err.append(e)

    t = threading.Thread(target=recopy, daemon=True)
    t.start()
    try:
        wait_until(lambda: conn.execute("SELECT EXISTS (SELECT 1 FROM orchestrate.events WHERE kind = 'yield')")
                   .fetchone()[0], timeout=60, message="the repair never yielded")
        with psycopg.connect(dsn, autocommit=True) as w:  # rows the repair locks before the held one
            t0 = time.monotonic()
            for i in range(1, 50):
                w.execute("UPDATE items SET v = v + 1 WHERE id = %s", (i,))
            per_write = (time.monotonic() - t0) / 49
        holder.commit()
    finally:
        holder.close()
    t.join(timeout=120)
    assert not t.is_alive() and not err, err
    assert per_write < 0.5, per_write
    msg = conn.execute("SELECT message FROM orchestrate.events WHERE kind = 'yield' ORDER BY id LIMIT 1").fetchone()[0]
    assert "row lock held by pid" in msg, msg
    assert _diff(conn) == 0
