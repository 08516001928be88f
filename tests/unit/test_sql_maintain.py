"""maintain's statements, rendered without a server: the exact SQL a pass runs."""

from datetime import datetime

import pytest

from orchestrator.sql import QualifiedName
from orchestrator.sql import maintain as m
from orchestrator.sql.compose import text

T = QualifiedName("app", "Order Items")
D = QualifiedName("app", "Order Items_default")
N = QualifiedName("app", "Order Items_p2026_03")
LO, HI = datetime(2026, 3, 1), datetime(2026, 4, 1)
TZ = "timestamp with time zone"
KEY = "Created At"
PK, PK_TYPES = ["id", "Line"], ["bigint", "integer"]
COLS = ["id", "Line", "Created At", "note"]

QT, QD, QN = '"app"."Order Items"', '"app"."Order Items_default"', '"app"."Order Items_p2026_03"'
RNG = """"Created At" >= '2026-03-01 00:00:00+00' AND "Created At" < '2026-04-01 00:00:00+00'"""
RNG_D = """"d"."Created At" >= '2026-03-01 00:00:00+00' AND "d"."Created At" < '2026-04-01 00:00:00+00'"""
AFTER = '("id", "Line") > (%s::bigint, %s::integer)'
UPTO = '("id", "Line") <= (%s::bigint, %s::integer)'
WCOLS = '"id", "Line", "Created At", "note"'


def rng(alias=None):
    return m.key_range(KEY, TZ, LO, HI, alias)


@pytest.mark.parametrize("key_type, lo", [
    ("timestamp with time zone", "'2026-03-01 00:00:00+00'"),
    ("timestamp(3) with time zone", "'2026-03-01 00:00:00+00'"),
    ("timestamp without time zone", "'2026-03-01 00:00:00'"), ("date", "'2026-03-01'"),
])
def test_key_range_bounds_follow_the_key_type(key_type, lo):
    assert text(m.key_range("k", key_type, LO, HI)).startswith(f'"k" >= {lo} AND "k" < ')


def test_ranges():
    assert text(rng()) == RNG
    assert text(rng("d")) == RNG_D


def test_locks_and_refuses_an_unknown_mode():
    assert text(m.lock_table(T, "SHARE")) == f"LOCK TABLE {QT} IN SHARE MODE"
    assert text(m.lock_table(D, "ACCESS EXCLUSIVE")) == f"LOCK TABLE {QD} IN ACCESS EXCLUSIVE MODE"
    with pytest.raises(ValueError):
        m.lock_table(T, "SHARE; DROP TABLE x")


def test_default_report_and_counts():
    assert text(m.default_by_day(D, KEY)) == (
        'SELECT CASE WHEN "Created At" IS NOT NULL AND isfinite("Created At") '
        "THEN date_trunc('day', \"Created At\")::timestamp END AS d, "
        f"count(*) FROM {QD} GROUP BY 1 ORDER BY 1 NULLS FIRST")
    assert text(m.count_where(D, rng())) == f"SELECT count(*) FROM {QD} WHERE {RNG}"
    assert text(m.count_rows(N)) == f"SELECT count(*) FROM {QN}"


def test_staging():
    assert text(m.create_like(N, T, m.LIKE_OPTIONS[0])) == (
        f"CREATE TABLE {QN} (LIKE {QT} INCLUDING ALL EXCLUDING IDENTITY)")
    assert text(m.create_like(N, T, m.LIKE_OPTIONS[2])) == (
        f"CREATE TABLE {QN} (LIKE {QT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED "
        "INCLUDING INDEXES)")
    with pytest.raises(ValueError):
        m.create_like(N, T, "INCLUDING ALL) ; DROP TABLE x; --")
    assert text(m.stage_bounds(N, KEY, "Order Items_p2026_03_orchestrate_bounds", rng())) == (
        f'ALTER TABLE {QN} ALTER COLUMN "Created At" SET NOT NULL, '
        f'ADD CONSTRAINT "Order Items_p2026_03_orchestrate_bounds" CHECK ({RNG})')
    assert text(m.comment_on_table(N, "staging, it's safe to drop")) == (
        f"COMMENT ON TABLE {QN} IS 'staging, it''s safe to drop'")
    assert text(m.comment_on_table(N, None)) == f"COMMENT ON TABLE {QN} IS NULL"
    assert text(m.owner_to(N, "App Owner")) == f'ALTER TABLE {QN} OWNER TO "App Owner"'
    assert text(m.drop_table(N)) == f"DROP TABLE {QN}"


def test_sibling_storage_and_replica_identity():
    assert text(m.set_reloptions(N, ["fillfactor=70", "autovacuum_vacuum_scale_factor=0.02"])) == (
        f"""ALTER TABLE {QN} SET ("fillfactor" = '70', "autovacuum_vacuum_scale_factor" = '0.02')""")
    # A value that is not a plain word stays a literal.
    assert text(m.set_reloptions(N, ["x=a'b=c"])) == f"""ALTER TABLE {QN} SET ("x" = 'a''b=c')"""
    assert text(m.replica_identity(N, "f")) == f"ALTER TABLE {QN} REPLICA IDENTITY FULL"
    assert text(m.replica_identity(N, "n")) == f"ALTER TABLE {QN} REPLICA IDENTITY NOTHING"
    assert text(m.replica_identity_index(N, "Order Items_p2026_03_pkey")) == (
        f'ALTER TABLE {QN} REPLICA IDENTITY USING INDEX "Order Items_p2026_03_pkey"')


def test_the_locked_swap():
    assert text(m.delete_stale_copies(N, D, PK, COLS, rng("d"))) == (
        f"DELETE FROM {QN} AS n WHERE NOT EXISTS (SELECT 1 FROM {QD} AS d WHERE "
        f'"d"."id" = "n"."id" AND "d"."Line" = "n"."Line" AND {RNG_D} AND '
        'ROW("d"."id", "d"."Line", "d"."Created At", "d"."note")::text = '
        'ROW("n"."id", "n"."Line", "n"."Created At", "n"."note")::text)')
    assert text(m.insert_missing(N, D, PK, COLS, rng("d"))) == (
        f"INSERT INTO {QN} ({WCOLS}) OVERRIDING SYSTEM VALUE SELECT {WCOLS} FROM {QD} AS d WHERE {RNG_D} "
        f'AND NOT EXISTS (SELECT 1 FROM {QN} AS n WHERE "d"."id" = "n"."id" AND "d"."Line" = "n"."Line")')
    assert text(m.insert_where(N, D, COLS, rng())) == (
        f"INSERT INTO {QN} ({WCOLS}) OVERRIDING SYSTEM VALUE SELECT {WCOLS} FROM {QD} WHERE {RNG}")
    assert text(m.ENABLED_TRIGGER) == (
        "SELECT tgname, tgenabled FROM pg_catalog.pg_trigger WHERE tgrelid = %s::regclass "
        "AND tgname = %s AND tgenabled <> 'D'")
    assert text(m.set_trigger(D, "orchestrate_reverse", "DISABLE")) == (
        f'ALTER TABLE {QD} DISABLE TRIGGER "orchestrate_reverse"')
    for verb in ("ENABLE", "ENABLE REPLICA", "ENABLE ALWAYS"):
        assert text(m.set_trigger(D, "tg", verb)) == f'ALTER TABLE {QD} {verb} TRIGGER "tg"'
    with pytest.raises(ValueError):
        m.set_trigger(D, "tg", "DROP")
    assert text(m.delete_where(D, rng())) == f"DELETE FROM {QD} WHERE {RNG}"
    assert text(m.attach_partition(T, N, TZ, LO, HI)) == (
        f"ALTER TABLE {QT} ATTACH PARTITION {QN} FOR VALUES FROM ('2026-03-01 00:00:00+00') "
        "TO ('2026-04-01 00:00:00+00')")
    assert text(m.attach_partition(T, N, "date", LO, HI)) == (
        f"ALTER TABLE {QT} ATTACH PARTITION {QN} FOR VALUES FROM ('2026-03-01') TO ('2026-04-01')")
    assert text(m.drop_constraint(N, "Order Items_p2026_03_orchestrate_bounds")) == (
        f'ALTER TABLE {QN} DROP CONSTRAINT "Order Items_p2026_03_orchestrate_bounds"')
    assert text(m.CITUS_SEQUENTIAL) == "SET LOCAL citus.multi_shard_modify_mode = 'sequential'"


def test_copy_batches():
    first = m.copy_where(rng(), PK, PK_TYPES, after=False)
    later = m.copy_where(rng(), PK, PK_TYPES, after=True)
    assert text(first) == RNG
    assert text(later) == f"{RNG} AND {AFTER}"
    assert text(m.copy_window(D, PK, first)) == (
        f'WITH b AS MATERIALIZED (SELECT "id", "Line" FROM {QD} WHERE {RNG} ORDER BY "id", "Line" LIMIT %s) '
        'SELECT (SELECT count(*) FROM b), "id"::text, "Line"::text FROM b ORDER BY "id" DESC, "Line" DESC LIMIT 1')
    assert text(m.copy_window(D, PK, later)) == (
        f'WITH b AS MATERIALIZED (SELECT "id", "Line" FROM {QD} WHERE {RNG} AND {AFTER} ORDER BY "id", "Line" '
        'LIMIT %s) SELECT (SELECT count(*) FROM b), "id"::text, "Line"::text FROM b ORDER BY "id" DESC, '
        '"Line" DESC LIMIT 1')
    assert text(m.copy_batch(N, D, COLS, PK, PK_TYPES, later)) == (
        f"INSERT INTO {QN} ({WCOLS}) OVERRIDING SYSTEM VALUE SELECT {WCOLS} FROM {QD} "
        f"WHERE {RNG} AND {AFTER} AND {UPTO} ON CONFLICT DO NOTHING")


def test_retention():
    assert text(m.detach_partition(T, N)) == f"ALTER TABLE {QT} DETACH PARTITION {QN}"
    assert text(m.detach_partition(T, N, "CONCURRENTLY")) == f"ALTER TABLE {QT} DETACH PARTITION {QN} CONCURRENTLY"
    assert text(m.detach_partition(T, N, "FINALIZE")) == f"ALTER TABLE {QT} DETACH PARTITION {QN} FINALIZE"
    with pytest.raises(ValueError):
        m.detach_partition(T, N, "CASCADE")
    assert text(m.create_schema("Old Data")) == 'CREATE SCHEMA IF NOT EXISTS "Old Data"'
    assert text(m.set_schema(N, "Old Data")) == f'ALTER TABLE {QN} SET SCHEMA "Old Data"'


def test_partman_handover():
    parked = QualifiedName("app", "Order Items_handover")
    assert text(m.rename_to(D, parked.name)) == f'ALTER TABLE {QD} RENAME TO "Order Items_handover"'
    assert text(m.insert_through_parent(T, parked, COLS)) == (
        f'INSERT INTO {QT} ({WCOLS}) OVERRIDING SYSTEM VALUE SELECT {WCOLS} FROM "app"."Order Items_handover"')
    assert text(m.partman_registered("part man")) == (
        'SELECT count(*) FROM "part man"."part_config" WHERE parent_table = %s')
    call = ('SELECT "partman"."create_parent"(p_parent_table := %s::text, p_control := %s::text, '
            "p_type := %s::text, p_interval := %s::text, p_premake := %s::int")
    assert text(m.partman_create_parent("partman", no_default_table=False)) == call + ")"
    assert text(m.partman_create_parent("partman", no_default_table=True)) == call + ", p_default_table := false)"
    assert text(m.partman_retention("partman")) == (
        'UPDATE "partman"."part_config" SET retention = %s, retention_keep_table = %s, retention_schema = %s '
        "WHERE parent_table = %s")
    assert text(m.partman_config("partman")) == (
        "SELECT parent_table, control, partition_interval, premake, retention, retention_keep_table "
        'FROM "partman"."part_config" WHERE parent_table = %s')


def test_fixed_statements_take_their_values_as_parameters():
    for q in (m.RELATION_BY_NAME, m.DETACH_PENDING):
        assert text(q).endswith("WHERE n.nspname = %s AND c.relname = %s")
    assert text(m.TABLE_OWNER) == "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s"
    assert text(m.DISTRIBUTE_COLOCATED) == (
        "SELECT pg_catalog.create_distributed_table(%s::pg_catalog.regclass, %s, colocate_with => %s)")
    assert text(m.EVENTS_TABLE_EXISTS) == "SELECT pg_catalog.to_regclass('orchestrate.events') IS NOT NULL"
