"""drift's statements, rendered without a server: the sentinel, the DDL guard, the twin's DDL."""

import pytest

from orchestrator.sql import QualifiedName
from orchestrator.sql import drift as d
from orchestrator.sql.compose import text

T = QualifiedName("app", "Order Items")
TW = QualifiedName("app", "Order Items_partitioned")
FN = QualifiedName("orchestrate", "m1_capture_columns")
QT, QTW, QFN = '"app"."Order Items"', '"app"."Order Items_partitioned"', '"orchestrate"."m1_capture_columns"'


def test_column_sentinel():
    assert text(d.column_guard_function(FN)) == (
        f"CREATE OR REPLACE FUNCTION {QFN}() RETURNS trigger LANGUAGE plpgsql\n"
        "SET search_path = pg_catalog AS $orchestrate$ BEGIN RETURN NULL; END $orchestrate$")
    assert text(d.drop_trigger(T, "orchestrate_capture_columns")) == (
        f'DROP TRIGGER IF EXISTS "orchestrate_capture_columns" ON {QT}')
    assert text(d.column_guard_trigger(T, "orchestrate_capture_columns", ["id", "Note"], FN)) == (
        f'CREATE TRIGGER "orchestrate_capture_columns" AFTER UPDATE OF "id", "Note" ON {QT} '
        f"FOR EACH ROW WHEN (false) EXECUTE FUNCTION {QFN}()")
    assert text(d.drop_function(FN)) == f"DROP FUNCTION IF EXISTS {QFN}()"
    assert text(d.drop_function(FN, if_exists=False)) == f"DROP FUNCTION {QFN}()"
    assert d.no_arg_signature(FN) == f"{QFN}()"


def test_ddl_guard():
    fn = QualifiedName("orchestrate", "orchestrate_ddl_guard_7")
    body = text(d.ddl_guard_function(fn, 16384, "app.\"Order Items\" is being migrated; it's refused"))
    assert body.startswith('CREATE OR REPLACE FUNCTION "orchestrate"."orchestrate_ddl_guard_7"() '
                           "RETURNS event_trigger LANGUAGE plpgsql\nSET search_path = pg_catalog AS $orchestrate$\n")
    assert body.count("16384::oid") == 3
    assert body.count("RAISE EXCEPTION 'app.\"Order Items\" is being migrated; it''s refused' "
                      "USING ERRCODE = 'object_in_use';") == 2
    assert "IF pg_catalog.current_setting('application_name') LIKE 'orchestrate:%' THEN" in body
    assert body.endswith("END $orchestrate$")
    assert text(d.revoke_function(fn)) == 'REVOKE ALL ON FUNCTION "orchestrate"."orchestrate_ddl_guard_7"() FROM PUBLIC'
    assert [text(d.create_event_trigger("g" + s, e, fn)) for e, s in d.GUARD_EVENTS] == [
        'CREATE EVENT TRIGGER "g" ON ddl_command_end EXECUTE FUNCTION "orchestrate"."orchestrate_ddl_guard_7"()',
        'CREATE EVENT TRIGGER "g_drop" ON sql_drop EXECUTE FUNCTION "orchestrate"."orchestrate_ddl_guard_7"()']
    with pytest.raises(ValueError):
        d.create_event_trigger("g", "login", fn)
    assert text(d.drop_event_trigger("g")) == 'DROP EVENT TRIGGER IF EXISTS "g"'


def ddl(kind, column, detail, index=None):
    return [text(q) for q in d.twin_ddl(TW, kind, column, detail, index)]


def test_twin_ddl():
    col = {"type": "character varying(20)", "collation": 'pg_catalog."C"', "generated": "", "default": "'eu'::text",
           "not_null": True}
    assert ddl("add_column", "Region", col) == [
        f"""ALTER TABLE {QTW} ADD COLUMN "Region" character varying(20) COLLATE pg_catalog."C" """
        "DEFAULT 'eu'::text NOT NULL"]
    gen = {"type": "integer", "collation": None, "generated": "s", "default": "(qty * 2)", "not_null": False}
    assert ddl("add_column", "double", gen) == [
        f'ALTER TABLE {QTW} ADD COLUMN "double" integer GENERATED ALWAYS AS ((qty * 2)) STORED']
    assert ddl("drop_column", "Note", {}) == [f'ALTER TABLE {QTW} DROP COLUMN IF EXISTS "Note"']
    assert ddl("rename_column", "New", {"old": "Old"}) == [f'ALTER TABLE {QTW} RENAME COLUMN "Old" TO "New"']
    assert ddl("default", "note", {"default": None}) == [f'ALTER TABLE {QTW} ALTER COLUMN "note" DROP DEFAULT']
    assert ddl("default", "note", {"default": "'x'::text"}) == [
        f"""ALTER TABLE {QTW} ALTER COLUMN "note" SET DEFAULT 'x'::text"""]
    assert ddl("not_null", "note", {"not_null": True}) == [f'ALTER TABLE {QTW} ALTER COLUMN "note" SET NOT NULL']
    assert ddl("not_null", "note", {"not_null": False}) == [f'ALTER TABLE {QTW} ALTER COLUMN "note" DROP NOT NULL']
    assert ddl("drop_check", "Pos", {}) == [f'ALTER TABLE {QTW} DROP CONSTRAINT IF EXISTS "Pos"']
    assert ddl("add_check", "Pos", {"definition": "CHECK ((qty > 0))"}) == [
        f'ALTER TABLE {QTW} ADD CONSTRAINT "Pos" CHECK ((qty > 0)) NOT VALID']
    assert ddl("add_check", "Pos", {"definition": "CHECK ((qty > 0)) NOT VALID"}) == [
        f'ALTER TABLE {QTW} ADD CONSTRAINT "Pos" CHECK ((qty > 0)) NOT VALID']
    assert ddl("drop_index", "ix", {}, QualifiedName("app", "Order Items_partitioned_ix")) == [
        'DROP INDEX IF EXISTS "app"."Order Items_partitioned_ix"']
    with pytest.raises(ValueError):
        ddl("add_index", "ix", {})
    assert text(d.replace_check_not_valid(TW, "Pos", "CHECK ((qty > 0))")) == (
        f'ALTER TABLE {QTW} DROP CONSTRAINT IF EXISTS "Pos", ADD CONSTRAINT "Pos" CHECK ((qty > 0)) NOT VALID')
    assert text(d.validate_constraint(TW, "Pos")) == f'ALTER TABLE {QTW} VALIDATE CONSTRAINT "Pos"'


def test_index_on_the_twin():
    head = d.index_definition_head(True, '"Order Items_note_idx"', 'app."Order Items"')
    assert head == 'CREATE UNIQUE INDEX "Order Items_note_idx" ON app."Order Items" USING '
    definition = head + "btree (note) WHERE (note IS NOT NULL)"
    assert text(d.create_parent_index(definition, head, True, "Order Items_partitioned_note_idx", TW,
                                      "Created At")) == (
        f'CREATE UNIQUE INDEX IF NOT EXISTS "Order Items_partitioned_note_idx" ON ONLY {QTW} '
        'USING btree (note, "Created At") WHERE (note IS NOT NULL)')
    part = QualifiedName("app", "Order Items_p2026_03")
    assert text(d.create_partition_index(definition, head, True, "p_note_x", part, None)) == (
        'CREATE UNIQUE INDEX CONCURRENTLY "p_note_x" ON "app"."Order Items_p2026_03" '
        "USING btree (note) WHERE (note IS NOT NULL)")
    plain = d.index_definition_head(False, "ix", "app.t")
    assert text(d.create_partition_index(plain + "btree (a)", plain, False, "p_ix", part, None)) == (
        'CREATE INDEX CONCURRENTLY "p_ix" ON "app"."Order Items_p2026_03" USING btree (a)')
    with pytest.raises(ValueError):  # never rewrites a definition it did not expect
        d.create_partition_index("CREATE INDEX other ON app.t USING btree (a)", plain, False, "p_ix", part, None)
    assert text(d.drop_index(part)) == 'DROP INDEX IF EXISTS "app"."Order Items_p2026_03"'
    assert text(d.attach_index(QualifiedName("app", "ix"), QualifiedName("app", "p_ix"))) == (
        'ALTER INDEX "app"."ix" ATTACH PARTITION "app"."p_ix"')


def test_fixed_statements_take_their_values_as_parameters():
    assert text(d.COLUMN_GUARD_COLUMNS).endswith("WHERE t.tgrelid = pg_catalog.to_regclass(%s) AND t.tgname = %s")
    assert text(d.RANGES_PLANNED) == "SELECT count(*) FROM orchestrate.ranges WHERE migration_id = %s"
    assert "E'\\n'" in text(d.COLUMNS)
    assert text(d.COLUMNS).endswith("WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped")
