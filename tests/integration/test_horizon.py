"""A migration that outlives premake: the twin keeps getting partitions, rows that the
twin's default partition took for a now-due period are moved out, and the cutover's
partition gate is met. Time is moved with the runner's ``now`` override."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from orchestrator import runner
from orchestrator.plan import parse_plan

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def items(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("CREATE TABLE public.items (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, v text)")
    conn.execute("CREATE INDEX ON public.items (created_at)")
    conn.execute("INSERT INTO public.items SELECT g, %s::timestamptz - g * interval '3 hours', 'v' || g "
                 "FROM generate_series(1, 400) g", (T0,))
    return conn


def plan():
    return parse_plan({"table": "public.items",
                       "partition_by": {"column": "created_at", "interval": "1 month", "premake": 1},
                       "backfill": {"range": "1 month"},
                       "cutover": {"lock_timeout": "200ms", "attempts": 50, "backoff_max": "300ms",
                                   "gate_timeout": "10s"}})


def test_partitions_follow_now_and_default_rows_move_out(items, dsn):
    """Without the mechanism: the rows written for the newly due month sit in the twin's
    default partition and the cutover cannot create that partition (exit 1, forever)."""
    p = plan()
    runner.apply(p, dsn, until="backfill", now=T0.replace(tzinfo=None))  # naive UTC, as the runner takes it
    # Written while the migration runs, for a month beyond the twin's partitions: via the
    # capture trigger they land in the twin's default partition.
    later = T0 + timedelta(days=75)
    items.execute("INSERT INTO public.items SELECT 1000 + g, %s::timestamptz + g * interval '1 minute', 'late' "
                  "FROM generate_series(1, 50) g", (later,))
    assert items.execute("SELECT count(*) FROM public.items_default").fetchone()[0] == 50
    runner.apply(p, dsn, now=later.replace(tzinfo=None))
    assert items.execute("SELECT relkind FROM pg_class WHERE oid = 'public.items'::regclass").fetchone()[0] == "p"
    assert items.execute("SELECT count(*) FROM public.items_default").fetchone()[0] == 0
    part = items.execute("SELECT tableoid::regclass::text, count(*) FROM public.items WHERE v = 'late' "
                         "GROUP BY 1").fetchall()
    assert part == [(f"items_p{later:%Y_%m}", 50)]
    # up to now + premake
    last = items.execute("SELECT max(c.relname) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                         "WHERE i.inhparent = 'public.items'::regclass AND c.relname <> 'items_default'").fetchone()
    assert last[0] == f"items_p{(later.replace(day=1) + timedelta(days=40)):%Y_%m}"
    n = items.execute("SELECT count(*) FROM ((TABLE public.items EXCEPT ALL TABLE public.items_retired) UNION ALL "
                      "(TABLE public.items_retired EXCEPT ALL TABLE public.items)) d").fetchone()[0]
    assert n == 0
    events = items.execute("SELECT message FROM orchestrate.events WHERE kind = 'horizon'").fetchall()
    assert events and "moved" in events[0][0]
