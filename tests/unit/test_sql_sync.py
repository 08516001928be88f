"""The synchronous capture's statements (orchestrator/sql/sync.py), rendered without a server."""

from orchestrator.sql import QualifiedName, Shape
from orchestrator.sql import sync as sync_sql
from orchestrator.sql.compose import text

SHAPE = Shape(columns=("id", "note", "created_at"), all_columns=("id", "note", "created_at", "total"),
              pk=("id",), key="created_at", key_type="timestamp with time zone", key_nullable=False,
              pk_types=("bigint",))
T, TW = QualifiedName("public", "orders"), QualifiedName("public", "orders_partitioned")
TW_SQL = '"public"."orders_partitioned"'
FN = QualifiedName("orchestrate", "capture_1")
BY_OLD = 'WHERE "id" = OLD."id" AND "created_at" = OLD."created_at"'


def test_sync_function_paths():
    body = text(sync_sql.sync_function(FN, TW, SHAPE))
    assert body.startswith('CREATE OR REPLACE FUNCTION "orchestrate"."capture_1"() RETURNS trigger LANGUAGE plpgsql\n'
                           "SET search_path = pg_catalog, pg_temp AS $orchestrate$\n")
    assert body.endswith("END\n$orchestrate$")
    # every writable column on insert, never the generated one
    insert = (f'INSERT INTO {TW_SQL} ("id", "note", "created_at") OVERRIDING SYSTEM VALUE '
              'VALUES (NEW."id", NEW."note", NEW."created_at");')
    assert insert + "\n" in body and "total" not in body
    # a change of key moves the row; else an UPDATE by (pk, key) that may touch nothing
    assert '(NEW."id", NEW."created_at") IS DISTINCT FROM (OLD."id", OLD."created_at")' in body
    assert f"DELETE FROM {TW_SQL} {BY_OLD};" in body
    assert f'UPDATE {TW_SQL} SET "note" = NEW."note" {BY_OLD};' in body
    # the insert path is a plain insert (divergence fails loudly); only the probe after a
    # by-key miss uses ON CONFLICT, on dst's own key, so an invisible row raises 40001
    assert body.count('ON CONFLICT ("id", "created_at") DO NOTHING') == 3  # update, delete, delete half of a move
    assert body.count("IF NOT FOUND THEN INSERT") == 3
    assert "'public.orders_partitioned'; END IF;" in body  # the divergence names dst
    assert "ON CONFLICT" not in text(sync_sql.sync_function(FN, TW, SHAPE, probe=False))
    reverse = text(sync_sql.sync_function(QualifiedName("orchestrate", "reverse_1"), T, SHAPE, dst_key=("id",)))
    assert 'ON CONFLICT ("id") DO NOTHING' in reverse


def test_distributed_recheck_runs_the_by_key_statement_again_before_calling_it_a_divergence():
    body = text(sync_sql.sync_function(FN, TW, SHAPE, recheck=True))
    assert (f'DO NOTHING; IF NOT FOUND THEN UPDATE {TW_SQL} SET "note" = NEW."note" {BY_OLD}; '
            "IF NOT FOUND THEN RAISE EXCEPTION") in body


def test_distributed_capture_commits_with_two_phases_once_per_transaction():
    body = text(sync_sql.sync_function(FN, TW, SHAPE, two_phase=True))
    # A zero-row INSERT .. SELECT (Citus' COPY path marks the transaction for 2PC), guarded
    # by the transaction's id, before any write of the row.
    assert ("IF pg_catalog.current_setting('orchestrate.two_phase', true) IS DISTINCT FROM\n"
            "       pg_catalog.txid_current()::text THEN\n"
            f"    INSERT INTO {TW_SQL} (") in body
    assert "WHERE false;\n    PERFORM pg_catalog.set_config('orchestrate.two_phase', " \
           "pg_catalog.txid_current()::text, true);" in body
    assert body.index("WHERE false;") < body.index("IF TG_OP = 'INSERT'")
    assert "orchestrate.two_phase" not in text(sync_sql.sync_function(FN, TW, SHAPE))


def test_sync_function_nullable_key_branches():
    nullable = Shape(**{**SHAPE.__dict__, "key_nullable": True})
    body = text(sync_sql.sync_function(FN, TW, nullable))
    assert (f'IF OLD."created_at" IS NULL THEN DELETE FROM {TW_SQL} WHERE "id" = OLD."id" AND "created_at" IS NULL; '
            f"ELSE DELETE FROM {TW_SQL} {BY_OLD}; END IF;") in body


def test_a_key_of_an_extension_type_is_compared_with_its_own_operator():
    ext = Shape(columns=("id", "created_at"), all_columns=("id", "created_at"), pk=("id",), key="created_at",
                key_type="timestamp with time zone", key_nullable=False, pk_types=("public.citext",),
                eq_ops=(("id", "OPERATOR(public.=)"),))
    body = text(sync_sql.sync_function(FN, TW, ext))
    assert 'NOT coalesce(NEW."id" OPERATOR(public.=) OLD."id", (NEW."id" IS NULL) = (OLD."id" IS NULL))' in body
    assert 'WHERE "id" OPERATOR(public.=) OLD."id" AND "created_at" = OLD."created_at"' in body
    assert "IS DISTINCT FROM" not in body


def test_every_column_in_the_key_makes_an_update_a_no_op_by_key():
    keyed = Shape(columns=("id", "created_at"), all_columns=("id", "created_at"), pk=("id",), key="created_at",
                  key_type="date", key_nullable=False, pk_types=("bigint",))
    assert f'UPDATE {TW_SQL} SET "created_at" = NEW."created_at" {BY_OLD};' in \
        text(sync_sql.sync_function(FN, TW, keyed))


def test_a_hostile_column_name_cannot_end_the_body():
    hostile = Shape(**{**SHAPE.__dict__, "columns": ("id", "x$orchestrate$; ALTER ROLE x SUPERUSER; --", "created_at")})
    body = text(sync_sql.sync_function(FN, TW, hostile))
    assert "AS $orchestrate_1$\n" in body and body.endswith("END\n$orchestrate_1$")
    assert body.count("$orchestrate_1$") == 2


def test_sync_triggers_fire_always_and_when_switched_on():
    stmts = [text(s) for s in sync_sql.create_sync_triggers(
        T, "orchestrate_capture", QualifiedName("orchestrate", "c"), QualifiedName("orchestrate", "c_t"),
        QualifiedName("orchestrate", "on"))]
    assert stmts == [
        'CREATE TRIGGER "orchestrate_capture" AFTER INSERT OR UPDATE OR DELETE ON "public"."orders" FOR EACH ROW '
        'WHEN ("orchestrate"."on"()) EXECUTE FUNCTION "orchestrate"."c"()',
        'CREATE TRIGGER "orchestrate_capture_truncate" AFTER TRUNCATE ON "public"."orders" FOR EACH STATEMENT '
        'WHEN ("orchestrate"."on"()) EXECUTE FUNCTION "orchestrate"."c_t"()',
        'ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "orchestrate_capture"',
        'ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "orchestrate_capture_truncate"',
    ]
    plain = text(sync_sql.create_sync_triggers(T, "t", FN, FN)[0])
    assert "WHEN" not in plain and "FOR EACH ROW EXECUTE FUNCTION" in plain
    assert [text(s) for s in sync_sql.drop_sync_triggers(T, "t")] == [
        'DROP TRIGGER IF EXISTS "t" ON "public"."orders"', 'DROP TRIGGER IF EXISTS "t_truncate" ON "public"."orders"']


def test_the_switch_and_the_truncate_mirror():
    assert text(sync_sql.sync_switch(QualifiedName("orchestrate", "on"), False)) == (
        'CREATE OR REPLACE FUNCTION "orchestrate"."on"() RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE '
        "AS $orchestrate$SELECT false$orchestrate$")
    assert f"  TRUNCATE {TW_SQL};\n" in text(sync_sql.truncate_function(FN, TW))
