"""Async capture's statements, rendered without a server, for a table whose names need quoting."""

import pytest

from orchestrator.sql import QualifiedName, Shape
from orchestrator.sql import changelog as c
from orchestrator.sql.compose import text

SRC = QualifiedName("app", "Order Items")
TWIN = QualifiedName("app", "Order Items_partitioned")
LOG = QualifiedName("app", "Order Items_changes")
QS, QT, QL = '"app"."Order Items"', '"app"."Order Items_partitioned"', '"app"."Order Items_changes"'
SHAPE = Shape(columns=("Id", "note", "Created At"), all_columns=("Id", "note", "Created At"), pk=("Id",),
              key="Created At", key_type="timestamp with time zone", key_nullable=False, pk_types=("bigint",))


def test_the_log():
    assert [text(q) for q in c.create_log(LOG, SRC, SHAPE)] == [
        f'CREATE TABLE {QL} AS SELECT "Id", "Created At" FROM ONLY {QS} WITH NO DATA',
        f'ALTER TABLE {QL} ADD COLUMN "orchestrate_seq" bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, '
        'ADD COLUMN "orchestrate_truncate" boolean NOT NULL DEFAULT false, '
        'ADD COLUMN "orchestrate_gone" boolean NOT NULL DEFAULT false, '
        'ADD COLUMN "orchestrate_at" timestamptz NOT NULL DEFAULT pg_catalog.statement_timestamp()',
        f'CREATE INDEX ON {QL} ("Id")',
    ]
    assert text(c.grant_select(LOG, "Reader")) == f'GRANT SELECT ON {QL} TO "Reader"'
    assert text(c.drop_table(LOG)) == f"DROP TABLE {QL}"
    assert text(c.pending_truncate(LOG)) == f'SELECT EXISTS (SELECT 1 FROM {QL} WHERE "orchestrate_truncate")'


def test_the_capture_trigger_functions():
    fn = QualifiedName("orchestrate", "capture_1")
    assert text(c.log_function(fn, LOG, SHAPE)) == f"""CREATE OR REPLACE FUNCTION "orchestrate"."capture_1"() \
RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $orchestrate$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO {QL} ("Id", "Created At") VALUES (NEW."Id", NEW."Created At");
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO {QL} ("Id", "Created At", "orchestrate_gone") VALUES (OLD."Id", OLD."Created At", true);
  ELSIF (NEW."Id", NEW."Created At") IS DISTINCT FROM (OLD."Id", OLD."Created At") THEN
    INSERT INTO {QL} ("Id", "Created At", "orchestrate_gone") VALUES (OLD."Id", OLD."Created At", true), \
(NEW."Id", NEW."Created At", false);
  ELSE
    INSERT INTO {QL} ("Id", "Created At") VALUES (NEW."Id", NEW."Created At");
  END IF;
  RETURN NULL;
END
$orchestrate$"""
    tfn = QualifiedName("orchestrate", "capture_truncate_1")
    assert text(c.truncate_log_function(tfn, LOG)) == f"""CREATE OR REPLACE FUNCTION \
"orchestrate"."capture_truncate_1"() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $orchestrate$
BEGIN
  INSERT INTO {QL} ("orchestrate_truncate") VALUES (true);
  RETURN NULL;
END
$orchestrate$"""


def test_replay():
    body = text(c.replay_function(QualifiedName("orchestrate", "replay_1"), SRC, TWIN, LOG, SHAPE, "App Owner"))
    batch = '"l"."orchestrate_seq" OPERATOR(pg_catalog.=) ANY (s) AND NOT "l"."orchestrate_truncate"'
    assert "IF current_user OPERATOR(pg_catalog.<>) 'App Owner'::pg_catalog.name THEN" in body
    assert "'orchestrate: % runs as %, not as the table owner', 'orchestrate.replay_1', current_user;" in body
    steps = [
        f'FROM (SELECT "orchestrate_seq", "orchestrate_truncate" FROM {QL} ORDER BY "orchestrate_seq" LIMIT n) b;',
        f"IF trunc THEN\n    DELETE FROM {QT};",
        f'DELETE FROM {QT} t WHERE ("t"."Created At" = ANY (ARRAY(SELECT DISTINCT "l"."Created At" FROM {QL} l '
        f'WHERE {batch} AND "l"."orchestrate_gone"))) AND "t"."Id" = ANY (ARRAY(SELECT DISTINCT "l"."Id" FROM {QL} '
        f'l WHERE {batch} AND "l"."orchestrate_gone")) AND NOT EXISTS (SELECT 1 FROM ONLY {QS} s WHERE '
        '"s"."Id" = "t"."Id" AND "s"."Created At" = "t"."Created At");',
        f'INSERT INTO {QT} ("Id", "note", "Created At") OVERRIDING SYSTEM VALUE\n'
        f'      SELECT "Id", "note", "Created At" FROM ONLY {QS} t WHERE "t"."Id" = ANY (ARRAY(SELECT DISTINCT '
        f'"l"."Id" FROM {QL} l WHERE {batch}))\n'
        '      ON CONFLICT ("Id", "Created At") DO UPDATE SET "note" = EXCLUDED."note";',
        f'DELETE FROM {QL} WHERE "orchestrate_seq" OPERATOR(pg_catalog.=) ANY (s);',
    ]
    at = [body.index(s) for s in steps]
    assert at == sorted(at)


def test_replay_with_an_extension_type_key_and_a_nullable_key():
    shape = Shape(columns=("path", "at"), all_columns=("path", "at"), pk=("path",), key="at",
                  key_type="timestamp without time zone", key_nullable=True, pk_types=("public.ltree",),
                  eq_ops=(("path", "OPERATOR(public.=)"),))
    body = text(c.replay_function(QualifiedName("orchestrate", "replay_1"), SRC, TWIN, LOG, shape, "app"))
    assert '"t"."path" OPERATOR(public.=) ANY (ARRAY(SELECT DISTINCT "l"."path"' in body
    assert 'OR (has_null AND "t"."at" IS NULL)' in body
    assert '("s"."at" = "t"."at" OR ("s"."at" IS NULL AND "t"."at" IS NULL))' in body
    assert 'ON CONFLICT ("path", "at") DO NOTHING;' in body


def test_lag_and_verify():
    fn = QualifiedName("orchestrate", "replay_lag_1")
    assert text(c.lag_function(fn, LOG)) == """CREATE OR REPLACE FUNCTION "orchestrate"."replay_lag_1"(OUT pending \
bigint, OUT oldest_s double precision)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $orchestrate$
SELECT CASE WHEN b.lo IS NULL THEN 0
            WHEN b.hi OPERATOR(pg_catalog.-) b.lo OPERATOR(pg_catalog.<) 100000
            THEN (SELECT pg_catalog.count(*) FROM "app"."Order Items_changes" c WHERE c."orchestrate_seq" \
OPERATOR(pg_catalog.>=) b.lo
                  AND c."orchestrate_seq" OPERATOR(pg_catalog.<=) b.hi)
            ELSE b.hi OPERATOR(pg_catalog.-) b.lo OPERATOR(pg_catalog.+) 1 END,
       coalesce(extract(epoch FROM pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-)
       (SELECT "orchestrate_at" FROM "app"."Order Items_changes" ORDER BY "orchestrate_seq" LIMIT 1))::double \
precision, 0)
  FROM (SELECT pg_catalog.min("orchestrate_seq") AS lo, pg_catalog.max("orchestrate_seq") AS hi FROM \
"app"."Order Items_changes") b
$orchestrate$"""
    assert text(c.lag_query(fn)) == 'SELECT * FROM "orchestrate"."replay_lag_1"()'
    assert text(c.replay_call(QualifiedName("orchestrate", "replay_1"))) == 'SELECT "orchestrate"."replay_1"(%s)'
    assert text(c.pending_filter(SHAPE, LOG, TWIN)) == (
        f'NOT EXISTS (SELECT 1 FROM {QL} l WHERE NOT "l"."orchestrate_truncate" AND '
        '"l"."Id" = "app"."Order Items_partitioned"."Id")')


def test_functions_by_signature():
    fn = QualifiedName("orchestrate", "replay_1")
    assert c.signature(fn, "integer") == '"orchestrate"."replay_1"(integer)'
    assert text(c.drop_function(fn, "integer")) == 'DROP FUNCTION IF EXISTS "orchestrate"."replay_1"(integer)'
    assert text(c.drop_function(fn)) == 'DROP FUNCTION IF EXISTS "orchestrate"."replay_1"()'
    with pytest.raises(ValueError):
        c.drop_function(fn, "text); DROP TABLE x; --")
