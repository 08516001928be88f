"""Verification catches a tampered twin, names the range, blocks the cutover; --recopy repairs.
Rows with a NULL key or keys far outside the partitions go to the default partition."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import yaml

from helpers import drain, run_cli, wait_until
from orchestrator.lab.sample import create_orders
from orchestrator.lab.workload import Workload

END = datetime.now(timezone.utc)


def write_plan(tmp_path: Path, table: str = "public.orders", column: str = "created_at", capture_mode: str = "sync",
               **partition) -> Path:
    plan = {
        "table": table,
        "partition_by": {"column": column, "interval": "1 month", "premake": 2, **partition},
        "backfill": {"range": "1 day", "batch_size": 1000},
        "capture": {"mode": capture_mode},
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def cli(*args: str) -> tuple[int, str, str]:
    return run_cli(*[str(a) for a in args])


@pytest.fixture
def tampered(conn: psycopg.Connection, dsn: str, tmp_path: Path, capture_mode: str):
    """orders after backfill, with one twin row changed by hand (the capture trigger still on),
    in both capture modes: async verify must tell the tampering from replay lag."""
    create_orders(conn, "public.orders", rows=15_000, days=60, end=END, seed=4)
    plan = write_plan(tmp_path, capture_mode=capture_mode)
    code, out, err = cli("apply", plan, "--dsn", dsn, "--until", "backfill")
    assert code == 0, err
    victim, day = conn.execute(
        "SELECT id, (created_at AT TIME ZONE 'UTC')::date FROM orders ORDER BY id OFFSET 4000 LIMIT 1"
    ).fetchone()
    assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'orchestrate_capture'").fetchone()[0] == 1
    n = conn.execute("UPDATE orders_partitioned SET amount = amount + 0.01 WHERE id = %s", (victim,)).rowcount
    assert n == 1
    return plan, victim, f"{day:%Y-%m-%d}"


def _not_cut_over(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "r"
    assert conn.execute("SELECT to_regclass('public.orders_retired')").fetchone()[0] is None
    assert conn.execute("SELECT status FROM orchestrate.migrations").fetchone()[0] == "running"


def test_verify_names_the_tampered_range_and_recopy_repairs_it(tampered, conn: psycopg.Connection, dsn: str) -> None:
    plan, victim, label = tampered
    code, out, err = cli("apply", plan, "--dsn", dsn, "--until", "verify")
    assert code == 6, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and label in lines[0] and "1 range(s)" in lines[0], err
    _not_cut_over(conn)
    # A plain apply does not cut over either: the range is still a mismatch.
    code, out, err = cli("apply", plan, "--dsn", dsn)
    assert code == 6 and label in err, (code, err)
    _not_cut_over(conn)
    code, out, err = cli("status", plan, "--dsn", dsn, "--output", "json")
    assert code == 0 and json.loads(out)["ranges"]["mismatched_labels"] == [label], out

    # Repair while the application writes, then finish the migration.
    wl = Workload(dsn, "public.orders", "created_at", clients=2, seed=2)
    wl.setup()  # golden = the live table (the twin's tampered value is not in it)
    wl.start()
    try:
        code, out, err = cli("apply", plan, "--dsn", dsn, "--recopy", label)
    finally:
        report = wl.stop()
    assert code == 0, err
    assert report.errors == 0, report.error_samples
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    cmp = wl.compare()
    assert cmp.ok, str(cmp)
    events = conn.execute("SELECT message FROM orchestrate.events WHERE kind = 'repair'").fetchall()
    assert len(events) == 1 and label in events[0][0], events


def test_recopy_does_not_deadlock_with_a_concurrent_writer(tampered, conn: psycopg.Connection, dsn: str) -> None:
    """The re-copy must take the live rows' locks before touching the twin's, in the writers' order.

    A statement trigger makes the re-copy's DELETE of the twin's rows pause; meanwhile a
    writer updates a row of that range (live row lock, then the twin row through the
    capture trigger). Locking twin before live, the re-copy and the writer deadlock."""
    plan, victim, label = tampered
    code, _, err = cli("apply", plan, "--dsn", dsn, "--until", "verify")
    assert code == 6, err
    conn.execute("CREATE FUNCTION public.pause() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$")
    conn.execute("CREATE TRIGGER pause AFTER DELETE ON orders_partitioned FOR EACH STATEMENT "
                 "EXECUTE FUNCTION public.pause()")
    other = conn.execute(
        "SELECT id FROM orders WHERE (created_at AT TIME ZONE 'UTC')::date = %s::date AND id <> %s LIMIT 1",
        (label, victim),
    ).fetchone()[0]
    outcome: dict = {}

    def repair() -> None:
        outcome["apply"] = cli("apply", plan, "--dsn", dsn, "--recopy", label, "--until", "verify")

    t = threading.Thread(target=repair, daemon=True)
    t.start()
    with psycopg.connect(dsn, autocommit=True) as watch, psycopg.connect(dsn, autocommit=True) as writer:
        wait_until(lambda: watch.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
            "AND application_name LIKE 'orchestrate:%'"
        ).fetchone()[0] == 1, timeout=60, message="the re-copy never reached its DELETE of the twin's range")
        try:
            writer.execute("SET deadlock_timeout = '200ms'")
            writer.execute("UPDATE orders SET amount = amount + 5 WHERE id = %s", (other,))
            outcome["writer"] = "ok"
        except psycopg.Error as e:
            outcome["writer"] = str(e).splitlines()[0]
    t.join(timeout=120)
    conn.execute("DROP TRIGGER pause ON orders_partitioned")
    code, out, err = outcome["apply"]
    assert (outcome["writer"], code) == ("ok", 0), f"writer: {outcome['writer']}; apply exit {code}: {err[-1500:]}"
    # Async: the writer's change may have committed after the last replay before apply stopped
    # at verify; it waits in the change log. Replay it, as the next apply would.
    drain(conn)
    diff = conn.execute(
        "SELECT count(*) FROM ((TABLE orders EXCEPT ALL TABLE orders_partitioned) UNION ALL "
        "(TABLE orders_partitioned EXCEPT ALL TABLE orders)) d"
    ).fetchone()[0]
    assert diff == 0


def test_null_and_far_keys_go_to_the_default_partition(conn: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    conn.execute(
        """
CREATE TABLE public.events (
    id bigint PRIMARY KEY,
    at timestamptz,
    body text NOT NULL
);
CREATE INDEX ON public.events (at);
INSERT INTO public.events
SELECT g, now() - g * interval '7 minutes', 'e' || g FROM generate_series(1, 5000) g;
INSERT INTO public.events VALUES
    (-1, NULL, 'null key'), (-2, NULL, 'null key'), (-3, NULL, 'another'),
    (-4, '1900-01-01 00:00+00', 'far past'), (-5, '1969-12-31 23:59:59+00', 'before the epoch'),
    (-6, '9999-12-31 23:59:59+00', 'far future'), (-7, '2400-02-29 12:00+00', 'leap day 2400');
"""
    )
    start = (END - timedelta(days=40)).strftime("%Y-%m-01")
    plan = write_plan(tmp_path, table="public.events", column="at", start=start)
    code, out, err = cli("plan", plan, "--dsn", dsn, "--output", "json")
    assert code == 0, err
    assert json.loads(out)["estimates"]["rows_to_default_partition"] == 7, out
    expected = conn.execute("SELECT array_agg(id ORDER BY id) FROM events WHERE id < 0").fetchone()[0]
    code, out, err = cli("apply", plan, "--dsn", dsn)
    assert code == 0, err
    # A handful of outlier keys must not make the backfill slow: ranges stay within the
    # partitions' span (about 40 days) plus the default's, never one per day up to year 9999.
    n_ranges = conn.execute("SELECT count(*) FROM orchestrate.ranges").fetchone()[0]
    assert n_ranges < 200, f"{n_ranges} backfill ranges for 40 days of keys and 7 outliers"
    assert conn.execute("SELECT array_agg(id ORDER BY id) FROM events_default").fetchone()[0] == expected
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 5007
    diff = conn.execute(
        "SELECT count(*) FROM ((TABLE events EXCEPT ALL TABLE events_retired) UNION ALL "
        "(TABLE events_retired EXCEPT ALL TABLE events)) d"
    ).fetchone()[0]
    assert diff == 0
    # New rows with NULL or far keys keep working after cutover (the default partition takes them).
    conn.execute("INSERT INTO events VALUES (-8, NULL, 'after'), (-9, '3000-01-01', 'after')")
    assert conn.execute("SELECT count(*) FROM events_default").fetchone()[0] == 9
