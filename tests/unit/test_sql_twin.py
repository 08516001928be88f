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
        f'CREATE UNIQUE INDEX "Order Items_note_twin" ON {TW_SQL} USING btree (note, "created_at")'


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


def test_the_twin_its_key_and_partitions():
    from orchestrator.sql import Shape

    shape = Shape(columns=("id", "Created At"), all_columns=("id", "Created At"), pk=("id",), key="Created At",
                  key_type="timestamp with time zone", key_nullable=False, pk_types=("bigint",))
    assert text(twin.create_twin(T, TW, "Created At")) == (
        f"CREATE TABLE {TW_SQL} (LIKE {T_SQL} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED "
        "INCLUDING IDENTITY INCLUDING STORAGE INCLUDING COMMENTS INCLUDING COMPRESSION INCLUDING STATISTICS) "
        'PARTITION BY RANGE ("Created At")')
    assert text(twin.twin_primary_key(TW, shape)) == f'ALTER TABLE {TW_SQL} ADD PRIMARY KEY ("id", "Created At")'
    # A nullable key cannot be in a primary key: the default partition holds the NULLs.
    nullable = Shape(**{**shape.__dict__, "key_nullable": True})
    assert text(twin.twin_primary_key(TW, nullable)) == \
        f'ALTER TABLE {TW_SQL} ADD UNIQUE NULLS NOT DISTINCT ("id", "Created At")'
    part = QualifiedName("app", "Order Items_p2024_01")
    assert text(twin.create_partition(part, TW, "2024-01-01 00:00:00", "2024-02-01 00:00:00", "date")) == (
        f'CREATE TABLE "app"."Order Items_p2024_01" PARTITION OF {TW_SQL} '
        "FOR VALUES FROM ('2024-01-01') TO ('2024-02-01')")
    assert "FROM ('2024-01-01 00:00:00+00') TO (MAXVALUE)" in text(
        twin.create_partition(part, TW, "2024-01-01 00:00:00", None, "timestamp with time zone"))
    assert text(twin.create_default_partition(QualifiedName("app", "d"), TW)) == \
        f'CREATE TABLE "app"."d" PARTITION OF {TW_SQL} DEFAULT'
