"""A table and a column whose names contain ``%``: psycopg reads ``%`` in a query's text as
a placeholder, so no statement may pass a quoted name through placeholder parsing unescaped
(owner.render once did, with no parameters: "the query has 1 placeholders but 0 parameters")."""

from __future__ import annotations

from datetime import datetime

import yaml

from helpers import run_cli
from orchestrator.maintain import maintain_pass
from orchestrator.plan import parse_plan


def test_maintain_moves_rows_out_of_the_default_of_a_table_named_with_percent(conn, dsn):
    """No primary key: the rows move out under the lock, each statement through the owner's
    executor with no parameters (maintain._as_owner, owner.render). With a primary key the
    batched precopy binds parameters into composed SQL too; not covered here."""
    conn.execute(
        """CREATE TABLE public."100% orders" (
               id bigint NOT NULL, created_at timestamptz NOT NULL, "pct%" numeric NOT NULL DEFAULT 1)
               PARTITION BY RANGE (created_at)""")
    conn.execute("""CREATE TABLE public."100% orders_p2026_01" PARTITION OF public."100% orders"
                    FOR VALUES FROM ('2026-01-01') TO ('2026-02-01')""")
    conn.execute('CREATE TABLE public."100% orders_default" PARTITION OF public."100% orders" DEFAULT')
    conn.execute("""INSERT INTO public."100% orders" (id, created_at, "pct%")
                    SELECT g, timestamptz '2026-01-01' + g * interval '1 hour', g % 100
                    FROM generate_series(1, 1500) g""")
    plan = parse_plan({
        "table": 'public."100% orders"',
        "partition_by": {"column": "created_at", "interval": "1 month", "premake": 1},
        "retention": {"keep": None},
        "cutover": {"lock_timeout": "200ms", "attempts": 100, "backoff_max": "200ms"},
        "maintenance": {"interval": "1 hour"},
    })
    r = maintain_pass(plan, dsn, now=datetime(2026, 2, 10))
    assert r["created"] == ["100% orders_p2026_02", "100% orders_p2026_03"]
    assert sum(r["moved"].values()) > 0
    left = conn.execute("""SELECT count(*) FROM public."100% orders_default" WHERE created_at < '2026-04-01'""")
    assert left.fetchone()[0] == 0
    total = conn.execute('SELECT count(*), sum("pct%") FROM public."100% orders"').fetchone()
    assert total == (1500, sum(g % 100 for g in range(1, 1501)))


def test_apply_refuses_a_name_with_percent_before_it_changes_anything(conn, dsn, tmp_path):
    """The migration binds parameters into statements that quote the names: refused up front,
    one line, exit 3, nothing recorded (not a failure in the middle of the backfill)."""
    conn.execute('CREATE TABLE public.orders (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, "pct%" int)')
    conn.execute("INSERT INTO public.orders SELECT g, now() - g * interval '1 hour', g FROM generate_series(1, 50) g")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"table": "public.orders",
                                    "partition_by": {"column": "created_at", "interval": "1 month"}}))
    for verb in ("plan", "apply"):
        rc, out, err = run_cli(verb, str(plan), "--dsn", dsn)
        assert rc == 3, (verb, rc, out, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "contains '%'" in lines[0] and '"pct%"' in lines[0], err
    assert conn.execute("SELECT to_regnamespace('orchestrate')").fetchone()[0] is None
    assert conn.execute("SELECT to_regclass('public.orders_partitioned')").fetchone()[0] is None
