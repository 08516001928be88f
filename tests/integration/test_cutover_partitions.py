"""Under the cutover's ACCESS EXCLUSIVE lock, nothing is done per partition.

The swap used to give every partition its owner and replica identity and clone the
reverse trigger onto each of them under the lock, so the hold grew with the partition
count (11 ms at 41 partitions, 169 ms at 1,106). Now the owner and replica identity are
set before the lock, and the reverse trigger is staged at prepare and only switched on.
Timing would be a flaky proof on a busy machine; the catalog is not: every catalog row
the cutover transaction wrote carries its transaction id (xmin), so no partition's
pg_class row and no trigger clone on a partition may carry the swap's xid.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import yaml

from helpers import run_cli
from orchestrator.lab.sample import create_orders

END = datetime.now(timezone.utc) - timedelta(days=2)
START = (END - timedelta(days=300)).strftime("%Y-%m-%d")  # about 300 daily partitions up to now + 1


def _plan(tmp_path: Path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({
        "table": "public.orders",
        "partition_by": {"column": "created_at", "interval": "1 day", "start": START, "premake": 1,
                         "max_partitions": 2000},
        "backfill": {"range": "1 day", "batch_size": 2000},
    }))
    return path


def _swap_xid_rows(conn: psycopg.Connection) -> tuple[int, int, int]:
    """(partitions, partition catalog rows written by the swap, trigger clones written by it)."""
    swap = "(SELECT xmin FROM pg_class WHERE oid = 'public.orders'::regclass)"
    parts = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'public.orders'::regclass").fetchone()[0]
    rel = conn.execute(f"SELECT count(*) FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid "
                       f"WHERE i.inhparent = 'public.orders'::regclass AND c.xmin = {swap}").fetchone()[0]
    trg = conn.execute(f"SELECT count(*) FROM pg_trigger t JOIN pg_inherits i ON i.inhrelid = t.tgrelid "
                       f"WHERE i.inhparent = 'public.orders'::regclass AND t.xmin = {swap}").fetchone()[0]
    return parts, rel, trg


def test_the_swap_writes_no_catalog_row_per_partition(conn: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    create_orders(conn, "public.orders", rows=6_000, days=300, end=END, seed=7)
    conn.execute("CREATE ROLE orders_owner_cp")
    conn.execute("ALTER TABLE public.orders OWNER TO orders_owner_cp")
    conn.execute("ALTER TABLE public.orders REPLICA IDENTITY FULL")
    plan = _plan(tmp_path)
    code, out, err = run_cli("apply", plan, "--dsn", dsn)
    assert code == 0, err

    parts, rel, trg = _swap_xid_rows(conn)
    assert parts > 250, parts
    assert rel == 0, f"the swap altered {rel} of {parts} partitions under its lock"
    assert trg == 0, f"the swap created {trg} trigger clones on partitions under its lock"
    # ... and yet every partition has what the swap promises.
    owners = conn.execute("SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                          "WHERE i.inhparent = 'public.orders'::regclass AND c.relowner <> "
                          "'orders_owner_cp'::regrole").fetchone()[0]
    assert owners == 0
    full = conn.execute("SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                        "WHERE i.inhparent = 'public.orders'::regclass AND c.relreplident = 'f'").fetchone()[0]
    assert full == parts

    # The reverse trigger, staged at prepare and switched on by the swap, mirrors writes
    # into the retired table; before the swap it never fired (the retired name did not exist).
    row = conn.execute("INSERT INTO public.orders (customer_id, status, amount, currency, created_at) "
                       "VALUES (1, 'new', 1, 'EUR', now()) RETURNING id").fetchone()
    conn.execute("UPDATE public.orders SET amount = 7, created_at = now() - interval '100 days' WHERE id = %s", row)
    assert conn.execute("SELECT amount, created_at < now() - interval '99 days' FROM public.orders_retired "
                        "WHERE id = %s", row).fetchone() == (7, True)
    deleted = conn.execute("SELECT id FROM public.orders ORDER BY id LIMIT 1").fetchone()
    conn.execute("DELETE FROM public.orders WHERE id = %s", deleted)
    assert conn.execute("SELECT count(*) FROM public.orders_retired WHERE id = %s", deleted).fetchone()[0] == 0

    # Rollback switches the trigger off rather than dropping it under its lock, and leaves
    # nothing of ours behind.
    code, out, err = run_cli("rollback", plan, "--dsn", dsn)
    assert code == 0, err
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "r"
    assert conn.execute("SELECT count(*) FROM public.orders WHERE id = %s", row).fetchone()[0] == 1
    left = conn.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = 'orchestrate'::regnamespace").fetchone()[0]
    assert left == 0
    assert conn.execute("SELECT to_regclass('public.orders_partitioned')").fetchone()[0] is None


def test_staged_reverse_trigger_costs_nothing_before_the_swap(conn: psycopg.Connection, dsn: str,
                                                               tmp_path: Path) -> None:
    """Switched off, the staged trigger is not called and queues nothing: a write into the
    twin before the cutover would fail if it were (the retired table does not exist yet)."""
    create_orders(conn, "public.orders", rows=2_000, days=30, end=END, seed=8)
    plan = _plan(tmp_path)
    code, out, err = run_cli("apply", plan, "--dsn", dsn, "--until", "prepare")
    assert code == 0, err
    qual = conn.execute("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = "
                        "'public.orders_partitioned'::regclass AND tgname = 'orchestrate_reverse'").fetchone()[0]
    assert "WHEN (orchestrate.reverse_on_" in qual, qual
    conn.execute("INSERT INTO public.orders_partitioned SELECT * FROM public.orders LIMIT 100")
    assert conn.execute("SELECT count(*) FROM public.orders_partitioned").fetchone()[0] == 100
    # Turned on by hand, the same write reaches the trigger function (and fails: no retired table).
    fn = conn.execute("SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.proname LIKE 'reverse_on_%' "
                      "AND p.pronamespace = 'orchestrate'::regnamespace").fetchone()[0]
    conn.execute(f"CREATE OR REPLACE FUNCTION {fn.replace('()', '')}() RETURNS boolean LANGUAGE sql STABLE "
                 "AS 'SELECT true'")
    try:
        conn.execute("INSERT INTO public.orders_partitioned SELECT * FROM public.orders ORDER BY id DESC LIMIT 1")
        raise AssertionError("the switched-on reverse trigger did not fire")
    except psycopg.errors.UndefinedTable:
        pass
