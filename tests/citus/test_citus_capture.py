"""Capture and verify in distributed mode, deterministically: a change of the distribution
column reaches the distributed twin as a move (Citus refuses an UPDATE that sets it), and a
real divergence in the twin is caught by verify (exit 6, the range named) despite its
re-reads, then repaired by --recopy; a SERIALIZABLE writer whose commit fails leaves nothing
in the twin (the capture commits with two phases)."""

from __future__ import annotations

import re

import psycopg
import pytest
from test_citus_migration import make_orders, write_plan

from helpers import run_cli

COLS = "customer_id, id, status, amount, note, created_at"


def same(conn: psycopg.Connection) -> None:
    diff = conn.execute(
        f"SELECT count(*) FROM ((SELECT {COLS} FROM public.orders EXCEPT ALL SELECT {COLS} FROM "
        f"public.orders_partitioned) UNION ALL (SELECT {COLS} FROM public.orders_partitioned EXCEPT ALL "
        f"SELECT {COLS} FROM public.orders)) d").fetchone()[0]
    assert diff == 0


def test_distribution_column_change_and_divergence(citus_conn, citus_dsn, tmp_path):
    # Keyed by id alone: the distribution column is not in the live primary key, so the
    # trigger must add it to the key it matches rows by, and never SET it.
    make_orders(citus_conn, rows=1_500, tenant_key=False)
    plan = write_plan(tmp_path, sleep_ratio=0)
    rc, out, err = run_cli("apply", str(plan), "--dsn", citus_dsn, "--until", "backfill")
    assert rc == 0, out + err
    cid, rid = citus_conn.execute("SELECT customer_id, id FROM public.orders ORDER BY id LIMIT 1").fetchone()
    # An ordinary update (the trigger must not SET the distribution column: Citus refuses it) ...
    citus_conn.execute("UPDATE public.orders SET note = 'touched' WHERE customer_id = %s AND id = %s", (cid, rid))
    # ... a change of the distribution column (a move to another shard) ...
    citus_conn.execute("UPDATE public.orders SET customer_id = customer_id + 1000003 WHERE customer_id = %s "
                       "AND id = %s", (cid, rid))
    # ... inside a transaction with a rollback, and a delete.
    with citus_conn.transaction():
        citus_conn.execute("UPDATE public.orders SET amount = amount + 1 WHERE id < 50")
        citus_conn.execute("DELETE FROM public.orders WHERE id BETWEEN 50 AND 60")
    try:
        with citus_conn.transaction():
            citus_conn.execute("UPDATE public.orders SET note = 'rolled back' WHERE id < 100")
            raise RuntimeError("rollback")
    except RuntimeError:
        pass
    same(citus_conn)
    assert citus_conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'p' AND "
                              "conrelid = 'public.orders_partitioned'::regclass").fetchone()[0] == \
        "PRIMARY KEY (id, created_at, customer_id)"
    assert citus_conn.execute("SELECT count(*) FROM public.orders_partitioned WHERE customer_id = %s AND id = %s",
                              (cid + 1000003, rid)).fetchone()[0] == 1
    # A divergence nobody wrote through the trigger: verify names its range, exit 6.
    citus_conn.execute("UPDATE public.orders_partitioned SET amount = amount + 7 WHERE customer_id = %s AND id = %s",
                       (cid + 1000003, rid))
    rc, out, err = run_cli("apply", str(plan), "--dsn", citus_dsn)
    assert rc == 6, out + err
    assert "verification failed for 1 range(s)" in err and "Traceback" not in err
    assert citus_conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "r"
    rc, out, err = run_cli("apply", str(plan), "--dsn", citus_dsn, "--recopy", "all")
    assert rc == 0, out + err
    assert citus_conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    diff = citus_conn.execute(
        f"SELECT count(*) FROM ((SELECT {COLS} FROM public.orders EXCEPT ALL SELECT {COLS} FROM "
        f"public.orders_retired) UNION ALL (SELECT {COLS} FROM public.orders_retired EXCEPT ALL "
        f"SELECT {COLS} FROM public.orders)) d").fetchone()[0]
    assert diff == 0


def test_verify_settles_a_hot_range_under_a_short_lock(citus_conn, citus_dsn, tmp_path):
    """A writer inserting into the current range every few ms keeps the two unlocked reads
    (heap, then the shards) from ever agreeing; the locked read settles it: verify passes,
    the writer sees no error, and the range's verdict says it was read under the lock."""
    from orchestrator.lab.bench_citus import StallWriter

    make_orders(citus_conn, rows=1_500)
    plan = write_plan(tmp_path, sleep_ratio=0)
    writers = [StallWriter(citus_dsn) for _ in range(4)]
    for w in writers:
        w.start()
    try:
        rc, out, err = run_cli("apply", str(plan), "--dsn", citus_dsn, "--until", "verify")
    finally:
        results = [w.finish() for w in writers]
    assert rc == 0, out + err
    assert all(r["errors"] == 0 and r["writes"] > 50 for r in results), results
    locked = citus_conn.execute("SELECT count(*) FROM orchestrate.ranges WHERE verify_state = 'ok' "
                                "AND (verify_detail->>'locked')::bool").fetchone()[0]
    assert locked >= 1
    same(citus_conn)


def test_why_every_distributed_batch_copies_with_on_conflict(citus_conn):
    """The premise of the backfill's rule (phases/backfill.py, copy_range: a distributed batch
    is always guarded): Citus runs INSERT .. SELECT from a local table without ON CONFLICT as
    a COPY into the shards, and a duplicate key there reaches the client as XX000, not 23505,
    so a redo keyed on the unique violation would never run. With ON CONFLICT DO NOTHING the
    same statement succeeds."""
    import psycopg

    c = citus_conn
    c.execute("CREATE TABLE public.dst (tenant bigint NOT NULL, id bigint NOT NULL, PRIMARY KEY (tenant, id))")
    c.execute("SELECT create_distributed_table('public.dst', 'tenant')")
    c.execute("CREATE TABLE public.src (tenant bigint NOT NULL, id bigint NOT NULL)")
    c.execute("INSERT INTO public.src SELECT g % 7, g FROM generate_series(1, 100) g")
    c.execute("INSERT INTO public.dst VALUES (3, 3)")  # what the capture trigger wrote meanwhile
    try:
        c.execute("INSERT INTO public.dst SELECT tenant, id FROM public.src")
    except psycopg.Error as e:
        err = e
    else:
        raise AssertionError("the duplicate key was not refused")
    assert "duplicate key value violates unique constraint" in str(err)
    assert not isinstance(err, psycopg.errors.UniqueViolation), type(err)  # the SQLSTATE is lost
    c.execute("INSERT INTO public.dst SELECT tenant, id FROM public.src ON CONFLICT DO NOTHING")
    assert c.execute("SELECT count(*) FROM public.dst").fetchone()[0] == 100


def test_a_serializable_writer_whose_commit_fails_leaves_nothing_in_the_twin(citus_conn, citus_dsn, tmp_path):
    """Citus commits a one-shard write on its worker in the coordinator's pre-commit, and
    PostgreSQL checks SERIALIZABLE's read/write dependencies after that: a writer canceled
    "as a pivot, during commit attempt" got 40001, but with one phase its trigger's write
    stayed in the twin, a write nobody committed, cut over as the table's data (checked:
    this test fails so without the capture's two-phase prologue)."""
    make_orders(citus_conn, rows=600)
    plan = write_plan(tmp_path, sleep_ratio=0)
    rc, out, err = run_cli("apply", str(plan), "--dsn", citus_dsn, "--until", "backfill")
    assert rc == 0, out + err
    (c1, i1), (c2, i2) = citus_conn.execute(
        "SELECT customer_id, id FROM public.orders ORDER BY id LIMIT 2").fetchall()
    one = "SELECT note FROM public.orders WHERE customer_id = %s AND id = %s"
    set_note = "UPDATE public.orders SET note = %s WHERE customer_id = %s AND id = %s"
    with psycopg.connect(citus_dsn) as t1, psycopg.connect(citus_dsn) as t2:
        for t in (t1, t2):
            t.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        # Write skew: each reads the row the other writes.
        t1.execute(one, (c1, i1)).fetchall()
        t2.execute(one, (c2, i2)).fetchall()
        t1.execute(set_note, ("t1 committed", c2, i2))
        t2.execute(set_note, ("t2 never committed", c1, i1))
        t1.commit()
        with pytest.raises(psycopg.errors.SerializationFailure, match="read/write dependencies"):
            t2.commit()
    same(citus_conn)
    assert citus_conn.execute("SELECT count(*) FROM public.orders_partitioned WHERE note = 't2 never committed'"
                              ).fetchone()[0] == 0
    assert citus_conn.execute("SELECT count(*) FROM public.orders_partitioned WHERE note = 't1 committed'"
                              ).fetchone()[0] == 1


def test_every_captured_transaction_of_a_long_session_commits_with_two_phases(citus_conn, citus_dsn, tmp_path):
    """The prologue stays two-phase once PL/pgSQL has switched the trigger's statements to
    generic plans (after five executions in a session): insert, update and delete, each in
    its own transaction, twelve rounds in one session, each prepared on its worker."""
    make_orders(citus_conn, rows=300)
    plan = write_plan(tmp_path, sleep_ratio=0)
    rc, out, err = run_cli("apply", str(plan), "--dsn", citus_dsn, "--until", "backfill")
    assert rc == 0, out + err
    notes: list[str] = []
    with psycopg.connect(citus_dsn) as t:
        t.add_notice_handler(lambda d: notes.append(d.message_primary or ""))
        t.execute("SET citus.log_remote_commands = on")
        t.commit()
        phases = []
        for i in range(12):
            for stmt in ("INSERT INTO public.orders (customer_id, amount, created_at) VALUES (%s, 1, now() - "
                         "interval '1 day') RETURNING id",
                         "UPDATE public.orders SET note = 'round' WHERE customer_id = %s AND id = %s",
                         "DELETE FROM public.orders WHERE customer_id = %s AND id = %s"):
                notes.clear()
                if stmt.startswith("INSERT"):
                    new = t.execute(stmt, (i + 1,)).fetchone()[0]
                else:
                    t.execute(stmt, (i + 1, new))
                t.commit()
                phases.append(any(n.startswith("issuing PREPARE TRANSACTION") for n in notes))
    assert all(phases), phases
    same(citus_conn)


def test_a_migration_captured_without_the_prologue_gets_it_when_apply_resumes(citus_conn, citus_dsn, tmp_path):
    """A distributed migration captured by an older version (its dual-write function has no
    two-phase prologue) is given this version's function by the next apply, still SECURITY
    DEFINER and the table owner's; a migration that has it is left alone."""
    make_orders(citus_conn, rows=300)
    plan = write_plan(tmp_path, sleep_ratio=0)
    rc, out, err = run_cli("apply", str(plan), "--dsn", citus_dsn, "--until", "backfill")
    assert rc == 0, out + err
    fn = citus_conn.execute("SELECT p.oid FROM pg_proc p WHERE p.pronamespace = 'orchestrate'::regnamespace "
                            "AND p.proname ~ '^capture_[0-9]+$'").fetchone()[0]
    source = citus_conn.execute("SELECT pg_get_functiondef(%s)", (fn,)).fetchone()[0]
    old, n = re.subn(r"IF pg_catalog\.current_setting\('orchestrate\.two_phase'.*?END IF;\s*", "", source,
                     count=1, flags=re.S)
    assert n == 1
    citus_conn.execute(old)  # what an older version left: same owner, SECURITY DEFINER, no prologue

    def facts():
        return citus_conn.execute(
            "SELECT strpos(prosrc, 'orchestrate.two_phase') > 0, prosecdef, pg_get_userbyid(proowner) "
            "FROM pg_proc WHERE oid = %s", (fn,)).fetchone()

    owner = citus_conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'public.orders'::regclass"
                               ).fetchone()[0]
    assert facts() == (False, True, owner)
    rc, out, err = run_cli("apply", str(plan), "--dsn", citus_dsn, "--until", "verify")
    assert rc == 0, out + err
    assert facts() == (True, True, owner)
    events = "SELECT count(*) FROM orchestrate.events WHERE message LIKE 'dual-write function rendered again%%'"
    assert citus_conn.execute(events).fetchone()[0] == 1
    rc, out, err = run_cli("apply", str(plan), "--dsn", citus_dsn, "--until", "verify")
    assert rc == 0, out + err
    assert citus_conn.execute(events).fetchone()[0] == 1  # nothing to do the second time
