"""The verbs end to end through the real CLI, on a quiet table, and every bad input.

Bad input must give one line on stderr, a non-zero exit, no traceback, and leave the
database as it was.
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest
import yaml

from helpers import run_cli
from orchestrator.lab.sample import create_orders
from orchestrator.state.store import LOCK_NAMESPACE, Store, ensure_schema


def write_plan(tmp_path, table="public.orders", name="plan.yaml", **extra):
    plan = {"version": 1, "table": table,
            "partition_by": {"column": "created_at", "interval": "1 month", "premake": 2}}
    for k, v in extra.items():
        plan[k] = v
    path = tmp_path / name
    path.write_text(yaml.safe_dump(plan))
    return str(path)


def objects(conn) -> set[str]:
    """Every relation, trigger and function in the user's and orchestrate's schemas."""
    rels = conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'orchestrate')").fetchall()
    trg = conn.execute("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal").fetchall()
    fns = conn.execute("SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                       "WHERE n.nspname = 'orchestrate'").fetchall()
    return {r[0] for r in rels} | {"trigger " + r[0] for r in trg} | {"function " + r[0] for r in fns}


def state_snapshot(conn) -> dict[str, list[str]]:
    """The state schema as data: whether it exists, and every row of every table in it."""
    tables = [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'orchestrate' AND c.relkind IN ('r', 'p') ORDER BY 1").fetchall()]
    snap = {"schema": [str(r[0]) for r in conn.execute(
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'orchestrate'").fetchall()]}
    for t in tables:
        snap[t] = sorted(str(r[0]) for r in conn.execute(f"SELECT to_jsonb(t) FROM orchestrate.{t} t").fetchall())
    return snap


def table_digest(conn, table="public.orders") -> tuple:
    return conn.execute(f"SELECT count(*), sum(hashtextextended(t::text, 0)::numeric) FROM {table} t").fetchone()


def assert_one_line_error(code, out, err, expected_code, fragment):
    assert code == expected_code, (code, out, err)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert fragment in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def orders(conn):
    create_orders(conn, rows=3000, days=70)
    return conn


def test_full_flow_on_a_quiet_table(orders, dsn, tmp_path):
    plan = write_plan(tmp_path)
    before = table_digest(orders)
    code, out, err = run_cli("apply", plan, "--dsn", dsn)
    assert code == 0, err
    assert "partitioned" in out
    assert orders.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    # every row accounted for, every column identical
    assert table_digest(orders) == before
    assert orders.execute("SELECT count(*) FROM ONLY public.orders_default").fetchone()[0] == 0
    # status: JSON contract
    code, out, err = run_cli("status", plan, "--dsn", dsn, "--output", "json")
    assert code == 0, err
    status = json.loads(out)
    assert status["status"] == "cut_over"
    for phase in ("prepare", "capture", "backfill", "verify", "cutover"):
        assert status["phases"][phase]["state"] == "done"
        assert isinstance(status["phases"][phase]["duration_s"], float)
    assert status["ranges"]["rows_copied"] == before[0]
    assert status["phases"]["cutover"]["detail"]["lock_held_ms"] > 0
    # once partitioned, `plan` shows what the next maintain pass would do
    code, out, err = run_cli("plan", plan, "--dsn", dsn, "-o", "json")
    assert code == 0, err
    assert json.loads(out)["maintenance"]["table"] == "public.orders"
    # running it again is a no-op that says so
    code, out, _ = run_cli("apply", plan, "--dsn", dsn)
    assert code == 0 and "nothing to do" in out
    # the view and the grant moved with the table; the sequence keeps working
    assert orders.execute("SELECT sum(orders) FROM public.orders_daily").fetchone()[0] == before[0]
    assert orders.execute("SELECT has_table_privilege('reporting', 'public.orders', 'SELECT')").fetchone()[0]
    new_id = orders.execute("INSERT INTO public.orders (customer_id, amount) VALUES (1, 1) RETURNING id").fetchone()[0]
    assert orders.execute("SELECT count(*) FROM public.orders_retired WHERE id = %s", (new_id,)).fetchone()[0] == 1
    # finalize needs confirmation without a terminal, then drops the way back
    code, _, err = run_cli("finalize", plan, "--dsn", dsn)
    assert_one_line_error(code, "", err, 2, "pass --yes")
    code, out, err = run_cli("finalize", plan, "--dsn", dsn, "--yes")
    assert code == 0, err
    assert orders.execute("SELECT to_regclass('public.orders_retired')").fetchone()[0] is None
    # the serial sequence was moved to the new table, so dropping the old one kept it
    orders.execute("INSERT INTO public.orders (customer_id, amount) VALUES (1, 1)")
    assert "trigger orchestrate_reverse" not in objects(orders)


def test_until_and_rollback_restore_the_original(orders, dsn, tmp_path):
    plan = write_plan(tmp_path)
    before_rows, before_objects = table_digest(orders), objects(orders)
    code, out, err = run_cli("apply", plan, "--dsn", dsn, "--until", "backfill")
    assert code == 0, err
    assert "stopped after backfill" in out
    status = json.loads(run_cli("status", plan, "--dsn", dsn, "-o", "json")[1])
    assert status["phases"]["backfill"]["state"] == "done" and status["phases"]["verify"]["state"] == "pending"
    code, out, err = run_cli("rollback", plan, "--dsn", dsn)
    assert code == 0, err
    assert objects(orders) == before_objects
    assert table_digest(orders) == before_rows
    # after a rollback, apply starts over
    code, out, err = run_cli("apply", plan, "--dsn", dsn, "--until", "prepare")
    assert code == 0, err
    status = json.loads(run_cli("status", plan, "--dsn", dsn, "-o", "json")[1])
    assert status["migration_id"] == 2 and status["phases"]["prepare"]["state"] == "done"


def test_second_apply_is_refused(orders, dsn, tmp_path):
    plan = write_plan(tmp_path)
    assert run_cli("apply", plan, "--dsn", dsn, "--until", "prepare")[0] == 0
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, hashtext('public.orders'))", (LOCK_NAMESPACE,))
        code, out, err = run_cli("apply", plan, "--dsn", dsn)
        assert_one_line_error(code, out, err, 5, "another orchestrate run is acting on public.orders")
    status = json.loads(run_cli("status", plan, "--dsn", dsn, "-o", "json")[1])
    assert status["phases"]["capture"]["state"] == "pending"


def test_changed_plan_is_refused_on_resume(orders, dsn, tmp_path):
    plan = write_plan(tmp_path)
    assert run_cli("apply", plan, "--dsn", dsn, "--until", "capture")[0] == 0
    changed = write_plan(tmp_path, name="changed.yaml",
                         partition_by={"column": "created_at", "interval": "1 week", "premake": 2})
    code, out, err = run_cli("apply", changed, "--dsn", dsn)
    assert_one_line_error(code, out, err, 8, "the plan changed since migration 1 started")
    status = json.loads(run_cli("status", plan, "--dsn", dsn, "-o", "json")[1])
    assert status["phases"]["backfill"]["state"] == "pending"


@pytest.mark.parametrize("case, expected_code, fragment", [
    ("malformed", 2, "malformed YAML"),
    ("unknown_field", 2, "colour: unknown field"),
    ("unknown_table", 3, "table public.nope does not exist"),
    ("missing_column", 3, "column shipped_at does not exist"),
    ("text_key", 3, "is of type text; the partition key must be timestamp"),
    ("parsecs", 2, "'7 parsecs' is not an interval"),
    ("sql_in_name", 2, "is not a table name"),
    ("no_primary_key", 3, "has no primary key"),
    ("wrong_case", 3, "does not exist (did you mean public."),
])
def test_bad_input(orders, dsn, tmp_path, case, expected_code, fragment):
    orders.execute("CREATE TABLE public.nopk (created_at timestamptz, x int)")
    orders.execute('CREATE TABLE public."Orders" (id int primary key, created_at timestamptz)')
    before_rows, before_objects, before_state = table_digest(orders), objects(orders), state_snapshot(orders)
    pb = {"column": "created_at", "interval": "1 month", "premake": 2}
    makers = {
        "unknown_field": lambda: write_plan(tmp_path, colour="blue"),
        "unknown_table": lambda: write_plan(tmp_path, table="public.nope"),
        "missing_column": lambda: write_plan(tmp_path, partition_by={**pb, "column": "shipped_at"}),
        "text_key": lambda: write_plan(tmp_path, partition_by={**pb, "column": "status"}),
        "parsecs": lambda: write_plan(tmp_path, partition_by={**pb, "interval": "7 parsecs"}),
        "sql_in_name": lambda: write_plan(tmp_path, table="public.orders; drop table x"),
        "no_primary_key": lambda: write_plan(tmp_path, table="public.nopk"),
        # quoted, so it keeps its case and does not exist; the message points at "Orders"
        "wrong_case": lambda: write_plan(tmp_path, table='public."ORDERS"'),
    }
    if case == "malformed":
        (tmp_path / "bad.yaml").write_text("version: 1\ntable: public.orders\npartition_by: {column: [\n")
        plan = str(tmp_path / "bad.yaml")
    else:
        plan = makers[case]()
    for verb in ("plan", "apply"):
        code, out, err = run_cli(verb, plan, "--dsn", dsn)
        assert_one_line_error(code, out, err, expected_code, fragment)
    assert table_digest(orders) == before_rows
    assert objects(orders) == before_objects
    assert state_snapshot(orders) == before_state


@pytest.mark.parametrize("case, expected_code, fragment", [
    ("missing_column", 3, "column shipped_at does not exist"),
    ("no_primary_key", 3, "has no primary key"),
])
def test_bad_input_leaves_an_existing_state_schema_as_it_was(orders, dsn, tmp_path, case, expected_code, fragment):
    """A state schema that already holds another table's settings: a refused plan adds no row."""
    orders.execute("CREATE TABLE public.nopk (created_at timestamptz, x int)")
    ensure_schema(orders)
    Store(orders).set_controls("public.other", paused=True, batch_size=500)
    before = state_snapshot(orders)
    assert before["controls"], before
    pb = {"column": "created_at", "interval": "1 month", "premake": 2}
    plan = (write_plan(tmp_path, partition_by={**pb, "column": "shipped_at"}) if case == "missing_column"
            else write_plan(tmp_path, table="public.nopk"))
    for verb in ("plan", "apply", "status", "rollback"):
        code, out, err = run_cli(verb, plan, "--dsn", dsn)
        if verb in ("plan", "apply"):
            assert_one_line_error(code, out, err, expected_code, fragment)
    assert state_snapshot(orders) == before


def test_unreachable_dsn_fails_fast(tmp_path):
    plan = write_plan(tmp_path)
    t0 = time.monotonic()
    code, out, err = run_cli("apply", plan, "--dsn",
                             "host=127.0.0.1 port=1 user=x password=hunter2 dbname=x connect_timeout=3")
    # connect_timeout=3 bounds it: well under the 60 s pytest-timeout would need on a stall.
    assert time.monotonic() - t0 < 30
    assert_one_line_error(code, out, err, 4, "cannot connect to")
    assert "hunter2" not in err and "password=***" in err


def test_no_dsn_is_a_clear_error(tmp_path):
    code, out, err = run_cli("apply", write_plan(tmp_path), env={"ORCHESTRATE_DSN": ""})
    assert_one_line_error(code, out, err, 2, "pass --dsn or set ORCHESTRATE_DSN")


def test_plan_json_lists_steps_with_locks(orders, dsn, tmp_path):
    code, out, err = run_cli("plan", write_plan(tmp_path), "--dsn", dsn, "--output", "json")
    assert code == 0, err
    data = json.loads(out)
    phases = [s["phase"] for s in data["steps"]]
    assert phases[0] == "prepare" and phases[-1] == "cutover"
    assert {"prepare", "capture", "backfill", "verify", "cutover"} <= set(phases)
    assert all(s["lock"] for s in data["steps"])
    assert data["estimates"]["partitions"] >= 3
    assert any("PRIMARY KEY (id, created_at)" in w for w in data["warnings"])
    # The cutover's steps show what it executes: the reverse trigger staged at prepare is
    # switched on (its function rendered again), not created under the lock.
    cut = " ".join(s["sql"] for s in data["steps"] if s["phase"] == "cutover")
    assert 'FUNCTION "orchestrate"."reverse_on_<id>"() RETURNS boolean' in cut and "SELECT true" in cut
    assert 'INSERT INTO "public"."orders_retired"' in cut and "CREATE TRIGGER" not in cut
    # plan changes nothing
    assert orders.execute("SELECT to_regclass('public.orders_partitioned')").fetchone()[0] is None


def test_mixed_case_table_in_another_schema(conn, dsn, tmp_path):
    conn.execute('CREATE SCHEMA "Sales"')
    conn.execute('CREATE TABLE "Sales"."Order Items" ("Id" bigint PRIMARY KEY, "Created At" timestamptz NOT NULL, '
                 '"select" text)')
    conn.execute("""INSERT INTO "Sales"."Order Items" SELECT g, now() - g * interval '1 hour', 'it''s "q" \\ é'
                    FROM generate_series(1, 2000) g""")
    before = table_digest(conn, '"Sales"."Order Items"')
    plan = write_plan(tmp_path, table='"Sales"."Order Items"',
                      partition_by={"column": "Created At", "interval": "1 week", "premake": 1})
    code, out, err = run_cli("apply", plan, "--dsn", dsn)
    assert code == 0, err
    assert table_digest(conn, '"Sales"."Order Items"') == before
    assert conn.execute(
        """SELECT relkind FROM pg_class WHERE oid = '"Sales"."Order Items"'::regclass""").fetchone()[0] == "p"
