"""Spans: adjacent ranges smaller than a batch are copied by one batch (see
orchestrator.phases.backfill.Ranges), checkpointed together, split when they hold a batch.

Each test compares the twin with the table row for row, and reads the ranges' checkpoints:
every range copied, every row counted once, fewer batches than ranges.
"""

from __future__ import annotations

import threading

import psycopg

from helpers import wait_until
from orchestrator import runner
from orchestrator.plan import parse_plan

BATCH = 1000


def _table(conn: psycopg.Connection, per_day: dict[int, int]) -> int:
    """items with ``per_day[d]`` rows on day d of October 2026 (a few rows NULL-keyed too)."""
    conn.execute("CREATE TABLE public.items (id bigint PRIMARY KEY, at timestamptz, v int NOT NULL, note text)")
    n = 0
    for day, rows in sorted(per_day.items()):
        conn.execute("INSERT INTO public.items SELECT g, timestamptz '2026-10-01 00:00+00' "
                     "+ %s::int * interval '1 day' + (g - %s::int) * interval '1 second', 0, 'x' "
                     "FROM generate_series(%s::int, %s::int) g",
                     (day, n + 1, n + 1, n + rows))
        n += rows
    conn.execute("INSERT INTO public.items SELECT g, NULL, 0, 'null key' FROM generate_series(%s::int, %s::int) g",
                 (n + 1, n + 5))
    return n + 5


def _plan():
    return parse_plan({"table": "public.items", "partition_by": {"column": "at", "interval": "1 month"},
                       "backfill": {"range": "1 day", "batch_size": BATCH, "fixed_batch_size": True}})


def _diff(conn: psycopg.Connection) -> int:
    return conn.execute(
        "SELECT count(*) FROM ((SELECT * FROM items EXCEPT ALL SELECT * FROM items_partitioned) UNION ALL "
        "(SELECT * FROM items_partitioned EXCEPT ALL SELECT * FROM items)) d").fetchone()[0]


def _ranges(conn: psycopg.Connection) -> dict:
    return dict(zip(("ranges", "copied", "rows", "batches", "unbatched"), conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE state = 'copied' AND cursor IS NULL), sum(rows_copied), "
        "sum(batches), count(*) FILTER (WHERE batches = 0) FROM orchestrate.ranges").fetchone(), strict=True))


def test_small_ranges_are_copied_in_spans_each_checkpointed(dsn: str, conn: psycopg.Connection) -> None:
    total = _table(conn, {d: 40 for d in range(30)})
    runner.apply(_plan(), dsn, until="backfill")
    r = _ranges(conn)
    assert _diff(conn) == 0
    assert r["copied"] == r["ranges"] and r["rows"] == total, r
    # 33 ranges (NULL keys, before, 30 days, from) in a handful of batches: the first day
    # alone, then spans of up to 0.7 * 1000 / 40 = 17 days.
    assert r["batches"] <= 6, r
    assert r["unbatched"] >= r["ranges"] - 6, r


def test_a_span_holding_a_batch_or_more_is_split_and_copied_in_windows(dsn: str, conn: psycopg.Connection) -> None:
    """Day 20 alone holds 2.5 batches: the span that reaches it is given back whole (nothing
    of it commits), its ranges are copied one by one, and day 20 in windows with a cursor."""
    per_day = {d: 30 for d in range(30)}
    per_day[20] = int(2.5 * BATCH)
    total = _table(conn, per_day)
    runner.apply(_plan(), dsn, until="backfill")
    r = _ranges(conn)
    assert _diff(conn) == 0
    assert r["copied"] == r["ranges"] and r["rows"] == total, r
    big = conn.execute("SELECT rows_copied, batches FROM orchestrate.ranges WHERE label = '2026-10-21'").fetchone()
    assert big == (per_day[20], 3), big
    assert r["batches"] < r["ranges"] / 2, r


def test_a_span_meeting_an_application_row_lock_yields_and_stays_exact(dsn: str, conn: psycopg.Connection) -> None:
    """An idle-in-transaction update in the middle of a would-be span: the span's batch times
    out on it and rolls back, shrinks its window until the span is split, copies the ranges
    before the held one while the holder waits, and the held range once the holder commits
    (after touching a row the span had locked); the twin then equals the table."""
    _table(conn, {d: 40 for d in range(30)})
    plan = _plan()
    runner.apply(plan, dsn, until="capture")
    held = conn.execute("SELECT id FROM items WHERE at >= '2026-10-15' ORDER BY at LIMIT 1 OFFSET 20").fetchone()[0]
    holder = psycopg.connect(dsn)
    holder.execute("UPDATE items SET v = v + 1, note = 'held' WHERE id = %s", (held,))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            runner.apply(plan, dsn, until="backfill")
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    def before_held_copied() -> bool:
        return conn.execute("SELECT to_regclass('orchestrate.ranges') IS NOT NULL AND NOT EXISTS (SELECT 1 FROM "
                            "orchestrate.ranges WHERE NOT is_null AND left(hi, 10) <= '2026-10-15' "
                            "AND state <> 'copied') "
                            "AND EXISTS (SELECT 1 FROM orchestrate.events WHERE kind = 'yield' "
                            "AND message LIKE '%%range 2026-10-15:%%')").fetchone()[0]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        wait_until(before_held_copied, timeout=90,
                   message="the span was not split down to the held range, or the ranges before it not copied")
        holder.execute("UPDATE items SET v = v + 1 WHERE id = %s", (held - 3,))  # a row the span had locked
        holder.commit()
    finally:
        holder.close()
    t.join(timeout=120)
    assert not t.is_alive() and not errors, errors
    r = _ranges(conn)
    assert _diff(conn) == 0
    assert r["copied"] == r["ranges"], r
    assert conn.execute("SELECT v, note FROM items_partitioned WHERE id = %s", (held,)).fetchone() == (1, "held")
