"""Capture under concurrent multi-row transactions at every isolation level, through a whole
migration (prepare .. cutover) and on the new table after it.

Writers run READ COMMITTED, REPEATABLE READ and SERIALIZABLE transactions that each
update two rows (in random order), move one row's key, delete one and insert one, and
apply the same changes to a golden mirror table in the same transaction. They retry
40001 and 40P01 the way applications do; any other error fails the test. Small backfill
batches make many rows get copied after the snapshots of transactions already open, so
the trigger's probe (40001 instead of a silent miss) is exercised for real. At the end
the table equals the golden mirror, and the retired table equals the table.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timezone

import psycopg
import pytest

from orchestrator import runner
from orchestrator.lab.sample import create_orders
from orchestrator.plan import parse_plan

END = datetime(2026, 10, 20, 12, tzinfo=timezone.utc)
LEVELS = ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE", "REPEATABLE READ"]
RETRYABLE = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


def _writer(dsn: str, level: str, seed: int, stop: threading.Event, out: dict) -> None:
    rng = random.Random(seed)
    with psycopg.connect(dsn) as c:
        while not stop.is_set():
            ids = [r[0] for r in c.execute("SELECT id FROM golden ORDER BY random() LIMIT 4")]
            c.commit()
            if len(ids) < 4:
                return
            for _attempt in range(50):
                try:
                    c.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
                    c.execute("SELECT pg_sleep(%s)", (rng.uniform(0, 0.05),))  # an older snapshot
                    for t in ("orders", "golden"):
                        for i in (ids[:2] if rng.random() < 0.5 else ids[1::-1]):
                            c.execute(f"UPDATE {t} SET amount = amount + 1, note = %s WHERE id = %s",
                                      (f"{level} {seed}", i))
                        c.execute(f"UPDATE {t} SET created_at = created_at - interval '9 days' WHERE id = %s",
                                  (ids[2],))
                        c.execute(f"DELETE FROM {t} WHERE id = %s", (ids[3],))
                    new_id = c.execute("SELECT nextval('orders_id_seq')").fetchone()[0]
                    for t in ("orders", "golden"):
                        c.execute(f"INSERT INTO {t} (id, customer_id, amount, note, created_at) "
                                  "VALUES (%s, %s, 1, 'new', %s)", (new_id, seed, END))
                    c.commit()
                    out["commits"] += 1
                    break
                except RETRYABLE as e:
                    c.rollback()
                    out["retries"][e.sqlstate] = out["retries"].get(e.sqlstate, 0) + 1
                    time.sleep(rng.uniform(0, 0.02))
                except psycopg.Error as e:
                    c.rollback()
                    out["errors"].append(f"{level}: {e.sqlstate} {str(e).splitlines()[0]}")
                    break


@pytest.mark.parametrize("capture_mode", ["sync", "async"])
def test_multi_row_transactions_at_every_level_through_the_migration(dsn: str, conn: psycopg.Connection,
                                                                     capture_mode: str) -> None:
    create_orders(conn, "public.orders", rows=3000, days=10, end=END, seed=17)
    conn.execute("CREATE TABLE public.golden (LIKE public.orders INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    conn.execute("INSERT INTO public.golden SELECT * FROM public.orders")
    conn.execute("ALTER TABLE public.golden ADD PRIMARY KEY (id)")
    plan = parse_plan({"table": "public.orders", "partition_by": {"column": "created_at", "interval": "1 month"},
                       "backfill": {"range": "1 day", "batch_size": 30, "fixed_batch_size": True,
                                    "sleep_ratio": 0.5},
                       "cutover": {"lock_timeout": "300ms", "attempts": 100, "backoff_max": "300ms"},
                       "capture": {"mode": capture_mode}})
    out: dict = {"commits": 0, "retries": {}, "errors": []}
    stop = threading.Event()
    threads = [threading.Thread(target=_writer, args=(dsn, lvl, n, stop, out), daemon=True)
               for n, lvl in enumerate(LEVELS)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        outcome = runner.apply(plan, dsn)
        assert outcome.data["status"] == "cut_over", outcome.message
        time.sleep(1.0)  # and through the reverse trigger on the new table
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not out["errors"], out["errors"][:5]
    assert out["commits"] > 20, out
    diff = conn.execute(
        "SELECT count(*) FROM ((SELECT * FROM orders EXCEPT ALL SELECT * FROM golden) UNION ALL "
        "(SELECT * FROM golden EXCEPT ALL SELECT * FROM orders)) d").fetchone()[0]
    sample = conn.execute("(SELECT 'table', * FROM (SELECT * FROM orders EXCEPT ALL SELECT * FROM golden) a LIMIT 3) "
                          "UNION ALL (SELECT 'golden', * FROM (SELECT * FROM golden EXCEPT ALL SELECT * FROM orders) "
                          "b LIMIT 3)").fetchall()
    assert diff == 0, f"{diff} rows differ from the golden mirror; {out}; {sample}"
    retired = conn.execute(
        "SELECT count(*) FROM ((SELECT * FROM orders EXCEPT ALL SELECT * FROM orders_retired) UNION ALL "
        "(SELECT * FROM orders_retired EXCEPT ALL SELECT * FROM orders)) d").fetchone()[0]
    assert retired == 0, f"{retired} rows differ between the table and the retired table"
    print(out)
