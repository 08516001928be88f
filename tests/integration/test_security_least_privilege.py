"""Least privilege, first class: a whole migration run by a non-superuser that owns the table.

The grants are the ones README "Security model" lists for managed PostgreSQL (RDS, Aurora,
Cloud SQL): the owner, plus CREATE on the database (state schema) and pg_monitor. The
application writes throughout with DML grants only (its golden copy lives in a schema it
may write too). apply, rollback, apply, finalize: every acknowledged write is there.
"""

from __future__ import annotations

import time
import uuid

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator import runner
from orchestrator.lab.sample import create_orders
from orchestrator.lab.workload import GOLDEN_SCHEMA, Workload
from orchestrator.plan import parse_plan

PLAN = {
    "version": 1,
    "table": "public.orders",
    "partition_by": {"column": "created_at", "interval": "1 month", "premake": 1},
    "backfill": {"range": "1 month", "batch_size": 2000},
    "cutover": {"lock_timeout": "300ms", "attempts": 60, "backoff_max": "1s", "gate_timeout": "60s"},
}


def as_user(dsn: str, user: str) -> str:
    params = conninfo_to_dict(dsn)
    params["user"] = user
    return make_conninfo(**params)


def test_whole_migration_as_a_non_superuser_owner_under_a_dml_only_application(dsn, conn, capture_mode):
    create_orders(conn, rows=8000, days=90)
    suffix = uuid.uuid4().hex[:8]
    owner, app = f"owner_{suffix}", f"app_{suffix}"
    db = conn.info.dbname
    # The grants README lists: nothing else.
    conn.execute(f"""
        CREATE ROLE {owner} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB;
        CREATE ROLE {app} LOGIN NOSUPERUSER;
        GRANT pg_monitor TO {owner};
        GRANT CREATE ON DATABASE {db} TO {owner};
        GRANT CREATE ON SCHEMA public TO {owner};
        ALTER TABLE public.orders OWNER TO {owner};
        ALTER VIEW public.orders_daily OWNER TO {owner};
        GRANT USAGE ON SCHEMA public TO {app};
        GRANT SELECT, INSERT, UPDATE, DELETE ON public.orders TO {app};
        GRANT USAGE ON SEQUENCE public.orders_id_seq TO {app};
    """)
    owner_dsn, app_dsn = as_user(dsn, owner), as_user(dsn, app)
    plan = parse_plan({**PLAN, "capture": {"mode": capture_mode}})
    wl = Workload(dsn, "public.orders", "created_at", clients=3, seed=12)
    wl.setup()  # the golden copy: the test's bookkeeping, written by the application too
    conn.execute(f"GRANT USAGE ON SCHEMA {GOLDEN_SCHEMA} TO {app}; "
                 f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {GOLDEN_SCHEMA} TO {app}")
    wl.dsn = app_dsn

    def under_load(step):
        wl.start()
        try:
            time.sleep(0.5)
            out = step()
            time.sleep(0.5)
        finally:
            report = wl.stop()
        assert report.errors == 0, report.error_samples
        assert sum(report.ops.values()) > 0
        cmp = wl.compare(dsn=dsn)
        assert cmp.ok, str(cmp)
        return out

    assert under_load(lambda: runner.apply(plan, owner_dsn)).data["status"] == "cut_over"
    assert under_load(lambda: runner.rollback(plan, owner_dsn)).data["status"] == "rolled_back"
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "r"
    assert under_load(lambda: runner.apply(plan, owner_dsn)).data["status"] == "cut_over"
    # finalize between bursts of writes: under continuous writes (three clients, no think
    # time) its ACCESS EXCLUSIVE on the partitioned table ran out of attempts here once
    assert runner.finalize(plan, owner_dsn).data["status"] == "finalized"
    under_load(lambda: None)
    # The new table, its partitions and orchestrate's functions all belong to the owner; the
    # state schema to the running role; nobody else may use it.
    owners = conn.execute(
        "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c WHERE c.oid = 'public.orders'::regclass "
        "OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'public.orders'::regclass)").fetchall()
    assert owners == [(owner,)]
    assert conn.execute("SELECT pg_get_userbyid(nspowner), nspacl::text FROM pg_namespace "
                        "WHERE nspname = 'orchestrate'").fetchone() == (owner, f"{{{owner}=UC/{owner}}}")
    assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (owner,)).fetchone()[0] is False
    with psycopg.connect(app_dsn, autocommit=True) as c:  # the application still writes the new table
        c.execute("INSERT INTO public.orders (customer_id, amount, created_at) VALUES (1, 1, now())")
