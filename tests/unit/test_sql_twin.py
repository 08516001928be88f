"""prepare's statements (orchestrator/sql/twin.py), rendered without a server."""

from orchestrator.sql import QualifiedName, rewrite_index, twin
from orchestrator.sql.compose import SQL, col, name, text

T = QualifiedName("app", "Order Items")
TW = QualifiedName("app", "Order Items_partitioned")
T_SQL = '"app"."Order Items"'
TW_SQL = '"app"."Order Items_partitioned"'


def test_owner():
    assert text(twin.owner_to(TW, "App Owner")) == f'ALTER TABLE {TW_SQL} OWNER TO "App Owner"'


def test_rows_outside():
    # without partitions only a NULL key is counted; with them, a key outside [first, last)
    assert text(twin.rows_outside(T, "Created At", "timestamp with time zone", bounded=False)) == \
        f'SELECT count(*) FROM {T_SQL} WHERE "Created At" IS NULL'
    assert text(twin.rows_outside(T, "Created At", "timestamp with time zone", bounded=True)) == (
        f'SELECT count(*) FROM {T_SQL} WHERE "Created At" IS NULL OR "Created At" < %s::timestamp with time zone '
        'OR "Created At" >= %s::timestamp with time zone')


def test_index_head_matches_and_rewrites():
    live = text(twin.index_head(True, SQL('"Order Items_note"'), SQL('app."Order Items"')))
    assert live == 'CREATE UNIQUE INDEX "Order Items_note" ON app."Order Items" USING '
    new = text(twin.index_head(True, col("Order Items_note_twin"), name(TW)))
    assert new == f'CREATE UNIQUE INDEX "Order Items_note_twin" ON {TW_SQL} USING '
    assert text(twin.index_head(False, col("i"), name(TW))) == f'CREATE INDEX "i" ON {TW_SQL} USING '
    definition = 'CREATE UNIQUE INDEX "Order Items_note" ON app."Order Items" USING btree (note)'
    assert rewrite_index(definition, live, new, "created_at") == \
        f'CREATE UNIQUE INDEX "Order Items_note_twin" ON {TW_SQL} USING btree (note, created_at)'


def test_foreign_key():
    definition = "FOREIGN KEY (customer_id) REFERENCES app.customers(id)"
    assert text(twin.add_foreign_key(TW, "Order Items_customer_fk", definition)) == \
        f'ALTER TABLE {TW_SQL} ADD CONSTRAINT "Order Items_customer_fk" {definition}'


def test_rollback_drops():
    assert text(twin.drop_table_cascade(TW)) == f"DROP TABLE {TW_SQL} CASCADE"
    fn = QualifiedName("orchestrate", "capture_7")
    assert text(twin.drop_function(fn)) == 'DROP FUNCTION IF EXISTS "orchestrate"."capture_7"()'
    assert text(twin.drop_function(fn, "text")) == 'DROP FUNCTION IF EXISTS "orchestrate"."capture_7"(text)'


def test_fixed_statements():
    assert text(twin.CATALOG_SEARCH_PATH) == "SET LOCAL search_path = pg_catalog"
    assert text(twin.CITUS_SEQUENTIAL) == "SET LOCAL citus.multi_shard_modify_mode = 'sequential'"
    assert text(twin.TO_REGCLASS_OID) == "SELECT pg_catalog.to_regclass(%s)::oid"
