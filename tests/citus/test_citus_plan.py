"""`plan --dsn` against a Citus coordinator: what is missing, one line, exit 3, nothing left
behind; and the rollback-after-cutover story: refused without the plan's acknowledgement,
and with it, the loss it acknowledges is real and said again by rollback."""

from __future__ import annotations

import psycopg
import pytest
import yaml
from test_citus_migration import make_orders, write_plan

from helpers import run_cli


def nothing_recorded(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT to_regnamespace('orchestrate')").fetchone()[0] is None
    assert conn.execute("SELECT to_regclass('public.orders_partitioned')").fetchone()[0] is None


def refused(conn, dsn, plan, needle: str) -> None:
    for verb in ("plan", "apply"):
        rc, out, err = run_cli(verb, str(plan), "--dsn", dsn)
        assert rc == 3, (verb, rc, out, err)
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], err
        assert "Traceback" not in err
    nothing_recorded(conn)


def test_plan_checks_the_column(citus_conn, citus_dsn, tmp_path):
    make_orders(citus_conn, rows=500)
    plan = write_plan(tmp_path)
    rc, out, err = run_cli("plan", str(plan), "--dsn", citus_dsn)
    assert rc == 0, out + err
    assert "create_distributed_table" in out and "2 worker(s)" in out
    assert "primary key becomes (customer_id, id, created_at)" in out or "customer_id" in out
    data = yaml.safe_load(plan.read_text())
    data["distribute"]["column"] = "nope"
    plan.write_text(yaml.safe_dump(data))
    refused(citus_conn, citus_dsn, plan, 'column nope does not exist')
    data["distribute"]["column"] = "note"
    plan.write_text(yaml.safe_dump(data))
    refused(citus_conn, citus_dsn, plan, "is nullable")


@pytest.mark.no_workers
def test_plan_refuses_a_coordinator_without_workers(citus_conn, citus_dsn, tmp_path):
    make_orders(citus_conn, rows=200)
    refused(citus_conn, citus_dsn, write_plan(tmp_path), "no active worker is registered")


def test_plan_refuses_a_database_without_citus(citus, tmp_path, request):
    import uuid

    name = f"c_nocitus_{uuid.uuid4().hex[:8]}"
    citus.coordinator.create_database(name)
    request.addfinalizer(lambda: citus.coordinator.drop_database(name))
    dsn = citus.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        make_orders(conn, rows=200)
        refused(conn, dsn, write_plan(tmp_path), "the citus extension is not installed")


def test_cutover_needs_the_acknowledgement_and_the_loss_is_real(citus_conn, citus_dsn, tmp_path):
    make_orders(citus_conn, rows=2_000)
    plan = write_plan(tmp_path, ack=False, sleep_ratio=0)
    rc, out, err = run_cli("plan", str(plan), "--dsn", citus_dsn)
    assert rc == 0 and "rollback after the cutover loses the writes made since" in out, out + err
    rc, out, err = run_cli("apply", str(plan), "--dsn", citus_dsn)
    assert rc == 8, out + err
    assert "accept_no_rollback_after_cutover" in err and "Traceback" not in err
    # Verified, not swapped: the heap table is still the live one.
    assert citus_conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "r"
    ack = write_plan(tmp_path, ack=True, sleep_ratio=0)  # same shape: the acknowledgement is not part of it
    rc, out, err = run_cli("apply", str(ack), "--dsn", citus_dsn)
    assert rc == 0, out + err
    assert citus_conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    before = citus_conn.execute("SELECT count(*) FROM public.orders").fetchone()[0]
    citus_conn.execute("INSERT INTO public.orders (customer_id, amount, note) VALUES (42, 1, 'after cutover')")
    rc, out, err = run_cli("rollback", str(ack), "--dsn", citus_dsn)
    assert rc == 0, out + err
    assert "writes made since the cutover are NOT in it" in out
    assert citus_conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "r"
    # What the plan acknowledged: the write made after the cutover is not in the heap table.
    assert citus_conn.execute("SELECT count(*) FROM public.orders").fetchone()[0] == before
    assert citus_conn.execute("SELECT count(*) FROM public.orders WHERE note = 'after cutover'").fetchone()[0] == 0
    assert citus_conn.execute("SELECT count(*) FROM citus_shards").fetchone()[0] == 0
    # The serial sequence stayed the heap table's (Citus never gives one back): inserts go on.
    assert citus_conn.execute("SELECT pg_get_serial_sequence('public.orders', 'id')").fetchone()[0] == \
        "public.orders_id_seq"
    citus_conn.execute("INSERT INTO public.orders (customer_id, amount) VALUES (43, 1)")
    # And finalize after a fresh run keeps the sequence (it moves to the distributed table).
    rc, out, err = run_cli("apply", str(ack), "--dsn", citus_dsn)
    assert rc == 0, out + err
    rc, out, err = run_cli("finalize", str(ack), "--dsn", citus_dsn, "--yes")
    assert rc == 0, out + err
    assert citus_conn.execute("SELECT to_regclass('public.orders_retired')").fetchone()[0] is None
    citus_conn.execute("INSERT INTO public.orders (customer_id, amount) VALUES (44, 1)")
    assert citus_conn.execute("SELECT pg_get_serial_sequence('public.orders', 'id')").fetchone()[0] == \
        "public.orders_id_seq"
