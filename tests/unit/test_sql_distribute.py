"""Distributed mode's statements, rendered without a server."""

from orchestrator.distribute import _qualified
from orchestrator.sql import QualifiedName
from orchestrator.sql import distribute as d
from orchestrator.sql.compose import text

T = QualifiedName("app", "Order Items")
TWIN = QualifiedName("app", "Order Items_partitioned")


def test_create_distributed_table_takes_values_as_literals():
    assert text(d.create_distributed_table(TWIN, "Customer Id", None, None)) == (
        """SELECT pg_catalog.create_distributed_table('app."Order Items_partitioned"'::pg_catalog.regclass, """
        "'Customer Id')")
    assert text(d.create_distributed_table(TWIN, "tenant", "app.\"It's\"", 8)) == (
        """SELECT pg_catalog.create_distributed_table('app."Order Items_partitioned"'::pg_catalog.regclass, """
        """'tenant', colocate_with => 'app."It''s"', shard_count => 8)""")


def test_finalize_and_verify_statements():
    seq = QualifiedName("app", "Order Items_id_seq")
    assert text(d.owned_by(seq, T, "Id")) == (
        'ALTER SEQUENCE "app"."Order Items_id_seq" OWNED BY "app"."Order Items"."Id"')
    assert text(d.lock_share(T)) == 'LOCK TABLE ONLY "app"."Order Items" IN SHARE MODE'
    assert text(d.lock_timeout(0.2)) == "SET LOCAL lock_timeout = '200ms'"
    assert text(d.lock_timeout(0.0001)) == "SET LOCAL lock_timeout = '1ms'"  # never 0: no limit


def test_the_rendered_table_name_is_parsed_back():
    assert _qualified(str(T)) == T and _qualified(T) is T


def test_catalog_reads_are_schema_qualified():
    for q in (d.CITUS_VERSION, d.ACTIVE_WORKERS, d.ON_WORKERS, d.IS_COORDINATOR, d.HASHABLE_TYPE,
              d.DEFERRABLE_UNIQUE_COUNT, d.COLOCATION_TYPE, d.SHARD_COUNT, d.DDL_PROPAGATION, d.IS_DISTRIBUTED):
        assert "pg_catalog." in text(q)
    assert "'SELECT count(*) FROM %%s') p WHERE i.inhparent = pg_catalog.to_regclass(%s)" in text(d.SHARD_ROWS)
    assert text(d.SET_DDL_PROPAGATION) == "SELECT pg_catalog.set_config('citus.enable_ddl_propagation', %s, true)"
