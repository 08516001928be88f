"""maintain's default-partition move yields to the application's locks.

An application session has updated a row in the default partition and stays idle in
transaction. maintain wants to move the default's rows of a new month into their own
partition: its swap takes SHARE on the parent, then waits for ACCESS EXCLUSIVE on the
default, which the holder keeps. While that request waits, every writer of the table
queues behind it. The plan asks for a long ``cutover.lock_timeout`` (5 s): maintain caps
each wait at half of ``deadlock_timeout``, backs off and retries, names the holder, and
finishes after the holder commits. A second writer meanwhile never waits for long; in the
control (the cap removed) it waits for seconds at a time.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

import psycopg
import pytest

from helpers import wait_until
from orchestrator import maintain
from orchestrator.maintain import maintain_pass
from orchestrator.plan import parse_plan

HOLD_S = 4.0
NOW = datetime(2026, 7, 15)


def _setup(conn: psycopg.Connection):
    conn.execute("CREATE TABLE orders (id bigserial, created_at timestamptz NOT NULL, note text, "
                 "PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at)")
    for m in range(1, 7):
        conn.execute(f"CREATE TABLE orders_p2026_{m:02d} PARTITION OF orders "
                     f"FOR VALUES FROM ('2026-{m:02d}-01') TO ('2026-{m + 1:02d}-01')")
    conn.execute("CREATE TABLE orders_default PARTITION OF orders DEFAULT")
    conn.execute("INSERT INTO orders (created_at, note) SELECT timestamptz '2026-08-01' + g * interval '1 hour', "
                 "'n' FROM generate_series(0, 39) g")  # August: no partition yet, so in the default
    return parse_plan({"table": "public.orders", "partition_by": {"column": "created_at", "interval": "1 month",
                                                                  "premake": 2},
                       "cutover": {"lock_timeout": "5s", "attempts": 200, "backoff_max": "200ms"}})


def _scenario(conn: psycopg.Connection, dsn: str) -> dict:
    plan = _setup(conn)
    out: dict = {"waits": []}
    holder = psycopg.connect(dsn)
    holder.execute("UPDATE orders SET note = 'held' WHERE id = 1")  # a row in the default
    out["holder_pid"] = holder.info.backend_pid

    def run() -> None:
        try:
            out["result"] = maintain_pass(plan, dsn, now=NOW)
        except BaseException as e:  # noqa: BLE001 - asserted below
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE NOT l.granted "
            "AND a.application_name LIKE 'orchestrate:%%'").fetchone()[0] > 0, timeout=60, interval=0.01,
            message="maintain never waited for the holder")
        with psycopg.connect(dsn, autocommit=True) as w:  # a writer of another month
            t0 = time.monotonic()
            while time.monotonic() - t0 < HOLD_S:
                s = time.monotonic()
                w.execute("INSERT INTO orders (created_at, note) VALUES ('2026-03-03', 'w')")
                out["waits"].append(time.monotonic() - s)
                time.sleep(0.02)
        holder.commit()
    finally:
        holder.close()
    t.join(timeout=120)
    assert not t.is_alive(), "maintain did not finish after the holder committed"
    return out


def test_default_move_yields_to_a_lock_holder(dsn: str, conn: psycopg.Connection) -> None:
    out = _scenario(conn, dsn)
    assert "error" not in out, out.get("error")
    assert max(out["waits"]) < 1.5, f"a writer waited {max(out['waits']):.2f} s behind maintain"
    waited = out["result"].get("waited_for") or []
    assert any(f"lock held by pid {out['holder_pid']}, idle in transaction" in w for w in waited), waited
    # ... and says so in the events too (status shows them), not only in its result and the log.
    events = [r[0] for r in conn.execute("SELECT message FROM orchestrate.events WHERE kind = 'yield'")]
    assert any(m.startswith("maintain ") and f"pid {out['holder_pid']}" in m for m in events), events
    assert "orders_p2026_08" in out["result"]["created"]
    assert conn.execute("SELECT count(*) FROM orders_p2026_08").fetchone()[0] == 40
    assert conn.execute("SELECT count(*) FROM orders_default").fetchone()[0] == 0
    assert conn.execute("SELECT note FROM orders WHERE id = 1").fetchone()[0] == "held"


def test_control_without_the_cap_stalls_writers(dsn: str, conn: psycopg.Connection,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maintain, "batch_lock_timeout_ms", lambda conn, plan_s: int(plan_s * 1000))
    out = _scenario(conn, dsn)
    assert "error" not in out, out.get("error")
    assert max(out["waits"]) > 2.0, f"the control did not stall the writer: {max(out['waits']):.2f} s"
