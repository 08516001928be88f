"""`orchestrate maintain` on a distributed partitioned table: partitions ahead (distributed
and colocated like the others), rows of a new range moved out of the default partition
first (Citus' own create_time_partitions refuses while the default holds them), retention."""

from __future__ import annotations

import psycopg
import yaml
from test_citus_migration import make_orders, write_plan

from helpers import run_cli


def test_maintain_creates_ahead_moves_the_default_and_retires(citus_conn, citus_dsn, tmp_path):
    make_orders(citus_conn, rows=1_500)
    plan = write_plan(tmp_path, sleep_ratio=0)
    rc, out, err = run_cli("apply", str(plan), "--dsn", citus_dsn)
    assert rc == 0, out + err
    # Rows three months ahead land in the default partition (no partition there yet).
    citus_conn.execute(
        "INSERT INTO public.orders (customer_id, amount, created_at) SELECT g, 1, "
        "date_trunc('month', now()) + interval '3 months' + g * interval '1 hour' FROM generate_series(1, 40) g")
    assert citus_conn.execute("SELECT count(*) FROM public.orders_default").fetchone()[0] == 40
    total = citus_conn.execute("SELECT count(*), sum(amount) FROM public.orders").fetchone()
    # Control: Citus' own function cannot make that partition while the default holds its rows.
    try:
        with citus_conn.transaction():
            citus_conn.execute("SELECT create_time_partitions('public.orders', '1 month', now() + interval '5 months')")
        raise AssertionError("create_time_partitions made a partition over rows of the default")
    except psycopg.Error as e:
        assert "default" in str(e).lower(), e
    data = yaml.safe_load(plan.read_text())
    data["partition_by"]["premake"] = 4
    data["retention"] = {"keep": 1, "action": "drop"}
    plan.write_text(yaml.safe_dump(data))
    first_month = citus_conn.execute(
        "SELECT min(c.relname) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'public.orders'::regclass AND c.relname <> 'orders_default'").fetchone()[0]
    in_first = citus_conn.execute(f"SELECT count(*) FROM public.{first_month}").fetchone()[0]
    rc, out, err = run_cli("maintain", str(plan), "--dsn", citus_dsn)
    assert rc == 0, out + err
    assert citus_conn.execute("SELECT count(*) FROM public.orders_default").fetchone()[0] == 0
    # Every partition, old and new, is distributed and colocated with the parent.
    rows = citus_conn.execute(
        "SELECT c.relname, p.colocationid = (SELECT colocationid FROM pg_dist_partition "
        "WHERE logicalrelid = 'public.orders'::regclass) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "LEFT JOIN pg_dist_partition p ON p.logicalrelid = i.inhrelid "
        "WHERE i.inhparent = 'public.orders'::regclass").fetchall()
    assert rows and all(colocated for _, colocated in rows), rows
    names = {r[0] for r in rows}
    assert first_month not in names  # retired by retention
    assert len(names) >= 6
    ahead = citus_conn.execute("SELECT count(*) FROM public.orders WHERE created_at >= "
                               "date_trunc('month', now()) + interval '3 months'").fetchone()[0]
    assert ahead == 40
    # The retired month's rows are gone (action: drop), nothing else.
    assert total[0] - citus_conn.execute("SELECT count(*) FROM public.orders").fetchone()[0] == in_first
    again = run_cli("maintain", str(plan), "--dsn", citus_dsn)  # idempotent
    assert again[0] == 0 and "created nothing" in again[1], again
