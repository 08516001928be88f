"""Security: no privilege borrowed by the table owner, our state schema or ours alone,
built-ins never shadowed, refused runs leave nothing, our sessions known by pid.

Each attack is run against the real server the tests start. The table owner is hostile:
it plants code (a CHECK function, triggers and a rule on the twin and on the retired
table) that logs ``current_user`` and tries to make itself superuser, directly and after
``RESET ROLE``. Writes come from an application role with DML grants only, so every
``current_user`` in the log other than the owner's or the application's is a privilege
the owner borrowed.
"""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from helpers import run_cli, start_apply, stop, wait_until
from orchestrator import runner
from orchestrator.db import connect
from orchestrator.lab.sample import create_orders
from orchestrator.phases import Context
from orchestrator.phases.cutover import cutover_gates, lock_holders
from orchestrator.plan import parse_plan
from orchestrator.sql import QualifiedName
from orchestrator.state.store import LOCK_NAMESPACE, Store
from orchestrator.throttle import Throttler

PLAN = {
    "version": 1,
    "table": "public.orders",
    "partition_by": {"column": "created_at", "interval": "1 month", "premake": 1},
    "backfill": {"range": "1 month", "batch_size": 2000},
    "cutover": {"lock_timeout": "300ms", "attempts": 50, "backoff_max": "1s", "gate_timeout": "30s"},
}


def write_plan(tmp_path, name="plan.yaml", **extra) -> str:
    data = {**PLAN, **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def role_dsn(dsn: str, user: str, **extra) -> str:
    params = conninfo_to_dict(dsn)
    params.update(user=user, **extra)
    return make_conninfo(**params)


def new_role(conn: psycopg.Connection, stem: str, options: str = "") -> str:
    """A uniquely named login role (roles are cluster-wide; databases are per test)."""
    name = f"{stem}_{uuid.uuid4().hex[:8]}"
    conn.execute(f"CREATE ROLE {name} LOGIN NOSUPERUSER {options}")
    return name


def app_role(conn: psycopg.Connection) -> str:
    """The application: DML on the table, nothing else."""
    app = new_role(conn, "app")
    conn.execute(f"GRANT USAGE ON SCHEMA public TO {app}")
    conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON public.orders TO {app}")
    conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {app}")
    return app


def state_rows(conn: psycopg.Connection) -> dict:
    """Every row of every table in the state schema, and the schema's objects."""
    out = {"objects": sorted(conn.execute(
        "SELECT c.relname, c.relkind, pg_get_userbyid(c.relowner) FROM pg_class c "
        "WHERE c.relnamespace = to_regnamespace('orchestrate')").fetchall()),
        "functions": sorted(r[0] for r in conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = to_regnamespace('orchestrate')"))}
    for (table,) in conn.execute("SELECT c.relname FROM pg_class c WHERE c.relkind = 'r' "
                                 "AND c.relnamespace = to_regnamespace('orchestrate') ORDER BY 1").fetchall():
        out[table] = sorted(str(r[0]) for r in conn.execute(f"SELECT t::text FROM orchestrate.{table} t"))
    return out


def user_objects(conn: psycopg.Connection) -> list:
    return sorted(conn.execute(
        "SELECT n.nspname, c.relname, c.relkind, c.oid::int FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
    ).fetchall())


# --- (a) the table owner never borrows the running role's rights --------------------------

# Run on the owner's own session: under SET ROLE, the probe's RESET ROLE would succeed.
EVIL_SETUP = """
CREATE TABLE public.evil_log (who text, what text);
GRANT INSERT ON public.evil_log TO PUBLIC;
-- Owner code: log who runs it, then try to become superuser, also after RESET ROLE (which
-- is all `SET ROLE owner` would stand between it and the running role).
CREATE FUNCTION public.evil_probe(what text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.evil_log VALUES (current_user, what);
  BEGIN EXECUTE 'ALTER ROLE {evil} SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
  BEGIN EXECUTE 'RESET ROLE'; EXECUTE 'ALTER ROLE {evil} SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
  RETURN true;
END $$;
CREATE FUNCTION public.evil_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM public.evil_probe(TG_ARGV[0]); RETURN NULL; END $$;
ALTER TABLE public.orders ADD CONSTRAINT evil_check CHECK (public.evil_probe('check'));
"""


def test_owner_code_runs_as_the_owner_when_a_superuser_migrates(dsn, conn, tmp_path):
    """(a) orchestrate as superuser; the owner's CHECK (live table, copied to the twin), a
    trigger and a rule it adds to the twin, and a trigger it adds to the retired table after
    cutover all run, and only ever as the owner (or the application): the owner never
    becomes superuser through the migration."""
    create_orders(conn, rows=3000, days=70)
    evil = new_role(conn, "evil")
    conn.execute(f"GRANT CREATE ON SCHEMA public TO {evil}; ALTER TABLE public.orders OWNER TO {evil}")
    evil_conn = psycopg.connect(role_dsn(dsn, evil), autocommit=True)
    evil_conn.execute(EVIL_SETUP.format(evil=evil))
    conn.execute("DELETE FROM public.evil_log")  # the CHECK ran (as the owner) over the existing rows
    app = app_role(conn)
    app_conn = psycopg.connect(role_dsn(dsn, app), autocommit=True)
    plan = parse_plan(PLAN)

    def app_writes(tag: str) -> None:
        """Insert two rows, update one, delete the other: each reaches the other table."""
        ids = [app_conn.execute("INSERT INTO public.orders (customer_id, amount, note, created_at) "
                                "VALUES (1, 5, %s, now()) RETURNING id", (tag,)).fetchone()[0] for _ in range(2)]
        app_conn.execute("UPDATE public.orders SET note = note || '!' WHERE id = %s", (ids[0],))
        app_conn.execute("DELETE FROM public.orders WHERE id = %s", (ids[1],))

    assert runner.apply(plan, dsn, until="prepare").data["phase"] == "prepare"
    # The twin is the owner's from prepare on: the owner can (and does) plant code on it.
    assert conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = "
                        "'public.orders_partitioned'::regclass").fetchone()[0] == evil
    evil_conn.execute("""
        CREATE TRIGGER evil_twin AFTER INSERT OR UPDATE OR DELETE ON public.orders_partitioned
            FOR EACH ROW EXECUTE FUNCTION public.evil_trigger('twin trigger');
        CREATE RULE evil_twin_rule AS ON DELETE TO public.orders_partitioned
            DO ALSO INSERT INTO public.evil_log SELECT current_user, 'twin rule'
                WHERE public.evil_probe('twin rule')""")
    assert runner.apply(plan, dsn, until="capture").data["phase"] == "capture"
    app_writes("during capture")  # the forward trigger writes the twin: its trigger and rule fire
    assert runner.apply(plan, dsn).data["status"] == "cut_over"  # backfill copies: the twin's CHECK fires
    evil_conn.execute("""
        CREATE TRIGGER evil_retired AFTER INSERT OR UPDATE OR DELETE ON public.orders_retired
            FOR EACH ROW EXECUTE FUNCTION public.evil_trigger('retired trigger')""")
    app_writes("after cutover")  # the reverse trigger writes the retired table
    assert runner.finalize(plan, dsn).data["status"] == "finalized"
    app_conn.close()
    evil_conn.close()

    assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (evil,)).fetchone()[0] is False
    log = conn.execute("SELECT what, who, count(*) FROM public.evil_log GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    ran = {(what, who) for what, who, _n in log}
    # Every planted piece ran (the test is not vacuous) ...
    for what in ("check", "twin trigger", "twin rule", "retired trigger"):
        assert (what, evil) in ran, (what, log)
    # ... and never as anyone but the owner or the application.
    assert {who for _what, who in ran} <= {evil, app}, log


HOSTILE_COLUMN = 'x$orchestrate$; ALTER ROLE {evil} SUPERUSER; SELECT $orchestrate$'


def test_a_column_name_holding_our_dollar_quote_is_only_a_name(dsn, conn, capture_mode):
    """The owner names a column so that it would end a function body quoted as
    ``$orchestrate$`` and run the rest as SQL. The trigger and replay functions hold every
    column name: their tag is chosen so the name is only ever a name. The migration runs to
    the end with the rows exact, and the owner gains nothing. (With the fixed tag, prepare
    failed with exit 1, a syntax error, when it staged the reverse trigger.)"""
    evil = new_role(conn, "evil")
    col = HOSTILE_COLUMN.format(evil=evil)
    quoted = '"' + col.replace('"', '""') + '"'
    conn.execute(f"GRANT CREATE ON SCHEMA public TO {evil}")
    with psycopg.connect(role_dsn(dsn, evil), autocommit=True) as owner:
        owner.execute(f"CREATE TABLE public.items (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, "
                      f"{quoted} text)")
        owner.execute("INSERT INTO public.items SELECT g, timestamptz '2026-10-01 00:00+00' + g * interval '1 hour', "
                      "'v' || g FROM generate_series(1, 2000) g")
    plan = parse_plan({**PLAN, "table": "public.items", "capture": {"mode": capture_mode},
                       "backfill": {"range": "1 month", "batch_size": 300}})
    assert runner.apply(plan, dsn, until="capture").data["phase"] == "capture"
    # Writes through the capture: each names the column, in the trigger or the replay.
    conn.execute(f"UPDATE public.items SET {quoted} = 'changed' WHERE id % 7 = 0")
    conn.execute("DELETE FROM public.items WHERE id % 11 = 0")
    conn.execute("INSERT INTO public.items VALUES (5000, timestamptz '2026-10-20 00:00+00', 'new')")
    assert runner.apply(plan, dsn).data["status"] == "cut_over"
    conn.execute(f"UPDATE public.items SET {quoted} = 'after' WHERE id = 5000")  # the reverse trigger
    live = conn.execute(f"SELECT id, created_at, {quoted} FROM public.items ORDER BY id").fetchall()
    retired = conn.execute(f"SELECT id, created_at, {quoted} FROM public.items_retired ORDER BY id").fetchall()
    assert live == retired and len(live) == 2000 - 2000 // 11 + 1
    assert conn.execute(f"SELECT count(*) FROM public.items WHERE {quoted} = 'changed'").fetchone()[0] > 0
    assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (evil,)).fetchone()[0] is False


# --- (b) built-ins are never shadowed -------------------------------------------------------

def test_shadowed_builtins_are_never_called(dsn, conn, tmp_path):
    """(b) public.hashtextextended(text, integer) and public.setval(text, smallint, boolean)
    would win over the built-ins by an exact argument match under ``pg_catalog, public``.
    They are never called, and verify still catches a corrupted twin."""
    create_orders(conn, rows=3000, days=70)
    conn.execute("""
        ALTER TABLE public.orders ADD COLUMN ticket bigint GENERATED BY DEFAULT AS IDENTITY;
        CREATE TABLE public.shadow_log (fn text, who text);
        CREATE FUNCTION public.hashtextextended(text, integer) RETURNS bigint LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.shadow_log VALUES ('hashtextextended', current_user); RETURN 0; END $$;
        CREATE FUNCTION public.setval(text, smallint, boolean) RETURNS bigint LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.shadow_log VALUES ('setval', current_user); RETURN 0; END $$;
        CREATE FUNCTION public.setval(text, bigint, boolean) RETURNS bigint LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.shadow_log VALUES ('setval', current_user); RETURN 0; END $$;
    """)
    plan_file = write_plan(tmp_path)
    code, out, err = run_cli("apply", plan_file, "--dsn", dsn, "--until", "backfill")
    assert code == 0, err
    # Corrupt one row of the twin behind the trigger's back: verify must see it.
    conn.execute("UPDATE public.orders_partitioned SET note = 'corrupted' "
                 "WHERE id = (SELECT min(id) FROM public.orders_partitioned)")
    code, out, err = run_cli("apply", plan_file, "--dsn", dsn, "--until", "verify")
    assert code == 6, (code, err)
    assert conn.execute("SELECT count(*) FROM public.shadow_log").fetchone()[0] == 0
    code, out, err = run_cli("apply", plan_file, "--dsn", dsn, "--recopy", "all")
    assert code == 0, err  # repaired, verified, cut over: the identity continued with setval
    assert conn.execute("SELECT relkind FROM pg_class WHERE oid = 'public.orders'::regclass").fetchone()[0] == "p"
    assert conn.execute("SELECT fn, who FROM public.shadow_log").fetchall() == []


# --- (c) a state schema someone else controls ------------------------------------------------

@pytest.mark.parametrize("how", ["schema owned by another role", "table planted with CREATE granted"])
def test_foreign_state_schema_is_refused(dsn, conn, tmp_path, how):
    """(c) a pre-created ``orchestrate`` schema another role controls, with a trigger on a table
    in it: refused with one line (exit 8), nothing changed, the trigger never fired."""
    create_orders(conn, rows=500, days=40)
    other = new_role(conn, "other")
    if how == "schema owned by another role":
        conn.execute(f"CREATE SCHEMA orchestrate AUTHORIZATION {other}")
    else:
        conn.execute("CREATE SCHEMA orchestrate")
        conn.execute(f"GRANT USAGE, CREATE ON SCHEMA orchestrate TO {other}")
    conn.execute(f"""SET ROLE {other};
        CREATE TABLE orchestrate.migrations (id bigint);
        CREATE TABLE orchestrate.fired (who text);
        CREATE FUNCTION orchestrate.grab() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO orchestrate.fired VALUES (current_user);
              BEGIN EXECUTE 'ALTER ROLE {other} SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
              RETURN NULL; END $$;
        CREATE TRIGGER grab AFTER INSERT OR UPDATE ON orchestrate.migrations
            FOR EACH STATEMENT EXECUTE FUNCTION orchestrate.grab();
        RESET ROLE""")
    before = (user_objects(conn), state_rows(conn))
    plan_file = write_plan(tmp_path)
    for verb in (["apply", plan_file], ["status", plan_file], ["pause", plan_file], ["rollback", plan_file],
                 ["plan", plan_file]):
        code, out, err = run_cli(*verb, "--dsn", dsn)
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
        assert code == 8 and len(lines) == 1 and "Traceback" not in err, (verb, code, out, err)
        assert "state schema" in lines[0], err
    assert (user_objects(conn), state_rows(conn)) == before
    assert conn.execute("SELECT count(*) FROM orchestrate.fired").fetchone()[0] == 0
    assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (other,)).fetchone()[0] is False


# --- state hygiene ---------------------------------------------------------------------------

def test_refused_apply_leaves_nothing_and_the_corrected_plan_just_runs(dsn, conn, tmp_path):
    """A preflight refusal (a typo in the key column) records nothing: no migration row, no
    schema object, state rows unchanged; the corrected plan then succeeds, no rollback between."""
    create_orders(conn, rows=1000, days=40)
    fresh = user_objects(conn)
    bad = write_plan(tmp_path, "bad.yaml", partition_by={**PLAN["partition_by"], "column": "created_att"})
    code, out, err = run_cli("apply", bad, "--dsn", dsn)
    assert code == 3 and "created_att" in err and "Traceback" not in err, (code, err)
    assert user_objects(conn) == fresh  # not even the state schema was created
    # With a state schema already there (a pause recorded for another table): rows unchanged too.
    other = write_plan(tmp_path, "other.yaml", table="public.other_table")
    assert run_cli("pause", other, "--dsn", dsn)[0] == 0
    before = (user_objects(conn), state_rows(conn))
    code, out, err = run_cli("apply", bad, "--dsn", dsn)
    assert code == 3, err
    assert (user_objects(conn), state_rows(conn)) == before
    good = write_plan(tmp_path, "good.yaml")
    code, out, err = run_cli("apply", good, "--dsn", dsn, "--until", "prepare")
    assert code == 0, err


def test_rollback_drops_only_what_the_migration_created(dsn, conn, tmp_path):
    """Rollback drops the twin by the oid prepare recorded: a same-named table the user made
    (after dropping ours) is left alone, with its rows."""
    create_orders(conn, rows=1000, days=40)
    plan_file = write_plan(tmp_path)
    assert run_cli("apply", plan_file, "--dsn", dsn, "--until", "prepare")[0] == 0
    conn.execute("DROP TABLE public.orders_partitioned")
    conn.execute("CREATE TABLE public.orders_partitioned (precious int)")
    conn.execute("INSERT INTO public.orders_partitioned VALUES (1)")
    code, out, err = run_cli("rollback", plan_file, "--dsn", dsn)
    assert code == 0, err
    assert conn.execute("SELECT precious FROM public.orders_partitioned").fetchall() == [(1,)]
    assert "not the table this migration created" in err
    # And the twin it did create is dropped as before.
    conn.execute("DROP TABLE public.orders_partitioned")
    assert run_cli("apply", plan_file, "--dsn", dsn, "--until", "prepare")[0] == 0
    assert run_cli("rollback", plan_file, "--dsn", dsn)[0] == 0
    assert conn.execute("SELECT to_regclass('public.orders_partitioned')").fetchone()[0] is None


def lock_holder_pid(conn: psycopg.Connection) -> int | None:
    row = conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s::oid AND granted",
                       (LOCK_NAMESPACE,)).fetchone()
    return row[0] if row else None


def test_a_lost_migration_lock_stops_the_run_before_the_next_phase(dsn, conn, tmp_path):
    """The lock session is terminated while the backfill waits: apply finishes the phase it is
    in, then notices before verify and stops (exit 4) instead of running unlocked."""
    create_orders(conn, rows=2000, days=40)
    plan_file = write_plan(tmp_path)
    assert run_cli("pause", plan_file, "--dsn", dsn)[0] == 0
    proc = start_apply(tmp_path, plan_file, dsn, "--until", "verify")
    try:
        store = Store(conn)
        wait_until(lambda: (m := store.live("public.orders")) is not None and m.phase == "backfill", timeout=120)
        pid = wait_until(lambda: lock_holder_pid(conn), timeout=30)
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert run_cli("resume", plan_file, "--dsn", dsn)[0] == 0
        code = proc.wait(timeout=300)
    finally:
        stop(proc)
    log = open(proc.log_path).read()  # type: ignore[attr-defined]
    assert code == 4, log
    assert "lost the migration lock" in log
    m = Store(conn).live("public.orders")
    assert m.phase_state("backfill") == "done" and m.phase_state("verify") == "pending", m.phases


# --- our own sessions are known by pid, never by name ------------------------------------

def test_own_sessions_are_known_by_pid_not_by_application_name(dsn, conn):
    """A session that calls itself ``orchestrate:...`` is still a blocker to the cutover gate
    and an old transaction to the throttle; a session this process opened is not."""
    create_orders(conn, rows=500, days=40)
    table = QualifiedName("public", "orders")
    impostor = psycopg.connect(dsn, application_name="orchestrate:main")
    ours = connect(dsn, "main", autocommit=False)
    try:
        impostor.execute("SELECT 1 FROM public.orders LIMIT 1")  # a transaction holding ACCESS SHARE
        ours.execute("SELECT 1 FROM public.orders LIMIT 1")
        time.sleep(1.2)
        holders = {h["pid"] for h in lock_holders(conn, [table])}
        assert impostor.info.backend_pid in holders
        assert ours.info.backend_pid not in holders
        plan = parse_plan({**PLAN, "throttle": {"max_xact_age_s": 1, "heartbeat": False}})
        throttle = Throttler(plan.throttle, dsn)
        try:
            state = throttle.check(force=True)
        finally:
            throttle.stop()
        assert state.throttled and f"pid {impostor.info.backend_pid}" in state.reason, state
    finally:
        impostor.close()
        ours.close()


# --- least privilege: checks that need pg_monitor fail closed --------------------------------

def test_without_pg_monitor_the_checks_fail_closed_and_plan_says_so(dsn, conn, tmp_path):
    """Run as the owner without pg_monitor: other roles' transactions are invisible, so the
    blocker gate fails and the transaction-age throttle holds, each saying why; `plan`
    warns. With pg_monitor granted, the same checks run and pass."""
    create_orders(conn, rows=500, days=40)
    owner = new_role(conn, "owner")
    conn.execute(f"ALTER TABLE public.orders OWNER TO {owner}; GRANT CREATE ON SCHEMA public TO {owner}; "
                 f"ALTER VIEW public.orders_daily OWNER TO {owner}; "
                 f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {owner}")
    owner_dsn = role_dsn(dsn, owner)
    plan_file = write_plan(tmp_path)
    code, out, err = run_cli("plan", plan_file, "--dsn", owner_dsn, "-o", "json")
    assert code == 0, err
    import json

    warnings = json.loads(out)["warnings"]
    assert any("pg_monitor" in w for w in warnings), warnings
    plan = parse_plan({**PLAN, "throttle": {"max_xact_age_s": 1, "heartbeat": False}})
    oconn = connect(owner_dsn)
    try:
        gates = cutover_gates(Context(plan=plan, dsn=owner_dsn, conn=oconn, store=Store(oconn), migration=None))
        blockers = [g for g in gates if "no old transaction" in g["gate"]][0]
        assert not blockers["ok"] and "pg_monitor" in blockers["detail"], blockers
    finally:
        oconn.close()
    throttle = Throttler(plan.throttle, owner_dsn)
    try:
        state = throttle.check(force=True)
    finally:
        throttle.stop()
    assert state.throttled and "pg_monitor" in state.reason, state
    # With pg_monitor the same checks see and pass.
    conn.execute(f"GRANT pg_monitor TO {owner}")
    throttle = Throttler(plan.throttle, owner_dsn)
    try:
        assert not throttle.check(force=True).throttled
    finally:
        throttle.stop()


def test_maintain_moves_default_rows_as_the_owner(dsn, conn, tmp_path):
    """maintain (as superuser) moves rows out of the default partition into a new partition:
    the owner's CHECK and row trigger fire on those writes, as the owner only; the new
    partition is the owner's before a row reaches it."""
    evil = new_role(conn, "evil")
    conn.execute(f"GRANT CREATE ON SCHEMA public TO {evil}")
    evil_conn = psycopg.connect(role_dsn(dsn, evil), autocommit=True)
    evil_conn.execute(EVIL_SETUP.split("ALTER TABLE public.orders")[0].format(evil=evil))
    evil_conn.execute("""
        CREATE TABLE public.events (id bigint NOT NULL, created_at timestamptz NOT NULL, note text,
            PRIMARY KEY (id, created_at), CHECK (public.evil_probe('check'))) PARTITION BY RANGE (created_at);
        CREATE TABLE public.events_default PARTITION OF public.events DEFAULT;
        CREATE TRIGGER evil_rows AFTER INSERT OR DELETE ON public.events
            FOR EACH ROW EXECUTE FUNCTION public.evil_trigger('row trigger');
        INSERT INTO public.events SELECT g, date_trunc('month', now()) + g * interval '1 hour', 'x'
            FROM generate_series(1, 300) g;
    """)
    conn.execute("DELETE FROM public.evil_log")
    plan = tmp_path / "events.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "table": "public.events",
                                    "partition_by": {"column": "created_at", "interval": "1 month", "premake": 1},
                                    "backfill": {"batch_size": 100}}))
    code, out, err = run_cli("maintain", str(plan), "--dsn", dsn, "-o", "json")
    evil_conn.close()
    assert code == 0, err
    assert conn.execute("SELECT count(*) FROM public.events_default").fetchone()[0] == 0
    parts = conn.execute("SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_inherits i JOIN pg_class c "
                         "ON c.oid = i.inhrelid WHERE i.inhparent = 'public.events'::regclass").fetchall()
    assert parts == [(evil,)]
    assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (evil,)).fetchone()[0] is False
    ran = set(conn.execute("SELECT what, who FROM public.evil_log").fetchall())
    assert ("check", evil) in ran and ("row trigger", evil) in ran, ran
    assert {who for _what, who in ran} == {evil}, ran


def test_a_member_of_the_owner_role_acts_as_the_owner(dsn, conn, tmp_path):
    """Case (c): a non-superuser member of the owner role runs the migration. Functions and
    twin are the owner's; the owner never keeps CREATE (or USAGE) on the state schema."""
    create_orders(conn, rows=1500, days=70)
    owner, dba = new_role(conn, "owner"), new_role(conn, "dba")
    conn.execute(f"""GRANT CREATE ON SCHEMA public TO {owner}; ALTER TABLE public.orders OWNER TO {owner};
        ALTER VIEW public.orders_daily OWNER TO {owner}; GRANT {owner} TO {dba}; GRANT pg_monitor TO {dba};
        GRANT CREATE ON DATABASE {conn.info.dbname} TO {dba}""")
    plan_file = write_plan(tmp_path)
    dba_dsn = role_dsn(dsn, dba)
    code, out, err = run_cli("apply", plan_file, "--dsn", dba_dsn, "--until", "verify")
    assert code == 0, err
    fns = conn.execute("SELECT p.proname, pg_get_userbyid(p.proowner), p.prosecdef, p.proacl::text FROM pg_proc p "
                       "WHERE p.pronamespace = 'orchestrate'::regnamespace ORDER BY 1").fetchall()
    # The functions that write the owner's tables are the owner's, SECURITY DEFINER. The
    # reverse trigger's switch and the two column guards are ours: they touch no table (a
    # constant, and a trigger body that never runs) and the owner cannot reach or alter them.
    definers = ["as_owner_1", "capture_1", "capture_truncate_1", "reverse_1", "reverse_truncate_1"]
    ours = ["capture_columns_1", "reverse_columns_1", "reverse_on_1"]
    assert [f[0] for f in fns] == sorted(definers + ours), fns
    assert all(f[1] == owner and f[2] for f in fns if f[0] in definers), fns
    assert all(f[1] == dba and not f[2] for f in fns if f[0] in ours), fns
    assert all(f"{dba}=X/" in f[3] for f in fns if f[0].startswith("as_owner")), fns
    assert all("=X/" not in f[3].replace(f"{owner}=X/", "") for f in fns
               if f[0] in definers and not f[0].startswith("as_owner")), fns
    assert conn.execute("SELECT has_schema_privilege(%s, 'orchestrate', 'CREATE'), "
                        "has_schema_privilege(%s, 'orchestrate', 'USAGE')", (owner, owner)).fetchone() == (False, False)
    assert run_cli("apply", plan_file, "--dsn", dba_dsn)[0] == 0
    code, out, err = run_cli("rollback", plan_file, "--dsn", dba_dsn)
    assert code == 0, err
    assert conn.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = 'orchestrate'::regnamespace"
                        ).fetchone()[0] == 0


def test_plan_and_apply_refuse_a_role_that_cannot_act_as_the_owner(dsn, conn, tmp_path):
    """A role that is neither the owner, a member of it, nor superuser: refused (exit 3) by
    `plan --dsn` and by `apply`, one line naming the grant, nothing recorded."""
    create_orders(conn, rows=500, days=40)
    owner, stranger = new_role(conn, "owner"), new_role(conn, "stranger")
    conn.execute(f"ALTER TABLE public.orders OWNER TO {owner}; GRANT SELECT ON public.orders TO {stranger}; "
                 f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {stranger}")
    plan_file = write_plan(tmp_path)
    before = user_objects(conn)
    for verb in ("plan", "apply"):
        code, out, err = run_cli(verb, plan_file, "--dsn", role_dsn(dsn, stranger))
        assert code == 3 and "Traceback" not in err, (verb, code, err)
        assert f"GRANT {owner} TO {stranger}" in err, err
    assert user_objects(conn) == before


def test_force_row_level_security_without_bypassrls_is_refused(dsn, conn, tmp_path):
    """FORCE ROW LEVEL SECURITY and an owner without BYPASSRLS: copied as the owner, its own
    policies would hide rows. Refused before anything is recorded; with BYPASSRLS it runs."""
    create_orders(conn, rows=800, days=40)
    owner = new_role(conn, "owner")
    conn.execute(f"""GRANT CREATE ON SCHEMA public TO {owner}; ALTER TABLE public.orders OWNER TO {owner};
        CREATE POLICY only_paid ON public.orders USING (status = 'paid');
        ALTER TABLE public.orders ENABLE ROW LEVEL SECURITY; ALTER TABLE public.orders FORCE ROW LEVEL SECURITY""")
    plan_file = write_plan(tmp_path)
    before = user_objects(conn)
    code, out, err = run_cli("apply", plan_file, "--dsn", dsn)
    assert code == 3 and "FORCE ROW LEVEL SECURITY" in err and "BYPASSRLS" in err, (code, err)
    assert user_objects(conn) == before
    conn.execute(f"ALTER ROLE {owner} BYPASSRLS")
    code, out, err = run_cli("apply", plan_file, "--dsn", dsn, "--until", "verify")
    assert code == 0, err
    assert conn.execute("SELECT count(*) FROM public.orders_partitioned").fetchone()[0] == \
        conn.execute("SELECT count(*) FROM public.orders").fetchone()[0] == 800


def test_plan_refuses_a_view_the_running_role_cannot_recreate(dsn, conn, tmp_path):
    """The cutover re-creates dependent views on the new table: a view owned by a role the
    running (non-superuser) role cannot act as is refused up front by `plan`, not mid-cutover."""
    create_orders(conn, rows=500, days=40)  # its view public.orders_daily stays the superuser's
    owner = new_role(conn, "owner")
    conn.execute(f"ALTER TABLE public.orders OWNER TO {owner}; GRANT CREATE ON SCHEMA public TO {owner}; "
                 f"GRANT CREATE ON DATABASE {conn.info.dbname} TO {owner}; GRANT pg_monitor TO {owner}")
    plan_file = write_plan(tmp_path)
    code, out, err = run_cli("plan", plan_file, "--dsn", role_dsn(dsn, owner))
    assert code == 3 and "ALTER VIEW public.orders_daily OWNER TO" in err, (code, err)
    conn.execute(f"ALTER VIEW public.orders_daily OWNER TO {owner}")
    assert run_cli("plan", plan_file, "--dsn", role_dsn(dsn, owner))[0] == 0
